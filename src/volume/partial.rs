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
use crate::error::{Error, Result};

const S: usize = SECTOR as usize;

/// Stored versions read at once by one fold or resolution pass.
const READS_AT_ONCE: usize = 64;

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
        let Some(mut base) = self.state.lock().partial_base(chunk) else {
            return Ok(());
        };
        loop {
            let data = match base {
                Some(loc) => Some(self.load(chunk, loc).await?),
                None => None,
            };
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

    /// Fold every partial chunk, `READS_AT_ONCE` at a time (a flush does
    /// this before it captures, so that it does not read while holding
    /// off other flushes).
    pub(super) async fn fold_all(&self) -> Result<()> {
        let partial = self.state.lock().partial_chunks();
        futures::stream::iter(partial)
            .map(|chunk| self.fold(chunk))
            .buffer_unordered(READS_AT_ONCE)
            .try_collect()
            .await
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
                        let data = match base {
                            Some(loc) => Some(self.load(c.chunk, loc).await?),
                            None => None,
                        };
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
}
