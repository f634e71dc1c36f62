//! Reading clean chunks from the store: concurrent misses on one chunk
//! share its ranged GETs (one per frame of its mapping, in parallel), and sequential reading triggers readahead of the
//! following chunks in parallel, so a cold sequential read runs at the
//! store's bandwidth instead of one request's latency at a time.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use super::Inner;
use crate::cache::ChunkData;
use crate::codec::patch;
use crate::error::{Error, Result};
use crate::store::backend::StoreError;
use crate::store::{Loc, Mapping};

#[derive(Default)]
pub struct Fetcher {
    inflight: Mutex<HashMap<Loc, Arc<OnceCell<ChunkData>>>>,
    sequence: Mutex<Sequence>,
}

/// The sequential-read detector: pure (no I/O, no clock), so its rules
/// are unit-tested on their own.
#[derive(Default)]
struct Sequence {
    /// Chunk after the last read.
    next: u64,
    /// Chunks are prefetched up to (excluding) this one.
    prefetched_to: u64,
    /// Current readahead window in chunks (0: not sequential).
    window: u64,
    /// Whether any read was seen (the first read is never "sequential").
    started: bool,
}

impl Sequence {
    /// Note a read of chunks `first..=last` on a volume of `chunks`
    /// chunks; returns the chunks to prefetch now. A read that starts at,
    /// just before, or inside what was read or prefetched is sequential:
    /// the window doubles (from 2) up to `max`, and what it covers beyond
    /// what was already prefetched is returned. Anything else resets the
    /// window, and nothing is prefetched. `max` 0: never.
    fn note(&mut self, first: u64, last: u64, max: u64, chunks: u64) -> std::ops::Range<u64> {
        if max == 0 {
            return 0..0;
        }
        let sequential = self.started
            && first >= self.next.saturating_sub(1)
            && first <= self.prefetched_to.max(self.next);
        self.started = true;
        self.window = if sequential {
            (self.window * 2).max(2).min(max)
        } else {
            0
        };
        self.next = last + 1;
        if self.window == 0 {
            self.prefetched_to = last + 1;
            return 0..0;
        }
        let end = (last + 1 + self.window).min(chunks);
        let start = self.prefetched_to.max(last + 1);
        self.prefetched_to = self.prefetched_to.max(end);
        start..end.max(start)
    }
}

impl Inner {
    /// A clean chunk's data: cache (keyed by the mapping's last frame:
    /// docs/rfcs/0007), else its frames by ranged GET — shared with any
    /// concurrent reader of the same mapping — decoded and composed.
    pub(super) async fn load(&self, chunk: u64, mapping: &Mapping) -> Result<ChunkData> {
        let key = mapping.last();
        if let Some(data) = self.cache.get(&key) {
            return Ok(data);
        }
        let cell = self.fetch.inflight.lock().entry(key).or_default().clone();
        let result = cell
            .get_or_try_init(|| async {
                let data = Arc::new(self.fetch_and_decode(chunk, mapping).await?);
                self.cache.insert(key, data.clone());
                Ok::<_, Error>(data)
            })
            .await
            .cloned();
        let mut inflight = self.fetch.inflight.lock();
        if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&key);
        }
        result
    }

    /// The chunk a mapping reads as: its chunk frame with every patch laid
    /// over it in order, the frames fetched in parallel. A frame gone
    /// because the chunk moved meanwhile (garbage collection deletes a
    /// frame only after the grace period from when the chunk moved; a read
    /// that looked the chunk up before the move and waited longer finds it
    /// gone) is read from where the chunk is now: the same data, or newer.
    async fn fetch_and_decode(&self, chunk: u64, mapping: &Mapping) -> Result<Vec<u8>> {
        let frames = mapping.frames();
        let decoded = futures::future::try_join_all(frames.iter().enumerate().map(|(i, loc)| {
            self.frame(chunk, *loc, move |frame| match i {
                0 => self.codec.decode(*loc, chunk, frame),
                _ => self.codec.decode_patch(*loc, chunk, frame),
            })
        }))
        .await;
        let mut decoded = match decoded {
            Ok(decoded) => decoded,
            Err(Error::Store(StoreError::NotFound(_)))
                if self.moved_from(chunk, mapping).is_some() =>
            {
                return match self.moved_from(chunk, mapping).expect("checked") {
                    Some(now) => Box::pin(self.fetch_and_decode(chunk, &now)).await,
                    None => Ok(vec![0u8; self.chunk_size]),
                };
            }
            Err(e) => return Err(e),
        };
        let mut data = decoded.remove(0);
        for body in &decoded {
            patch::apply(body, &mut data);
        }
        if !decoded.is_empty() {
            (self.patched_reads).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(data)
    }

    /// One frame, decoded by `decode`: SSD tier, else the store (which
    /// then fills the SSD tier). A frame from the SSD tier that fails to
    /// decode is dropped there and read from the store: the cache disk is
    /// never trusted over the bucket.
    async fn frame(
        &self,
        chunk: u64,
        loc: Loc,
        decode: impl Fn(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if let Some(disk) = &self.disk
            && let Some(frame) = disk.get(&loc).await
        {
            match decode(&frame) {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::warn!(
                        "SSD cache entry for chunk {chunk} is bad ({e}); reading the store"
                    );
                    disk.remove(&loc);
                }
            }
        }
        let frame = self.log.read_frame(loc).await?;
        let data = decode(&frame)?;
        if let Some(disk) = &self.disk {
            disk.insert(&loc, frame.to_vec());
        }
        Ok(data)
    }

    /// Where `chunk` is now, if it is no longer at `mapping` (Some(None):
    /// zeros). A dirty chunk's last stored location counts.
    fn moved_from(&self, chunk: u64, mapping: &Mapping) -> Option<Option<Mapping>> {
        let now = self.state.lock().index.get(chunk);
        (now.as_ref() != Some(mapping)).then_some(now)
    }

    /// Note a read of chunks `first..=last`; when reads are sequential,
    /// prefetch a window (doubling up to the configured maximum) ahead.
    pub(super) fn note_read(self: &Arc<Self>, first: u64, last: u64) {
        let range = self.fetch.sequence.lock().note(
            first,
            last,
            self.cfg.readahead_chunks,
            self.log.chunks(),
        );
        for chunk in range {
            let mapping = {
                let st = self.state.lock();
                if st.dirty.get(chunk).is_some() {
                    continue;
                }
                st.index.get(chunk)
            };
            let Some(mapping) = mapping else { continue };
            if self.cache.contains(&mapping.last()) {
                continue;
            }
            let this = Arc::clone(self);
            self.runtime.spawn(async move {
                if let Err(e) = this.load(chunk, &mapping).await {
                    tracing::debug!("readahead of chunk {chunk} failed: {e}");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Sequence;

    #[test]
    fn sequential_reads_prefetch_a_doubling_window_once() {
        let mut s = Sequence::default();
        assert_eq!(
            s.note(0, 0, 8, 100),
            0..0,
            "the first read is never sequential"
        );
        assert_eq!(s.note(1, 1, 8, 100), 2..4, "window 2");
        assert_eq!(s.note(2, 2, 8, 100), 4..7, "window 4: only what is new");
        assert_eq!(s.note(3, 3, 8, 100), 7..12, "window 8, the most");
        assert_eq!(s.note(4, 4, 8, 100), 12..13);
        // A read inside what was prefetched is still sequential.
        assert_eq!(s.note(10, 11, 8, 100), 13..20);
    }

    #[test]
    fn a_jump_resets_and_the_end_of_the_volume_bounds_it() {
        let mut s = Sequence::default();
        s.note(0, 0, 8, 100);
        s.note(1, 1, 8, 100);
        assert_eq!(s.note(50, 50, 8, 100), 0..0, "a jump: not sequential");
        assert_eq!(s.note(51, 51, 8, 100), 52..54, "starts again at 2");
        let mut s = Sequence::default();
        s.note(96, 96, 8, 100);
        assert_eq!(s.note(97, 97, 8, 100), 98..100);
        assert_eq!(s.note(98, 99, 8, 100), 100..100, "nothing past the end");
        // Reading backwards by one chunk still counts (a re-read).
        assert_eq!(s.note(99, 99, 8, 100), 100..100);
    }

    #[test]
    fn readahead_off_prefetches_nothing() {
        let mut s = Sequence::default();
        for c in 0..10 {
            assert_eq!(s.note(c, c, 0, 100), 0..0);
        }
    }
}
