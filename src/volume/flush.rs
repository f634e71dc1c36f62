//! FLUSH: capture the dirty table, encode it into segments, upload them in
//! parallel, confirm ownership, then publish the new locations.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::Inner;
use super::dirty::Captured;
use crate::cache::ChunkData;
use crate::error::{Error, Result};
use crate::store::segment::SegmentBuilder;
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
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || items.len() < 2 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("encode thread"))
            .collect()
    })
}

/// Where one captured chunk goes: its segment (index into the layout) and
/// frame offset, or a zero record.
struct Placement {
    segment: usize,
    offset: Option<u64>,
}

impl Inner {
    /// Encode captured chunks into as few segments as the size target
    /// allows: compress in parallel, lay the frames out (offsets are known
    /// once sizes are), then encrypt in parallel and assemble.
    fn encode(&self, captured: &[Captured]) -> Result<Vec<Encoded>> {
        let plains: Vec<Option<Vec<u8>>> = par_map(captured, |c| match c.data.as_deref() {
            Some(data) if !is_zero(data) => Some(self.codec.compress(data)),
            _ => None,
        });
        let mut ids = vec![self.log.alloc_segment()?];
        let mut size = 0usize;
        let mut placements = Vec::with_capacity(captured.len());
        for plain in &plains {
            let offset = match plain {
                Some(p) => {
                    let len = crate::codec::Codec::sealed_len(p);
                    if size > 0 && size + len > self.cfg.segment_target {
                        ids.push(self.log.alloc_segment()?);
                        size = 0;
                    }
                    size += len;
                    Some((size - len) as u64)
                }
                None => None,
            };
            placements.push(Placement {
                segment: ids.len() - 1,
                offset,
            });
        }
        let keys: Vec<_> = ids.iter().map(|id| self.codec.frame_key(*id)).collect();
        let work: Vec<(usize, &Placement)> = placements.iter().enumerate().collect();
        let frames: Vec<Option<Vec<u8>>> = par_map(&work, |(i, p)| {
            let plain = plains[*i].as_ref()?;
            Some(
                self.codec
                    .seal(&keys[p.segment], p.offset?, captured[*i].chunk, plain),
            )
        });
        let mut builders: Vec<(SegmentBuilder, Vec<Result4>)> = ids
            .iter()
            .map(|id| (SegmentBuilder::new(*id), Vec::new()))
            .collect();
        for ((c, p), frame) in captured.iter().zip(&placements).zip(frames) {
            let (builder, results) = &mut builders[p.segment];
            let loc = match frame {
                Some(frame) => {
                    debug_assert_eq!(Some(builder.next_offset()), p.offset);
                    Some(builder.push_frame(c.chunk, &frame))
                }
                None => {
                    builder.push_zero(c.chunk);
                    None
                }
            };
            results.push((c.chunk, c.generation, loc, c.data.clone()));
        }
        Ok(builders
            .into_iter()
            .map(|(b, results)| finish(self, b, results))
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

fn finish(inner: &Inner, builder: SegmentBuilder, results: Vec<Result4>) -> Encoded {
    Encoded {
        id: builder.id,
        bytes: builder.finish(inner.log.keys()),
        results,
    }
}

/// Flush in the background by size and by age, while the volume lives.
pub async fn background(inner: Weak<Inner>) {
    loop {
        // Hold no reference while sleeping: the volume may go away.
        let Some(tick) = inner.upgrade().map(|i| i.cfg.flush_age / 4) else {
            return;
        };
        tokio::time::sleep(tick).await;
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
