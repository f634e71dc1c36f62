//! Clean-chunk cache: decoded chunks keyed by where their frame lives.
//!
//! Keyed by location, not chunk number: a location is immutable (segments
//! are never rewritten in place), so an entry can never be stale — an
//! overwrite gives the chunk a new location and the old entry simply ages
//! out. Dirty data is never here; it lives in the volume's dirty table
//! until its segment is acknowledged.
//!
//! Eviction is CLOCK (second chance) over a byte budget.

mod disk;

pub use disk::DiskCache;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::store::Loc;

pub type ChunkData = Arc<Vec<u8>>;

struct Entry {
    data: ChunkData,
    referenced: bool,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Loc, Entry>,
    clock: VecDeque<Loc>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

pub struct ChunkCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: usize,
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
}

impl ChunkCache {
    pub fn new(budget_bytes: usize) -> Self {
        ChunkCache {
            budget: budget_bytes,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, loc: &Loc) -> Option<ChunkData> {
        let mut inner = self.inner.lock();
        match inner.map.get_mut(loc) {
            Some(e) => {
                e.referenced = true;
                let data = e.data.clone();
                inner.hits += 1;
                Some(data)
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    /// Presence check that does not count as a hit or miss.
    pub fn contains(&self, loc: &Loc) -> bool {
        self.inner.lock().map.contains_key(loc)
    }

    pub fn insert(&self, loc: Loc, data: ChunkData) {
        if data.len() > self.budget {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.map.contains_key(&loc) {
            return;
        }
        inner.bytes += data.len();
        inner.map.insert(
            loc,
            Entry {
                data,
                referenced: false,
            },
        );
        inner.clock.push_back(loc);
        while inner.bytes > self.budget {
            let Some(victim) = inner.clock.pop_front() else {
                break;
            };
            let entry = inner.map.get_mut(&victim).expect("clock and map agree");
            if entry.referenced {
                entry.referenced = false;
                inner.clock.push_back(victim);
            } else {
                let gone = inner.map.remove(&victim).expect("present");
                inner.bytes -= gone.data.len();
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.lock();
        CacheStats {
            bytes: inner.bytes,
            entries: inner.map.len(),
            hits: inner.hits,
            misses: inner.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SegmentId;

    fn loc(i: u32) -> Loc {
        Loc {
            segment: SegmentId { epoch: 1, seq: 0 },
            offset: i * 100,
            len: 100,
        }
    }

    #[test]
    fn stays_within_budget_and_keeps_referenced() {
        let cache = ChunkCache::new(3 * 10);
        for i in 0..3 {
            cache.insert(loc(i), Arc::new(vec![i as u8; 10]));
        }
        assert!(cache.get(&loc(0)).is_some());
        cache.insert(loc(3), Arc::new(vec![3; 10]));
        assert!(cache.get(&loc(0)).is_some(), "referenced entry survives");
        assert!(cache.get(&loc(1)).is_none(), "oldest unreferenced evicted");
        assert!(cache.stats().bytes <= 30);
    }
}
