//! FLUSH: capture the dirty table, encode it into segments, upload them in
//! parallel, confirm ownership, then publish the new locations.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::Inner;
use super::dirty::Captured;
use crate::cache::ChunkData;
use crate::codec::Plain;
use crate::error::{Error, Result};
use crate::store::segment::SegmentLayout;
use crate::store::{Loc, SegmentId};

/// Serialized by the flush mutex: one flush at a time, in log order.
pub struct FlushState {
    segments_since_checkpoint: u64,
    last_segment: Option<SegmentId>,
}

impl FlushState {
    pub fn new(segments_since_checkpoint: u64) -> Self {
        FlushState {
            segments_since_checkpoint,
            last_segment: None,
        }
    }
}

type Result4 = (u64, u64, Option<Loc>, Option<ChunkData>);

/// One encoded segment and what it makes durable.
struct Encoded {
    id: SegmentId,
    bytes: Bytes,
    /// (chunk, generation, new location, data for the cache)
    results: Vec<Result4>,
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|b| *b == 0)
}

/// Run `f` over `items` on all cores (scoped threads), keeping order.
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
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

/// A frame to encrypt: its segment (index), place, chunk and buffer slot.
struct Slot<'a> {
    segment: usize,
    loc: Loc,
    captured: &'a Captured,
    plain: &'a Plain,
    out: &'a mut [u8],
}

impl Inner {
    /// Encode captured chunks into as few segments as the size target
    /// allows: compress in parallel, lay the segments out (offsets are
    /// known once sizes are), allocate each object once, then encrypt
    /// every frame in place inside it, in parallel. Peak memory is the
    /// captured data plus the objects (and the small zstd outputs).
    fn encode(&self, captured: &[Captured]) -> Result<Vec<Encoded>> {
        let plains: Vec<Option<Plain>> =
            par_map(captured.iter().collect(), |c| match c.data.as_deref() {
                Some(data) if !is_zero(data) => Some(self.codec.compress(data)),
                _ => None,
            });
        let mut layouts = vec![SegmentLayout::new(self.log.alloc_segment()?)];
        let mut results: Vec<Vec<Result4>> = vec![Vec::new()];
        let mut placed = Vec::with_capacity(captured.len());
        for (c, plain) in captured.iter().zip(&plains) {
            let loc = match plain {
                Some(p) => {
                    let len = self.codec.frame_len(p);
                    let used = layouts.last().expect("one at least").frames_len();
                    if used > 0 && used + len > self.cfg.segment_target {
                        layouts.push(SegmentLayout::new(self.log.alloc_segment()?));
                        results.push(Vec::new());
                    }
                    let loc = layouts.last_mut().expect("one").add_frame(c.chunk, len);
                    placed.push((layouts.len() - 1, loc, c, p));
                    Some(loc)
                }
                None => {
                    layouts.last_mut().expect("one").add_zero(c.chunk);
                    None
                }
            };
            let last = results.last_mut().expect("one per layout");
            last.push((c.chunk, c.generation, loc, c.data.clone()));
        }
        // One zero-filled buffer per object (calloc: no pass over it), cut
        // into one slot per frame, in layout order.
        let mut objects: Vec<Vec<u8>> = layouts.iter().map(|l| vec![0u8; l.object_len()]).collect();
        let keys: Vec<_> = layouts.iter().map(|l| self.codec.frame_key(l.id)).collect();
        let mut rest: Vec<&mut [u8]> = objects.iter_mut().map(|o| o.as_mut_slice()).collect();
        let mut slots = Vec::with_capacity(placed.len());
        for (segment, loc, captured, plain) in placed {
            let (out, tail) = std::mem::take(&mut rest[segment]).split_at_mut(loc.len as usize);
            rest[segment] = tail;
            slots.push(Slot {
                segment,
                loc,
                captured,
                plain,
                out,
            });
        }
        par_map(slots, |s| {
            let data = s.captured.data.as_deref().expect("placed chunks hold data");
            self.codec.seal_into(
                &keys[s.segment],
                s.loc.offset as u64,
                s.captured.chunk,
                data,
                s.plain,
                s.out,
            );
        });
        Ok(layouts
            .into_iter()
            .zip(objects)
            .zip(results)
            .map(|((layout, object), results)| Encoded {
                id: layout.id,
                bytes: layout.finish(self.log.keys(), object),
                results,
            })
            .collect())
    }

    async fn encode_off_runtime(self: &Arc<Self>, captured: Vec<Captured>) -> Result<Vec<Encoded>> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.encode(&captured))
            .await
            .expect("encode task")
    }

    pub(super) async fn flush(self: &Arc<Self>) -> Result<()> {
        let mut fs = self.flush.lock().await;
        self.check_writable()?;
        let (captured, journal_mark) = {
            let mut st = self.state.lock();
            let captured = st.capture();
            if captured.is_empty() {
                // Every earlier write was acknowledged by an earlier flush
                // that also confirmed ownership: nothing to do, no request.
                return Ok(());
            }
            // Later writes go to a new journal segment; the captured ones
            // are all in the segments before it.
            let id = self.log.keys().volume_id;
            let mark = st.journal.as_mut().map(|j| j.rotate(&id));
            (captured, mark)
        };
        // Compression and encryption are CPU work: off the async workers,
        // on all cores.
        let encoded = self.encode_off_runtime(captured).await?;
        let uploads = encoded
            .iter()
            .map(|e| self.log.put_segment(e.id, e.bytes.clone()));
        futures::future::try_join_all(uploads).await?;
        if let Err(e) = self.log.check_owner().await {
            if matches!(e, Error::Fenced(_)) {
                self.fenced.store(true, Ordering::SeqCst);
                tracing::error!("{e}");
            }
            return Err(e);
        }
        {
            let mut st = self.state.lock();
            for e in &encoded {
                for (chunk, generation, loc, data) in &e.results {
                    st.complete(*chunk, *generation, *loc);
                    if let (Some(loc), Some(data)) = (loc, data) {
                        self.cache.insert(*loc, data.clone());
                    }
                }
            }
            match (&mut st.journal, journal_mark) {
                (Some(j), Some(Ok(mark))) => j.release_before(mark),
                (Some(_), Some(Err(e))) => tracing::warn!("journal rotation failed: {e}"),
                _ => {}
            }
        }
        // Fill the SSD tier with the new frames, outside the state lock.
        if let Some(disk) = &self.disk {
            for e in &encoded {
                for loc in e.results.iter().filter_map(|r| r.2) {
                    let at = loc.offset as usize;
                    disk.insert(&loc, e.bytes[at..at + loc.len as usize].to_vec());
                }
            }
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.last_flush_unix
            .store(crate::store::fencing::unix_now(), Ordering::Relaxed);
        fs.segments_since_checkpoint += encoded.len() as u64;
        fs.last_segment = encoded.last().map(|e| e.id);
        if fs.segments_since_checkpoint >= self.cfg.checkpoint_every {
            // Durability does not depend on checkpoints; a failed one is
            // retried after the next flush.
            match self.write_checkpoint(&mut fs).await {
                Ok(()) => {}
                Err(e) => tracing::warn!("checkpoint failed (will retry): {e}"),
            }
        }
        Ok(())
    }

    async fn write_checkpoint(&self, fs: &mut FlushState) -> Result<()> {
        let Some(position) = fs.last_segment else {
            return Ok(());
        };
        let index = self.state.lock().index.clone();
        self.log.put_checkpoint(position, index).await?;
        fs.segments_since_checkpoint = 0;
        Ok(())
    }

    /// Checkpoint if anything was written since the last one.
    pub(super) async fn checkpoint_now(&self) -> Result<()> {
        let mut fs = self.flush.lock().await;
        if fs.segments_since_checkpoint > 0 {
            self.write_checkpoint(&mut fs).await?;
        }
        Ok(())
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
            st.dirty.bytes() >= inner.cfg.flush_bytes
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
