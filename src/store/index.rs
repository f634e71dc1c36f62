//! The in-memory index: chunk number → where its current content lives
//! (a chunk frame, and any patches laid over it: docs/rfcs/0007).
//! Unmapped chunks read as zeros. Also tracks live bytes per segment, which
//! `inspect` reports and garbage collection will use.
//!
//! Both maps are persistent (`imbl`): a clone shares the tree and costs
//! O(1), and later changes copy only the paths they touch. A checkpoint
//! takes its snapshot under the volume's state lock, which every read and
//! write also takes; with a plain `BTreeMap` that clone was O(mapped
//! chunks) — about 8 M entries at 1 TiB — with all I/O waiting on it.

use std::sync::Arc;

use imbl::{HashMap, OrdMap, OrdSet};

use super::segment::SegmentId;
use crate::error::{Error, Result};

/// Where one chunk's frame is: segment, byte offset, frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub segment: SegmentId,
    pub offset: u32,
    pub len: u32,
}

/// Where one chunk's content is: a chunk frame, with the patches written
/// over it since laid on top in order (docs/rfcs/0007).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Mapping {
    Frame(Loc),
    /// The chunk frame, then one or more patches, oldest first.
    Patched(Arc<[Loc]>),
}

/// The most patches a mapping may hold: a flush writes a patch only below
/// `MAX_PATCHES` (8), flushes in flight (at most 4) may each add one
/// more, and failed flushes' late segments at most as many again before
/// the chunk is written whole (docs/rfcs/0007): 15. Anything beyond is
/// corrupt.
pub const MOST_PATCHES_STORED: usize = 16;

impl Mapping {
    /// Every frame: the chunk frame first, then the patches in order.
    pub fn frames(&self) -> &[Loc] {
        match self {
            Mapping::Frame(loc) => std::slice::from_ref(loc),
            Mapping::Patched(frames) => frames,
        }
    }

    /// The newest frame: it names the content (every mapping that ends in
    /// it reads the same; a location is never reused), so the memory
    /// cache keys by it.
    pub fn last(&self) -> Loc {
        *self.frames().last().expect("a mapping has a frame")
    }

    pub fn patches(&self) -> usize {
        self.frames().len() - 1
    }

    /// Bytes of the patches' frames.
    pub fn patch_bytes(&self) -> u64 {
        self.frames()[1..].iter().map(|l| l.len as u64).sum()
    }

    /// This mapping with `patch` laid on top.
    pub fn with_patch(&self, patch: Loc) -> Mapping {
        let frames: Vec<Loc> = self.frames().iter().copied().chain([patch]).collect();
        Mapping::Patched(frames.into())
    }

    /// Whether a frame of this mapping is in `segment`.
    pub fn in_segment(&self, segment: SegmentId) -> bool {
        self.frames().iter().any(|l| l.segment == segment)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentLive {
    /// Frames of live mappings (a chunk's frame and its patches).
    pub frames: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Index {
    map: OrdMap<u64, Mapping>,
    live: HashMap<SegmentId, SegmentLive>,
    /// Chunks set since the last `take_changed`: what the next
    /// checkpoint's delta holds (docs/rfcs/0004).
    changed: OrdSet<u64>,
}

impl Index {
    pub fn get(&self, chunk: u64) -> Option<Mapping> {
        self.map.get(&chunk).cloned()
    }

    /// Map `chunk` to `mapping` (Some) or to zeros (None).
    pub fn set(&mut self, chunk: u64, mapping: Option<Mapping>) {
        self.changed.insert(chunk);
        self.load(chunk, mapping);
    }

    /// Map `chunk` to a chunk frame at `loc` (Some) or to zeros (None).
    pub fn set_frame(&mut self, chunk: u64, loc: Option<Loc>) {
        self.set(chunk, loc.map(Mapping::Frame));
    }

    /// Lay the patch at `loc` over `chunk`'s mapping. A patch of an
    /// unmapped chunk, or past `MOST_PATCHES_STORED`, is refused (no
    /// writer makes one: docs/rfcs/0007).
    pub fn patch(&mut self, chunk: u64, loc: Loc) -> Result<()> {
        let Some(now) = self.map.get(&chunk) else {
            return Err(Error::Integrity(format!(
                "a patch of chunk {chunk}, which holds no frame"
            )));
        };
        if now.patches() >= MOST_PATCHES_STORED {
            return Err(Error::Integrity(format!(
                "chunk {chunk} holds too many patches"
            )));
        }
        let patched = now.with_patch(loc);
        self.set(chunk, Some(patched));
        Ok(())
    }

    /// Map `chunk` as a checkpoint recorded it: not a change since the
    /// checkpoint (nothing for the next delta to hold). Every frame of a
    /// mapping counts live in its segment.
    pub fn load(&mut self, chunk: u64, mapping: Option<Mapping>) {
        if let Some(m) = &mapping {
            for loc in m.frames() {
                let live = self.live.entry(loc.segment).or_default();
                live.frames += 1;
                live.bytes += loc.len as u64;
            }
        }
        let old = match mapping {
            Some(m) => self.map.insert(chunk, m),
            None => self.map.remove(&chunk),
        };
        for old in old.iter().flat_map(|m| m.frames()) {
            let live = self.live.get_mut(&old.segment).expect("live entry exists");
            live.frames -= 1;
            live.bytes -= old.len as u64;
            if live.frames == 0 {
                self.live.remove(&old.segment);
            }
        }
    }

    /// The chunks set since the last call (a set that shares storage with
    /// the index's clones: O(1)).
    pub fn take_changed(&mut self) -> OrdSet<u64> {
        std::mem::take(&mut self.changed)
    }

    /// Number of mapped (non-zero) chunks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Mapping)> + '_ {
        self.map.iter().map(|(c, m)| (*c, m))
    }

    /// Whether `other` is an unmodified clone of this index, sharing its
    /// storage (what makes a snapshot O(1)).
    pub fn shares_storage_with(&self, other: &Index) -> bool {
        self.map.ptr_eq(&other.map) && self.live.ptr_eq(&other.live)
    }

    /// Segments holding at least one live frame, with their live bytes.
    pub fn live_segments(&self) -> &HashMap<SegmentId, SegmentLive> {
        &self.live
    }

    pub fn live_bytes(&self) -> u64 {
        self.live.values().map(|l| l.bytes).sum()
    }

    /// Reject an index entry that cannot belong to this volume.
    pub fn check_chunk(chunk: u64, chunks: u64, origin: &str) -> Result<()> {
        if chunk >= chunks {
            return Err(Error::Integrity(format!(
                "{origin} maps chunk {chunk}, beyond the volume's {chunks} chunks"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(seq: u64, offset: u32) -> Loc {
        Loc {
            segment: SegmentId { epoch: 1, seq },
            offset,
            len: 100,
        }
    }

    #[test]
    fn a_snapshot_shares_storage_and_stays_unchanged_by_later_writes() {
        let mut index = Index::default();
        for chunk in 0..100_000u64 {
            index.set_frame(chunk, Some(loc(chunk / 1000, (chunk % 1000) as u32 * 100)));
        }
        let snapshot = index.clone();
        assert!(
            snapshot.shares_storage_with(&index),
            "clone copied the maps"
        );
        index.set_frame(5, Some(loc(999, 0)));
        index.set(6, None);
        assert!(!snapshot.shares_storage_with(&index));
        assert_eq!(snapshot.get(5), Some(Mapping::Frame(loc(0, 500))));
        assert_eq!(snapshot.get(6), Some(Mapping::Frame(loc(0, 600))));
        assert_eq!(index.get(5), Some(Mapping::Frame(loc(999, 0))));
        assert_eq!(index.get(6), None);
        assert_eq!(snapshot.len(), 100_000);
        assert_eq!(index.len(), 99_999);
        assert_eq!(
            snapshot.live_segments()[&SegmentId { epoch: 1, seq: 0 }].frames,
            1000
        );
        assert_eq!(
            index.live_segments()[&SegmentId { epoch: 1, seq: 0 }].frames,
            998
        );
    }

    /// Every frame of a patched mapping is live in its segment until the
    /// mapping is replaced; a patch over nothing is refused.
    #[test]
    fn patches_stack_and_count_live_in_their_segments() {
        let mut index = Index::default();
        assert!(index.patch(3, loc(1, 0)).is_err(), "nothing to patch");
        index.set_frame(3, Some(loc(1, 0)));
        index.patch(3, loc(2, 0)).unwrap();
        index.patch(3, loc(2, 100)).unwrap();
        let m = index.get(3).unwrap();
        assert_eq!(m.frames(), [loc(1, 0), loc(2, 0), loc(2, 100)]);
        assert_eq!(
            (m.patches(), m.patch_bytes(), m.last()),
            (2, 200, loc(2, 100))
        );
        let seg = |seq| SegmentId { epoch: 1, seq };
        assert_eq!(index.live_segments()[&seg(2)].frames, 2);
        assert_eq!(index.live_bytes(), 300);
        index.set_frame(3, Some(loc(4, 0)));
        assert!(!index.live_segments().contains_key(&seg(1)));
        assert!(!index.live_segments().contains_key(&seg(2)));
        assert_eq!(index.live_bytes(), 100);
        // What docs/ARCHITECTURE.md ("Index memory") counts on.
        assert_eq!(std::mem::size_of::<Mapping>(), 32);
    }
}
