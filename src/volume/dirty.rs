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

use bit_set::BitSet;

use super::journal::{Journal, Record};
use super::partial::{Partial, patch_fits};
use crate::cache::ChunkData;
use crate::error::Result;
use crate::store::{Index, Loc, Mapping};

/// What a zeroed chunk counts against the dirty limit (it holds no data,
/// but a huge discard must still apply back-pressure).
pub const ZERO_COST: usize = 64;

/// What a dirty chunk holds.
#[derive(Clone, Debug)]
pub enum Content {
    /// All zeros (discarded or zeroed).
    Zeros,
    Whole(ChunkData),
    /// Some sectors, written over a stored version not read yet
    /// (volume::partial).
    Partial(Arc<Partial>),
}

impl Content {
    /// Copy `out.len()` bytes at `at` into `out`; false when some of them
    /// are in the stored version of a partial chunk.
    pub fn read(&self, at: usize, out: &mut [u8]) -> bool {
        match self {
            Content::Zeros => out.fill(0),
            Content::Whole(d) => out.copy_from_slice(&d[at..at + out.len()]),
            Content::Partial(p) => return p.read(at, out),
        }
        true
    }
}

#[derive(Clone)]
struct Dirty {
    data: Content,
    generation: u64,
    /// A flush in flight captured this generation.
    in_flight: bool,
    /// The sectors written since the entry was made over the chunk's
    /// stored version; None when it does not sit on that version (a
    /// whole-chunk write, zeros, or writes over unpublished zeros). What a
    /// patch of this entry holds (docs/rfcs/0007).
    since_stored: Option<BitSet>,
    /// What it counts against the dirty limit now (`State::recount`).
    cost: usize,
}

/// The sectors `at..at + len` of a chunk (bytes, whole sectors).
pub fn sectors(at: usize, len: usize) -> BitSet {
    (at / SECTOR..(at + len).div_ceil(SECTOR)).collect()
}

const SECTOR: usize = super::SECTOR as usize;

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

impl DirtyTable {
    pub fn get(&self, chunk: u64) -> Option<&Content> {
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
    pub content: Content,
    pub since_stored: Option<BitSet>,
}

/// What a flush made durable for one chunk it captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Zeros,
    Frame(Loc),
    /// A patch over the chunk's mapping (docs/rfcs/0007).
    Patch(Loc),
}

impl Published {
    /// The frame written, if any: the memory cache keys the chunk's
    /// content by it.
    pub fn loc(self) -> Option<Loc> {
        match self {
            Published::Zeros => None,
            Published::Frame(loc) | Published::Patch(loc) => Some(loc),
        }
    }
}

pub struct State {
    pub index: Index,
    pub dirty: DirtyTable,
    next_generation: u64,
    /// When the oldest unflushed write happened.
    pub oldest_dirty: Option<Instant>,
    /// Where acknowledged writes outlive this process (daemon only).
    pub journal: Option<Journal>,
    /// Frames of stored versions found unreadable for good (failed
    /// authentication, or gone): a partial write into a chunk stored there
    /// fails at once, as it did when every such write read its chunk first.
    unreadable: std::collections::HashSet<Loc>,
    /// Chunks a failed flush held: its segments may still land (RFC 0003,
    /// W3) with patches the index never counted, so the next flush writes
    /// each of them whole, which bounds the mapping replay rebuilds
    /// (docs/rfcs/0007, "Failed flushes").
    rewrite: std::collections::HashSet<u64>,
}

/// Unreadable locations remembered at most (each is a corrupt or lost
/// frame: a bucket with more has bigger problems than this list).
const UNREADABLE_KEPT: usize = 4096;

impl State {
    pub fn new(index: Index) -> Self {
        State {
            index,
            dirty: DirtyTable::default(),
            next_generation: 1,
            oldest_dirty: None,
            journal: None,
            unreadable: Default::default(),
            rewrite: Default::default(),
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.oldest_dirty.get_or_insert_with(Instant::now);
        self.next_generation
    }

    /// A new entry for a chunk (replacing any): `since_stored` as `Dirty`
    /// says.
    pub fn set_dirty(&mut self, chunk: u64, data: Content, since_stored: Option<BitSet>) {
        let generation = self.bump();
        let entry = Dirty {
            data,
            generation,
            in_flight: false,
            since_stored,
            cost: 0,
        };
        if let Some(old) = self.dirty.map.insert(chunk, entry) {
            self.dirty.bytes -= old.cost;
        }
        self.recount(chunk);
    }

    /// Count the entry of `chunk` against the dirty limit again, after it,
    /// the chunk's mapping or its `rewrite` mark changed: its bytes — but
    /// a partial entry the next flush would have to read (not a patch)
    /// counts the whole chunk, which that flush then holds: the limit
    /// bounds what a flush holds (docs/rfcs/0007).
    pub fn recount(&mut self, chunk: u64) {
        let Some(entry) = self.dirty.map.get(&chunk) else {
            return;
        };
        let cost = match &entry.data {
            Content::Zeros => ZERO_COST,
            Content::Whole(d) => d.len(),
            Content::Partial(p) => {
                let patch = !self.rewrite.contains(&chunk)
                    && (entry.since_stored.as_ref()).is_some_and(|since| {
                        patch_fits(since, self.index.get(chunk).as_ref(), p.chunk_size())
                    });
                if patch { p.held() } else { p.chunk_size() }
            }
        };
        let entry = self.dirty.map.get_mut(&chunk).expect("present");
        self.dirty.bytes = self.dirty.bytes - entry.cost + cost;
        entry.cost = cost;
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
    pub fn patch_dirty(&mut self, chunk: u64, at: usize, bytes: &[u8], chunk_size: usize) {
        let generation = self.bump();
        let entry = self
            .dirty
            .map
            .get_mut(&chunk)
            .expect("caller checked it is dirty");
        // Copy-on-write: a flush in progress may hold the previous version.
        match &mut entry.data {
            Content::Zeros => {
                let mut buf = vec![0u8; chunk_size];
                buf[at..at + bytes.len()].copy_from_slice(bytes);
                entry.data = Content::Whole(Arc::new(buf));
            }
            Content::Whole(data) => {
                Arc::make_mut(data)[at..at + bytes.len()].copy_from_slice(bytes)
            }
            Content::Partial(p) => Arc::make_mut(p).write(at, bytes),
        }
        if let Some(since) = &mut entry.since_stored {
            // In place: no set allocated per write on this path.
            for s in at / SECTOR..(at + bytes.len()).div_ceil(SECTOR) {
                since.insert(s);
            }
        }
        if let Content::Partial(p) = &entry.data
            && p.is_whole()
        {
            entry.data = Content::Whole(Arc::new(p.over(None)));
        }
        entry.generation = generation;
        entry.in_flight = false;
        self.recount(chunk);
    }

    /// Whether the chunk currently has (possibly) non-zero content.
    pub fn holds_data(&self, chunk: u64) -> bool {
        match self.dirty.get(chunk) {
            Some(data) => !matches!(data, Content::Zeros),
            None => self.index.get(chunk).is_some(),
        }
    }

    /// Make a whole chunk zeros; free when it already is.
    pub fn zero_chunk(&mut self, chunk: u64) {
        if self.holds_data(chunk) {
            self.set_dirty(chunk, Content::Zeros, None);
        }
    }

    /// Where a partial chunk's stored version is now (None: it reads as
    /// zeros); None when the chunk is not partial.
    pub fn partial_base(&self, chunk: u64) -> Option<Option<Mapping>> {
        matches!(self.dirty.get(chunk), Some(Content::Partial(_))).then(|| self.index.get(chunk))
    }

    /// Whether a frame of `mapping` was found unreadable for good.
    pub fn is_unreadable(&self, mapping: &Mapping) -> bool {
        mapping.frames().iter().any(|l| self.unreadable.contains(l))
    }

    /// The generation of the newest write applied so far: a FLUSH that
    /// starts now covers every write up to it.
    pub fn generation(&self) -> u64 {
        self.next_generation
    }

    /// A partial chunk's stored version at `base` cannot be read for good:
    /// drop the entry (the writes in it are lost; a FLUSH says so), and
    /// remember `base`. Returns the dropped entry's generation (its newest
    /// write), None when the chunk is no longer partial there.
    pub fn drop_unreadable(&mut self, chunk: u64, base: Option<Mapping>) -> Option<u64> {
        if self.partial_base(chunk).as_ref() != Some(&base) {
            return None;
        }
        for loc in base.iter().flat_map(|m| m.frames()) {
            if self.unreadable.len() < UNREADABLE_KEPT {
                self.unreadable.insert(*loc);
            }
        }
        let gone = self.dirty.map.remove(&chunk).expect("partial");
        self.dirty.bytes -= gone.cost;
        if self.dirty.is_empty() {
            self.oldest_dirty = None;
        }
        Some(gone.generation)
    }

    /// Every partial chunk a flush must read — `needs_base` says so, or a
    /// failed flush asked for it whole —, in chunk order.
    pub fn partial_chunks(
        &self,
        needs_base: impl Fn(&BitSet, Option<&Mapping>) -> bool,
    ) -> Vec<u64> {
        let mut out: Vec<u64> = (self.dirty.map.iter())
            .filter(|(chunk, d)| match (&d.data, &d.since_stored) {
                (Content::Partial(_), Some(since)) => {
                    self.rewrite.contains(chunk)
                        || needs_base(since, self.index.get(**chunk).as_ref())
                }
                (Content::Partial(_), None) => true,
                _ => false,
            })
            .map(|(chunk, _)| *chunk)
            .collect();
        out.sort_unstable();
        out
    }

    /// The sectors written into a dirty chunk since its stored version
    /// (`Dirty::since_stored`).
    #[cfg(test)]
    pub fn since_stored(&self, chunk: u64) -> Option<&BitSet> {
        self.dirty.map.get(&chunk)?.since_stored.as_ref()
    }

    /// Make a partial chunk whole, given its stored version `data` read
    /// from `base` (None: zeros): its generation stays, its content does
    /// not change (volume::partial). `Err(now)` when the chunk is no
    /// longer at `base` — read it from `now` instead.
    pub fn fold(
        &mut self,
        chunk: u64,
        base: Option<Mapping>,
        data: Option<&[u8]>,
    ) -> std::result::Result<(), Option<Mapping>> {
        let now = self.index.get(chunk);
        let Some(entry) = self.dirty.map.get_mut(&chunk) else {
            return Ok(());
        };
        let Content::Partial(p) = &entry.data else {
            return Ok(());
        };
        if now != base {
            return Err(now);
        }
        entry.data = Content::Whole(Arc::new(p.over(data)));
        self.recount(chunk);
        Ok(())
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
                    content: d.data.clone(),
                    since_stored: d.since_stored.clone(),
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
            self.rewrite.insert(chunk);
            self.recount(chunk);
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

    /// Whether a failed flush asked for `chunk` whole (`rewrite`); the
    /// ask holds until a chunk frame or zero record of it is published
    /// (`complete`), so the entry keeps counting the whole chunk that the
    /// flush writing it holds.
    pub fn must_rewrite(&self, chunk: u64) -> bool {
        self.rewrite.contains(&chunk)
    }

    /// The collector moved `chunk` to a chunk frame at `loc` (its mapping
    /// folded: a partial entry of it may now be a patch again).
    pub fn moved(&mut self, chunk: u64, loc: Option<Loc>) {
        self.index.set_frame(chunk, loc);
        self.recount(chunk);
    }

    /// Capture `flight` is published: whether an earlier one gave back
    /// after it (then not every write before it is durable).
    pub fn landed(&mut self, flight: u64) -> bool {
        self.dirty.flights.remove(&flight).unwrap_or(false)
    }

    /// A captured chunk is durable as `published`: publish it and drop the
    /// dirty entry unless it was rewritten meanwhile.
    pub fn complete(&mut self, chunk: u64, generation: u64, published: Published) {
        if !matches!(published, Published::Patch(_)) {
            self.rewrite.remove(&chunk);
        }
        match published {
            Published::Zeros => self.index.set(chunk, None),
            Published::Frame(loc) => self.index.set_frame(chunk, Some(loc)),
            // A patch is written only over a mapped chunk, and until it is
            // published only flushes of the same entry and content-keeping
            // copies change the mapping (docs/rfcs/0007, point 2).
            Published::Patch(loc) => self
                .index
                .patch(chunk, loc)
                .expect("a patch is published over a mapped chunk"),
        }
        if self
            .dirty
            .map
            .get(&chunk)
            .is_some_and(|d| d.generation == generation)
        {
            let gone = self.dirty.map.remove(&chunk).expect("present");
            self.dirty.bytes -= gone.cost;
        } else {
            self.recount(chunk);
        }
        if self.dirty.is_empty() {
            self.oldest_dirty = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Content {
        Content::Whole(Arc::new(vec![n; 16]))
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
        st.set_dirty(1, chunk(1), None);
        st.set_dirty(2, chunk(2), None);
        let (f0, _) = st.capture();
        let (f_empty, none) = st.capture();
        assert!(none.is_empty(), "both are in flight");
        assert!(!st.landed(f_empty));
        st.set_dirty(3, chunk(3), None);
        let (f1, first) = st.capture();
        assert_eq!(first.iter().map(|c| c.chunk).collect::<Vec<_>>(), [3]);
        st.set_dirty(2, chunk(4), None);
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
        st.complete(2, second[0].generation, Published::Zeros);
        st.complete(3, third[0].generation, Published::Zeros);
        assert_eq!(st.dirty.len(), 1, "chunk 1 is still dirty");
    }

    fn loc(offset: u32) -> Loc {
        Loc {
            segment: crate::store::SegmentId { epoch: 1, seq: 1 },
            offset,
            len: 16,
        }
    }

    /// A partial chunk folds over the stored version read from where the
    /// index says — and not over one read from a location the chunk has
    /// left since: a late read of an old lineage must not fold into a new
    /// partial entry (published, rewritten, published, partial again).
    #[test]
    fn a_partial_chunk_folds_only_over_its_current_stored_version() {
        let mut st = State::new(Index::default());
        let (old, new) = (Mapping::Frame(loc(0)), Mapping::Frame(loc(100)));
        st.index.set(7, Some(old.clone()));
        let partial = |b: u8| Content::Partial(Arc::new(Partial::new(1024, 512, &[b; 512])));
        st.set_dirty(7, partial(1), Some(sectors(512, 512)));
        assert_eq!(st.partial_base(7), Some(Some(old.clone())));
        assert_eq!(st.partial_chunks(|_, _| true), [7]);
        assert!(st.partial_chunks(|_, _| false).is_empty());
        // Published and written again meanwhile: the read of `old` is stale.
        let (_, c) = st.capture();
        st.complete(7, c[0].generation, Published::Frame(loc(100)));
        st.set_dirty(7, partial(2), Some(sectors(512, 512)));
        assert_eq!(
            st.fold(7, Some(old.clone()), Some(&[9u8; 1024])),
            Err(Some(new.clone()))
        );
        assert!(matches!(st.dirty.get(7), Some(Content::Partial(_))));
        // Read from where it is now: whole, the written sectors on top.
        assert_eq!(st.fold(7, Some(new), Some(&[5u8; 1024])), Ok(()));
        let mut out = [0u8; 1024];
        assert!(st.dirty.get(7).expect("dirty").read(0, &mut out));
        assert_eq!(&out[..512], &[5u8; 512]);
        assert_eq!(&out[512..], &[2u8; 512]);
        assert!(st.partial_chunks(|_, _| true).is_empty());
        assert_eq!(
            st.since_stored(7),
            Some(&sectors(512, 512)),
            "a fold keeps it"
        );
        // Nothing to fold any more.
        assert_eq!(st.fold(7, Some(old), Some(&[9u8; 1024])), Ok(()));
    }

    /// `since_stored` grows with every write into the entry and only
    /// then; an entry that does not sit on its stored version has none,
    /// and patching it (zeros made whole) does not make one up.
    #[test]
    fn since_stored_collects_the_sectors_written_over_the_stored_version() {
        let mut st = State::new(Index::default());
        st.index.set_frame(1, Some(loc(0)));
        st.set_dirty(
            1,
            Content::Whole(Arc::new(vec![1; 4096])),
            Some(sectors(0, 512)),
        );
        st.patch_dirty(1, 1024, &[7u8; 1024], 4096);
        let want: BitSet = [0usize, 2, 3].into_iter().collect();
        assert_eq!(st.since_stored(1), Some(&want));
        st.set_dirty(2, Content::Zeros, None);
        st.patch_dirty(2, 0, &[7u8; 512], 4096);
        assert!(matches!(st.dirty.get(2), Some(Content::Whole(_))));
        assert_eq!(st.since_stored(2), None);
        assert_eq!(sectors(100, 1), [0usize].into_iter().collect::<BitSet>());
        assert_eq!(sectors(511, 2), [0usize, 1].into_iter().collect::<BitSet>());
    }

    /// A partial entry counts its own bytes while the next flush would
    /// write it as a patch, and the whole chunk once that flush would have
    /// to read it (the mapping at its patch bound, or a failed flush
    /// asking for it whole): the limit bounds what a flush holds.
    #[test]
    fn a_partial_entry_counts_what_its_flush_will_hold() {
        let mut st = State::new(Index::default());
        st.index.set_frame(3, Some(loc(0)));
        let p = Partial::new(4096, 512, &[1u8; 512]);
        let held = p.held();
        st.set_dirty(3, Content::Partial(Arc::new(p)), Some(sectors(512, 512)));
        assert_eq!(st.dirty.bytes(), held, "a patch: its own bytes");
        st.give_back(0, [(3, 0)]);
        assert_eq!(st.dirty.bytes(), 4096, "asked for whole");
        assert!(st.must_rewrite(3));
        assert_eq!(st.partial_chunks(|_, _| false), [3], "read before capture");
        st.patch_dirty(3, 1024, &[1u8; 512], 4096);
        assert_eq!(st.dirty.bytes(), 4096, "still asked for whole");
        // A chunk frame of it published (an older generation: it stays).
        st.complete(3, 0, Published::Frame(loc(9)));
        assert!(!st.must_rewrite(3));
        let held = match st.dirty.get(3) {
            Some(Content::Partial(p)) => p.held(),
            _ => panic!("still partial"),
        };
        assert_eq!(st.dirty.bytes(), held);
        // The mapping reaches its patch bound (another entry's flushes).
        let mut m = Mapping::Frame(loc(0));
        for i in 0..super::super::partial::MAX_PATCHES as u32 {
            m = m.with_patch(loc(100 + i));
        }
        st.index.set(3, Some(m));
        st.recount(3);
        assert_eq!(st.dirty.bytes(), 4096, "at the bound: read, held whole");
        st.moved(3, Some(loc(50)));
        assert_eq!(st.dirty.bytes(), held, "folded by the collector");
        st.patch_dirty(3, 0, &[2u8; 2560], 4096);
        assert_eq!(st.dirty.bytes(), 4096, "over half: read, held whole");
    }
}
