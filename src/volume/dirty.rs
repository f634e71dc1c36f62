//! The dirty table and the state it shares a lock with (the index).
//!
//! One lock guards both so that a reader always finds a chunk either in the
//! dirty table or at its new index location: a flush publishes the new
//! location and drops the dirty entry in one critical section.
//!
//! Each entry carries a generation; a flush removes an entry only if it is
//! still the generation it uploaded, so a write that lands during the
//! upload stays dirty for the next flush. An entry whose generation a
//! flush in flight holds is not captured again by the next one (flushes
//! overlap: docs/rfcs/0005); if that flush fails, it gives the entry back.

use std::collections::{BTreeMap, HashMap};
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
    /// A flush in flight captured this generation.
    in_flight: bool,
}

#[derive(Default)]
pub struct DirtyTable {
    map: HashMap<u64, Dirty>,
    bytes: usize,
    /// The most bytes ever dirty at once.
    peak: usize,
    /// Captures not yet published or given back, by capture number: true
    /// once an earlier capture gave back (its entries are dirty again and
    /// not in the later one, which then did not make every write before it
    /// durable).
    flights: BTreeMap<u64, bool>,
    next_flight: u64,
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
        let entry = Dirty {
            data,
            generation,
            in_flight: false,
        };
        if let Some(old) = self.dirty.map.insert(chunk, entry) {
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
        entry.in_flight = false;
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

    /// Everything dirty now that no flush in flight holds, in chunk
    /// order, under a new capture number; it is in flight from now on.
    pub fn capture(&mut self) -> (u64, Vec<Captured>) {
        let mut out: Vec<Captured> = self
            .dirty
            .map
            .iter_mut()
            .filter(|(_, d)| !d.in_flight)
            .map(|(chunk, d)| {
                d.in_flight = true;
                Captured {
                    chunk: *chunk,
                    generation: d.generation,
                    data: d.data.clone(),
                }
            })
            .collect();
        out.sort_by_key(|c| c.chunk);
        let flight = self.dirty.next_flight;
        self.dirty.next_flight += 1;
        self.dirty.flights.insert(flight, false);
        (flight, out)
    }

    /// Capture `flight` will not publish these (chunk, generation): those
    /// not rewritten since are for the next flush to capture, and every
    /// later capture still in flight is overtaken.
    pub fn give_back(&mut self, flight: u64, captured: impl IntoIterator<Item = (u64, u64)>) {
        for (chunk, generation) in captured {
            if let Some(d) = self.dirty.map.get_mut(&chunk)
                && d.generation == generation
            {
                d.in_flight = false;
            }
        }
        self.dirty.flights.remove(&flight);
        for (_, overtaken) in self.dirty.flights.range_mut(flight + 1..) {
            *overtaken = true;
        }
    }

    /// Capture `flight` is published: whether an earlier one gave back
    /// after it (then not every write before it is durable).
    pub fn landed(&mut self, flight: u64) -> bool {
        self.dirty.flights.remove(&flight).unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Option<ChunkData> {
        Some(Arc::new(vec![n; 16]))
    }

    fn chunks(c: &[Captured]) -> Vec<(u64, u64)> {
        c.iter().map(|c| (c.chunk, c.generation)).collect()
    }

    /// A flush in flight holds what it captured: the next capture takes
    /// only what was written since; a rewrite is captured again; what a
    /// failed flush gives back is captured again unless rewritten (then
    /// the rewrite is); a give-back overtakes later captures in flight,
    /// not earlier ones or later ones not yet made.
    #[test]
    fn captures_skip_what_a_flush_in_flight_holds() {
        let mut st = State::new(Index::default());
        st.set_dirty(1, chunk(1));
        st.set_dirty(2, chunk(2));
        let (f0, _) = st.capture();
        let (f_empty, none) = st.capture();
        assert!(none.is_empty(), "both are in flight");
        assert!(!st.landed(f_empty));
        st.set_dirty(3, chunk(3));
        let (f1, first) = st.capture();
        assert_eq!(first.iter().map(|c| c.chunk).collect::<Vec<_>>(), [3]);
        st.set_dirty(2, chunk(4));
        let (f2, second) = st.capture();
        assert_eq!(second.iter().map(|c| c.chunk).collect::<Vec<_>>(), [2]);
        // f1 fails: f2 (later, in flight) is overtaken; f0 (earlier) is not.
        st.give_back(f1, chunks(&first));
        let (f3, third) = st.capture();
        assert_eq!(chunks(&third), chunks(&first), "chunk 3 is back");
        assert!(!st.landed(f0));
        assert!(st.landed(f2));
        assert!(!st.landed(f3), "captured after the give-back");
        // Publishing: chunk 2's newer version is clean, chunk 3 too.
        st.complete(2, second[0].generation, None);
        st.complete(3, third[0].generation, None);
        assert_eq!(st.dirty.len(), 1, "chunk 1 is still dirty");
    }
}
