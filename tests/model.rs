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
//! - flushes, and flushes held at a gate (a segment PUT, the ownership
//!   check, a checkpoint PUT) while other writes land, then released;
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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use zerofs_ublk::error::Error;
use zerofs_ublk::store::backend::{
    DynStore, FaultPlan, FaultyStore, LocalDirStore, MemoryStore, ObjectInfo, ObjectStore,
    StoreError, StoreResult,
};
use zerofs_ublk::store::checkpoint::CHECKPOINT_PREFIX;
use zerofs_ublk::store::fencing::EPOCH_PREFIX;
use zerofs_ublk::store::index::SEGMENT_PREFIX;
use zerofs_ublk::volume::{Volume, VolumeConfig};

const CHUNKS: u64 = 12;
const CS: usize = CHUNK as usize;
const SECTORS_PER_CHUNK: u64 = CHUNK as u64 / 512;
const SECTORS: u64 = CHUNKS * SECTORS_PER_CHUNK;
/// Bytes before a journal record's data (kind, offset, len, crc).
const JOURNAL_RECORD_HEADER: u64 = 21;

// ---- A deterministic RNG ---------------------------------------------------

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

/// Where a flush is held so other things can happen meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    SegmentPut,
    OwnerCheck,
    CheckpointPut,
}

impl Gate {
    fn holds(self, write: bool, key: &str) -> bool {
        match self {
            Gate::SegmentPut => write && key.starts_with(SEGMENT_PREFIX),
            Gate::OwnerCheck => !write && key.starts_with(EPOCH_PREFIX),
            Gate::CheckpointPut => write && key.starts_with(CHECKPOINT_PREFIX),
        }
    }
}

/// The store as one simulated server process sees it. The process can
/// die at its k-th store write (that write landing or not) or at once;
/// after that nothing it sends reaches the store. Requests matching an
/// armed gate wait until it opens.
#[derive(Debug)]
struct ProcStore {
    inner: DynStore,
    dead: AtomicBool,
    /// (writes still allowed, whether the fatal one lands)
    kill: Mutex<Option<(u64, bool)>>,
    /// The prefix of the object whose write the process died at.
    died_at: Mutex<Option<String>>,
    gate: Mutex<Option<(Gate, Arc<Semaphore>)>>,
    held: AtomicUsize,
}

fn dead_error() -> StoreError {
    StoreError::Unavailable("simulated process is dead".into())
}

impl ProcStore {
    fn new(inner: DynStore) -> Arc<Self> {
        Arc::new(ProcStore {
            inner,
            dead: AtomicBool::new(false),
            kill: Mutex::new(None),
            died_at: Mutex::new(None),
            gate: Mutex::new(None),
            held: AtomicUsize::new(0),
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
        *self.gate.lock() = Some((gate, Arc::new(Semaphore::new(0))));
    }

    fn open_gate(&self) {
        if let Some((_, sem)) = self.gate.lock().take() {
            sem.close();
        }
    }

    async fn pass(&self, write: bool, key: &str) -> StoreResult<()> {
        let wait = match &*self.gate.lock() {
            Some((gate, sem)) if gate.holds(write, key) => {
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
        self.pass(true, key).await?;
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
        self.pass(false, key).await?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.pass(false, key).await?;
        self.inner.get_range(key, range).await
    }
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.pass(false, key).await?;
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.pass(false, prefix).await?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        let dies = self.admit_write(key).await?;
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

// ---- The model --------------------------------------------------------------

fn hash(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

struct Model {
    current: Vec<u8>,
    /// Per chunk: the versions it held since the last recovery, in order.
    history: Vec<Vec<u64>>,
    /// Per chunk: index of the oldest version a crash may leave.
    floor: Vec<usize>,
}

impl Model {
    fn new() -> Self {
        let current = vec![0u8; CHUNKS as usize * CS];
        let zero = hash(&current[..CS]);
        Model {
            current,
            history: vec![vec![zero]; CHUNKS as usize],
            floor: vec![0; CHUNKS as usize],
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

    /// Where each chunk's history is now (what a flush captures).
    fn marks(&self) -> Vec<usize> {
        self.history.iter().map(|h| h.len() - 1).collect()
    }

    fn durable_at(&mut self, marks: &[usize]) {
        for (f, m) in self.floor.iter_mut().zip(marks) {
            *f = (*f).max(*m);
        }
    }

    fn all_durable(&mut self) {
        let marks = self.marks();
        self.durable_at(&marks);
    }

    /// Check a recovered image: every chunk at or above its floor. Returns
    /// the newest matching version of each chunk, then starts a new life
    /// from the image.
    fn recovered(&mut self, image: Vec<u8>) -> Result<Vec<usize>, String> {
        let mut matched = Vec::new();
        for c in 0..CHUNKS as usize {
            let got = hash(&image[c * CS..(c + 1) * CS]);
            let found = self.history[c]
                .iter()
                .enumerate()
                .rev()
                .take_while(|(i, _)| *i >= self.floor[c])
                .find(|(_, h)| **h == got)
                .map(|(i, _)| i);
            match found {
                Some(i) => matched.push(i),
                None => {
                    let older = self.history[c][..self.floor[c]].contains(&got);
                    return Err(format!(
                        "chunk {c} after recovery is {} (floor: version {} of {})",
                        if older {
                            "an older version than the last acknowledged one: acknowledged data lost"
                        } else {
                            "no version it ever held since the last recovery: torn, foreign or a fenced writer's"
                        },
                        self.floor[c],
                        self.history[c].len()
                    ));
                }
            }
        }
        self.current = image;
        for c in 0..CHUNKS as usize {
            self.history[c] = vec![hash(self.chunk(c))];
            self.floor[c] = 0;
        }
        Ok(matched)
    }
}

// ---- Statistics over the run -------------------------------------------------

#[derive(Default)]
struct Stats {
    cases: usize,
    crash_points: BTreeMap<String, usize>,
    takeovers: usize,
    zombie_flushes_refused: usize,
    failed_flushes: usize,
    gated_flushes: usize,
    concurrent_batches: usize,
    ops: usize,
}

impl Stats {
    fn crash(&mut self, kind: impl Into<String>) {
        *self.crash_points.entry(kind.into()).or_default() += 1;
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

fn config() -> VolumeConfig {
    VolumeConfig {
        cache_bytes: 4 * CS,
        ..test_config()
    }
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

struct Case {
    rng: Rng,
    trace: Vec<String>,
    model: Model,
    /// Transient faults for everyone (below every process's view).
    faults: FaultyStore,
    journal: Option<PathBuf>,
    proc_: Arc<ProcStore>,
    vol: Option<Arc<Volume>>,
    zombie: Option<(Arc<ProcStore>, Arc<Volume>, bool)>,
    _dirs: Vec<tempfile::TempDir>,
}

type Step = Result<(), String>;

fn check(cond: bool, what: impl FnOnce() -> String) -> Step {
    if cond { Ok(()) } else { Err(what()) }
}

impl Case {
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
        let journal = if rng.chance(50) {
            let d = scratch_dir();
            let p = d.path().join("journal");
            dirs.push(d);
            Some(p)
        } else {
            None
        };
        let faults = FaultyStore::new(inner);
        let case = Case {
            rng,
            trace: Vec::new(),
            model: Model::new(),
            proc_: ProcStore::new(Arc::new(faults.clone())),
            faults,
            journal,
            vol: None,
            zombie: None,
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

    fn journaled(&self) -> bool {
        self.journal.is_some()
    }

    /// A new simulated process opens the volume (and replays the journal).
    async fn open_process(&mut self, force: bool) -> Result<Arc<Volume>, Error> {
        self.proc_ = ProcStore::new(Arc::new(self.faults.clone()));
        self.open_as(Arc::clone(&self.proc_), force).await
    }

    async fn open_as(&self, proc_: Arc<ProcStore>, force: bool) -> Result<Arc<Volume>, Error> {
        let store: DynStore = proc_;
        let opts = match &self.journal {
            Some(dir) => journaled_writer(force, dir),
            None => writer(force),
        };
        let vol = Volume::open(store, &secret(), opts, config()).await?;
        if let Some(dir) = &self.journal {
            vol.attach_journal(dir).await?;
        }
        Ok(Arc::new(vol))
    }

    /// After a crash: the next process recovers; check what it holds.
    async fn recover(&mut self, stats: &mut Stats, kind: &str) -> Result<Vec<usize>, String> {
        self.faults.set_plan(FaultPlan::default());
        let vol = self
            .open_process(true)
            .await
            .map_err(|e| format!("reopen after crash failed: {e}"))?;
        let image = vol
            .read(0, self.model.current.len())
            .await
            .map_err(|e| format!("read after recovery failed: {e}"))?;
        self.vol = Some(vol);
        stats.crash(kind);
        self.model.recovered(image)
    }

    /// The current process dies: nothing more of it reaches the store.
    fn die(&mut self) {
        self.proc_.kill_now();
        self.vol = None;
    }

    async fn write(&mut self, vol: &Volume, sector: u64, sectors: u64, seed: u64) -> Step {
        let data = pattern(seed, (sectors * 512) as usize);
        vol.write(sector * 512, &data)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        self.model.apply((sector * 512) as usize, &data);
        if self.journaled() {
            self.model.all_durable();
        }
        Ok(())
    }

    async fn read_check(&mut self, vol: &Volume, sector: u64, sectors: u64) -> Step {
        let got = vol
            .read(sector * 512, (sectors * 512) as usize)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        let off = (sector * 512) as usize;
        check(got == self.model.current[off..off + got.len()], || {
            format!("read of sectors {sector}+{sectors} differs from the model")
        })
    }

    async fn flush(&mut self, stats: &mut Stats) -> Step {
        let marks = self.model.marks();
        match self.vol().flush().await {
            Ok(()) => self.model.durable_at(&marks),
            Err(_) => stats.failed_flushes += 1,
        }
        Ok(())
    }

    async fn step(&mut self, stats: &mut Stats) -> Step {
        stats.ops += 1;
        let r = self.rng.below(100);
        match r {
            0..=21 => {
                let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
                self.note(format!("write {sector}+{sectors} seed {seed}"));
                self.write(&self.vol(), sector, sectors, seed).await
            }
            22..=25 => {
                let (sector, sectors) = self.rng.range();
                let discard = self.rng.chance(50);
                self.note(format!(
                    "{} {sector}+{sectors}",
                    if discard { "discard" } else { "write-zeroes" }
                ));
                let (off, len) = (sector * 512, sectors * 512);
                let vol = self.vol();
                let r = if discard {
                    vol.discard(off, len).await
                } else {
                    vol.write_zeroes(off, len).await
                };
                r.map_err(|e| format!("zeroing failed: {e}"))?;
                self.model.apply(off as usize, &vec![0; len as usize]);
                if self.journaled() {
                    self.model.all_durable();
                }
                Ok(())
            }
            26..=31 => {
                let (sector, sectors) = self.rng.range();
                self.note(format!("read {sector}+{sectors}"));
                self.read_check(&self.vol(), sector, sectors).await
            }
            32..=39 => {
                self.note("flush");
                self.flush(stats).await
            }
            40..=45 => self.concurrent_writers(stats).await,
            46..=53 => self.gated_flush(stats).await,
            54..=57 => {
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
                Ok(())
            }
            58..=62 => {
                self.note("crash");
                self.die();
                self.recover(stats, "between operations").await.map(drop)
            }
            63..=72 => self.crash_inside(stats).await,
            73..=76 if self.journaled() => self.torn_append(stats).await,
            77..=78 if self.journaled() => self.crash_in_rotation(stats).await,
            79..=82 => self.clean_reopen(stats).await,
            83..=87 => self.takeover(stats, None).await,
            88..=90 => {
                let gate = self.pick_gate();
                self.takeover(stats, Some(gate)).await
            }
            91..=95 if self.zombie.is_some() => self.zombie_step(stats).await,
            96..=99 if self.zombie.is_some() => self.contended_open().await,
            _ => {
                let (sector, sectors) = self.rng.range();
                self.note(format!("read {sector}+{sectors}"));
                self.read_check(&self.vol(), sector, sectors).await
            }
        }
    }

    fn pick_gate(&mut self) -> Gate {
        match self.rng.below(3) {
            0 => Gate::SegmentPut,
            1 => Gate::OwnerCheck,
            _ => Gate::CheckpointPut,
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
        self.note(format!("concurrent writes {writes:?}"));
        stats.concurrent_batches += 1;
        let vol = self.vol();
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
            t.await
                .unwrap()
                .map_err(|e| format!("concurrent write failed: {e}"))?;
        }
        let image = vol
            .read(0, self.model.current.len())
            .await
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
            let mut found = None;
            for order in permutations(&touching) {
                let mut buf = self.model.current[chunk.clone()].to_vec();
                let mut versions = Vec::new();
                for &i in &order {
                    let (s, k, seed) = writes[i];
                    let data = pattern(seed, (k * 512) as usize);
                    let (a, b) = ((s * 512) as usize, ((s + k) * 512) as usize);
                    let (lo, hi) = (a.max(chunk.start), b.min(chunk.end));
                    buf[lo - chunk.start..hi - chunk.start].copy_from_slice(&data[lo - a..hi - a]);
                    versions.push(hash(&buf));
                }
                if buf == image[chunk.clone()] {
                    found = Some(versions);
                    break;
                }
            }
            let versions = found.ok_or_else(|| {
                format!("chunk {c} after concurrent writes matches no order of its writers")
            })?;
            self.model.history[c].extend(versions);
        }
        self.model.current = image;
        if self.journaled() {
            self.model.all_durable();
        }
        Ok(())
    }

    /// A flush held at a gate while more writes land (and reads check
    /// them); then it completes, fails, or the process dies with it in
    /// flight.
    async fn gated_flush(&mut self, stats: &mut Stats) -> Step {
        let gate = self.pick_gate();
        let crash = self.rng.chance(25);
        self.note(format!("flush held at {gate:?}, crash in flight {crash}"));
        stats.gated_flushes += 1;
        let vol = self.vol();
        let marks = self.model.marks();
        self.proc_.arm(gate);
        let v = Arc::clone(&vol);
        let task = tokio::spawn(async move { v.flush().await });
        while self.proc_.held.load(Ordering::SeqCst) == 0 && !task.is_finished() {
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        for _ in 0..1 + self.rng.below(4) {
            let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
            self.note(format!(
                "  while held: write {sector}+{sectors} seed {seed}"
            ));
            self.write(&vol, sector, sectors, seed).await?;
            if self.rng.chance(30) {
                let (sector, sectors) = self.rng.range();
                self.read_check(&vol, sector, sectors).await?;
            }
        }
        // A second flush queued behind the held one (flushes are serial;
        // it captures whatever the first left, and these later writes).
        let second = (!crash && self.rng.chance(30)).then(|| {
            self.note("  while held: a second flush starts");
            let v = Arc::clone(&vol);
            (
                self.model.marks(),
                tokio::spawn(async move { v.flush().await }),
            )
        });
        if crash {
            self.proc_.kill_now();
            task.abort();
            let _ = task.await;
            drop(vol);
            self.vol = None;
            return self.recover(stats, "flush in flight").await.map(drop);
        }
        self.proc_.open_gate();
        match task.await.unwrap() {
            Ok(()) => self.model.durable_at(&marks),
            Err(_) => stats.failed_flushes += 1,
        }
        if let Some((marks, task)) = second {
            match task.await.unwrap() {
                Ok(()) => self.model.durable_at(&marks),
                Err(_) => stats.failed_flushes += 1,
            }
        }
        // What the flush made durable and what was written during it must
        // both read back (a flush that forgot the later writes shows here).
        self.read_check(&vol, 0, SECTORS).await
    }

    /// The process dies at its k-th store write inside an operation.
    async fn crash_inside(&mut self, stats: &mut Stats) -> Step {
        let what = self.rng.below(3);
        // Small k: a flush here writes a few segments and maybe a
        // checkpoint; recovery a probe, a claim, a seal, replay segments.
        let (k, land) = (
            self.rng.below([5, 7, 9][what as usize]),
            self.rng.chance(50),
        );
        match what {
            0 => {
                self.note(format!(
                    "crash at store write {k} (lands {land}) of a flush"
                ));
                self.proc_.kill_after(k, land);
                let marks = self.model.marks();
                if self.vol().flush().await.is_ok() {
                    self.model.durable_at(&marks);
                }
            }
            1 => {
                self.note(format!(
                    "crash at store write {k} (lands {land}) of a close"
                ));
                self.proc_.kill_after(k, land);
                let vol = self.vol.take().expect("live writer");
                let vol = Arc::try_unwrap(vol).expect("no other reference");
                if vol.close().await.is_ok() {
                    self.model.all_durable();
                }
            }
            _ => {
                self.note(format!(
                    "crash, then the recovering process dies at store write {k} (lands {land})"
                ));
                self.die();
                self.faults.set_plan(FaultPlan::default());
                let p = ProcStore::new(Arc::new(self.faults.clone()));
                p.kill_after(k, land);
                self.proc_ = Arc::clone(&p);
                let attempt = self.open_as(Arc::clone(&p), true).await;
                drop(attempt);
            }
        }
        let died = self.proc_.died_at.lock().clone();
        self.die();
        let kind = match died {
            Some(at) => format!(
                "inside {} at {at}",
                ["flush", "close", "recovery"][what as usize]
            ),
            None => format!("after {}", ["flush", "close", "recovery"][what as usize]),
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
        // Everything before is acknowledged; this write is not.
        self.model.all_durable();
        let data = pattern(seed, (sectors * 512) as usize);
        self.vol()
            .write(sector * 512, &data)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
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

    /// Close, then open without --force: a released volume needs none.
    async fn clean_reopen(&mut self, stats: &mut Stats) -> Step {
        self.note("close, reopen without --force");
        let vol = self.vol.take().expect("live writer");
        let vol = Arc::try_unwrap(vol).expect("no other reference");
        if vol.close().await.is_err() {
            self.proc_.kill_now();
            return self.recover(stats, "after a failed close").await.map(drop);
        }
        self.model.all_durable();
        self.faults.set_plan(FaultPlan::default());
        let vol = self
            .open_process(false)
            .await
            .map_err(|e| format!("open without --force after a clean close failed: {e}"))?;
        self.vol = Some(vol);
        self.read_check(&self.vol(), 0, SECTORS).await
    }

    /// A new writer takes over with --force while the old one lives on as
    /// a zombie — optionally with the old one's flush held in flight
    /// across the takeover.
    async fn takeover(&mut self, stats: &mut Stats, gate: Option<Gate>) -> Step {
        self.note(format!(
            "takeover with --force, old writer's flush held at {gate:?}"
        ));
        stats.takeovers += 1;
        self.faults.set_plan(FaultPlan::default());
        let old_proc = Arc::clone(&self.proc_);
        let old = self.vol.take().expect("live writer");
        let marks = self.model.marks();
        let in_flight = gate.map(|g| {
            old_proc.arm(g);
            let v = Arc::clone(&old);
            tokio::spawn(async move { v.flush().await })
        });
        if let Some(task) = &in_flight {
            while old_proc.held.load(Ordering::SeqCst) == 0 && !task.is_finished() {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        }
        let new = self
            .open_process(true)
            .await
            .map_err(|e| format!("takeover failed: {e}"))?;
        let image = new
            .read(0, self.model.current.len())
            .await
            .map_err(|e| format!("read after takeover failed: {e}"))?;
        self.vol = Some(new);
        let matched = self.model.recovered(image)?;
        stats.crash("takeover of a live writer");
        if let Some(task) = in_flight {
            old_proc.open_gate();
            if task.await.unwrap().is_ok() {
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
        self.zombie = Some((old_proc, old, false));
        Ok(())
    }

    /// The zombie writes (never visible to anyone) or flushes (refused),
    /// sometimes writing more while its flush is held in flight (those
    /// writes land in the journal segment its flush started).
    async fn zombie_step(&mut self, stats: &mut Stats) -> Step {
        let (zproc, zombie, dirty) = self.zombie.as_ref().unwrap();
        let (zproc, zombie, was_dirty) = (Arc::clone(zproc), Arc::clone(zombie), *dirty);
        let what = self.rng.below(10);
        if what < 5 {
            let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
            self.note(format!("zombie writes {sector}+{sectors} seed {seed}"));
            let data = pattern(seed, (sectors * 512) as usize);
            // Its own journal or memory take it; it must never reach ours.
            if zombie.write(sector * 512, &data).await.is_ok() {
                self.zombie.as_mut().unwrap().2 = true;
            }
            return Ok(());
        }
        let held = what >= 8;
        self.note(format!("zombie flushes (held, writing meanwhile: {held})"));
        let r = if held {
            zproc.arm(Gate::SegmentPut);
            let z = Arc::clone(&zombie);
            let task = tokio::spawn(async move { z.flush().await });
            while zproc.held.load(Ordering::SeqCst) == 0 && !task.is_finished() {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            for _ in 0..1 + self.rng.below(3) {
                let ((sector, sectors), seed) = (self.rng.range(), self.rng.next());
                self.note(format!("  zombie writes {sector}+{sectors} seed {seed}"));
                let data = pattern(seed, (sectors * 512) as usize);
                let _ = zombie.write(sector * 512, &data).await;
            }
            zproc.open_gate();
            task.await.unwrap()
        } else {
            zombie.flush().await
        };
        if r.is_err() {
            stats.zombie_flushes_refused += 1;
        }
        check(r.is_err() || !was_dirty, || {
            "a fenced writer's flush of new writes was acknowledged".into()
        })
    }

    /// An open without --force while the owner runs must be refused, and
    /// must not disturb the owner.
    async fn contended_open(&mut self) -> Step {
        self.note("open without --force while the owner runs");
        self.faults.set_plan(FaultPlan::default());
        let p = ProcStore::new(Arc::new(self.faults.clone()));
        match self.open_as(Arc::clone(&p), false).await {
            Err(Error::InUse(_)) => Ok(()),
            Err(e) => Err(format!("contended open failed oddly: {e}")),
            Ok(_) => Err("a second writer opened a live writer's volume without --force".into()),
        }
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
        "backend {backend:?}, journal {}",
        if case.journaled() { "on" } else { "off" }
    );
    case.note(setup);
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
        }
        // The end of every life: a crash, then everything acknowledged.
        case.note("final crash");
        case.die();
        case.recover(stats, "between operations").await.map(drop)
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
        if let Err((e, trace)) = rt.block_on(run_case(seed, OPS_PER_CASE, &mut stats)) {
            fail(seed, e, trace);
        }
        println!("case {seed} passed");
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
        "model checker: {} cases, {} ops, {crashes} crash points, {} takeovers, {} zombie flushes refused, \
         {} held flushes, {} concurrent batches, {} failed flushes",
        stats.cases,
        stats.ops,
        stats.takeovers,
        stats.zombie_flushes_refused,
        stats.gated_flushes,
        stats.concurrent_batches,
        stats.failed_flushes
    );
    for (kind, n) in &stats.crash_points {
        println!("  crash points {kind}: {n}");
    }
    assert!(
        crashes >= 5000 || cases < 1500,
        "expected at least 5000 crash points, got {crashes}"
    );
}
