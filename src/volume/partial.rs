//! Partial chunks: a write smaller than a chunk, into a chunk that is
//! neither dirty nor in the memory cache, completes without reading the
//! chunk. The dirty table holds the sectors written and which ones they
//! are (`Partial`); the rest of the chunk is its stored version, read
//! later — in the background right away, by a read that needs it, or at
//! the latest by the flush that uploads the chunk (`Inner::fold`) — or
//! never, when the flush writes a patch instead (docs/rfcs/0007).
//!
//! Why the stored version may be read *any* time later, at whatever
//! location the index names then: a partial entry is made only for a
//! chunk that is not dirty, so no flush in flight holds an older version
//! of it; from then on the chunk's index location changes only when a
//! flush publishes a version of this same entry (its stored version with
//! an earlier, smaller set of written sectors laid over it — sectors only
//! ever get added) or when a collector copies the frame (same content).
//! Laying the current sectors over any of those gives the same chunk.
//!
//! A flush uploads a partial chunk as a patch when the rules of
//! docs/rfcs/0007 allow (`patch_fits`): then its stored version is never
//! read at all (not even in the background after the write). Otherwise
//! it is read and the chunk uploaded whole.

use std::sync::Arc;

use bit_set::BitSet;

use futures::{StreamExt as _, TryStreamExt as _};

use super::Inner;
use super::SECTOR;
use super::dirty::{Captured, Content};
use super::flush::{Body, Ready};
use crate::cache::ChunkData;
use crate::codec::patch;
use crate::error::{Error, Result};
use crate::store::Mapping;
use crate::store::backend::StoreError;

const S: usize = SECTOR as usize;

/// Stored versions read at once by one fold or resolution pass, and by
/// background folds in all.
pub(super) const READS_AT_ONCE: usize = 64;

/// The most patches a flush lays over a chunk's mapping before it writes
/// the chunk whole again (docs/rfcs/0007).
pub const MAX_PATCHES: usize = 8;

/// Whether a flush writes the sectors `since` of a chunk mapped as
/// `mapping` as a patch (docs/rfcs/0007, rules 1 to 3): the chunk is
/// mapped; the sectors are at most half the chunk; the mapping has fewer
/// than `MAX_PATCHES` patches, and their frames with these sectors stay
/// within one chunk. Pure: unit-tested.
pub fn patch_fits(since: &BitSet, mapping: Option<&Mapping>, chunk_size: usize) -> bool {
    let Some(m) = mapping else { return false };
    let bytes = since.count() * S;
    bytes > 0
        && bytes <= chunk_size / 2
        && m.patches() < MAX_PATCHES
        && m.patch_bytes() + bytes as u64 <= chunk_size as u64
}

/// Sectors written into a chunk whose stored version is not in memory:
/// only those sectors are held (a page written into a 128 KiB chunk costs
/// its own bytes, not the chunk's), in the order first written.
#[derive(Clone, Debug)]
pub struct Partial {
    /// Per sector of the chunk: its place in `data` (`UNWRITTEN`: none).
    slot: Vec<u16>,
    data: Vec<u8>,
}

const UNWRITTEN: u16 = u16::MAX;

impl Partial {
    /// `bytes` written at `at` (both whole sectors) of a chunk of
    /// `chunk_size` bytes (at most 32 Mi: a slot is a u16).
    pub fn new(chunk_size: usize, at: usize, bytes: &[u8]) -> Self {
        debug_assert!(chunk_size / S < UNWRITTEN as usize);
        let mut p = Partial {
            slot: vec![UNWRITTEN; chunk_size / S],
            data: Vec::with_capacity(bytes.len()),
        };
        p.write(at, bytes);
        p
    }

    pub fn write(&mut self, at: usize, bytes: &[u8]) {
        debug_assert!(at.is_multiple_of(S) && bytes.len().is_multiple_of(S));
        for (i, sector) in bytes.chunks_exact(S).enumerate() {
            let slot = &mut self.slot[at / S + i];
            if *slot == UNWRITTEN {
                *slot = (self.data.len() / S) as u16;
                self.data.extend_from_slice(sector);
            } else {
                let at = *slot as usize * S;
                self.data[at..at + S].copy_from_slice(sector);
            }
        }
    }

    /// The chunk's size.
    pub fn chunk_size(&self) -> usize {
        self.slot.len() * S
    }

    /// Bytes it holds.
    pub fn held(&self) -> usize {
        self.data.len() + self.slot.len() * 2
    }

    /// Every sector is written: the stored version no longer matters.
    pub fn is_whole(&self) -> bool {
        self.data.len() == self.slot.len() * S
    }

    /// Sector `s`, if it is written.
    pub fn sector(&self, s: usize) -> Option<&[u8]> {
        match self.slot[s] {
            UNWRITTEN => None,
            slot => Some(&self.data[slot as usize * S..(slot as usize + 1) * S]),
        }
    }

    /// Copy `out.len()` bytes at `at` into `out` if they are all written.
    pub fn read(&self, at: usize, out: &mut [u8]) -> bool {
        let covered = (at / S..(at + out.len()).div_ceil(S)).all(|s| self.sector(s).is_some());
        if covered {
            let mut done = 0;
            while done < out.len() {
                let pos = at + done;
                let sector = self.sector(pos / S).expect("covered");
                let n = (S - pos % S).min(out.len() - done);
                out[done..done + n].copy_from_slice(&sector[pos % S..pos % S + n]);
                done += n;
            }
        }
        covered
    }

    /// The chunk: these sectors laid over its stored version (None: zeros).
    pub fn over(&self, base: Option<&[u8]>) -> Vec<u8> {
        let mut out = base.map_or_else(|| vec![0u8; self.slot.len() * S], <[u8]>::to_vec);
        for s in 0..self.slot.len() {
            if let Some(sector) = self.sector(s) {
                out[s * S..(s + 1) * S].copy_from_slice(sector);
            }
        }
        out
    }
}

impl Inner {
    /// Read the stored version of a partial chunk and make the dirty entry
    /// whole (same generation: its content does not change). Nothing to
    /// do when the chunk is no longer partial. Shares the GET with any
    /// reader of that frame.
    pub(super) async fn fold(&self, chunk: u64) -> Result<()> {
        self.fold_from(chunk).await.map_err(|(_, e)| e)
    }

    /// A partial chunk's content for a read: its sectors laid over its
    /// stored version, without making the entry whole — a fold would make
    /// it count a whole chunk against the dirty limit, unreserved, and
    /// reads of many partial chunks would take memory past the limit
    /// (docs/rfcs/0007, "The dirty limit"). The stored version stays in
    /// the memory cache for the next read. None when the chunk is no
    /// longer partial (read it from memory again).
    pub(super) async fn compose(&self, chunk: u64) -> Result<Option<Vec<u8>>> {
        let Some(mut base) = self.state.lock().partial_base(chunk) else {
            return Ok(None);
        };
        loop {
            let data = self.stored_version(chunk, base.clone()).await?;
            let st = self.state.lock();
            match st.partial_base(chunk) {
                None => return Ok(None),
                Some(now) if now == base => {
                    let Some(Content::Partial(p)) = st.dirty.get(chunk) else {
                        unreachable!("partial_base says partial");
                    };
                    return Ok(Some(p.over(data.as_deref().map(|d| d.as_slice()))));
                }
                // Published meanwhile: read where it is now.
                Some(now) => base = now,
            }
        }
    }

    /// A chunk's stored version at `base` (None: it reads as zeros).
    async fn stored_version(&self, chunk: u64, base: Option<Mapping>) -> Result<Option<ChunkData>> {
        match base {
            Some(m) => Ok(Some(self.load(chunk, &m).await?)),
            None => Ok(None),
        }
    }

    /// Whether a flush would read `chunk`'s stored version to upload the
    /// sectors `since` (it would not for a patch).
    pub(super) fn needs_base(&self, since: &BitSet, mapping: Option<&Mapping>) -> bool {
        !patch_fits(since, mapping, self.chunk_size)
    }

    /// Note writes up to `generation` as dropped, for the first FLUSH
    /// that covers them to report (`Volume::flush`).
    pub(super) fn note_dropped(&self, generation: u64, what: String) {
        tracing::error!("acknowledged writes dropped: {what}");
        self.dropped.lock().push((generation, what));
    }

    /// `fold`; a failure says which mapping failed to read.
    async fn fold_from(&self, chunk: u64) -> std::result::Result<(), (Option<Mapping>, Error)> {
        let Some(mut base) = self.state.lock().partial_base(chunk) else {
            return Ok(());
        };
        loop {
            let data = self
                .stored_version(chunk, base.clone())
                .await
                .map_err(|e| (base.clone(), e))?;
            match self
                .state
                .lock()
                .fold(chunk, base.clone(), data.as_deref().map(|d| d.as_slice()))
            {
                Ok(()) => return Ok(()),
                // Published meanwhile (a flush of an earlier version of the
                // entry): read where it is now.
                Err(moved) => base = moved,
            }
        }
    }

    /// Fold a partial chunk in the background (right after its write), at
    /// most `READS_AT_ONCE` at a time.
    pub(super) fn fold_later(self: &Arc<Self>, chunk: u64) {
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            let Ok(_permit) = this.fold_permits.acquire().await else {
                return;
            };
            match this.fold(chunk).await {
                Ok(()) => {}
                Err(e @ Error::Integrity(_)) => tracing::error!(
                    "chunk {chunk}: its stored version cannot be read ({e}); the writes into it \
                     since the last FLUSH will be dropped, and the FLUSH that covers them fails"
                ),
                Err(e) => tracing::debug!("reading chunk {chunk}'s stored version failed: {e}"),
            }
        });
    }

    /// Fold every partial chunk a flush would read (one it would not write
    /// as a patch), `READS_AT_ONCE` at a time (a flush does this before
    /// it captures, so that it does not read while holding off other
    /// flushes). A chunk whose stored version cannot be read for good is
    /// dropped from the dirty table, and noted in `dropped` for the next
    /// FLUSH to report. Any other failure fails the whole fold.
    pub(super) async fn fold_all(&self) -> Result<()> {
        let partial = (self.state.lock()).partial_chunks(|since, m| self.needs_base(since, m));
        let failed: Vec<(u64, Option<Mapping>, Error)> = futures::stream::iter(partial)
            .map(|chunk| async move {
                self.fold_from(chunk)
                    .await
                    .err()
                    .map(|(b, e)| (chunk, b, e))
            })
            .buffer_unordered(READS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        for (chunk, base, e) in failed {
            let e = self.failed_for_good(e).await?;
            // Noted for the next FLUSH in the same critical section: a
            // FLUSH that no longer finds the entry finds the note.
            let mut st = self.state.lock();
            if let Some(generation) = st.drop_unreadable(chunk, base) {
                self.note_dropped(generation, format!("chunk {chunk} ({e})"));
            }
        }
        Ok(())
    }

    /// Whether reading a stored version failed for good: it failed
    /// authentication, or it is gone while this writer still owns the
    /// volume. `Err` with the error to fail with instead: the store's
    /// (it may pass), or fenced — a newer owner may have collected it,
    /// and being fenced is what the flush would have found anyway.
    pub(super) async fn failed_for_good(&self, e: Error) -> Result<Error> {
        match e {
            Error::Integrity(_) => Ok(e),
            Error::Store(StoreError::NotFound(_)) => match self.log.fence().check_owner().await {
                Ok(()) => Ok(e),
                Err(fenced @ Error::Fenced(_)) => Err(self.fenced_by(fenced)),
                Err(_) => Err(e),
            },
            e => Err(e),
        }
    }

    /// What a flush writes for each chunk it captured: a patch when the
    /// rules allow (`patch_fits`, against the mapping now) and no failed
    /// flush asked for the chunk whole (`State::must_rewrite`); else the
    /// whole chunk — a partial one (written after `fold_all`, or whose fold
    /// failed) laid over its stored version, read now; or a zero record,
    /// only for zeros that do not sit on the stored version.
    pub(super) async fn resolve_all(&self, captured: Vec<Captured>) -> Result<Vec<Ready>> {
        futures::stream::iter(captured)
            .map(|c| async move {
                let (mapping, rewrite) = {
                    let st = self.state.lock();
                    (st.index.get(c.chunk), st.must_rewrite(c.chunk))
                };
                let patch = (c.since_stored.as_ref()).filter(|since| {
                    !rewrite && patch_fits(since, mapping.as_ref(), self.chunk_size)
                });
                let body = match (c.content, patch) {
                    (Content::Zeros, _) => Body::Zeros,
                    // Zeros over the stored version are a frame: a flush in
                    // flight may patch the chunk as mapped (RFC 0007).
                    (Content::Whole(data), None)
                        if c.since_stored.is_none() && super::flush::is_zero(&data) =>
                    {
                        Body::Zeros
                    }
                    (Content::Whole(data), Some(since)) => Body::Patch {
                        body: patch::encode_chunk(&data, since),
                        chunk: Some(data),
                    },
                    (Content::Partial(p), Some(since)) => Body::Patch {
                        body: patch::encode(since, p.slot.len(), |s| {
                            p.sector(s).expect("since_stored holds written sectors")
                        }),
                        chunk: None,
                    },
                    (Content::Whole(data), None) => Body::Chunk(data),
                    (Content::Partial(p), None) => {
                        let data = self.stored_version(c.chunk, mapping).await?;
                        Body::Chunk(Arc::new(p.over(data.as_deref().map(|d| d.as_slice()))))
                    }
                };
                Ok::<_, Error>(Ready {
                    chunk: c.chunk,
                    generation: c.generation,
                    body,
                })
            })
            .buffered(READS_AT_ONCE)
            .try_collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_sectors_lay_over_the_stored_version() {
        let mut p = Partial::new(4 * S, S, &[1u8; S]);
        assert!(!p.is_whole());
        assert_eq!(p.held(), S + 8, "the written sector and its slots");
        let mut out = [0u8; S];
        assert!(p.read(S, &mut out));
        assert_eq!(out, [1u8; S]);
        assert!(!p.read(0, &mut [0u8; 2 * S]), "sector 0 is not written");
        p.write(3 * S, &[3u8; S]);
        let base: Vec<u8> = (0..4 * S).map(|i| (i / S) as u8 + 10).collect();
        let out = p.over(Some(&base));
        assert_eq!(&out[..S], &base[..S]);
        assert_eq!(&out[S..2 * S], &[1u8; S]);
        assert_eq!(&out[2 * S..3 * S], &base[2 * S..3 * S]);
        assert_eq!(&out[3 * S..], &[3u8; S]);
        assert_eq!(p.over(None)[..S], [0u8; S], "no stored version: zeros");
        // A later write over a written sector replaces it.
        p.write(S, &[7u8; S]);
        assert_eq!(&p.over(Some(&base))[S..2 * S], &[7u8; S]);
        p.write(0, &[0u8; S]);
        p.write(2 * S, &[2u8; S]);
        assert!(p.is_whole());
        assert_eq!(p.over(Some(&base)), p.over(None));
        assert_eq!(p.held(), 4 * S + 8, "a rewritten sector takes no more room");
    }

    #[test]
    fn reads_round_out_to_sectors_and_cross_them() {
        let mut p = Partial::new(8 * S, 3 * S, &[8u8; S]);
        p.write(2 * S, &[9u8; S]); // written after, placed before
        let mut two = [0u8; 2 * S];
        assert!(p.read(2 * S, &mut two));
        assert_eq!((&two[..S], &two[S..]), (&[9u8; S][..], &[8u8; S][..]));
        let mut across = [0u8; 10];
        assert!(p.read(3 * S - 5, &mut across), "across two written sectors");
        assert_eq!(across, [9, 9, 9, 9, 9, 8, 8, 8, 8, 8]);
        assert!(
            p.read(2 * S + 100, &mut [0u8; 10]),
            "inside one written sector"
        );
        assert!(!p.read(2 * S, &mut [0u8; 3 * S]));
        assert!(!p.read(S, &mut [0u8; S + 1]));
    }

    use crate::store::backend::{DynStore, MemoryStore};
    use crate::store::{Loc, paths};
    use crate::volume::Volume;
    use bit_set::BitSet;

    /// Open the 4 KiB-chunk volume in `store` as its writer (cold caches).
    async fn reopen(store: &DynStore) -> Volume {
        use crate::store::{OpenMode, WriterOptions};
        use crate::volume::{OpenOptions, VolumeConfig};
        let opts = OpenOptions {
            mode: OpenMode::Writer(WriterOptions::default()),
        };
        let secret = crate::store::keys::Secret::key_file(vec![7u8; 32]).expect("32 bytes");
        Volume::open(store.clone(), &secret, opts, VolumeConfig::default())
            .await
            .unwrap()
    }

    /// A new volume in `store` whose chunk 0 holds ones, closed; where.
    async fn chunk_zero_stored(store: &DynStore) -> Loc {
        let mut params = crate::store::CreateParams::new(1 << 20);
        params.chunk_size = 4096;
        let secret = crate::store::keys::Secret::key_file(vec![7u8; 32]).expect("32 bytes");
        Volume::create(store, &params, &secret, false)
            .await
            .unwrap();
        let vol = reopen(store).await;
        vol.write(0, &[1u8; 4096]).await.unwrap();
        vol.flush().await.unwrap();
        let loc = vol.index_snapshot().get(0).unwrap().last();
        vol.close().await.unwrap();
        loc
    }

    /// What a flush writes for each captured chunk: a patch of the sectors
    /// written since the stored version when the rules allow — without
    /// reading it; else the whole chunk, a partial one laid over its
    /// stored version (read now) or over zeros when there is none.
    #[tokio::test]
    async fn a_captured_chunk_resolves_to_a_patch_or_a_whole_chunk() {
        let store: DynStore = Arc::new(MemoryStore::new());
        chunk_zero_stored(&store).await;
        let vol = reopen(&store).await;
        let partial =
            |len: usize| Content::Partial(Arc::new(Partial::new(4096, 512, &vec![2u8; len])));
        let captured = |chunk, content, since: Option<BitSet>| Captured {
            chunk,
            generation: 5,
            content,
            since_stored: since,
        };
        let one = || Some(super::super::dirty::sectors(512, 512));
        let five = || Some(super::super::dirty::sectors(512, 2560));
        let whole = || Content::Whole(Arc::new(vec![3u8; 4096]));
        let gets = || vol.inner.log.request_stats().ranged_get;
        let before = gets();
        let mut ready = vol
            .inner
            .resolve_all(vec![
                captured(0, partial(512), one()),
                captured(0, whole(), one()),
            ])
            .await
            .unwrap();
        assert_eq!(gets(), before, "patches read nothing");
        ready.extend(
            vol.inner
                .resolve_all(vec![
                    captured(0, partial(2560), five()),
                    captured(0, partial(512), None),
                    captured(0, whole(), None),
                    captured(1, partial(512), one()),
                    captured(2, Content::Zeros, None),
                ])
                .await
                .unwrap(),
        );
        assert_eq!(
            gets(),
            before + 1,
            "the stored chunk read once (then cached)"
        );
        ready.swap(1, 2); // back in the order the cases are checked
        ready.swap(2, 3);
        let patch_of =
            |data: &[u8], since: Option<BitSet>| patch::encode_chunk(data, since.as_ref().unwrap());
        let mut two = vec![1u8; 4096];
        two[512..1024].fill(2);
        match &ready[0].body {
            Body::Patch { body, chunk: None } => assert_eq!(body, &patch_of(&two, one())),
            _ => panic!("one sector of a stored chunk: a patch, no chunk to cache"),
        }
        let mut over = vec![1u8; 4096];
        over[512..3072].fill(2);
        assert!(
            matches!(&ready[1].body, Body::Chunk(d) if **d == over),
            "over half"
        );
        assert!(
            matches!(&ready[2].body, Body::Chunk(d) if **d == two),
            "unknown since"
        );
        match &ready[3].body {
            Body::Patch {
                body,
                chunk: Some(c),
            } => {
                assert_eq!(body, &patch_of(&[3u8; 4096], one()));
                assert_eq!(**c, [3u8; 4096]);
            }
            _ => panic!("a whole entry with known sectors: a patch"),
        }
        assert!(matches!(&ready[4].body, Body::Chunk(d) if **d == [3u8; 4096]));
        let mut unmapped = vec![0u8; 4096];
        unmapped[512..1024].fill(2);
        assert!(
            matches!(&ready[5].body, Body::Chunk(d) if **d == unmapped),
            "no patch over an unmapped chunk"
        );
        assert!(matches!(ready[6].body, Body::Zeros));
        assert_eq!((ready[0].chunk, ready[0].generation), (0, 5));
        // Zeros: a zero record only when they do not sit on the stored
        // version; over it, a frame (a patch in flight may lean on the
        // chunk being mapped: RFC 0007, "Zero records").
        let zeros = || Content::Whole(Arc::new(vec![0u8; 4096]));
        let ready = vol
            .inner
            .resolve_all(vec![
                captured(0, zeros(), None),
                captured(0, zeros(), Some((0..8).collect())),
            ])
            .await
            .unwrap();
        assert!(matches!(ready[0].body, Body::Zeros));
        assert!(matches!(&ready[1].body, Body::Chunk(d) if super::super::flush::is_zero(d)));
        // A chunk a failed flush held is written whole until a chunk frame
        // of it is published, then patched again (RFC 0007, "Failed
        // flushes").
        vol.inner.state.lock().give_back(0, [(0, 5)]);
        for (want_patch, then_publish) in [(false, false), (false, true), (true, false)] {
            let ready = vol
                .inner
                .resolve_all(vec![captured(0, whole(), one())])
                .await
                .unwrap();
            assert_eq!(matches!(ready[0].body, Body::Patch { .. }), want_patch);
            if then_publish {
                let mut st = vol.inner.state.lock();
                let frame = st.index.get(0).unwrap().last();
                st.complete(0, 0, super::super::dirty::Published::Frame(frame));
            }
        }
        vol.close().await.unwrap();
    }

    /// The rules of docs/rfcs/0007: mapped, at most half the chunk, fewer
    /// than `MAX_PATCHES` patches whose frames with this one fit a chunk.
    #[test]
    fn a_patch_fits_only_within_its_bounds() {
        let loc = |offset, len| Loc {
            segment: crate::store::SegmentId { epoch: 1, seq: 1 },
            offset,
            len,
        };
        let cs = 64 * S;
        let some = |n: usize| (0..n).collect::<BitSet>();
        let base = Mapping::Frame(loc(0, 1000));
        assert!(patch_fits(&some(1), Some(&base), cs));
        assert!(patch_fits(&some(32), Some(&base), cs), "half");
        assert!(!patch_fits(&some(33), Some(&base), cs), "over half");
        assert!(!patch_fits(&some(1), None, cs), "unmapped");
        assert!(
            !patch_fits(&BitSet::new(), Some(&base), cs),
            "nothing written"
        );
        let mut m = base.clone();
        for i in 0..MAX_PATCHES as u32 - 1 {
            m = m.with_patch(loc(1000 + i, 600));
        }
        assert!(patch_fits(&some(1), Some(&m), cs), "one below the most");
        assert!(!patch_fits(
            &some(1),
            Some(&m.with_patch(loc(9000, 600))),
            cs
        ));
        // Patches' frames plus these sectors: at most a chunk.
        let big = base.with_patch(loc(1000, (cs - 4 * S) as u32));
        assert!(patch_fits(&some(4), Some(&big), cs));
        assert!(!patch_fits(&some(5), Some(&big), cs));
    }

    /// A dropped write is reported by a FLUSH that covers it — one that
    /// started after it — not by one that started before it and happened
    /// to finish after the drop (the review's interleaving: a FUA's flush
    /// in flight, then the write, then another flush drops it).
    #[tokio::test]
    async fn a_dropped_write_is_reported_by_a_flush_that_covers_it() {
        let mem = MemoryStore::new();
        let store: DynStore = Arc::new(mem.clone());
        let loc = chunk_zero_stored(&store).await;
        {
            let objects = mem.raw_objects();
            let mut objects = objects.lock();
            let object = objects.get_mut(&paths::segment(loc.segment)).unwrap();
            let mut bytes = object.to_vec();
            bytes[loc.offset as usize + 3] ^= 1;
            *object = bytes::Bytes::from(bytes);
        }
        let vol = reopen(&store).await;
        let earlier_flush_covers = vol.inner.state.lock().generation();
        // More than half the chunk: not a patch, the flush must read it.
        vol.write(512, &[2u8; 2560]).await.unwrap();
        vol.inner.flush().await.unwrap(); // drops it, notes it
        assert!(
            vol.inner.take_dropped(earlier_flush_covers).is_ok(),
            "a FLUSH that started before the write does not take its report"
        );
        assert!(matches!(vol.flush().await, Err(Error::WritesDropped(_))));
        vol.flush().await.expect("reported once");
    }
}
