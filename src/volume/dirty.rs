//! The dirty table and the state it shares a lock with (the index).
//!
//! One lock guards both so that a reader always finds a chunk either in the
//! dirty table or at its new index location: a flush publishes the new
//! location and drops the dirty entry in one critical section.
//!
//! Each entry carries a generation; a flush removes an entry only if it is
//! still the generation it uploaded, so a write that lands during the
//! upload stays dirty for the next flush.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::journal::{Journal, Record};
use crate::cache::ChunkData;
use crate::error::Result;
use crate::store::{Index, Loc};

/// What a zeroed chunk counts against the dirty limit (it holds no data,
/// but a huge discard must still apply back-pressure).
pub const ZERO_COST: usize = 64;

#[derive(Clone)]
struct Dirty {
    /// None: the chunk is now zeros.
    data: Option<ChunkData>,
    generation: u64,
}

#[derive(Default)]
pub struct DirtyTable {
    map: HashMap<u64, Dirty>,
    bytes: usize,
    /// The most bytes ever dirty at once.
    peak: usize,
}

fn cost(data: &Option<ChunkData>) -> usize {
    data.as_ref().map_or(ZERO_COST, |d| d.len())
}

impl DirtyTable {
    pub fn get(&self, chunk: u64) -> Option<&Option<ChunkData>> {
        self.map.get(&chunk).map(|d| &d.data)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn peak(&self) -> usize {
        self.peak
    }

    fn grew(&mut self) {
        self.peak = self.peak.max(self.bytes);
    }
}

/// A dirty chunk as one flush captured it.
pub struct Captured {
    pub chunk: u64,
    pub generation: u64,
    pub data: Option<ChunkData>,
}

pub struct State {
    pub index: Index,
    pub dirty: DirtyTable,
    next_generation: u64,
    /// When the oldest unflushed write happened.
    pub oldest_dirty: Option<Instant>,
    /// Where acknowledged writes outlive this process (daemon only).
    pub journal: Option<Journal>,
}

impl State {
    pub fn new(index: Index) -> Self {
        State {
            index,
            dirty: DirtyTable::default(),
            next_generation: 1,
            oldest_dirty: None,
            journal: None,
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.oldest_dirty.get_or_insert_with(Instant::now);
        self.next_generation
    }

    pub fn set_dirty(&mut self, chunk: u64, data: Option<ChunkData>) {
        let generation = self.bump();
        let new_cost = cost(&data);
        if let Some(old) = self.dirty.map.insert(chunk, Dirty { data, generation }) {
            self.dirty.bytes -= cost(&old.data);
        }
        self.dirty.bytes += new_cost;
        self.dirty.grew();
    }

    /// Record a write in the journal (if any) before it is applied.
    pub fn journal<'a>(&mut self, record: impl FnOnce() -> Record<'a>) -> Result<()> {
        match self.journal.as_mut() {
            Some(j) => j.append(&record()),
            None => Ok(()),
        }
    }

    /// Patch a chunk that is already dirty (the caller checked, under this
    /// same lock, and journaled the patch first).
    pub fn patch_dirty(&mut self, chunk: u64, at: usize, bytes: Option<&[u8]>, chunk_size: usize) {
        let generation = self.bump();
        let entry = self
            .dirty
            .map
            .get_mut(&chunk)
            .expect("caller checked it is dirty");
        let before = cost(&entry.data);
        let data = entry
            .data
            .get_or_insert_with(|| Arc::new(vec![0u8; chunk_size]));
        // Copy-on-write: a flush in progress may hold the previous version.
        let buf = Arc::make_mut(data);
        match bytes {
            Some(b) => buf[at..at + b.len()].copy_from_slice(b),
            None => buf[at..].fill(0),
        }
        entry.generation = generation;
        let after = cost(&entry.data);
        self.dirty.bytes = self.dirty.bytes - before + after;
        self.dirty.grew();
    }

    /// Whether the chunk currently has (possibly) non-zero content.
    pub fn holds_data(&self, chunk: u64) -> bool {
        match self.dirty.get(chunk) {
            Some(data) => data.is_some(),
            None => self.index.get(chunk).is_some(),
        }
    }

    /// Make a whole chunk zeros; free when it already is.
    pub fn zero_chunk(&mut self, chunk: u64) {
        if self.holds_data(chunk) {
            self.set_dirty(chunk, None);
        }
    }

    /// Everything dirty now, in chunk order.
    pub fn capture(&self) -> Vec<Captured> {
        let mut out: Vec<Captured> = self
            .dirty
            .map
            .iter()
            .map(|(chunk, d)| Captured {
                chunk: *chunk,
                generation: d.generation,
                data: d.data.clone(),
            })
            .collect();
        out.sort_by_key(|c| c.chunk);
        out
    }

    /// A captured chunk is durable at `loc` (None = zeros): publish it and
    /// drop the dirty entry unless it was rewritten meanwhile.
    pub fn complete(&mut self, chunk: u64, generation: u64, loc: Option<Loc>) {
        self.index.set(chunk, loc);
        if self
            .dirty
            .map
            .get(&chunk)
            .is_some_and(|d| d.generation == generation)
        {
            let gone = self.dirty.map.remove(&chunk).expect("present");
            self.dirty.bytes -= cost(&gone.data);
        }
        if self.dirty.is_empty() {
            self.oldest_dirty = None;
        }
    }
}
