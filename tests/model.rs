//! Model checker: random I/O interleaved with crashes, takeovers and
//! faults, checked against a model of the durability contract.
//!
//! Each case is one simulated life of a volume, driven by a seeded RNG
//! (deterministic: `MODEL_SEED=<seed> cargo test --test model -- --nocapture`
//! replays one case and prints its trace). A case picks a backend (memory
//! or a local directory) and whether the writer keeps a host-local journal
//! (as the device server does), then runs operations:
//!
//! - writes, zeroes, discards, reads — sequential, and concurrent writers
//!   whose per-chunk apply order the model recovers from what it reads;
//! - flushes, and flushes held at a gate (a segment PUT, a checkpoint
//!   PUT) while other writes land, then released;
//! - crashes between operations, and inside them: the simulated process
//!   dies at its k-th store write (the write lands or not), during a
//!   flush (after k of n segments, after the PUTs before publishing,
//!   mid-checkpoint), close, or the next open and journal replay; while
//!   a flush is held in flight; in the middle of a journal append (the
//!   record is torn) or of a journal rotation (a `.new` file is left);
//! - takeovers with `--force` while the old writer lives on as a zombie,
//!   which keeps writing and flushing (it must be fenced), sometimes with
//!   its flush held in flight across the takeover; an open without
//!   `--force` of a live writer's volume must be refused;
//! - transient store faults (writes fail, before or after landing).
//!
//! The model, per chunk: every version the chunk held since recovery, in
//! apply order, and a floor — the oldest version a crash may fall back
//! to. A successful flush raises the floor to what it captured; with a
//! journal every acknowledged write does. After any crash, every chunk
//! must hold a version at or above its floor: acknowledged data survived,
//! and nothing is torn, foreign, or from a fenced zombie. While running,
//! every read must equal the model exactly.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use zerofs_ublk::error::Error;
use zerofs_ublk::store::append::WINDOW;
use zerofs_ublk::store::backend::{
    DynStore, FaultPlan, FaultyStore, LocalDirStore, MemoryStore, ObjectInfo, ObjectStore,
    StoreError, StoreResult,
};
use zerofs_ublk::store::keys::key_use;
use zerofs_ublk::store::paths::{self, CHECKPOINTS, CLAIMS, INDEX_RUNS, SEALS, SEGMENTS};
use zerofs_ublk::volume::gc::{GcConfig, GcPolicy};
use zerofs_ublk::volume::journal::{Durability, UploadLag};
use zerofs_ublk::volume::{Volume, VolumeConfig};

const CHUNKS: u64 = 12;
const CS: usize = CHUNK as usize;
const SECTORS_PER_CHUNK: u64 = CHUNK as u64 / 512;
const SECTORS: u64 = CHUNKS * SECTORS_PER_CHUNK;
/// Bytes before a journal record's data (kind, offset, len, counter, tag).
const JOURNAL_RECORD_HEADER: u64 = 41;

// ---- A deterministic RNG ---------------------------------------------------

#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A sector range of up to three chunks.
    fn range(&mut self) -> (u64, u64) {
        let sector = self.below(SECTORS);
        let max = (SECTORS - sector).min(3 * SECTORS_PER_CHUNK);
        (sector, 1 + self.below(max))
    }
    /// A sector range inside one chunk (one journal record).
    fn range_in_chunk(&mut self) -> (u64, u64) {
        let chunk = self.below(CHUNKS);
        let first = self.below(SECTORS_PER_CHUNK);
        let sectors = 1 + self.below(SECTORS_PER_CHUNK - first);
        (chunk * SECTORS_PER_CHUNK + first, sectors)
    }
}

// ---- One simulated process's view of the store -----------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Req {
    Write,
    Read,
    List,
    Delete,
}

/// Where a process is held so other things can happen meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// A flush's segment upload.
    SegmentPut,
    /// The collector's ownership check (after its checkpoint, before it
    /// marks anything). A flush makes none (docs/rfcs/0003).
    OwnerCheck,
    /// A checkpoint's root upload (in the background after a flush, or
    /// the collector's).
    CheckpointPut,
    /// A checkpoint's index run upload (before its root).
    IndexRunPut,
    /// An opener's claim of the next epoch.
    ClaimPut,
    /// An opener's seal of the log it found.
    SealPut,
    /// An opener's listing of the segments.
    SegmentList,
    /// An opener's fence marker at a name of the previous writer's (after
    /// its listing, before its seal).
    FencePut,
    /// A frame's ranged GET (a read, or the read of a read-modify-write).
    FrameGet,
    /// An object's deletion (garbage collection).
    Delete,
}

impl Gate {
    fn holds(self, req: Req, key: &str) -> bool {
        let (want, prefix) = match self {
            Gate::SegmentPut | Gate::FencePut => (Req::Write, SEGMENTS),
            Gate::OwnerCheck => (Req::Read, CLAIMS),
            Gate::CheckpointPut => (Req::Write, CHECKPOINTS),
            Gate::IndexRunPut => (Req::Write, INDEX_RUNS),
            Gate::ClaimPut => (Req::Write, CLAIMS),
            Gate::SealPut => (Req::Write, SEALS),
            Gate::SegmentList => (Req::List, SEGMENTS),
            Gate::FrameGet => (Req::Read, SEGMENTS),
            Gate::Delete => (Req::Delete, ""),
        };
        req == want && key.starts_with(prefix)
    }
}

/// The store as one simulated server process sees it. The process can
/// die at its k-th store write (that write landing or not) or at once;
/// after that nothing it sends reaches the store. Requests matching an
/// armed gate wait until it opens. Requests yield to the scheduler at
/// seeded points, so concurrent tasks interleave inside store calls even
/// on the memory backend (which never waits).
#[derive(Debug)]
struct ProcStore {
    inner: DynStore,
    dead: AtomicBool,
    /// (writes still allowed, whether the fatal one lands)
    kill: Mutex<Option<(u64, bool)>>,
    /// The prefix of the object whose write the process died at.
    died_at: Mutex<Option<String>>,
    gate: Mutex<Option<(Gate, Arc<Semaphore>)>>,
    /// The gate holds only the first request it matches.
    gate_once: AtomicBool,
    held: AtomicUsize,
    rng: Mutex<Rng>,
}

fn dead_error() -> StoreError {
    StoreError::Unavailable("simulated process is dead".into())
}

impl ProcStore {
    fn new(inner: DynStore, seed: u64) -> Arc<Self> {
        Arc::new(ProcStore {
            inner,
            dead: AtomicBool::new(false),
            kill: Mutex::new(None),
            died_at: Mutex::new(None),
            gate: Mutex::new(None),
            gate_once: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            rng: Mutex::new(Rng(seed)),
        })
    }

    fn kill_after(&self, writes: u64, land: bool) {
        *self.kill.lock() = Some((writes, land));
    }

    fn kill_now(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.open_gate();
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn arm(&self, gate: Gate) {
        self.held.store(0, Ordering::SeqCst);
        self.gate_once.store(false, Ordering::SeqCst);
        *self.gate.lock() = Some((gate, Arc::new(Semaphore::new(0))));
    }

    /// Hold only the first request the gate matches; later ones pass.
    fn arm_once(&self, gate: Gate) {
        self.arm(gate);
        self.gate_once.store(true, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        if let Some((_, sem)) = self.gate.lock().take() {
            sem.close();
        }
    }

    fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst) > 0
    }

    async fn pass(&self, req: Req, key: &str) -> StoreResult<()> {
        let yields = {
            let mut rng = self.rng.lock();
            if rng.chance(30) { 1 + rng.below(3) } else { 0 }
        };
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        let wait = match &*self.gate.lock() {
            Some((gate, sem))
                if gate.holds(req, key)
                    && !(self.gate_once.load(Ordering::SeqCst) && self.held()) =>
            {
                self.held.fetch_add(1, Ordering::SeqCst);
                Some(Arc::clone(sem))
            }
            _ => None,
        };
        if let Some(sem) = wait {
            // Closed when the gate opens: then everyone goes on.
            let _ = sem.acquire().await;
        }
        if self.is_dead() {
            return Err(dead_error());
        }
        Ok(())
    }

    /// Before a write: Ok(true) when the process dies right after it lands.
    async fn admit_write(&self, key: &str) -> StoreResult<bool> {
        self.admit(Req::Write, key).await
    }

    async fn admit(&self, req: Req, key: &str) -> StoreResult<bool> {
        self.pass(req, key).await?;
        let mut kill = self.kill.lock();
        match kill.as_mut() {
            Some((0, land)) => {
                let land = *land;
                *kill = None;
                let kind = key.split('/').next().unwrap_or(key).to_string();
                *self.died_at.lock() = Some(if land {
                    format!("{kind} (landed)")
                } else {
                    kind
                });
                if land {
                    Ok(true)
                } else {
                    self.dead.store(true, Ordering::SeqCst);
                    Err(dead_error())
                }
            }
            Some((n, _)) => {
                *n -= 1;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    fn after_write<T>(&self, dies: bool, result: StoreResult<T>) -> StoreResult<T> {
        if dies {
            self.dead.store(true, Ordering::SeqCst);
            return Err(dead_error());
        }
        result
    }
}

#[async_trait]
impl ObjectStore for ProcStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let dies = self.admit_write(key).await?;
        let result = self.inner.put(key, data).await;
        self.after_write(dies, result)
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let dies = self.admit_write(key).await?;
        let result = self.inner.put_if_absent(key, data).await;
        self.after_write(dies, result)
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.pass(Req::Read, key).await?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.pass(Req::Read, key).await?;
        self.inner.get_range(key, range).await
    }
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.pass(Req::Read, key).await?;
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.pass(Req::List, prefix).await?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        let dies = self.admit(Req::Delete, key).await?;
        let result = self.inner.delete(key).await;
        self.after_write(dies, result)
    }
    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }
    fn describe(&self) -> String {
        format!("process view of {}", self.inner.describe())
    }
}

/// Everything in a test that waits is bounded: a hang in the engine is a
/// failure with a seed, not a stuck CI job.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

async fn within<F: std::future::Future>(what: &str, f: F) -> Result<F::Output, String> {
    tokio::time::timeout(PATIENCE, f)
        .await
        .map_err(|_| format!("{what} did not finish within {PATIENCE:?} (a hang)"))
}

/// Wait until `p` holds a request at its gate (true) or `task` ended
/// without reaching it (false).
/// Wait until `task` is held at the armed gate, or has finished. A
/// flush's checkpoint is stored in the background, after the flush
/// returned: when `checkpoints` is given, a finished flush whose
/// checkpoint is still being stored is waited for until that reaches the
/// gate (or is stored).
async fn reached<T>(
    p: &ProcStore,
    task: &tokio::task::JoinHandle<T>,
    checkpoints: Option<&Volume>,
) -> Result<bool, String> {
    let start = std::time::Instant::now();
    loop {
        if p.held() {
            return Ok(true);
        }
        if task.is_finished() && !checkpoints.is_some_and(|v| v.checkpoint_running()) {
            return Ok(p.held());
        }
        if start.elapsed() > PATIENCE {
            return Err("a task neither reached its gate nor finished (a hang)".into());
        }
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
}

/// A process opens the volume (and replays the journal when it keeps one).
async fn open_volume(
    proc_: Arc<ProcStore>,
    journal: Option<PathBuf>,
    host: Option<UploadLag>,
    force: bool,
    cfg: VolumeConfig,
) -> Result<Arc<Volume>, Error> {
    let store: DynStore = proc_;
    let opts = match (&journal, host) {
        (Some(dir), Some(_)) => host_journaled_writer(force, dir),
        (Some(dir), None) => journaled_writer(force, dir),
        (None, _) => writer(force),
    };
    let vol = Volume::open(store, &secret(), opts, cfg).await?;
    if let Some(dir) = &journal {
        let durability = host.map_or(Durability::Process, Durability::Host);
        vol.attach_journal_as(dir, durability).await?;
    }
    Ok(Arc::new(vol))
}

// ---- The model --------------------------------------------------------------

fn hash(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// What a recovery may fall back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// The last flush (no journal replayed).
    Flushed,
    /// Every acknowledged write (a journal replayed after the process
    /// died).
    Acked,
    /// The last acknowledged FLUSH (a Host journal after a power cut).
    Durable,
}

struct Model {
    current: Vec<u8>,
    /// Per chunk: the versions it held since the last recovery, in order.
    history: Vec<Vec<u64>>,
    /// Per chunk: the newest version a successful flush made durable.
    flushed: Vec<usize>,
    /// Per chunk: the newest acknowledged version a journal replay
    /// restores (= `flushed` without a journal).
    acked: Vec<usize>,
    /// Per chunk: the newest version an acknowledged FLUSH covered — what
    /// a power cut may fall back to with a Host journal (docs/rfcs/0006).
    /// (In those lives a FLUSH may be acknowledged from the journal, so
    /// `flushed` means acknowledged, not in the bucket: they never recover
    /// without the journal.)
    durable: Vec<usize>,
    /// Per chunk: versions some flush attempt captured (only those can be
    /// in the bucket, whether or not the flush succeeded).
    captured: Vec<HashSet<usize>>,
}

impl Model {
    fn new() -> Self {
        let current = vec![0u8; CHUNKS as usize * CS];
        let zero = hash(&current[..CS]);
        Model {
            current,
            history: vec![vec![zero]; CHUNKS as usize],
            flushed: vec![0; CHUNKS as usize],
            acked: vec![0; CHUNKS as usize],
            durable: vec![0; CHUNKS as usize],
            captured: vec![HashSet::new(); CHUNKS as usize],
        }
    }

    fn chunk(&self, c: usize) -> &[u8] {
        &self.current[c * CS..(c + 1) * CS]
    }

    fn apply(&mut self, offset: usize, data: &[u8]) {
        self.current[offset..offset + data.len()].copy_from_slice(data);
        for c in offset / CS..=(offset + data.len() - 1) / CS {
            let h = hash(self.chunk(c));
            self.history[c].push(h);
        }
    }

    /// A flush attempt starts: where each chunk's history is now (what it
    /// captures).
    fn capture(&mut self) -> Vec<usize> {
        let marks: Vec<usize> = self.history.iter().map(|h| h.len() - 1).collect();
        for (c, m) in marks.iter().enumerate() {
            self.captured[c].insert(*m);
        }
        marks
    }

    /// The flush that captured `marks` succeeded.
    fn flushed_at(&mut self, marks: &[usize]) {
        for (c, &m) in marks.iter().enumerate() {
            self.flushed[c] = self.flushed[c].max(m);
            self.acked[c] = self.acked[c].max(m);
            self.durable[c] = self.durable[c].max(m);
        }
    }

    /// A journaled writer acknowledged everything so far.
    fn all_acked(&mut self) {
        for c in 0..CHUNKS as usize {
            self.acked[c] = self.history[c].len() - 1;
        }
    }

    /// Check a recovered image: each chunk must be its floor version — the
    /// acknowledged one when the journal was replayed, else the flushed
    /// one — or a later version some flush captured. Returns the newest
    /// matching version of each chunk, then starts a new life from the
    /// image.
    fn recovered(&mut self, image: Vec<u8>, floor: Floor) -> Result<Vec<usize>, String> {
        let mut matched = Vec::new();
        let replayed = floor != Floor::Flushed;
        for c in 0..CHUNKS as usize {
            let got = hash(&image[c * CS..(c + 1) * CS]);
            let (floor, any_later) = match floor {
                Floor::Acked => (self.acked[c], false),
                Floor::Flushed => (self.flushed[c], false),
                // A Host journal replayed up to where the power cut tore
                // it: any version the chunk held after the floor.
                Floor::Durable => (self.durable[c], true),
            };
            let allowed = |i: usize| {
                i == floor || (i > floor && (any_later || self.captured[c].contains(&i)))
            };
            let holds: Vec<usize> = (0..self.history[c].len())
                .filter(|i| self.history[c][*i] == got)
                .collect();
            match holds.iter().rev().find(|i| allowed(**i)) {
                Some(i) => matched.push(*i),
                None => {
                    let why = if holds.iter().any(|i| *i < floor) {
                        "an older version than the last acknowledged one: acknowledged data lost"
                    } else if !holds.is_empty() {
                        "a version no flush ever captured"
                    } else {
                        "no version it ever held since the last recovery: torn, foreign or a fenced writer's"
                    };
                    return Err(format!(
                        "chunk {c} after recovery is {why} (floor: version {floor} of {}, holds {holds:?}, captured {:?}, journal replayed: {replayed})",
                        self.history[c].len(),
                        self.captured[c]
                    ));
                }
            }
        }
        self.current = image;
        *self = Model {
            current: std::mem::take(&mut self.current),
            ..Model::new()
        };
        for c in 0..CHUNKS as usize {
            self.history[c] = vec![hash(self.chunk(c))];
        }
        Ok(matched)
    }
}

// ---- Statistics over the run -------------------------------------------------

#[derive(Default)]
struct Stats {
    cases: usize,
    crash_points: BTreeMap<String, usize>,
    gates_reached: BTreeMap<String, usize>,
    takeovers: usize,
    zombie_flushes_fenced: usize,
    /// Collection passes by a zombie, and how many of them deleted.
    zombie_collections: usize,
    zombie_deletions: usize,
    failed_flushes: usize,
    concurrent_batches: usize,
    ops: usize,
    /// Patches written, chunks read through patches, patches the
    /// collector folded (docs/rfcs/0007), over every process.
    patches: [u64; 3],
}

impl Stats {
    fn crash(&mut self, kind: impl Into<String>) {
        *self.crash_points.entry(kind.into()).or_default() += 1;
    }
    fn reached(&mut self, gate: Gate, whose: &str) {
        *self
            .gates_reached
            .entry(format!("{gate:?} ({whose})"))
            .or_default() += 1;
    }
    fn total_crashes(&self) -> usize {
        self.crash_points.values().sum()
    }
}

// ---- One case ------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Dir,
}

fn scratch_dir() -> tempfile::TempDir {
    // Memory-backed when the host has one: the local-directory backend
    // fsyncs every object.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

struct Zombie {
    proc_: Arc<ProcStore>,
    vol: Arc<Volume>,
    /// Holds writes no flush of its made durable.
    dirty: bool,
}

struct Case {
    rng: Rng,
    trace: Vec<String>,
    model: Model,
    cfg: VolumeConfig,
    /// Transient faults for everyone (below every process's view).
    faults: FaultyStore,
    /// Faults armed since they were last cleared: flushes may fail.
    faulty: bool,
    /// The host-local journal directory of this life's servers.
    journal: Option<PathBuf>,
    /// The journal is on a "local disk" (`--journal-dir`, a Host journal)
    /// with this lag bound: FLUSH may be acknowledged from it, and the
    /// life has power cuts.
    host: Option<UploadLag>,
    /// Whether the current writer keeps the journal (a server without it
    /// may run in between).
    writer_journals: bool,
    proc_: Arc<ProcStore>,
    vol: Option<Arc<Volume>>,
    zombie: Option<Zombie>,
    /// The writer last looked at (its address) and its patch counters.
    seen: (usize, [u64; 3]),
    _dirs: Vec<tempfile::TempDir>,
}

type Step = Result<(), String>;

/// A flush running in a task, with the model's marks of what it captures.
type FlushTask = (Vec<usize>, tokio::task::JoinHandle<Result<(), Error>>);

fn check(cond: bool, what: impl FnOnce() -> String) -> Step {
    if cond { Ok(()) } else { Err(what()) }
}

impl Case {
    /// Count the current writer's patches; a new writer's counters start
    /// at zero, so the last ones seen of the one before are added then.
    fn tally(&mut self, stats: &mut Stats, end: bool) {
        let now = self.vol.as_ref().map(|v| {
            let s = v.stats();
            (
                Arc::as_ptr(v) as usize,
                [s.patches_written, s.patched_reads, s.patches_folded],
            )
        });
        let (ptr, counts) = now.unwrap_or((0, [0; 3]));
        if ptr != self.seen.0 || end {
            for (total, n) in stats.patches.iter_mut().zip(self.seen.1) {
                *total += n;
            }
            self.seen = (ptr, [0; 3]);
        }
        if !end {
            self.seen = (ptr, counts);
        }
    }

    fn new(seed: u64) -> (Self, Backend) {
        let mut rng = Rng(seed);
        let backend = if rng.chance(50) {
            Backend::Memory
        } else {
            Backend::Dir
        };
        let mut dirs = Vec::new();
        let inner: DynStore = match backend {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Dir => {
                let d = scratch_dir();
                let store = LocalDirStore::open(d.path().join("bucket")).unwrap();
                dirs.push(d);
                Arc::new(store)
            }
        };
        let journaled = rng.chance(50);
        // Half the journaled lives keep a Host journal (on a disk: tmpfs is
        // refused): FLUSHes acknowledged from it (a large bound), from the
        // bucket (a bound below one record), or either (a bound in time).
        let on_disk = journaled && rng.chance(50);
        let journal = journaled.then(|| {
            let d = if on_disk {
                tempfile::tempdir().unwrap()
            } else {
                scratch_dir()
            };
            let p = d.path().join("journal");
            dirs.push(d);
            p
        });
        let host = on_disk.then(|| {
            let hour = Duration::from_secs(3600);
            [
                UploadLag {
                    bytes: 64 << 20,
                    age: hour,
                },
                UploadLag {
                    bytes: 1024,
                    age: hour,
                },
                UploadLag {
                    bytes: 64 << 20,
                    age: Duration::from_millis(2),
                },
            ][rng.below(3) as usize]
        });
        let cfg = VolumeConfig {
            cache_bytes: 4 * CS,
            // Some lives checkpoint after every flush (then every flush
            // reaches a checkpoint PUT).
            checkpoint_every: if rng.chance(33) { 1 } else { 3 },
            // Mostly the default (two flushes in flight), sometimes one at
            // a time or three.
            flush_depth: [2, 2, 1, 3][rng.below(4) as usize],
            readahead_chunks: rng.below(3),
            // Collection runs when a life asks (with no grace period, so
            // what it marks is deleted at its next pass), copying forward
            // segments below half or 90 % live.
            gc: GcConfig {
                policy: GcPolicy::Manual,
                live_below: if rng.chance(50) { 0.5 } else { 0.9 },
                ..test_config().gc
            },
            ..test_config()
        };
        let faults = FaultyStore::new(inner);
        let proc_ = ProcStore::new(Arc::new(faults.clone()), rng.next());
        let case = Case {
            rng,
            trace: Vec::new(),
            model: Model::new(),
            cfg,
            proc_,
            faults,
            faulty: false,
            writer_journals: journal.is_some(),
            host,
            journal,
            vol: None,
            zombie: None,
            seen: (0, [0; 3]),
            _dirs: dirs,
        };
        (case, backend)
    }

    fn note(&mut self, s: impl Into<String>) {
        self.trace.push(s.into());
    }

    fn vol(&self) -> Arc<Volume> {
        Arc::clone(self.vol.as_ref().expect("a live writer"))
    }

    fn clear_faults(&mut self) {
        self.faults.set_plan(FaultPlan::default());
        self.faulty = false;
    }

    fn new_proc(&mut self) -> Arc<ProcStore> {
        ProcStore::new(Arc::new(self.faults.clone()), self.rng.next())
    }

    /// A new simulated process (journaling when the life does) opens the
    /// volume and becomes the writer.
    async fn open_process(&mut self, force: bool) -> Result<Arc<Volume>, Error> {
        self.proc_ = self.new_proc();
        let vol = self.open_as(Arc::clone(&self.proc_), force).await?;
        self.writer_journals = self.journal.is_some();
        Ok(vol)
    }

    async fn open_as(&self, proc_: Arc<ProcStore>, force: bool) -> Result<Arc<Volume>, Error> {
        open_volume(
            proc_,
            self.journal.clone(),
            self.host,
            force,
            self.cfg.clone(),
        )
        .await
    }

    /// Whether a journaled opener now replays the last writer's journal.
    fn replays(&self) -> bool {
        self.journal.is_some() && self.writer_journals
    }

    /// After a crash: the next process recovers; check what it holds.
    async fn recover(&mut self, stats: &mut Stats, kind: &str) -> Result<Vec<usize>, String> {
        self.clear_faults();
        let replayed = self.replays();
        let vol = within("recovery", self.open_process(true))
            .await?
            .map_err(|e| format!("reopen after crash failed: {e}"))?;
        self.adopt(vol, replayed, stats, kind).await
    }

    /// `vol` is the new writer: check its image against the model.
    async fn adopt(
        &mut self,
        vol: Arc<Volume>,
        replayed: bool,
        stats: &mut Stats,
        kind: &str,
    ) -> Result<Vec<usize>, String> {
        let floor = if replayed {
            Floor::Acked
        } else {
            Floor::Flushed
        };
        self.adopt_with(vol, floor, stats, kind).await
    }

    /// `adopt`, checking against `floor`.
    async fn adopt_with(
        &mut self,
        vol: Arc<Volume>,
        floor: Floor,
        stats: &mut Stats,
        kind: &str,
    ) -> Result<Vec<usize>, String> {
        let image = within("read", vol.read(0, self.model.current.len()))
            .await?
            .map_err(|e| format!("read after recovery failed: {e}"))?;
        self.vol = Some(vol);
        stats.crash(kind);
        self.model.recovered(image, floor)
    }

    /// The current process dies: nothing more of it reaches the store.
    fn die(&mut self) {
        self.proc_.kill_now();
        self.vol = None;
    }

    fn acked(&mut self) {
        if self.writer_journals {
            self.model.all_acked();
        }
    }

    async fn write(&mut self, vol: &Volume, sector: u64, sectors: u64, seed: u64) -> Step {
        let data = pattern(seed, (sectors * 512) as usize);
        // Half the time as the frontend writes: at once when there is
        // room, else the waiting path.
        let at_once = self.rng.chance(50)
            && vol
                .try_write(sector * 512, &data)
                .map_err(|e| format!("write failed: {e}"))?;
        if !at_once {
            within("write", vol.write(sector * 512, &data))
                .await?
                .map_err(|e| format!("write failed: {e}"))?;
        }
        self.model.apply((sector * 512) as usize, &data);
        self.acked();
        Ok(())
    }

    async fn random_write(&mut self, vol: &Volume, prefix: &str) -> Step {
        let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
        self.note(format!("{prefix}write {sector}+{sectors} seed {seed}"));
        self.write(vol, sector, sectors, seed).await
    }

    async fn read_check(&mut self, vol: &Volume, sector: u64, sectors: u64) -> Step {
        let got = within("read", vol.read(sector * 512, (sectors * 512) as usize))
            .await?
            .map_err(|e| format!("read failed: {e}"))?;
        let off = (sector * 512) as usize;
        check(got == self.model.current[off..off + got.len()], || {
            format!("read of sectors {sector}+{sectors} differs from the model")
        })
    }

    /// A flush's outcome: success raises the floors; failure is allowed
    /// only when faults were armed.
    fn flushed(&mut self, marks: &[usize], r: Result<(), Error>, stats: &mut Stats) -> Step {
        match r {
            Ok(()) => {
                self.model.flushed_at(marks);
                Ok(())
            }
            Err(e) => {
                stats.failed_flushes += 1;
                check(self.faulty, || {
                    format!("a flush failed with no fault armed: {e}")
                })
            }
        }
    }

    async fn flush(&mut self, stats: &mut Stats) -> Step {
        let marks = self.model.capture();
        let vol = self.vol();
        let r = if self.bucket_flush() {
            within("flush to the bucket", vol.flush_to_bucket()).await?
        } else {
            within("flush", vol.flush()).await?
        };
        self.flushed(&marks, r, stats)
    }

    /// In a Host journal's life, half the flushes go straight to the
    /// bucket, as the background upload does (a FLUSH would mostly be
    /// acknowledged from the journal and never reach the store's gates).
    fn bucket_flush(&mut self) -> bool {
        self.host.is_some() && self.rng.chance(50)
    }

    /// A Host journal's host loses power (docs/rfcs/0006): between
    /// operations, or while a bucket flush runs and the process dies right
    /// after its k-th store write lands (or not). Of the journal only what
    /// was synced survives; the next writer replays it, and every chunk
    /// must be a version it held at or after the last acknowledged FLUSH.
    async fn power_cut(&mut self, stats: &mut Stats) -> Step {
        let during_flush = self.rng.chance(60);
        let vol = self.vol();
        let kind = if during_flush {
            let (k, land) = (self.rng.below(4), self.rng.chance(70));
            self.note(format!(
                "power cut at store write {k} (lands {land}) of a bucket flush"
            ));
            self.proc_.kill_after(k, land);
            let marks = self.model.capture();
            if let Ok(()) = within("flush to the bucket", vol.flush_to_bucket()).await? {
                self.model.flushed_at(&marks);
            }
            "power cut in a bucket flush"
        } else {
            self.note("power cut");
            "power cut"
        };
        self.proc_.kill_now();
        let state = vol.journal_durable_state();
        drop(vol);
        self.vol = None;
        cut_power(state, self.rng.next());
        self.clear_faults();
        let vol = within("recovery", self.open_process(true))
            .await?
            .map_err(|e| format!("reopen after a power cut failed: {e}"))?;
        self.adopt_with(vol, Floor::Durable, stats, kind)
            .await
            .map(drop)
    }

    async fn step(&mut self, stats: &mut Stats) -> Step {
        stats.ops += 1;
        let r = self.rng.below(120);
        match r {
            110..=115 => self.overlapping_flushes(stats).await,
            100..=104 => self.collect().await,
            105..=109 => self.gated_collect(stats).await,
            0..=20 => self.random_write(&self.vol(), "").await,
            21..=24 => {
                let (sector, sectors) = self.rng.range();
                let discard = self.rng.chance(50);
                self.note(format!(
                    "{} {sector}+{sectors}",
                    if discard { "discard" } else { "write-zeroes" }
                ));
                let (off, len) = (sector * 512, sectors * 512);
                let vol = self.vol();
                let r = if discard {
                    within("discard", vol.discard(off, len)).await?
                } else {
                    within("write-zeroes", vol.write_zeroes(off, len)).await?
                };
                r.map_err(|e| format!("zeroing failed: {e}"))?;
                self.model.apply(off as usize, &vec![0; len as usize]);
                self.acked();
                Ok(())
            }
            25..=29 => {
                let (sector, sectors) = self.rng.range();
                self.note(format!("read {sector}+{sectors}"));
                self.read_check(&self.vol(), sector, sectors).await
            }
            30..=36 => {
                self.note("flush");
                self.flush(stats).await
            }
            37..=42 => self.concurrent_writers(stats).await,
            43..=50 => self.gated_flush(stats).await,
            51..=54 => {
                let (after, land) = (self.rng.below(6), self.rng.chance(50));
                self.note(format!(
                    "transient faults after {after} writes, land {land}"
                ));
                self.faults.set_plan(FaultPlan {
                    writes_before_failure: Some(after),
                    land_then_fail: land,
                    failures: Some(1 + self.rng.below(3)),
                    ..FaultPlan::default()
                });
                self.faulty = true;
                Ok(())
            }
            55..=59 => {
                self.note("crash");
                self.die();
                self.recover(stats, "between operations").await.map(drop)
            }
            60..=68 => self.crash_inside(stats).await,
            69..=72 if self.writer_journals => self.torn_append(stats).await,
            73..=74 if self.writer_journals => self.crash_in_rotation(stats).await,
            // (A Host journal's life never recovers without it: FLUSHes
            // acknowledged from it are not in the bucket.)
            75..=76 if self.journal.is_some() && self.host.is_none() => {
                self.server_without_journal(stats).await
            }
            116..=119 if self.host.is_some() => self.power_cut(stats).await,
            77..=79 => self.clean_reopen(stats).await,
            80..=83 => self.takeover(stats, None).await,
            84..=86 => {
                let gate = [Gate::SegmentPut, Gate::CheckpointPut, Gate::IndexRunPut]
                    [self.rng.below(3) as usize];
                self.takeover(stats, Some(gate)).await
            }
            87..=88 => self.takeover_held_at_open(stats).await,
            89 => self.partial_write_race(stats).await,
            90 => self.racing_takeovers(stats).await,
            91..=95 if self.zombie.is_some() => self.zombie_step(stats).await,
            96..=99 => self.contended_open(stats).await,
            _ => {
                let (sector, sectors) = self.rng.range();
                self.note(format!("read {sector}+{sectors}"));
                self.read_check(&self.vol(), sector, sectors).await
            }
        }
    }

    /// Several writers at once. Each chunk is written whole by one writer
    /// at a time, in some order; the model finds the order from what the
    /// chunk holds afterwards (no order = a lost or torn update).
    async fn concurrent_writers(&mut self, stats: &mut Stats) -> Step {
        let n = 2 + self.rng.below(3) as usize;
        let writes: Vec<(u64, u64, u64)> = (0..n)
            .map(|_| {
                let (s, k) = self.rng.range();
                (s, k, self.rng.next())
            })
            .collect();
        // Sometimes a flush runs among them (never under faults: it must
        // succeed, and so must the flush that follows, which then pins
        // the floor to the outcome — what the concurrent one captured,
        // the model cannot know).
        let with_flush = !self.faulty && self.rng.chance(40);
        self.note(format!(
            "concurrent writes {writes:?}, flush among them: {with_flush}"
        ));
        stats.concurrent_batches += 1;
        let vol = self.vol();
        let flush = with_flush.then(|| {
            let v = Arc::clone(&vol);
            tokio::spawn(async move { v.flush().await })
        });
        let tasks: Vec<_> = writes
            .iter()
            .map(|&(s, k, seed)| {
                let v = Arc::clone(&vol);
                tokio::spawn(async move {
                    let data = pattern(seed, (k * 512) as usize);
                    v.write(s * 512, &data).await
                })
            })
            .collect();
        for t in tasks {
            within("concurrent write", t)
                .await?
                .unwrap()
                .map_err(|e| format!("concurrent write failed: {e}"))?;
        }
        if let Some(flush) = flush {
            within("flush", flush)
                .await?
                .unwrap()
                .map_err(|e| format!("a flush among concurrent writes failed: {e}"))?;
        }
        self.resolve(&vol, &writes).await?;
        if with_flush {
            self.flush(stats).await?;
        }
        Ok(())
    }

    /// After `writes` ran concurrently: each chunk must match some order
    /// of the writes touching it, applied whole; that becomes its version.
    async fn resolve(&mut self, vol: &Volume, writes: &[(u64, u64, u64)]) -> Step {
        let n = writes.len();
        let image = within("read", vol.read(0, self.model.current.len()))
            .await?
            .map_err(|e| format!("read failed: {e}"))?;
        for c in 0..CHUNKS as usize {
            let chunk = c * CS..(c + 1) * CS;
            let touching: Vec<usize> = (0..n)
                .filter(|&i| {
                    let (s, k, _) = writes[i];
                    let (a, b) = ((s * 512) as usize, ((s + k) * 512) as usize);
                    a < chunk.end && b > chunk.start
                })
                .collect();
            if touching.is_empty() {
                check(
                    image[chunk.clone()] == self.model.current[chunk.clone()],
                    || format!("chunk {c} changed though no writer touched it"),
                )?;
                continue;
            }
            let matches_an_order = permutations(&touching).iter().any(|order| {
                let mut buf = self.model.current[chunk.clone()].to_vec();
                for &i in order {
                    let (s, k, seed) = writes[i];
                    let data = pattern(seed, (k * 512) as usize);
                    let (a, b) = ((s * 512) as usize, ((s + k) * 512) as usize);
                    let (lo, hi) = (a.max(chunk.start), b.min(chunk.end));
                    buf[lo - chunk.start..hi - chunk.start].copy_from_slice(&data[lo - a..hi - a]);
                }
                buf == image[chunk.clone()]
            });
            check(matches_an_order, || {
                format!("chunk {c} after concurrent writes matches no order of its writers")
            })?;
            self.model.history[c].push(hash(&image[chunk]));
        }
        self.model.current = image;
        self.acked();
        Ok(())
    }

    /// A partial write to a chunk neither dirty nor cached completes
    /// without the store: it is acknowledged while its background read of
    /// the chunk's stored version is held. Meanwhile, one of: the chunk is
    /// rewritten whole and flushed (it moves to a new frame; the late read
    /// must not fold the old contents in); another partial write, a read
    /// of what was written, and a flush that has to wait for the held read;
    /// or the process dies with the read held.
    async fn partial_write_race(&mut self, stats: &mut Stats) -> Step {
        let mapped: Vec<usize> = (0..CHUNKS as usize)
            .filter(|&c| self.model.chunk(c).iter().any(|b| *b != 0))
            .collect();
        if mapped.is_empty() {
            return Ok(());
        }
        let c = mapped[self.rng.below(mapped.len() as u64) as usize] as u64;
        let mut partial = |least: u64| {
            let sectors = least + self.rng.below(SECTORS_PER_CHUNK - 1 - least);
            let first = self.rng.below(SECTORS_PER_CHUNK - sectors);
            (c * SECTORS_PER_CHUNK + first, sectors, self.rng.next())
        };
        // Over half the chunk: not a patch, so its stored version is read
        // (in the background) for the flush (docs/rfcs/0007).
        let (p1, p2) = (partial(SECTORS_PER_CHUNK / 2 + 1), partial(1));
        let whole = (c * SECTORS_PER_CHUNK, SECTORS_PER_CHUNK, self.rng.next());
        let then = self.rng.below(3);
        let next = match then {
            0 => format!("a whole write {whole:?} and a flush"),
            1 => format!("a partial write {p2:?}, a read and a flush"),
            _ => "the process dies".to_string(),
        };
        self.note(format!(
            "partial write {p1:?} to chunk {c} while its read is held, then {next}"
        ));
        // A fresh process (empty cache) after a clean close, so the
        // partial write's chunk is not in memory.
        self.clear_faults();
        let marks = self.model.capture();
        let vol = Arc::try_unwrap(self.vol.take().expect("live writer")).expect("one reference");
        within("close", vol.close())
            .await?
            .map_err(|e| format!("close failed with no fault armed: {e}"))?;
        self.model.flushed_at(&marks);
        let vol = within("open", self.open_process(false))
            .await?
            .map_err(|e| format!("open failed: {e}"))?;
        self.vol = Some(Arc::clone(&vol));
        self.proc_.arm(Gate::FrameGet);
        let (s, k, seed) = p1;
        let data = pattern(seed, (k * 512) as usize);
        match tokio::time::timeout(Duration::from_secs(5), vol.write(s * 512, &data)).await {
            Ok(r) => r.map_err(|e| format!("partial write failed: {e}"))?,
            Err(_) => return Err("a partial write waited for the store".into()),
        }
        self.model.apply((s * 512) as usize, &data);
        self.acked();
        // Its background read must start (and is held).
        let start = std::time::Instant::now();
        while !self.proc_.held() {
            if start.elapsed() > Duration::from_secs(5) {
                return Err("a partial write's background read never started".into());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        stats.reached(Gate::FrameGet, "partial write's read");
        match then {
            0 => {
                let (s, k, seed) = whole;
                self.write(&vol, s, k, seed).await?;
                self.flush(stats).await?;
                self.proc_.open_gate();
            }
            1 => {
                let (s, k, seed) = p2;
                self.write(&vol, s, k, seed).await?;
                self.read_check(&vol, s, k).await?;
                // A read of the whole chunk and a flush both need the
                // held read; they wait for it.
                let marks = self.model.capture();
                let v = Arc::clone(&vol);
                let read =
                    tokio::spawn(async move { v.read(c * SECTORS_PER_CHUNK * 512, CS).await });
                let v = Arc::clone(&vol);
                let task = tokio::spawn(async move { v.flush().await });
                tokio::time::sleep(Duration::from_millis(2)).await;
                self.proc_.open_gate();
                let got = within("read", read)
                    .await?
                    .unwrap()
                    .map_err(|e| format!("read of a partial chunk failed: {e}"))?;
                check(got == self.model.chunk(c as usize), || {
                    format!("a read of partial chunk {c} differs from the model")
                })?;
                let r = within("flush", task).await?.unwrap();
                self.flushed(&marks, r, stats)?;
            }
            _ => {
                self.die();
                drop(vol);
                self.recover(stats, "partial write's read held").await?;
                return Ok(());
            }
        }
        self.read_check(&vol, c * SECTORS_PER_CHUNK, SECTORS_PER_CHUNK)
            .await?;
        self.flush(stats).await
    }

    /// A flush held at a gate while more writes land (and reads check
    /// them); then it completes, or the process dies with it in flight.
    async fn gated_flush(&mut self, stats: &mut Stats) -> Step {
        let gate =
            [Gate::SegmentPut, Gate::CheckpointPut, Gate::IndexRunPut][self.rng.below(3) as usize];
        let crash = self.rng.chance(25);
        let bucket = self.bucket_flush();
        self.note(format!(
            "flush held at {gate:?}, crash in flight {crash}, to the bucket {bucket}"
        ));
        let vol = self.vol();
        let marks = self.model.capture();
        self.proc_.arm(gate);
        let v = Arc::clone(&vol);
        let task = tokio::spawn(async move {
            if bucket {
                v.flush_to_bucket().await
            } else {
                v.flush().await
            }
        });
        if reached(&self.proc_, &task, Some(&vol)).await? {
            stats.reached(gate, "owner's flush");
        }
        for _ in 0..1 + self.rng.below(4) {
            self.random_write(&vol, "  while held: ").await?;
            if self.rng.chance(30) {
                let (sector, sectors) = self.rng.range();
                self.read_check(&vol, sector, sectors).await?;
            }
        }
        // A second flush behind the held one (its segment PUT is held too;
        // it captures the writes made since, and publishes after it).
        let second = (!crash && self.rng.chance(30))
            .then(|| self.spawn_flush(&vol, "  while held: a second flush starts"));
        if crash {
            self.proc_.kill_now();
            task.abort();
            // It may have finished (acknowledged) before the process died.
            if let Ok(Ok(())) = within("flush", task).await? {
                self.model.flushed_at(&marks);
            }
            drop(vol);
            self.vol = None;
            return self.recover(stats, "flush in flight").await.map(drop);
        }
        self.proc_.open_gate();
        let r = within("flush", task).await?.unwrap();
        self.flushed(&marks, r, stats)?;
        if let Some((marks, task)) = second {
            let r = within("flush", task).await?.unwrap();
            self.flushed(&marks, r, stats)?;
        }
        // What the flush made durable and what was written during it must
        // both read back (a flush that forgot the later writes shows here).
        self.read_check(&vol, 0, SECTORS).await
    }

    /// Flushes overlapping (docs/rfcs/0005): the first is held at its
    /// first segment PUT while later ones capture, upload and wait for
    /// their turn — maybe with a collection copying forward meanwhile —
    /// then the first goes on, fails, or the process dies. A later flush
    /// acknowledged before an earlier one landed, or over an earlier one
    /// that failed after it captured, shows as lost data after the crash.
    async fn overlapping_flushes(&mut self, stats: &mut Stats) -> Step {
        let later = 1 + self.rng.below(2);
        let collect = self.rng.chance(30);
        let end = self.rng.below(4);
        let end_name = ["goes on", "goes on", "fails", "process dies"][end as usize];
        self.note(format!(
            "overlapping flushes: {later} behind one held at its segment PUT, collection {collect}, then it {end_name}"
        ));
        let vol = self.vol();
        self.random_write(&vol, "  ").await?;
        self.proc_.arm_once(Gate::SegmentPut);
        let mut flushes = vec![self.spawn_flush(&vol, "  first flush")];
        if reached(&self.proc_, &flushes[0].1, None).await? {
            stats.reached(Gate::SegmentPut, "overlapped flush");
        }
        for i in 0..later {
            for _ in 0..1 + self.rng.below(2) {
                self.random_write(&vol, "  while held: ").await?;
                // A flush spawned earlier may not have captured yet (its
                // task not yet run, or waiting for a slot): it may capture
                // this version, which then may be in the bucket.
                self.model.capture();
            }
            flushes.push(self.spawn_flush(&vol, &format!("  while held: flush {}", i + 2)));
        }
        let collection = collect.then(|| {
            self.note("  while held: collect");
            let v = Arc::clone(&vol);
            tokio::spawn(async move { v.collect(Duration::ZERO).await })
        });
        // Let the later flushes upload and wait for their turn.
        for _ in 0..self.rng.below(20) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if end == 2 {
            // The held PUT fails (it may land), and its retries: the later
            // flushes captured after it and must go round again.
            self.faults.set_plan(FaultPlan {
                writes_before_failure: Some(0),
                land_then_fail: self.rng.chance(50),
                failures: Some(1 + self.rng.below(3)),
                ..FaultPlan::default()
            });
            self.faulty = true;
        }
        if end == 3 {
            self.proc_.kill_now();
            for (_, task) in &flushes {
                task.abort();
            }
            if let Some(c) = &collection {
                c.abort();
            }
            // Any may have been acknowledged before the process died.
            for (marks, task) in flushes {
                if let Ok(Ok(())) = within("flush", task).await? {
                    self.model.flushed_at(&marks);
                }
            }
            drop(vol);
            self.vol = None;
            return self.recover(stats, "overlapping flushes").await.map(drop);
        }
        self.proc_.open_gate();
        for (marks, task) in flushes {
            let r = within("flush", task).await?.unwrap();
            self.flushed(&marks, r, stats)?;
        }
        if let Some(c) = collection {
            match within("collect", c).await?.unwrap() {
                Ok(_) => {}
                Err(_) if self.faulty => {}
                Err(e) => return Err(format!("collection failed: {e}")),
            }
        }
        self.read_check(&vol, 0, SECTORS).await
    }

    /// Start a flush in a task, capturing what it must make durable.
    fn spawn_flush(&mut self, vol: &Arc<Volume>, what: &str) -> FlushTask {
        let bucket = self.bucket_flush();
        self.note(format!(
            "{what}{}",
            if bucket { " (to the bucket)" } else { "" }
        ));
        let v = Arc::clone(vol);
        (
            self.model.capture(),
            tokio::spawn(async move {
                if bucket {
                    v.flush_to_bucket().await
                } else {
                    v.flush().await
                }
            }),
        )
    }

    /// A collection pass: with no grace period (what earlier passes marked
    /// is deleted now), or marking only.
    async fn collect(&mut self) -> Step {
        // Half the passes only mark (the grace period outlasts the life):
        // what they mark waits, and a takeover may come before a later
        // pass — the new owner's, or the zombie's — deletes it.
        let keep = self.rng.chance(50);
        self.note(format!("collect (marks kept for later: {keep})"));
        let grace = if keep {
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        };
        match within("collect", self.vol().collect(grace)).await? {
            Ok(pass) => {
                self.note(format!("  {pass:?}"));
                Ok(())
            }
            Err(_) if self.faulty => Ok(()),
            Err(e) => Err(format!("collection failed: {e}")),
        }
    }

    /// A collection held at one of its requests while the owner writes
    /// and flushes (the copy-forward race: a chunk rewritten while its old
    /// frame is being copied), maybe dying there.
    async fn gated_collect(&mut self, stats: &mut Stats) -> Step {
        let gate = [
            Gate::FrameGet,
            Gate::SegmentPut,
            Gate::CheckpointPut,
            Gate::OwnerCheck,
            Gate::Delete,
        ][self.rng.below(5) as usize];
        let crash = self.rng.chance(25);
        self.note(format!("collect held at {gate:?}, crash in flight {crash}"));
        let vol = self.vol();
        self.proc_.arm_once(gate);
        let v = Arc::clone(&vol);
        let task = tokio::spawn(async move { v.collect(Duration::ZERO).await });
        if reached(&self.proc_, &task, None).await? {
            stats.reached(gate, "collector");
        } else {
            // Nothing there to hold: the owner's own requests must pass.
            self.proc_.open_gate();
        }
        for _ in 0..1 + self.rng.below(3) {
            self.random_write(&vol, "  while held: ").await?;
        }
        // A flush meanwhile (it may wait for the collector's checkpoint).
        let flush = self
            .rng
            .chance(60)
            .then(|| self.spawn_flush(&vol, "  while held: flush"));
        if crash {
            self.proc_.kill_now();
            task.abort();
            if let Some((marks, f)) = flush
                && let Ok(Ok(())) = within("flush", f).await?
            {
                self.model.flushed_at(&marks);
            }
            drop(vol);
            self.vol = None;
            return self.recover(stats, "collection in flight").await.map(drop);
        }
        self.proc_.open_gate();
        match within("collect", task).await?.unwrap() {
            Ok(_) => {}
            Err(_) if self.faulty => {}
            Err(e) => return Err(format!("collection failed: {e}")),
        }
        if let Some((marks, f)) = flush {
            let r = within("flush", f).await?.unwrap();
            self.flushed(&marks, r, stats)?;
        }
        self.read_check(&vol, 0, SECTORS).await
    }

    /// The process dies at its k-th store write inside an operation.
    async fn crash_inside(&mut self, stats: &mut Stats) -> Step {
        let what = self.rng.below(4);
        // A flush here writes a few segments and maybe a checkpoint; an
        // open first probes conditional create (3 writes), then claims,
        // fences the crashed writer (WINDOW markers and more), seals,
        // replays; a collection deletes, copies forward, checkpoints,
        // deletes.
        let k = match what {
            0 => self.rng.below(5),
            1 => self.rng.below(7),
            2 => 3 + self.rng.below(6 + WINDOW),
            _ => self.rng.below(8),
        };
        let land = self.rng.chance(50);
        let names = ["flush", "close", "recovery", "collection"];
        self.note(format!(
            "crash at store write {k} (lands {land}) of a {}",
            names[what as usize]
        ));
        match what {
            0 => {
                self.proc_.kill_after(k, land);
                let marks = self.model.capture();
                if let Ok(()) = within("flush", self.vol().flush()).await? {
                    self.model.flushed_at(&marks);
                }
            }
            1 => {
                self.proc_.kill_after(k, land);
                let marks = self.model.capture();
                let vol = self.vol.take().expect("live writer");
                let vol = Arc::try_unwrap(vol).expect("no other reference");
                if let Ok(()) = within("close", vol.close()).await? {
                    self.model.flushed_at(&marks);
                }
            }
            3 => {
                self.proc_.kill_after(k, land);
                let _ = within("collect", self.vol().collect(Duration::ZERO)).await?;
            }
            _ => {
                // The writer dies; the process recovering from that dies
                // too; a third recovers.
                self.die();
                self.clear_faults();
                let p = self.new_proc();
                p.kill_after(k, land);
                self.proc_ = Arc::clone(&p);
                let attempt = within("recovery", self.open_as(p, true)).await?;
                drop(attempt);
            }
        }
        let died = self.proc_.died_at.lock().clone();
        self.die();
        let kind = match died {
            Some(at) => format!("inside {} at {at}", names[what as usize]),
            None => format!("after {}", names[what as usize]),
        };
        self.recover(stats, &kind).await.map(drop)
    }

    /// The process dies in the middle of appending a write's journal
    /// record: the write was never acknowledged, the record is torn.
    async fn torn_append(&mut self, stats: &mut Stats) -> Step {
        let ((sector, sectors), seed) = (self.rng.range_in_chunk(), self.rng.next());
        let record = JOURNAL_RECORD_HEADER + sectors * 512;
        let cut = 1 + self.rng.below(record - 1);
        self.note(format!(
            "crash mid-append: write {sector}+{sectors} seed {seed}, record cut by {cut} bytes"
        ));
        let data = pattern(seed, (sectors * 512) as usize);
        within("write", self.vol().write(sector * 512, &data))
            .await?
            .map_err(|e| format!("write failed: {e}"))?;
        // Not acknowledged: the model's floor stays before it.
        self.model.apply((sector * 512) as usize, &data);
        self.die();
        let newest = newest_journal_file(self.journal.as_ref().unwrap())
            .ok_or("no journal file after a journaled write")?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - cut).unwrap();
        self.recover(stats, "mid journal append").await.map(drop)
    }

    /// The process dies while rotating the journal: the next segment's
    /// file exists under its temporary name, its header partly written.
    async fn crash_in_rotation(&mut self, stats: &mut Stats) -> Step {
        let partial = self.rng.below(60) as usize;
        self.note(format!("crash mid-rotation ({partial} header bytes)"));
        self.die();
        let dir = self.journal.clone().unwrap();
        if let Some(newest) = newest_journal_file(&dir) {
            let name = newest.file_name().unwrap().to_str().unwrap().to_string();
            let (stem, seg) = name
                .strip_suffix(".journal")
                .and_then(|s| s.rsplit_once('-'))
                .unwrap();
            let next = u64::from_str_radix(seg, 16).unwrap() + 1;
            let new = dir.join(format!("{stem}-{next:08x}.journal.new"));
            std::fs::write(new, pattern(partial as u64, partial)).unwrap();
        }
        self.recover(stats, "mid journal rotation").await.map(drop)
    }

    /// The writer dies and a server without the journal directory takes
    /// over (another host, another run directory): it cannot replay the
    /// journal, so only flushed writes are guaranteed, and journals older
    /// than it are stale for every later server here.
    async fn server_without_journal(&mut self, stats: &mut Stats) -> Step {
        self.note("crash; a server without the journal takes over");
        self.die();
        self.clear_faults();
        self.proc_ = self.new_proc();
        let vol = within(
            "open",
            open_volume(Arc::clone(&self.proc_), None, None, true, self.cfg.clone()),
        )
        .await?
        .map_err(|e| format!("open without journal failed: {e}"))?;
        self.writer_journals = false;
        self.adopt(
            vol,
            false,
            stats,
            "taken over by a server without the journal",
        )
        .await
        .map(drop)
    }

    /// Close, then open without --force: a released volume needs none.
    async fn clean_reopen(&mut self, stats: &mut Stats) -> Step {
        self.note("close, reopen without --force");
        let marks = self.model.capture();
        let vol = self.vol.take().expect("live writer");
        let vol = Arc::try_unwrap(vol).expect("no other reference");
        if let Err(e) = within("close", vol.close()).await? {
            check(self.faulty, || {
                format!("close failed with no fault armed: {e}")
            })?;
            self.proc_.kill_now();
            return self.recover(stats, "after a failed close").await.map(drop);
        }
        self.model.flushed_at(&marks);
        self.clear_faults();
        let vol = within("open", self.open_process(false))
            .await?
            .map_err(|e| format!("open without --force after a clean close failed: {e}"))?;
        self.vol = Some(vol);
        self.read_check(&self.vol(), 0, SECTORS).await
    }

    /// The old writer lives on as a zombie: remember whether it holds
    /// writes it never flushed.
    fn make_zombie(&mut self, proc_: Arc<ProcStore>, vol: Arc<Volume>) {
        let dirty = vol.stats().dirty_chunks > 0;
        self.zombie = Some(Zombie { proc_, vol, dirty });
    }

    /// A takeover starts: the current writer steps aside (it lives on as a
    /// zombie); returns whether the next opener replays its journal, its
    /// process and its volume.
    fn begin_takeover(&mut self, stats: &mut Stats) -> (bool, Arc<ProcStore>, Arc<Volume>) {
        stats.takeovers += 1;
        self.clear_faults();
        let replayed = self.replays();
        let old = self.vol.take().expect("live writer");
        (replayed, Arc::clone(&self.proc_), old)
    }

    /// A new writer takes over with --force while the old one lives on as
    /// a zombie — optionally with the old one's flush held in flight
    /// across the takeover.
    async fn takeover(&mut self, stats: &mut Stats, gate: Option<Gate>) -> Step {
        self.note(format!(
            "takeover with --force, old writer's flush held at {gate:?}"
        ));
        let (replayed, old_proc, old) = self.begin_takeover(stats);
        let marks = self.model.capture();
        let in_flight = match gate {
            Some(g) => {
                // Sometimes only the flush's first segment PUT is held and
                // its later segments land before the new owner lists: the
                // held one is then a gap below the highest segment listed
                // (docs/rfcs/0003), which the new owner must fence.
                let first_only = g == Gate::SegmentPut && self.rng.chance(50);
                if first_only {
                    self.note("  only its first segment PUT is held");
                    old_proc.arm_once(g);
                } else {
                    old_proc.arm(g);
                }
                let v = Arc::clone(&old);
                let task = tokio::spawn(async move { v.flush().await });
                if reached(&old_proc, &task, Some(&old)).await? {
                    stats.reached(g, "flush across a takeover");
                }
                if first_only {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Some(task)
            }
            None => None,
        };
        let new = within("takeover", self.open_process(true))
            .await?
            .map_err(|e| format!("takeover failed: {e}"))?;
        let matched = self
            .adopt(new, replayed, stats, "takeover of a live writer")
            .await?;
        if let Some(task) = in_flight {
            old_proc.open_gate();
            if within("flush", task).await?.unwrap().is_ok() {
                // Acknowledged after the takeover: only correct if the new
                // owner already had everything it captured.
                for c in 0..CHUNKS as usize {
                    check(matched[c] >= marks[c], || {
                        format!(
                            "the fenced writer's flush was acknowledged, but the new owner lacks chunk {c} of it"
                        )
                    })?;
                }
            }
        }
        self.make_zombie(old_proc, old);
        Ok(())
    }

    /// A new writer's open is held — at its claim, its listing of the
    /// segments, its first fence marker, or its seal — while the old
    /// writer flushes. A flush acknowledged before the open finished must
    /// be in what it opens: at the fence marker, the old writer's segment
    /// takes the held name first (the opener must list again) or meets a
    /// marker already made (its flush fails).
    async fn takeover_held_at_open(&mut self, stats: &mut Stats) -> Step {
        let gate = [
            Gate::ClaimPut,
            Gate::SealPut,
            Gate::SegmentList,
            Gate::FencePut,
        ][self.rng.below(4) as usize];
        self.note(format!(
            "takeover with --force held at {gate:?} while the old writer flushes"
        ));
        let (replayed, old_proc, old) = self.begin_takeover(stats);
        if self.rng.chance(50) {
            self.random_write(&old, "  old writer: ").await?;
        }
        let p = self.new_proc();
        p.arm(gate);
        let opening = tokio::spawn(open_volume(
            Arc::clone(&p),
            self.journal.clone(),
            self.host,
            true,
            self.cfg.clone(),
        ));
        if reached(&p, &opening, None).await? {
            stats.reached(gate, "opener");
        }
        let marks = self.model.capture();
        if let Ok(()) = within("flush", old.flush()).await? {
            self.model.flushed_at(&marks);
        }
        p.open_gate();
        let new = within("takeover", opening)
            .await?
            .unwrap()
            .map_err(|e| format!("takeover failed: {e}"))?;
        self.proc_ = p;
        self.writer_journals = self.journal.is_some();
        self.adopt(new, replayed, stats, "takeover held at open")
            .await?;
        self.make_zombie(old_proc, old);
        Ok(())
    }

    /// Two servers take over with --force at once: one wins the epoch, or
    /// both open one after the other (the first is then fenced).
    async fn racing_takeovers(&mut self, stats: &mut Stats) -> Step {
        self.note("two takeovers with --force race");
        let (replayed, old_proc, old) = self.begin_takeover(stats);
        let (p1, p2) = (self.new_proc(), self.new_proc());
        let a = tokio::spawn(open_volume(
            Arc::clone(&p1),
            self.journal.clone(),
            self.host,
            true,
            self.cfg.clone(),
        ));
        let b = tokio::spawn(open_volume(
            Arc::clone(&p2),
            self.journal.clone(),
            self.host,
            true,
            self.cfg.clone(),
        ));
        let ra = within("takeover", a).await?.unwrap();
        let rb = within("takeover", b).await?.unwrap();
        for (name, r) in [("first", &ra), ("second", &rb)] {
            let line = match r {
                Ok(v) => format!("  {name} racer opened epoch {:?}", v.stats().epoch),
                Err(e) => format!("  {name} racer failed: {e}"),
            };
            self.note(line);
        }
        let epoch = |v: &Arc<Volume>| v.stats().epoch.unwrap_or(0);
        let (winner, proc_) = match (ra, rb) {
            (Ok(a), Ok(b)) if epoch(&a) > epoch(&b) => (a, p1),
            (Ok(_), Ok(b)) => (b, p2),
            (Ok(a), Err(_)) => (a, p1),
            (Err(_), Ok(b)) => (b, p2),
            (Err(e), Err(f)) => return Err(format!("both racing takeovers failed: {e}; {f}")),
        };
        // A racer that failed after claiming its epoch (its own seal or
        // replay flush found itself fenced) fences the other one too.
        let claims = self.faults.list(CLAIMS).await.map_err(|e| e.to_string())?;
        let latest = paths::listed_epochs(&claims, CLAIMS)
            .into_iter()
            .max()
            .unwrap_or(0);
        let fenced = epoch(&winner) < latest;
        self.proc_ = proc_;
        self.writer_journals = self.journal.is_some();
        self.adopt(winner, replayed, stats, "racing takeovers")
            .await?;
        self.make_zombie(old_proc, old);
        if fenced {
            // Nobody owns the volume: the next server takes over.
            self.note("  the winner was fenced by the failed racer's claim; another takeover");
            let p = Arc::clone(&self.proc_);
            let v = self.vol.take().expect("winner");
            self.make_zombie(p, v);
            return self.takeover_by_new_process(stats).await;
        }
        // The winner must work: a flush and a full read.
        self.flush(stats).await?;
        self.read_check(&self.vol(), 0, SECTORS).await
    }

    /// With no live owner (the last one fenced), a new server takes over.
    async fn takeover_by_new_process(&mut self, stats: &mut Stats) -> Step {
        let replayed = self.replays();
        let new = within("takeover", self.open_process(true))
            .await?
            .map_err(|e| format!("takeover failed: {e}"))?;
        self.adopt(new, replayed, stats, "racing takeovers")
            .await
            .map(drop)
    }

    /// The zombie writes (never visible to anyone) or flushes (refused),
    /// sometimes writing more while its flush is held in flight (those
    /// writes land in the journal segment its flush started).
    async fn zombie_step(&mut self, stats: &mut Stats) -> Step {
        let z = self.zombie.as_ref().unwrap();
        let (zproc, zombie, dirty) = (Arc::clone(&z.proc_), Arc::clone(&z.vol), z.dirty);
        let what = self.rng.below(14);
        if what >= 10 {
            // Deletes what it marked before the takeover, copies forward,
            // checkpoints; its owner check then fails.
            self.note("zombie collects");
            let before = zombie.gc_stats().objects_deleted;
            let r = within("zombie collect", zombie.collect(Duration::ZERO)).await?;
            self.note(format!("  {r:?}"));
            stats.zombie_collections += 1;
            if zombie.gc_stats().objects_deleted > before {
                stats.zombie_deletions += 1;
            }
            return Ok(());
        }
        if what < 5 {
            let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
            self.note(format!("zombie writes {sector}+{sectors} seed {seed}"));
            let data = pattern(seed, (sectors * 512) as usize);
            // Its own journal or memory take it; it must never reach ours.
            if within("zombie write", zombie.write(sector * 512, &data))
                .await?
                .is_ok()
            {
                self.zombie.as_mut().unwrap().dirty = true;
            }
            return Ok(());
        }
        let held = what >= 8;
        self.note(format!("zombie flushes (held, writing meanwhile: {held})"));
        let r = if held {
            zproc.arm(Gate::SegmentPut);
            let z = Arc::clone(&zombie);
            let task = tokio::spawn(async move { z.flush().await });
            if reached(&zproc, &task, None).await? {
                stats.reached(Gate::SegmentPut, "zombie's flush");
            }
            for _ in 0..1 + self.rng.below(3) {
                let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
                self.note(format!("  zombie writes {sector}+{sectors} seed {seed}"));
                let data = pattern(seed, (sectors * 512) as usize);
                let _ = within("zombie write", zombie.write(sector * 512, &data)).await?;
            }
            zproc.open_gate();
            within("zombie flush", task).await?.unwrap()
        } else {
            within("zombie flush", zombie.flush()).await?
        };
        if !dirty {
            return Ok(());
        }
        match r {
            Err(Error::Fenced(_)) => {
                stats.zombie_flushes_fenced += 1;
                Ok(())
            }
            Err(_) if self.faulty => Ok(()),
            Err(e) => Err(format!(
                "a fenced writer's flush failed, but not as fenced: {e}"
            )),
            Ok(()) => Err("a fenced writer's flush of unflushed writes was acknowledged".into()),
        }
    }

    /// An open without --force while the owner runs must be refused, and
    /// must not disturb the owner.
    async fn contended_open(&mut self, stats: &mut Stats) -> Step {
        self.note("open without --force while the owner runs");
        self.clear_faults();
        let p = self.new_proc();
        match within("open", self.open_as(p, false)).await? {
            Err(Error::InUse(_)) => {}
            Err(e) => return Err(format!("contended open failed oddly: {e}")),
            Ok(_) => {
                return Err("a second writer opened a live writer's volume without --force".into());
            }
        }
        self.flush(stats).await?;
        self.read_check(&self.vol(), 0, SECTORS).await
    }
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first);
            out.push(p);
        }
    }
    out
}

fn newest_journal_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "journal"))
        .max()
}

async fn run_case(seed: u64, ops: usize, stats: &mut Stats) -> Result<(), (String, Vec<String>)> {
    let (mut case, backend) = Case::new(seed);
    let setup = format!(
        "backend {backend:?}, journal {}, checkpoint every {} segments",
        if case.journal.is_some() { "on" } else { "off" },
        case.cfg.checkpoint_every
    );
    case.note(setup);
    key_use::start();
    let store: DynStore = Arc::new(case.faults.clone());
    Volume::create(&store, &params(CHUNKS), &secret(), false)
        .await
        .unwrap();
    let result: Step = async {
        let vol = case
            .open_process(false)
            .await
            .map_err(|e| format!("first open failed: {e}"))?;
        case.vol = Some(vol);
        for _ in 0..ops {
            case.step(stats).await?;
            case.tally(stats, false);
        }
        case.tally(stats, true);
        // The end of every life: a crash, then everything acknowledged.
        case.note("final crash");
        case.die();
        case.recover(stats, "between operations").await?;
        // No key and nonce ever encrypted two different messages, through
        // every crash, takeover, zombie and retry of this life.
        check(key_use::reuses() == 0, || {
            format!(
                "{} (key, nonce) pairs encrypted two different messages",
                key_use::reuses()
            )
        })
    }
    .await;
    stats.cases += 1;
    result.map_err(|e| (e, case.trace))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

const OPS_PER_CASE: usize = 40;

fn fail(seed: u64, error: String, trace: Vec<String>) -> ! {
    let mut msg = format!("model checker: case {seed} failed: {error}\ntrace:\n");
    for line in &trace {
        let _ = writeln!(msg, "  {line}");
    }
    let _ = write!(
        msg,
        "reproduce: MODEL_SEED={seed} cargo test --test model -- --nocapture"
    );
    panic!("{msg}");
}

#[test]
fn random_lives_keep_the_durability_contract() {
    let rt = runtime();
    let mut stats = Stats::default();
    if let Some(seed) = env("MODEL_SEED") {
        // A life's operations follow from its seed; how concurrent tasks
        // interleave around the blocking pool (encoding, the directory
        // backend) can vary between runs, so a failure may take a few.
        let repeat = env("MODEL_REPEAT").unwrap_or(20);
        for _ in 0..repeat {
            if let Err((e, trace)) = rt.block_on(run_case(seed, OPS_PER_CASE, &mut stats)) {
                fail(seed, e, trace);
            }
        }
        println!("case {seed} passed {repeat} times");
        return;
    }
    let cases = env("MODEL_CASES").unwrap_or(1500);
    // Fixed seeds: every run checks the same lives (MODEL_BASE explores
    // others).
    let base = env("MODEL_BASE").unwrap_or(0x5EED_0000);
    for i in 0..cases {
        let seed = base + i;
        if let Err((e, trace)) = rt.block_on(run_case(seed, OPS_PER_CASE, &mut stats)) {
            fail(seed, e, trace);
        }
    }
    let crashes = stats.total_crashes();
    println!(
        "model checker: {} cases, {} ops, {crashes} crash points, {} takeovers, \
         {} zombie flushes fenced, {} zombie collection passes ({} deleted something), \
         {} concurrent batches, {} failed flushes",
        stats.cases,
        stats.ops,
        stats.takeovers,
        stats.zombie_flushes_fenced,
        stats.zombie_collections,
        stats.zombie_deletions,
        stats.concurrent_batches,
        stats.failed_flushes
    );
    let [written, read, folded] = stats.patches;
    println!(
        "  patches: {written} written, {read} chunks read through patches, {folded} folded by the collector"
    );
    for (kind, n) in &stats.crash_points {
        println!("  crash points {kind}: {n}");
    }
    for (gate, n) in &stats.gates_reached {
        println!("  held at {gate}: {n}");
    }
    if cases >= 1500 {
        assert!(
            crashes >= 5000,
            "expected at least 5000 crash points, got {crashes}"
        );
        // Every gate must actually have held something.
        for gate in [
            "SegmentPut (owner's flush)",
            "SegmentPut (overlapped flush)",
            "CheckpointPut (owner's flush)",
            "IndexRunPut (owner's flush)",
            "SegmentPut (flush across a takeover)",
            "CheckpointPut (flush across a takeover)",
            "IndexRunPut (flush across a takeover)",
            "ClaimPut (opener)",
            "SealPut (opener)",
            "SegmentList (opener)",
            "FencePut (opener)",
            "SegmentPut (zombie's flush)",
            "FrameGet (partial write's read)",
            "FrameGet (collector)",
            "SegmentPut (collector)",
            "CheckpointPut (collector)",
            "OwnerCheck (collector)",
            "Delete (collector)",
        ] {
            let n = stats.gates_reached.get(gate).copied().unwrap_or(0);
            assert!(n >= 10, "gate {gate} held only {n} times");
        }
        // Patches must be written, read back and folded (docs/rfcs/0007).
        assert!(
            written >= 200 && read >= 50 && folded >= 20,
            "patches: {written} written, {read} read, {folded} folded"
        );
        // A zombie deleting what it marked before the takeover, while the
        // new owner runs, must actually happen.
        assert!(
            stats.zombie_deletions >= 10,
            "only {} zombie passes deleted anything",
            stats.zombie_deletions
        );
    }
}
