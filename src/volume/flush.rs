//! FLUSH: capture the dirty table, encode it into segments, upload them in
//! parallel by conditional create (a newer owner fences the names:
//! docs/rfcs/0003), then publish the new locations. Successive flushes
//! overlap, and publish in order (volume::pipeline, docs/rfcs/0005).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures::StreamExt as _;

use super::Inner;
use super::dirty::Published;
use super::journal::Release;
use super::pipeline::Turn;
use crate::cache::ChunkData;
use crate::codec::{FrameKind, Plain};
use crate::error::{Error, Result};
use crate::store::segment::SegmentLayout;
use crate::store::{Loc, SegmentId};

/// A chunk a flush (or a collector's copy) writes.
pub(super) struct Ready {
    pub chunk: u64,
    pub generation: u64,
    pub body: Body,
}

/// What a flush writes for one chunk.
pub(super) enum Body {
    /// A zero record: the chunk is unmapped.
    Zeros,
    /// A chunk frame — of zeros too: a patch written meanwhile may lean on
    /// the chunk being mapped (docs/rfcs/0007, "Zero records").
    Chunk(ChunkData),
    /// A patch's body (`codec::patch`), and the whole chunk when the
    /// entry held it (what the memory cache may keep).
    Patch {
        body: Vec<u8>,
        chunk: Option<ChunkData>,
    },
}

impl Body {
    /// The bytes the codec compresses and encrypts (None: a zero record).
    fn raw(&self) -> Option<&[u8]> {
        match self {
            Body::Zeros => None,
            Body::Chunk(data) => Some(data),
            Body::Patch { body, .. } => Some(body),
        }
    }

    /// The chunk's content after this write, when known whole.
    fn chunk(&self) -> Option<ChunkData> {
        match self {
            Body::Zeros => None,
            Body::Chunk(data) => Some(data.clone()),
            Body::Patch { chunk, .. } => chunk.clone(),
        }
    }
}

/// Publication state, under the flush lock: flushes publish in turn
/// (volume::pipeline), a collector's copy whenever its upload ends.
pub struct FlushState {
    pub(super) segments_since_checkpoint: u64,
    /// The newest segment of ours whose entries are published. Every
    /// segment of ours below it is published too, or never will be, or is
    /// a collector's copy whose moves change no chunk's content — or, when
    /// a copy published ahead of them, belongs to a flush still in flight
    /// (the checkpoint pick checks: docs/rfcs/0005).
    pub(super) last_segment: Option<SegmentId>,
    /// Where the last checkpoint was attempted: a position names one
    /// checkpoint, written once (its key and nonce derive from it).
    pub(super) checkpointed_at: Option<SegmentId>,
}

impl FlushState {
    pub fn new(segments_since_checkpoint: u64) -> Self {
        FlushState {
            segments_since_checkpoint,
            last_segment: None,
            checkpointed_at: None,
        }
    }

    /// Segments were published (a flush's, or the collector's copies).
    pub(super) fn published(&mut self, segments: &[Written]) {
        self.segments_since_checkpoint += segments.len() as u64;
        self.last_segment = self
            .last_segment
            .into_iter()
            .chain(segments.iter().map(|w| w.id))
            .max();
    }
}

/// A segment stored: its id, object size, and the bytes of its frames
/// (what live bytes are a share of).
#[derive(Debug, Clone, Copy)]
pub(super) struct Written {
    pub id: SegmentId,
    pub bytes: u64,
    pub frames: u64,
}

/// The ids of a plan being uploaded; when the upload ends, those not
/// stored are given up (with their bytes if they were encrypted).
struct Unstored<'a> {
    log: &'a crate::store::LogStore,
    ids: Vec<SegmentId>,
    /// Encrypted and not yet known stored.
    bytes: std::collections::HashMap<SegmentId, Bytes>,
}

impl Drop for Unstored<'_> {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        let bytes = &mut self.bytes;
        self.log
            .give_up_segments(ids.into_iter().map(|id| (id, bytes.remove(&id))));
    }
}

/// Rounds a FLUSH makes at most when earlier flushes fail under it.
const FLUSH_ROUNDS: usize = 3;

/// Whether a flush made every write before it durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Covered,
    /// An earlier flush gave back what it held after this one captured.
    Overtaken,
}

/// What one flush captured, in flight until it is published; given back
/// to the dirty table if the flush fails or is dropped.
struct Flight<'a> {
    inner: &'a Inner,
    /// The capture's number (`State::capture`).
    number: u64,
    /// (chunk, generation) still held: given back on drop.
    held: Vec<(u64, u64)>,
    /// Not yet landed or given back.
    open: bool,
    journal_mark: Option<Result<u64>>,
}

/// A flush between its capture and its end. Its fields drop in this
/// order: what it holds is given back *before* its turn ends, so the next
/// turn, publishing, already sees itself overtaken (docs/rfcs/0005).
struct InFlight<'a> {
    flight: Flight<'a>,
    turn: Turn<'a>,
}

impl Flight<'_> {
    /// Publish the outcomes (under the flush lock, in turn). Covered when
    /// no flush gave anything back since this one captured: then every
    /// write before the capture is durable, and the journal segments
    /// before the mark can go.
    /// The journal segments to delete come back with it: the caller
    /// deletes them off the runtime's threads, still in turn.
    fn publish(mut self, outcomes: Option<&[Vec<Outcome>]>) -> (Round, Option<Release>) {
        let inner = self.inner;
        let mut st = inner.state.lock();
        for (chunk, generation, published, data) in outcomes.into_iter().flatten().flatten() {
            st.complete(*chunk, *generation, *published);
            if matches!(published, Published::Patch(_)) {
                inner.patches_written.fetch_add(1, Ordering::Relaxed);
            }
            if let (Some(loc), Some(data)) = (published.loc(), data) {
                inner.cache.insert(loc, data.clone());
            }
        }
        self.held.clear();
        self.open = false;
        if st.landed(self.number) {
            return (Round::Overtaken, None);
        }
        let release = match (&mut st.journal, self.journal_mark.take()) {
            (Some(j), Some(Ok(mark))) => Some(j.release_before(mark)),
            (Some(_), Some(Err(e))) => {
                tracing::warn!("journal rotation failed: {e}");
                None
            }
            _ => None,
        };
        (Round::Covered, release)
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.open {
            let held = std::mem::take(&mut self.held);
            self.inner.state.lock().give_back(self.number, held);
        }
    }
}

/// Segments of one flush encrypted ahead of their uploads, at most: a big
/// flush uploads segment i while segment i+1 is being encrypted, and its
/// memory is bounded by this many objects, not by the whole flush.
const SEGMENTS_IN_FLIGHT: usize = 4;

/// What a flush decided before encrypting anything: each captured chunk
/// (or patch) compressed (or raw, or a zero record) and placed in a
/// segment.
pub(super) struct Plan {
    captured: Vec<Ready>,
    plains: Vec<Option<Plain>>,
    /// Per segment: (index into `captured`, frame location), in layout order.
    frames: Vec<Vec<(usize, Loc)>>,
}

/// (chunk, generation, what was written, the chunk for the cache)
pub(super) type Outcome = (u64, u64, Published, Option<ChunkData>);

pub(super) fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|b| *b == 0)
}

/// Which segment each captured chunk goes to, given its frame length
/// (None: a zero record, which takes no frame bytes): as many segments as
/// the target size rounds to, filled evenly and in order — a flush of
/// 64 MiB and a little is 2 segments, not 2 full ones and a tiny third;
/// none exceeds 1.5 × the target (bar one frame). Pure: the plan is
/// unit-tested apart from encoding. Returns (segments, segment of each).
fn split_segments(lens: &[Option<usize>], target: usize) -> (usize, Vec<usize>) {
    let total: usize = lens.iter().flatten().sum();
    let target = target.max(1);
    let count = ((total + target / 2) / target).max(1);
    let per_segment = total.div_ceil(count);
    let (mut n, mut used) = (0, 0);
    let segment_of = lens
        .iter()
        .map(|len| {
            if let Some(len) = len {
                if used > 0 && used + len > per_segment && n + 1 < count {
                    n += 1;
                    used = 0;
                }
                used += len;
            }
            n
        })
        .collect();
    (count, segment_of)
}

/// Run `f` over `items` on all cores (scoped threads), keeping order.
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = super::cores();
    if threads == 1 || items.len() < 2 {
        return items.into_iter().map(&f).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut items = items.into_iter();
    loop {
        let part: Vec<T> = items.by_ref().take(per).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("encode thread"))
            .collect()
    })
}

impl Inner {
    /// Compress every captured chunk in parallel (None: a zero record).
    pub(super) fn compress(&self, captured: &[Ready]) -> Vec<Option<Plain>> {
        par_map(captured.iter().collect(), |c| match &c.body {
            Body::Chunk(data) => Some(self.codec.compress(data)),
            Body::Patch { body, .. } => Some(self.codec.compress_patch(body)),
            Body::Zeros => None,
        })
    }

    /// `compress`, off the async workers (CPU work, on all cores).
    pub(super) async fn compress_off_workers(
        self: &Arc<Self>,
        captured: Vec<Ready>,
    ) -> (Vec<Ready>, Vec<Option<Plain>>) {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let plains = this.compress(&captured);
            (captured, plains)
        })
        .await
        .expect("compress task")
    }

    /// Lay the compressed frames out evenly over as many segments as the
    /// size target rounds to, allocating their ids (frame offsets, hence
    /// nonces, are known once compressed sizes are). Cheap; no I/O.
    pub(super) fn layout(
        &self,
        captured: Vec<Ready>,
        plains: Vec<Option<Plain>>,
    ) -> Result<(Plan, Vec<SegmentLayout>, Vec<Vec<Outcome>>)> {
        let lens: Vec<Option<usize>> = plains
            .iter()
            .map(|p| p.as_ref().map(|p| self.codec.frame_len(p)))
            .collect();
        let (count, segment_of) = split_segments(&lens, self.cfg.segment_target);
        let mut layouts = Vec::with_capacity(count);
        for _ in 0..count {
            layouts.push(SegmentLayout::new(self.log.alloc_segment()?));
        }
        let mut frames = vec![Vec::new(); count];
        let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); count];
        for (i, ((c, len), plain)) in captured.iter().zip(&lens).zip(&plains).enumerate() {
            let n = segment_of[i];
            let published = match (len, plain) {
                (Some(len), Some(plain)) => {
                    let patch = plain.kind() == FrameKind::Patch;
                    let loc = layouts[n].add_frame(c.chunk, *len, patch);
                    frames[n].push((i, loc));
                    if patch {
                        Published::Patch(loc)
                    } else {
                        Published::Frame(loc)
                    }
                }
                _ => {
                    layouts[n].add_zero(c.chunk);
                    Published::Zeros
                }
            };
            outcomes[n].push((c.chunk, c.generation, published, c.body.chunk()));
        }
        let plan = Plan {
            captured,
            plains,
            frames,
        };
        Ok((plan, layouts, outcomes))
    }

    /// Build segment `n` of the plan: allocate the object once at its final
    /// size (zero-filled by calloc, no pass over it), cut it into one slot
    /// per frame, encrypt every frame in place in parallel, encrypt the table.
    fn encrypt_segment(&self, plan: &Plan, n: usize, layout: SegmentLayout) -> Bytes {
        let mut object = vec![0u8; layout.object_len()];
        let key = self.codec.frame_key(layout.id);
        let mut rest = object.as_mut_slice();
        let mut slots = Vec::with_capacity(plan.frames[n].len());
        for &(i, loc) in &plan.frames[n] {
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(loc.len as usize);
            rest = tail;
            slots.push((i, loc, out));
        }
        par_map(slots, |(i, loc, out)| {
            let c = &plan.captured[i];
            let data = c.body.raw().expect("placed chunks hold data");
            let plain = plan.plains[i].as_ref().expect("placed chunks compressed");
            self.codec
                .encrypt_into(&key, loc.offset as u64, c.chunk, data, plain, out);
        });
        layout.finish(self.log.keys(), object)
    }

    /// Put one encrypted segment, then give its frames to the SSD tier (a
    /// frame cached before the flush is acknowledged is harmless: its
    /// location is never reused, and unpublished it is never looked up).
    async fn upload(&self, id: SegmentId, bytes: Bytes, frames: Vec<Loc>) -> Result<()> {
        self.log.put_segment(id, bytes.clone()).await?;
        if let Some(disk) = &self.disk {
            for loc in frames {
                let at = loc.offset as usize;
                disk.insert(&loc, bytes[at..at + loc.len as usize].to_vec());
            }
        }
        Ok(())
    }

    /// Encrypt the planned segments one by one off the async workers
    /// while earlier ones upload. Returns each segment with its size.
    /// However it ends — an error, or dropped by a cancelled task — the ids
    /// it did not store are given up: put again later with the bytes
    /// encrypted for them, or filled with an empty segment if none were
    /// (docs/rfcs/0003).
    pub(super) async fn upload_plan(
        self: &Arc<Self>,
        plan: Plan,
        layouts: Vec<SegmentLayout>,
    ) -> Result<Vec<Written>> {
        let mut unstored = Unstored {
            log: &self.log,
            ids: layouts.iter().map(|l| l.id).collect(),
            bytes: Default::default(),
        };
        let plan = Arc::new(plan);
        let mut written = Vec::with_capacity(layouts.len());
        let mut uploads = futures::stream::FuturesUnordered::new();
        for (n, layout) in layouts.into_iter().enumerate() {
            while uploads.len() >= SEGMENTS_IN_FLIGHT {
                let id = uploads.next().await.expect("non-empty")?;
                unstored.bytes.remove(&id);
            }
            let (id, frames) = (layout.id, layout.frames_len() as u64);
            let (this, p) = (Arc::clone(self), Arc::clone(&plan));
            let bytes = tokio::task::spawn_blocking(move || this.encrypt_segment(&p, n, layout))
                .await
                .expect("encrypt task");
            written.push(Written {
                id,
                bytes: bytes.len() as u64,
                frames,
            });
            unstored.bytes.insert(id, bytes.clone());
            let frames = plan.frames[n].iter().map(|(_, loc)| *loc).collect();
            uploads.push(async move {
                self.upload(id, bytes, frames).await?;
                Ok::<SegmentId, Error>(id)
            });
        }
        while let Some(done) = uploads.next().await {
            unstored.bytes.remove(&done?);
        }
        Ok(written)
    }

    /// Make every write that completed before this call durable. Flushes
    /// overlap (docs/rfcs/0005): this one captures and uploads while
    /// earlier ones are in flight, and publishes after them. If one of
    /// those fails after this one captured, what it held is dirty again
    /// and not in this flush: go round once more (at most
    /// `FLUSH_ROUNDS` times; every round's failure is the store's, after
    /// its own retries).
    pub(super) async fn flush(self: &Arc<Self>) -> Result<()> {
        for _ in 0..FLUSH_ROUNDS {
            if self.flush_round().await? == Round::Covered {
                return Ok(());
            }
        }
        Err(Error::Store(
            crate::store::backend::StoreError::Unavailable(format!(
                "{FLUSH_ROUNDS} flushes in a row were overtaken by the failure of an earlier one"
            )),
        ))
    }

    /// One flush: capture, encode and upload, then publish in turn.
    async fn flush_round(self: &Arc<Self>) -> Result<Round> {
        let pipeline = &self.pipeline;
        let slot = pipeline.slot().await;
        // Partial chunks are read before the capture, not under the
        // allocation lock (volume::partial); one written since is read
        // below, under it.
        self.fold_all().await?;
        let (in_flight, upload) = {
            let allocating = pipeline.allocating().await;
            self.check_writable()?;
            let (flight, captured) = {
                let mut st = self.state.lock();
                let (number, captured) = st.capture();
                // Later writes go to a new journal segment; the captured
                // ones are all in the segments before it.
                let mark = (!captured.is_empty())
                    .then(|| st.journal.as_mut().map(|j| j.rotate()))
                    .flatten();
                let flight = Flight {
                    inner: self,
                    number,
                    held: captured.iter().map(|c| (c.chunk, c.generation)).collect(),
                    open: true,
                    journal_mark: mark,
                };
                (flight, captured)
            };
            // In a Host journal directory, the captured writes' records
            // are made durable before any of them can reach the bucket: a
            // power cut then never leaves the bucket ahead of what replay
            // restores (docs/rfcs/0006, point 4). Before any id is
            // allocated: a failure gives the capture back and leaks none.
            if !captured.is_empty() {
                let before = match &flight.journal_mark {
                    Some(Ok(mark)) => Some(*mark),
                    _ => None,
                };
                self.sync_journal(before).await?;
            }
            let upload = if captured.is_empty() {
                // Nothing new: wait for the flushes before, no request.
                None
            } else {
                // Segments an earlier flush failed to store go first (no
                // request when there are none), those whose window allows:
                // the window rule needs them, and their bytes are held
                // until then. Waiting here for a flush in flight would hold
                // off every capture; the PUTs above them settle the rest.
                self.log
                    .settle_segments()
                    .await
                    .map_err(|e| self.fenced_by(e))?;
                // Failing here gives everything back; if it failed for
                // good, the next flush's fold drops that chunk.
                let captured = match self.resolve_all(captured).await {
                    Ok(captured) => captured,
                    Err(e) => return Err(self.failed_for_good(e).await.unwrap_or_else(|e| e)),
                };
                let (captured, plains) = self.compress_off_workers(captured).await;
                Some(self.layout(captured, plains)?)
            };
            // Ids are allocated by the layout, and handed to the upload
            // with no await in between: a cancelled flush gives up every
            // id it allocated.
            let lowest = upload
                .as_ref()
                .and_then(|(_, l, _)| l.first().map(|l| l.id));
            let turn = pipeline.take(&allocating, slot, lowest);
            (InFlight { flight, turn }, upload)
        };
        // Encryption overlaps the uploads; stored by conditional create at
        // names a newer owner fences: when every PUT succeeded, no newer
        // owner can miss them, and no owner check is needed before the
        // acknowledgement (docs/rfcs/0003).
        let written = match upload {
            Some((plan, layouts, outcomes)) => Some((
                self.upload_plan(plan, layouts)
                    .await
                    .map_err(|e| self.fenced_by(e))?,
                outcomes,
            )),
            None => None,
        };
        in_flight.turn.wait().await;
        let mut fs = self.flush.lock().await;
        // An earlier flush may have found this writer fenced meanwhile.
        self.check_writable()?;
        let InFlight { flight, turn } = in_flight;
        let (round, release) = flight.publish(written.as_ref().map(|(_, o)| o.as_slice()));
        // Deleted in this flush's turn, so in segment order; in a Host
        // directory each deletion is synced before the next (RFC 0006, 5).
        if let Some(release) = release {
            let rest = tokio::task::spawn_blocking(move || release.run())
                .await
                .unwrap_or_default();
            if let Some(j) = self.state.lock().journal.as_mut() {
                j.deleted(rest);
            }
        }
        turn.published();
        if let Some((segments, _)) = &written {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.last_flush_unix
                .store(crate::clock::unix_now(), Ordering::Relaxed);
            fs.published(segments);
            self.gc.lock().published(segments);
            // Started in the background: the acknowledgement never waits
            // for a checkpoint (see volume::checkpoint).
            self.checkpoint_if_due(&mut fs);
        }
        drop(fs);
        drop(turn);
        Ok(round)
    }

    /// Note a fencing error: this writer stops acknowledging anything.
    pub(super) fn fenced_by(&self, e: Error) -> Error {
        if matches!(e, Error::Fenced(_)) && !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!("{e}");
        }
        e
    }
}

/// Flush in the background by size and by age, while the volume lives.
pub async fn background(inner: Weak<Inner>, wanted: Arc<tokio::sync::Notify>) {
    loop {
        // Hold no reference while waiting: the volume may go away.
        let Some(tick) = inner.upgrade().map(|i| i.cfg.flush_age / 4) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = wanted.notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let due = {
            let st = inner.state.lock();
            // A FLUSH acknowledged from a Host journal: upload now.
            inner
                .upload_wanted
                .swap(false, std::sync::atomic::Ordering::SeqCst)
                || st.dirty.bytes() >= inner.cfg.flush_bytes
                || st
                    .oldest_dirty
                    .is_some_and(|t| t.elapsed() >= inner.cfg.flush_age)
        };
        if due && let Err(e) = inner.flush().await {
            if matches!(e, Error::Fenced(_)) {
                return;
            }
            tracing::warn!("background flush failed (will retry): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_segments;

    const MIB: usize = 1 << 20;

    fn sizes(lens: &[Option<usize>], target: usize) -> Vec<usize> {
        let (count, of) = split_segments(lens, target);
        let mut out = vec![0; count];
        for (len, n) in lens.iter().zip(&of) {
            out[*n] += len.unwrap_or(0);
        }
        assert!(of.windows(2).all(|w| w[0] <= w[1]), "in order");
        out
    }

    #[test]
    fn segments_are_as_many_as_the_target_rounds_to_and_even() {
        // 64 MiB and a little, in 128 KiB frames: 2 segments, no tiny third.
        let lens = vec![Some(128 << 10); 512 + 3];
        let s = sizes(&lens, 32 * MIB);
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|b| b.abs_diff(32 * MIB) <= MIB), "{s:?}");
        // 47 MiB: one segment (rounds to 1), at most 1.5 × the target.
        assert_eq!(sizes(&vec![Some(MIB); 47], 32 * MIB), [47 * MIB]);
        // 49 MiB: two.
        assert_eq!(sizes(&vec![Some(MIB); 49], 32 * MIB).len(), 2);
        // Small flushes and zero records only: one segment.
        assert_eq!(sizes(&[Some(4096)], 32 * MIB), [4096]);
        assert_eq!(sizes(&[None, None], 32 * MIB), [0]);
    }

    #[test]
    fn zero_records_ride_with_the_segment_being_filled() {
        let mut lens = vec![Some(MIB); 64];
        lens.insert(40, None);
        let (count, of) = split_segments(&lens, 32 * MIB);
        assert_eq!(count, 2);
        assert_eq!(
            of[40], of[39],
            "the zero record goes where its neighbour went"
        );
        assert_eq!(of[0], 0);
        assert_eq!(of[64], 1);
    }
}
