//! Partial chunks: a write smaller than a chunk, into a chunk that is
//! neither dirty nor in the memory cache, completes without reading the
//! chunk. The dirty table holds the sectors written and which ones they
//! are (`Partial`); the rest of the chunk is its stored version, read
//! later — in the background right away, by a read that needs it, or at
//! the latest by the flush that uploads the chunk (`Inner::fold`).
//!
//! Why the stored version may be read *any* time later, at whatever
//! location the index names then: a partial entry is made only for a
//! chunk that is not dirty, so no flush in flight holds an older version
//! of it; from then on the chunk's index location changes only when a
//! flush publishes a version of this same entry (its stored version with
//! an earlier, smaller set of written sectors laid over it — sectors only
//! ever get added) or when a collector copies the frame (same content).
//! Laying the current sectors over any of those gives the same chunk.
//! Every flush still uploads whole chunks: crash semantics stay per chunk.

use std::sync::Arc;

use bit_set::BitSet;

use futures::{StreamExt as _, TryStreamExt as _};

use super::Inner;
use super::SECTOR;
use super::dirty::{Captured, Content};
use super::flush::Ready;
use crate::cache::ChunkData;
use crate::error::{Error, Result};
use crate::store::Loc;
use crate::store::backend::StoreError;

const S: usize = SECTOR as usize;

/// Stored versions read at once by one fold or resolution pass, and by
/// background folds in all.
pub(super) const READS_AT_ONCE: usize = 64;

/// Sectors written into a chunk whose stored version is not in memory.
/// Sectors not written hold zeros here.
#[derive(Clone, Debug)]
pub struct Partial {
    data: Vec<u8>,
    written: BitSet,
}

impl Partial {
    /// `bytes` written at `at` (both whole sectors) of a chunk of
    /// `chunk_size` bytes.
    pub fn new(chunk_size: usize, at: usize, bytes: &[u8]) -> Self {
        let mut p = Partial {
            data: vec![0u8; chunk_size],
            written: BitSet::with_capacity(chunk_size / S),
        };
        p.write(at, bytes);
        p
    }

    pub fn write(&mut self, at: usize, bytes: &[u8]) {
        debug_assert!(at.is_multiple_of(S) && bytes.len().is_multiple_of(S));
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
        for s in at / S..(at + bytes.len()) / S {
            self.written.insert(s);
        }
    }

    /// Every sector is written: the stored version no longer matters.
    pub fn is_whole(&self) -> bool {
        self.written.count() == self.data.len() / S
    }

    /// Whether `at..at + len` is all written (then it reads from here).
    pub fn covers(&self, at: usize, len: usize) -> bool {
        (at / S..(at + len).div_ceil(S)).all(|s| self.written.contains(s))
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The chunk: these sectors laid over its stored version (None: zeros).
    pub fn over(&self, base: Option<&[u8]>) -> Vec<u8> {
        let mut out = self.data.clone();
        if let Some(base) = base {
            for s in (0..self.data.len() / S).filter(|s| !self.written.contains(*s)) {
                out[s * S..(s + 1) * S].copy_from_slice(&base[s * S..(s + 1) * S]);
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

    /// A chunk's stored version at `base` (None: it reads as zeros).
    async fn stored_version(&self, chunk: u64, base: Option<Loc>) -> Result<Option<ChunkData>> {
        match base {
            Some(loc) => Ok(Some(self.load(chunk, loc).await?)),
            None => Ok(None),
        }
    }

    /// Note writes up to `generation` as dropped, for the first FLUSH
    /// that covers them to report (`Volume::flush`).
    pub(super) fn note_dropped(&self, generation: u64, what: String) {
        tracing::error!("acknowledged writes dropped: {what}");
        self.dropped.lock().push((generation, what));
    }

    /// `fold`; a failure says which location failed to read.
    async fn fold_from(&self, chunk: u64) -> std::result::Result<(), (Option<Loc>, Error)> {
        let Some(mut base) = self.state.lock().partial_base(chunk) else {
            return Ok(());
        };
        loop {
            let data = self
                .stored_version(chunk, base)
                .await
                .map_err(|e| (base, e))?;
            match self
                .state
                .lock()
                .fold(chunk, base, data.as_deref().map(|d| d.as_slice()))
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

    /// Fold every partial chunk, `READS_AT_ONCE` at a time (a flush does
    /// this before it captures, so that it does not read while holding
    /// off other flushes). A chunk whose stored version cannot be read for
    /// good is dropped from the dirty table, and noted in `dropped` for
    /// the next FLUSH to report. Any other failure fails the whole fold.
    pub(super) async fn fold_all(&self) -> Result<()> {
        let partial = self.state.lock().partial_chunks();
        let failed: Vec<(u64, Option<Loc>, Error)> = futures::stream::iter(partial)
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

    /// What a flush captured, as whole chunks: a partial one (written
    /// after `fold_all`, or whose fold failed) laid over its stored
    /// version, read now.
    pub(super) async fn resolve_all(&self, captured: Vec<Captured>) -> Result<Vec<Ready>> {
        futures::stream::iter(captured)
            .map(|c| async move {
                let data = match c.content {
                    Content::Zeros => None,
                    Content::Whole(data) => Some(data),
                    Content::Partial(p) => {
                        let base = self.state.lock().index.get(c.chunk);
                        let data = self.stored_version(c.chunk, base).await?;
                        Some(Arc::new(p.over(data.as_deref().map(|d| d.as_slice()))))
                    }
                };
                Ok::<_, Error>(Ready {
                    chunk: c.chunk,
                    generation: c.generation,
                    data,
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
        assert!(p.covers(S, S));
        assert!(!p.covers(0, 2 * S), "sector 0 is not written");
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
        assert_eq!(p.over(Some(&base)), p.data());
    }

    #[test]
    fn covers_rounds_out_to_sectors() {
        let p = Partial::new(8 * S, 2 * S, &[9u8; 2 * S]);
        assert!(p.covers(2 * S, 2 * S));
        assert!(p.covers(2 * S + 100, 10), "inside one written sector");
        assert!(!p.covers(2 * S, 3 * S));
        assert!(!p.covers(S, S + 1));
    }

    use crate::store::backend::{DynStore, MemoryStore};
    use crate::store::{Loc, paths};
    use crate::volume::Volume;

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
        let loc = vol.index_snapshot().get(0).unwrap();
        vol.close().await.unwrap();
        loc
    }

    /// A partial chunk captured by a flush is uploaded whole: its sectors
    /// over the stored version (read now), or over zeros when there is
    /// none; other contents pass as they are.
    #[tokio::test]
    async fn a_captured_partial_chunk_resolves_over_its_stored_version() {
        let store: DynStore = Arc::new(MemoryStore::new());
        chunk_zero_stored(&store).await;
        let vol = reopen(&store).await;
        let partial = || Content::Partial(Arc::new(Partial::new(4096, 512, &[2u8; 512])));
        let captured = vec![
            Captured {
                chunk: 0,
                generation: 5,
                content: partial(),
            },
            Captured {
                chunk: 1,
                generation: 6,
                content: partial(),
            },
            Captured {
                chunk: 2,
                generation: 7,
                content: Content::Zeros,
            },
        ];
        let ready = vol.inner.resolve_all(captured).await.unwrap();
        let mut stored = vec![1u8; 4096];
        stored[512..1024].fill(2);
        let mut unmapped = vec![0u8; 4096];
        unmapped[512..1024].fill(2);
        assert_eq!(ready[0].data.as_deref(), Some(&stored));
        assert_eq!((ready[0].chunk, ready[0].generation), (0, 5));
        assert_eq!(ready[1].data.as_deref(), Some(&unmapped));
        assert!(ready[2].data.is_none());
        vol.close().await.unwrap();
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
        vol.write(512, &[2u8; 512]).await.unwrap();
        vol.inner.flush().await.unwrap(); // drops it, notes it
        assert!(
            vol.inner.take_dropped(earlier_flush_covers).is_ok(),
            "a FLUSH that started before the write does not take its report"
        );
        assert!(matches!(vol.flush().await, Err(Error::WritesDropped(_))));
        vol.flush().await.expect("reported once");
    }
}
