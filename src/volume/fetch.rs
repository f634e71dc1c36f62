//! Reading clean chunks from the store: concurrent misses on one chunk
//! share one ranged GET, and sequential reading triggers readahead of the
//! following chunks in parallel, so a cold sequential read runs at the
//! store's bandwidth instead of one request's latency at a time.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use super::Inner;
use crate::cache::ChunkData;
use crate::error::{Error, Result};
use crate::store::Loc;
use crate::store::backend::StoreError;

#[derive(Default)]
pub struct Fetcher {
    inflight: Mutex<HashMap<Loc, Arc<OnceCell<ChunkData>>>>,
    sequence: Mutex<Sequence>,
}

/// The sequential-read detector.
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

impl Inner {
    /// A clean chunk's data: cache, else one ranged GET (shared with any
    /// concurrent reader of the same chunk) and decode.
    pub(super) async fn load(&self, chunk: u64, loc: Loc) -> Result<ChunkData> {
        if let Some(data) = self.cache.get(&loc) {
            return Ok(data);
        }
        let cell = self.fetch.inflight.lock().entry(loc).or_default().clone();
        let result = cell
            .get_or_try_init(|| async {
                let data = Arc::new(self.fetch_and_decode(chunk, loc).await?);
                self.cache.insert(loc, data.clone());
                Ok::<_, Error>(data)
            })
            .await
            .cloned();
        let mut inflight = self.fetch.inflight.lock();
        if inflight.get(&loc).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&loc);
        }
        result
    }

    /// SSD tier, else the store (which then fills the SSD tier). A frame
    /// from the SSD tier that fails to decode is dropped there and read
    /// from the store: the cache disk is never trusted over the bucket.
    async fn fetch_and_decode(&self, chunk: u64, loc: Loc) -> Result<Vec<u8>> {
        if let Some(disk) = &self.disk
            && let Some(frame) = disk.get(&loc).await
        {
            match self.codec.decode(loc, chunk, &frame) {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::warn!(
                        "SSD cache entry for chunk {chunk} is bad ({e}); reading the store"
                    );
                    disk.remove(&loc);
                }
            }
        }
        let frame = match self.log.read_frame(loc).await {
            Ok(frame) => frame,
            // Garbage collection deletes a frame only after the grace
            // period from when the chunk moved; a read that looked the
            // chunk up before the move and waited longer finds it gone.
            // Where it is now holds the same data, or newer.
            Err(Error::Store(StoreError::NotFound(_))) if self.moved_from(chunk, loc).is_some() => {
                return match self.moved_from(chunk, loc).expect("checked") {
                    Some(now) => Box::pin(self.fetch_and_decode(chunk, now)).await,
                    None => Ok(vec![0u8; self.chunk_size]),
                };
            }
            Err(e) => return Err(e),
        };
        let data = self.codec.decode(loc, chunk, &frame)?;
        if let Some(disk) = &self.disk {
            disk.insert(&loc, frame.to_vec());
        }
        Ok(data)
    }

    /// Where `chunk` is now, if it is no longer at `loc` (Some(None):
    /// zeros). A dirty chunk's last stored location counts.
    fn moved_from(&self, chunk: u64, loc: Loc) -> Option<Option<Loc>> {
        let now = self.state.lock().index.get(chunk);
        (now != Some(loc)).then_some(now)
    }

    /// Note a read of chunks `first..=last`; when reads are sequential,
    /// prefetch a window (doubling up to the configured maximum) ahead.
    pub(super) fn note_read(self: &Arc<Self>, first: u64, last: u64) {
        let max = self.cfg.readahead_chunks;
        if max == 0 {
            return;
        }
        let range = {
            let mut s = self.fetch.sequence.lock();
            let sequential = s.started
                && first >= s.next.saturating_sub(1)
                && first <= s.prefetched_to.max(s.next);
            s.started = true;
            s.window = if sequential {
                (s.window * 2).max(2).min(max)
            } else {
                0
            };
            s.next = last + 1;
            if s.window == 0 {
                s.prefetched_to = last + 1;
                return;
            }
            let end = (last + 1 + s.window).min(self.log.chunks());
            let start = s.prefetched_to.max(last + 1);
            s.prefetched_to = s.prefetched_to.max(end);
            start..end
        };
        for chunk in range {
            let loc = {
                let st = self.state.lock();
                if st.dirty.get(chunk).is_some() {
                    continue;
                }
                st.index.get(chunk)
            };
            let Some(loc) = loc else { continue };
            if self.cache.contains(&loc) {
                continue;
            }
            let this = Arc::clone(self);
            self.runtime.spawn(async move {
                if let Err(e) = this.load(chunk, loc).await {
                    tracing::debug!("readahead of chunk {chunk} failed: {e}");
                }
            });
        }
    }
}
