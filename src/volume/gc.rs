//! Garbage collection: the log stops only growing.
//!
//! Three steps, each safe on its own (the argument, including against a
//! fenced zombie writer: docs/rfcs/0002-garbage-collection.md):
//!
//! 1. **Copy forward.** A segment whose live bytes fall below a share of
//!    its size has its live frames read, re-encoded into new segments of
//!    ours and published — a chunk moves only if the index still points at
//!    the frame that was copied. The ids are allocated, and the index and
//!    the dirty table checked, under the lock flushes capture and allocate
//!    under (docs/rfcs/0005), so a newer version of any copied chunk is
//!    always in a later segment: replaying a copy never changes a chunk's
//!    content.
//! 2. **Mark.** After a checkpoint of ours is stored *and* a following
//!    owner check finds no newer claim, every future recovery starts from
//!    that checkpoint or a newer one. What it does not need is marked
//!    unneeded: segments at or below its position that its index does not
//!    name, older checkpoints, index runs written at or below its position
//!    that it does not name (docs/rfcs/0004), older seals and release
//!    markers, claims of older epochs it names nothing of, probe leftovers.
//! 3. **Delete** what has been unneeded for the grace period, rate-limited.
//!
//! No request is made when nothing is to be copied, confirmed or deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use super::Inner;
use super::flush::Written;
use super::flush::{Body, Ready};
use crate::error::{Error, Result};
use crate::store::backend::StoreError;
use crate::store::checkpoint::RunId;
use crate::store::{Index, Inventory, Loc, Mapping, SegmentId, paths};

/// When the collector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcPolicy {
    /// Never in the background (`Volume::collect` still runs a pass).
    Manual,
    /// A background task in every writer.
    Background,
}

#[derive(Debug, Clone)]
pub struct GcConfig {
    pub policy: GcPolicy,
    /// How long an object stays after it became unneeded, so a reader that
    /// listed before can finish.
    pub grace: Duration,
    /// Copy a segment forward once its live bytes are below this share of
    /// its size.
    pub live_below: f64,
    /// Store bytes per second the collector reads and writes, at most.
    pub bytes_per_sec: u64,
    /// Store requests per second it makes, at most.
    pub requests_per_sec: u32,
    /// How often the background task looks for work (it makes no request
    /// when there is none).
    pub interval: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            policy: GcPolicy::Background,
            grace: Duration::from_secs(10 * 60),
            live_below: 0.5,
            bytes_per_sec: 64 << 20,
            requests_per_sec: 100,
            interval: Duration::from_secs(10),
        }
    }
}

/// Totals since open, for `status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    pub passes: u64,
    pub segments_copied: u64,
    pub chunks_moved: u64,
    pub bytes_copied: u64,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
    /// Unneeded objects waiting for the grace period.
    pub pending_objects: u64,
    pub pending_bytes: u64,
    /// Segments the collector knows of, and their bytes.
    pub segments: u64,
    pub segment_bytes: u64,
}

/// The kinds of objects the collector deletes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Object {
    Segment(SegmentId),
    Checkpoint(SegmentId),
    IndexRun(RunId),
    Seal(u64),
    Claim(u64),
    Release(u64),
    Probe(String),
}

impl Object {
    fn key(&self) -> String {
        match self {
            Object::Segment(id) => paths::segment(*id),
            Object::Checkpoint(id) => paths::checkpoint(*id),
            Object::IndexRun(run) => paths::index_run(*run),
            Object::Seal(e) => paths::seal(*e),
            Object::Claim(e) => paths::claim(*e),
            Object::Release(e) => paths::release(*e),
            Object::Probe(key) => key.clone(),
        }
    }
}

/// What the collector knows of the bucket: every object it may one day
/// delete (listed at open, or written since), and what is marked.
pub(super) struct Collector {
    /// Object sizes.
    segments: BTreeMap<SegmentId, u64>,
    /// Frame bytes of the segments this process wrote (for a listed one,
    /// its object size stands in: it is copied at most once, into a
    /// segment whose frames are all live).
    frames: std::collections::HashMap<SegmentId, u64>,
    checkpoints: BTreeMap<SegmentId, u64>,
    /// Index runs: of our checkpoints, and those listed with the older
    /// epochs' metadata.
    runs: BTreeMap<RunId, u64>,
    /// The runs the newest checkpoint of ours names.
    named_runs: BTreeSet<RunId>,
    seals: BTreeSet<u64>,
    claims: BTreeSet<u64>,
    releases: BTreeSet<u64>,
    probes: BTreeSet<String>,
    /// Unneeded since, and size.
    pending: BTreeMap<Object, (Instant, u64)>,
    /// A checkpoint stored but not yet followed by an owner check: its
    /// position, index and the runs it names.
    unconfirmed: Option<(SegmentId, Index, BTreeSet<RunId>)>,
    /// Older-epoch metadata (seals, claims, releases, probes, leftover
    /// segments and checkpoints) not yet marked: it needs a checkpoint of
    /// ours to be marked.
    inherited: bool,
    stats: GcStats,
}

impl Collector {
    pub(super) fn new(inventory: &Inventory, ours: u64) -> Self {
        Collector {
            segments: inventory.segments.clone(),
            frames: std::collections::HashMap::new(),
            checkpoints: inventory.checkpoints.clone(),
            runs: BTreeMap::new(),
            named_runs: BTreeSet::new(),
            seals: inventory.seals.iter().copied().collect(),
            claims: BTreeSet::new(),
            releases: BTreeSet::new(),
            probes: BTreeSet::new(),
            pending: BTreeMap::new(),
            unconfirmed: None,
            // Older epochs left claims and release markers (not listed at
            // open): listed when the first checkpoint of ours is confirmed.
            inherited: ours > 1,
            stats: GcStats::default(),
        }
    }

    /// Segments of ours are stored and published.
    pub(super) fn published(&mut self, segments: &[Written]) {
        for w in segments {
            self.segments.insert(w.id, w.bytes);
            self.frames.insert(w.id, w.frames);
        }
    }

    /// A checkpoint of ours is about to write these runs (sizes learnt if
    /// it is stored; if it fails, they are collected as unnamed runs).
    pub(super) fn runs_planned(&mut self, runs: Vec<RunId>) {
        for run in runs {
            self.runs.entry(run).or_insert(0);
        }
    }

    /// A checkpoint of ours is stored (not yet confirmed by an owner
    /// check): its root's size, its index, the runs it names with sizes.
    pub(super) fn checkpointed(
        &mut self,
        position: SegmentId,
        size: u64,
        index: Index,
        runs: Vec<(RunId, u64)>,
    ) {
        self.checkpoints.insert(position, size);
        self.runs.extend(runs.iter().copied());
        self.named_runs = runs.into_iter().map(|(r, _)| r).collect();
        self.unconfirmed = Some((position, index, self.named_runs.clone()));
    }

    pub(super) fn stats(&self) -> GcStats {
        let mut s = self.stats.clone();
        s.pending_objects = self.pending.len() as u64;
        s.pending_bytes = self.pending.values().map(|(_, b)| b).sum();
        s.segments = self.segments.len() as u64;
        s.segment_bytes = self.segments.values().sum();
        s
    }

    /// Segments worth copying forward, least live first.
    fn victims(&self, index: &Index, live_below: f64) -> Vec<(SegmentId, u64)> {
        let live = index.live_segments();
        let mut v: Vec<(f64, SegmentId, u64)> = self
            .segments
            .iter()
            .filter(|(id, _)| !self.pending.contains_key(&Object::Segment(**id)))
            .filter_map(|(id, size)| {
                let bytes = live.get(id)?.bytes;
                let whole = self.frames.get(id).unwrap_or(size);
                let share = bytes as f64 / (*whole).max(1) as f64;
                (share < live_below).then_some((share, *id, *size))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, id, size)| (id, size)).collect()
    }

    /// How many objects a confirmed checkpoint now would let be marked
    /// (older epochs' claims and release markers, one per seal, are
    /// counted by the seals).
    fn markable(&self, index: &Index, ours: u64) -> usize {
        let live = index.live_segments();
        let unpending = |o: Object| !self.pending.contains_key(&o);
        let segments = self
            .segments
            .keys()
            .filter(|id| !live.contains_key(*id) && unpending(Object::Segment(**id)))
            .count();
        let checkpoints = self
            .checkpoints
            .keys()
            .filter(|id| id.epoch < ours && unpending(Object::Checkpoint(**id)))
            .count();
        let runs = self
            .runs
            .keys()
            .filter(|r| !self.named_runs.contains(*r) && unpending(Object::IndexRun(**r)))
            .count();
        let seals = self
            .seals
            .iter()
            .filter(|e| **e < ours && unpending(Object::Seal(**e)))
            .count();
        segments + checkpoints + runs + 3 * seals
    }

    /// What no recovery from `position` (with `snapshot`) needs, and the
    /// writer itself (its `current` index) no longer names, not yet marked.
    fn unneeded(
        &self,
        position: SegmentId,
        snapshot: &Index,
        named_runs: &BTreeSet<RunId>,
        current: &Index,
        ours: u64,
    ) -> Vec<(Object, u64)> {
        let (live, now_live) = (snapshot.live_segments(), current.live_segments());
        let referenced: BTreeSet<u64> = live.keys().map(|id| id.epoch).collect();
        let mut unneeded: Vec<(Object, u64)> = Vec::new();
        unneeded.extend(
            self.segments
                .iter()
                .filter(|(id, _)| {
                    **id <= position && !live.contains_key(*id) && !now_live.contains_key(*id)
                })
                .map(|(id, size)| (Object::Segment(*id), *size)),
        );
        unneeded.extend(
            self.checkpoints
                .iter()
                .filter(|(id, _)| **id < position)
                .map(|(id, size)| (Object::Checkpoint(*id), *size)),
        );
        // A later checkpoint's runs are this one's, or written above it
        // (each builds on the chain of the last one stored): those are
        // never marked here (docs/rfcs/0004).
        unneeded.extend(
            self.runs
                .iter()
                .filter(|(run, _)| run.position <= position && !named_runs.contains(*run))
                .map(|(run, size)| (Object::IndexRun(*run), *size)),
        );
        let older = |set: &BTreeSet<u64>| {
            set.iter()
                .copied()
                .filter(|e| *e < ours)
                .collect::<Vec<_>>()
        };
        unneeded.extend(older(&self.seals).into_iter().map(|e| (Object::Seal(e), 0)));
        // A claim is retired (with its release marker) only when nothing
        // can need it: its writer closed cleanly (so it left no journal to
        // replay, and a journal before it was replayed or is stale
        // either way), the writer before it is gone too (released, or
        // retired already: the claim is what fences that writer's
        // zombie, whose owner check reads exactly it), and the snapshot
        // keys no segment to it.
        let released = |e: u64| self.releases.contains(&e);
        let gone = |e: u64| !self.claims.contains(&e) || released(e);
        for e in older(&self.claims) {
            if released(e) && gone(e - 1) && !referenced.contains(&e) {
                unneeded.push((Object::Claim(e), 0));
                unneeded.push((Object::Release(e), 0));
            }
        }
        unneeded.extend(self.probes.iter().map(|k| (Object::Probe(k.clone()), 0)));
        unneeded.retain(|(o, _)| !self.pending.contains_key(o));
        unneeded
    }

    /// Unneeded for at least `grace`, oldest first.
    fn due(&self, grace: Duration, now: Instant) -> Vec<(Object, u64)> {
        self.pending
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= grace)
            .map(|(o, (_, size))| (o.clone(), *size))
            .collect()
    }

    fn deleted(&mut self, object: &Object, size: u64) {
        self.pending.remove(object);
        match object {
            Object::Segment(id) => {
                self.segments.remove(id);
                self.frames.remove(id);
            }
            Object::Checkpoint(id) => {
                self.checkpoints.remove(id);
            }
            Object::IndexRun(run) => {
                self.runs.remove(run);
            }
            Object::Seal(e) => {
                self.seals.remove(e);
            }
            Object::Claim(e) => {
                self.claims.remove(e);
            }
            Object::Release(e) => {
                self.releases.remove(e);
            }
            Object::Probe(k) => {
                self.probes.remove(k);
            }
        }
        self.stats.objects_deleted += 1;
        self.stats.bytes_deleted += size;
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPass {
    pub segments_copied: u64,
    pub chunks_moved: u64,
    pub bytes_copied: u64,
    pub checkpointed: bool,
    pub marked: u64,
    pub deleted: u64,
    /// Objects still waiting for the grace period after the pass.
    pub pending: u64,
}

impl GcPass {
    /// Nothing was done and nothing waits.
    pub fn is_idle(&self) -> bool {
        *self
            == GcPass {
                pending: self.pending,
                ..GcPass::default()
            }
    }
}

/// Keeps a pass under the configured request and byte rates.
struct Pace {
    started: tokio::time::Instant,
    requests: u64,
    bytes: u64,
    requests_per_sec: u32,
    bytes_per_sec: u64,
}

impl Pace {
    fn new(cfg: &GcConfig) -> Self {
        Pace {
            started: tokio::time::Instant::now(),
            requests: 0,
            bytes: 0,
            requests_per_sec: cfg.requests_per_sec.max(1),
            bytes_per_sec: cfg.bytes_per_sec.max(1),
        }
    }

    async fn spend(&mut self, requests: u64, bytes: u64) {
        self.requests += requests;
        self.bytes += bytes;
        let by_requests = self.requests as f64 / self.requests_per_sec as f64;
        let by_bytes = self.bytes as f64 / self.bytes_per_sec as f64;
        let due = Duration::from_secs_f64(by_requests.max(by_bytes));
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Objects a background pass lets accumulate before it writes a
/// checkpoint only to mark them (otherwise the flushes' checkpoints do).
const MARK_BATCH: usize = 16;

/// Ranges of a segment covering `frames`, merging neighbours less than
/// this many bytes apart (one GET instead of several).
const MERGE_GAP: u64 = 1 << 20;

fn read_ranges(frames: &[(u64, Loc)]) -> Vec<std::ops::Range<u64>> {
    let mut offsets: Vec<(u64, u64)> = frames
        .iter()
        .map(|(_, l)| (l.offset as u64, l.offset as u64 + l.len as u64))
        .collect();
    offsets.sort_unstable();
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for (start, end) in offsets {
        match ranges.last_mut() {
            Some(r) if start <= r.end + MERGE_GAP => r.end = r.end.max(end),
            _ => ranges.push(start..end),
        }
    }
    ranges
}

impl Inner {
    /// One pass: copy forward what is worth it, checkpoint if that lets
    /// enough be marked (`eager`: anything), confirm ownership and mark,
    /// delete what has been unneeded for `grace`.
    pub(super) async fn collect(self: &Arc<Self>, grace: Duration, eager: bool) -> Result<GcPass> {
        let _one_pass_at_a_time = self.gc_pass.lock().await;
        // A writer that knows it is fenced stops here; one that does not
        // know yet may still delete what it marked (safe: docs/rfcs/0002)
        // and finds out at its next owner check.
        self.check_writable()?;
        let ours = self.log.fence().owned_epoch()?;
        // A checkpoint being stored in the background is the one to
        // confirm and mark from: wait for it rather than work from an
        // older one while it lands.
        self.checkpoint_settled().await;
        let mut pass = GcPass::default();
        let mut pace = Pace::new(&self.cfg.gc);
        // What was marked in earlier passes first: marking made it safe to
        // delete whenever the grace period is over, whoever owns the
        // volume by then.
        pass.deleted += self.delete_due(grace, &mut pace).await?;
        let victims = {
            let index = self.state.lock().index.clone();
            self.gc.lock().victims(&index, self.cfg.gc.live_below)
        };
        // Copy forward up to about one segment's worth of live data a pass.
        let mut budget = self.cfg.segment_target as u64;
        for (victim, size) in victims {
            if budget == 0 {
                break;
            }
            let copied = self.copy_forward(victim, size, &mut pace).await?;
            budget = budget.saturating_sub(copied.bytes_copied.max(1));
            pass.segments_copied += copied.segments_copied;
            pass.chunks_moved += copied.chunks_moved;
            pass.bytes_copied += copied.bytes_copied;
        }
        let markable = {
            let index = self.state.lock().index.clone();
            let gc = self.gc.lock();
            if gc.unconfirmed.is_some() {
                0
            } else {
                gc.markable(&index, ours)
            }
        };
        if markable >= if eager { 1 } else { MARK_BATCH } {
            self.write_checkpoint(true).await?;
            pass.checkpointed = true;
        }
        pass.marked = self.confirm_and_mark(ours).await?;
        pass.deleted += self.delete_due(grace, &mut pace).await?;
        let mut gc = self.gc.lock();
        gc.stats.passes += 1;
        gc.stats.segments_copied += pass.segments_copied;
        gc.stats.chunks_moved += pass.chunks_moved;
        gc.stats.bytes_copied += pass.bytes_copied;
        pass.pending = gc.pending.len() as u64;
        Ok(pass)
    }

    /// Delete what has been unneeded for `grace`.
    async fn delete_due(&self, grace: Duration, pace: &mut Pace) -> Result<u64> {
        let due = self.gc.lock().due(grace, Instant::now());
        let mut deleted = 0;
        for (object, size) in due {
            match self.log.delete(&object.key()).await {
                Ok(()) | Err(Error::Store(StoreError::NotFound(_))) => {}
                Err(e) => return Err(e),
            }
            self.gc.lock().deleted(&object, size);
            deleted += 1;
            pace.spend(1, 0).await;
        }
        Ok(deleted)
    }

    /// After a checkpoint of ours is stored, an owner check that finds no
    /// newer claim means every later owner listed the checkpoint and
    /// recovers from it or a newer one: mark what that recovery does not
    /// need (docs/rfcs/0002). No request when nothing would be marked.
    async fn confirm_and_mark(&self, ours: u64) -> Result<u64> {
        // A checkpoint picked before now lands first and is the one
        // confirmed, and none is picked until the marks are made: a newer
        // root never names what is marked here (docs/rfcs/0004; the review
        // found a collector copy published after an older checkpoint's
        // pick, named by a newer root in flight, marked from the older).
        let _no_checkpoint = self.without_checkpoints().await;
        let Some((position, snapshot, named_runs)) = self.gc.lock().unconfirmed.take() else {
            return Ok(0);
        };
        let worth_it = {
            let gc = self.gc.lock();
            let current = self.state.lock().index.clone();
            gc.inherited
                || !gc
                    .unneeded(position, &snapshot, &named_runs, &current, ours)
                    .is_empty()
        };
        if !worth_it {
            return Ok(0);
        }
        self.log
            .fence()
            .check_owner()
            .await
            .map_err(|e| self.fenced_by(e))?;
        if self.gc.lock().inherited {
            self.list_inherited(ours).await?;
        }
        // The current index is read under the collector's lock: a segment
        // published meanwhile is either named by it or not yet known here.
        let mut gc = self.gc.lock();
        let current = self.state.lock().index.clone();
        let now = Instant::now();
        let unneeded = gc.unneeded(position, &snapshot, &named_runs, &current, ours);
        let marked = unneeded.len() as u64;
        for (object, size) in unneeded {
            gc.pending.insert(object, (now, size));
        }
        gc.inherited = false;
        Ok(marked)
    }

    /// The metadata older epochs left (claims, release markers, probes):
    /// listed once, when the first checkpoint of ours is confirmed.
    async fn list_inherited(&self, ours: u64) -> Result<()> {
        let store = self.log.store();
        let claims = store.list(paths::CLAIMS).await?;
        let releases = store.list(paths::RELEASES).await?;
        let probes = store.list(paths::PROBES).await?;
        let runs = store.list(paths::INDEX_RUNS).await?;
        let mut gc = self.gc.lock();
        gc.runs.extend(paths::listed_runs(&runs));
        gc.claims.extend(
            paths::listed_epochs(&claims, paths::CLAIMS)
                .into_iter()
                .filter(|e| *e < ours),
        );
        gc.releases.extend(
            paths::listed_epochs(&releases, paths::RELEASES)
                .into_iter()
                .filter(|e| *e < ours),
        );
        gc.probes.extend(probes.into_iter().map(|o| o.key));
        Ok(())
    }

    /// Copy the live frames of `victim` into new segments of ours.
    async fn copy_forward(
        self: &Arc<Self>,
        victim: SegmentId,
        size: u64,
        pace: &mut Pace,
    ) -> Result<GcPass> {
        let (_, table) = self.log.read_table(victim, size).await?;
        // Live: the chunks whose mapping names a frame of this segment. A
        // chunk frame alone is copied from the ranges read here; a patched
        // mapping is folded — read whole, its other frames too, and written
        // as one chunk frame (docs/rfcs/0007).
        let live: Vec<(u64, Mapping)> = {
            let st = self.state.lock();
            let mut live: Vec<(u64, Mapping)> = table
                .iter()
                .filter_map(|e| {
                    let loc = e.loc(victim)?;
                    let m = st.index.get(e.chunk)?;
                    m.frames().contains(&loc).then_some((e.chunk, m))
                })
                .collect();
            live.dedup_by_key(|(chunk, _)| *chunk);
            live
        };
        let singles: Vec<(u64, Loc)> = live
            .iter()
            .filter_map(|(chunk, m)| match m {
                Mapping::Frame(loc) => Some((*chunk, *loc)),
                Mapping::Patched(_) => None,
            })
            .collect();
        let ranges = read_ranges(&singles);
        let read_bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let mut parts = Vec::with_capacity(ranges.len());
        for r in &ranges {
            parts.push((r.start, self.log.read_range(victim, r.clone()).await?));
        }
        pace.spend(1 + ranges.len() as u64, read_bytes).await;
        let frame_of = |loc: &Loc| {
            let (start, bytes) = parts
                .iter()
                .rev()
                .find(|(start, _)| *start <= loc.offset as u64)
                .expect("a range covers every frame");
            let at = (loc.offset as u64 - start) as usize;
            bytes.slice(at..at + loc.len as usize)
        };
        let mut captured = Vec::with_capacity(live.len());
        let mut from = Vec::with_capacity(live.len());
        for (chunk, m) in live {
            let data = match &m {
                Mapping::Frame(loc) => Arc::new(self.codec.decode(*loc, chunk, &frame_of(loc))?),
                Mapping::Patched(frames) => {
                    let bytes = frames.iter().map(|l| l.len as u64).sum();
                    let data = self.load(chunk, &m).await?;
                    pace.spend(frames.len() as u64, bytes).await;
                    data
                }
            };
            captured.push(Ready {
                chunk,
                generation: 0,
                body: Body::Chunk(data),
            });
            from.push(m);
        }
        if captured.is_empty() {
            return Ok(GcPass::default());
        }
        let (captured, plains) = self.compress_off_workers(captured).await;
        // Under the allocation lock flushes capture and allocate under:
        // the chunks still at the copied frames and not dirty, and the new
        // ids. A newer version of one of them is either published (the
        // index moved), or dirty — captured by a flush in flight, which
        // may hold lower ids than the copy (docs/rfcs/0005), or to be
        // captured — or written later: its flush allocates after this, so
        // replay applies it after the copy.
        let (plan, layouts, moves) = {
            let _allocating = self.pipeline.allocating().await;
            let still: Vec<bool> = {
                let st = self.state.lock();
                captured
                    .iter()
                    .zip(&from)
                    .map(|(c, m)| {
                        st.index.get(c.chunk).as_ref() == Some(m) && st.dirty.get(c.chunk).is_none()
                    })
                    .collect()
            };
            let mut kept_c = Vec::new();
            let mut kept_p = Vec::new();
            let mut kept_from = Vec::new();
            for (((c, p), loc), keep) in captured.into_iter().zip(plains).zip(from).zip(still) {
                if keep {
                    kept_c.push(c);
                    kept_p.push(p);
                    kept_from.push(loc);
                }
            }
            if kept_c.is_empty() {
                return Ok(GcPass::default());
            }
            let (plan, layouts, outcomes) = self.layout(kept_c, kept_p)?;
            let moves: Vec<(u64, Mapping, Option<Loc>)> = outcomes
                .into_iter()
                .flatten()
                .zip(kept_from)
                .map(|((chunk, _, to, _), from)| (chunk, from, to.loc()))
                .collect();
            (plan, layouts, moves)
        };
        let written = self
            .upload_plan(plan, layouts)
            .await
            .map_err(|e| self.fenced_by(e))?;
        let bytes: u64 = written.iter().map(|w| w.bytes).sum();
        pace.spend(written.len() as u64, bytes).await;
        let mut fs = self.flush.lock().await;
        let mut moved = 0;
        {
            let mut st = self.state.lock();
            for (chunk, from, to) in &moves {
                if st.index.get(*chunk).as_ref() == Some(from) {
                    if from.patches() > 0 {
                        self.patches_folded
                            .fetch_add(from.patches() as u64, Ordering::Relaxed);
                    }
                    st.moved(*chunk, *to);
                    moved += 1;
                }
            }
        }
        fs.published(&written);
        self.gc.lock().published(&written);
        tracing::debug!("copied {moved} chunks forward out of segment {victim}");
        Ok(GcPass {
            segments_copied: 1,
            chunks_moved: moved,
            bytes_copied: bytes,
            ..GcPass::default()
        })
    }
}

/// Collect in the background while the volume lives: a pass every
/// interval, making no request when there is nothing to do.
pub(super) async fn background(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.cfg.gc.interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        let grace = inner.cfg.gc.grace;
        match inner.collect(grace, false).await {
            Ok(_) => {}
            Err(Error::Fenced(_)) => return,
            Err(e) => tracing::warn!("garbage collection pass failed (will retry): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pass_keeps_to_its_request_and_byte_rates() {
        let cfg = GcConfig {
            requests_per_sec: 100,
            bytes_per_sec: 1 << 20,
            ..GcConfig::default()
        };
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(&cfg);
        for _ in 0..50 {
            pace.spend(1, 0).await;
        }
        let by_requests = start.elapsed();
        assert!(
            by_requests >= Duration::from_millis(490) && by_requests < Duration::from_millis(600),
            "{by_requests:?}"
        );
        pace.spend(0, 4 << 20).await;
        assert!(
            start.elapsed() >= Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn neighbouring_frames_are_read_in_one_range() {
        let seg = SegmentId { epoch: 1, seq: 0 };
        let at = |offset: u32, len: u32| {
            (
                0,
                Loc {
                    segment: seg,
                    offset,
                    len,
                },
            )
        };
        let far = (MERGE_GAP as u32) * 3;
        let ranges = read_ranges(&[at(far, 10), at(100, 50), at(0, 40)]);
        assert_eq!(ranges, vec![0..150, far as u64..far as u64 + 10]);
    }
}
