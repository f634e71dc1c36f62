//! The volume: block-device semantics over the log store.
//!
//! - WRITE completes once the data is in the dirty table (memory), like a
//!   disk's volatile write cache.
//! - FLUSH completes once every write completed before it is in a segment
//!   the object store created at a name no newer owner has fenced
//!   (docs/rfcs/0003): one round trip, no owner check. Checkpoints are
//!   stored in the background (`checkpoint`), never on the FLUSH path.
//! - Reads look up: dirty table → clean-chunk cache → ranged GET of the
//!   frame. Unwritten or discarded chunks read as zeros with no request.
//! - A partial-chunk write never waits for the store: into a chunk that
//!   is dirty or cached it is a copy; into any other it is kept as the
//!   sectors written, and the rest is read later (`partial`).
//! - The dirty table is bounded: a write that would exceed the limit first
//!   flushes (back-pressure), and a background task flushes by size and age.

mod checkpoint;
mod dirty;
mod fetch;
mod flush;
pub mod gc;
pub mod journal;
mod partial;
mod pipeline;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::cache::{CacheStats, ChunkCache, ChunkData, DiskCache};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::store::backend::{DynStore, StoreError};
use crate::store::keys::Secret;
use crate::store::{CreateParams, Index, LogStore, LogSummary, Mapping, OpenMode, Superblock};
use dirty::{Content, State};
use flush::FlushState;
use partial::Partial;

/// CPUs this process may use, asked once: `available_parallelism` reads
/// cgroup files on every call (about 10 µs, as much as a hot read).
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Sector size: offsets and lengths must be multiples of it.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Dirty bytes at which writers stop and flush (back-pressure).
    pub dirty_limit: usize,
    /// Dirty bytes at which the background task flushes.
    pub flush_bytes: usize,
    /// Largest segment one flush writes; bigger flushes write several.
    pub segment_target: usize,
    /// Dirty data older than this is flushed in the background.
    pub flush_age: Duration,
    /// Segments between checkpoints.
    pub checkpoint_every: u64,
    /// Flushes in flight at once: flush N+1 encodes and uploads while
    /// flush N uploads; they publish in order (1: one at a time; at most
    /// `pipeline::MAX_DEPTH`, 4).
    pub flush_depth: usize,
    /// Clean-chunk memory cache budget.
    pub cache_bytes: usize,
    /// Run the background flusher (off in tests that control every flush).
    pub background_flush: bool,
    /// Most chunks read ahead of a sequential reader (0: no readahead).
    pub readahead_chunks: u64,
    /// Garbage collection (writers only).
    pub gc: gc::GcConfig,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            dirty_limit: 256 << 20,
            flush_bytes: 128 << 20,
            segment_target: 32 << 20,
            flush_age: Duration::from_secs(2),
            checkpoint_every: 64,
            flush_depth: 2,
            cache_bytes: 256 << 20,
            background_flush: true,
            readahead_chunks: 32,
            gc: gc::GcConfig::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub mode: OpenMode,
}

/// `Volume::builder`: read-only and `VolumeConfig::default()` unless told.
pub struct VolumeBuilder<'a> {
    store: DynStore,
    secret: &'a Secret,
    opts: OpenOptions,
    cfg: VolumeConfig,
    disk: Option<DiskCache>,
}

impl VolumeBuilder<'_> {
    pub fn options(mut self, opts: OpenOptions) -> Self {
        self.opts = opts;
        self
    }

    pub fn config(mut self, cfg: VolumeConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// An SSD tier (ciphertext frames). Entries are keyed by volume id,
    /// but the volume closes the tier when it closes: one tier per volume
    /// for now.
    pub fn disk_cache(mut self, disk: DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    pub async fn open(self) -> Result<Volume> {
        Volume::open_with(self).await
    }
}

/// Counters for `inspect` / `status`.
#[derive(Debug, Clone, Default)]
pub struct VolumeStats {
    pub size: u64,
    pub chunk_size: u32,
    pub mapped_chunks: u64,
    pub live_bytes: u64,
    pub dirty_chunks: usize,
    pub dirty_bytes: usize,
    /// The most bytes that were ever dirty at once (bounded by the dirty
    /// limit plus one chunk).
    pub dirty_peak_bytes: usize,
    pub cache: CacheStats,
    pub epoch: Option<u64>,
    /// Unix time of the last flush that made data durable (0: none yet).
    pub last_flush_unix: u64,
    pub flushes: u64,
    /// Writes into a chunk neither dirty nor cached that completed
    /// without reading it (volume::partial).
    pub partial_writes: u64,
    /// Patches flushes wrote, and patches the collector folded back into
    /// chunk frames (docs/rfcs/0007).
    pub patches_written: u64,
    pub patches_folded: u64,
    /// Chunks read from the store through a mapping with patches.
    pub patched_reads: u64,
    /// FLUSHes acknowledged once a Host journal was synced, the bucket
    /// following behind (docs/rfcs/0006).
    pub local_flushes: u64,
    /// How far the bucket is behind the journal (bytes not yet uploaded,
    /// age of the oldest), when there is one.
    pub upload_lag: Option<journal::UploadLag>,
}

pub(crate) struct Inner {
    log: LogStore,
    codec: Codec,
    cache: ChunkCache,
    cfg: VolumeConfig,
    state: Mutex<State>,
    flush: tokio::sync::Mutex<FlushState>,
    /// The order of flushes in flight.
    pipeline: pipeline::Pipeline,
    fenced: AtomicBool,
    chunk_size: usize,
    last_flush_unix: AtomicU64,
    flushes: AtomicU64,
    partial_writes: AtomicU64,
    patches_written: AtomicU64,
    patches_folded: AtomicU64,
    patched_reads: AtomicU64,
    /// Background reads of partial chunks' stored versions (`partial`).
    fold_permits: tokio::sync::Semaphore,
    /// Partial chunks dropped, unreadable, not yet reported by a FLUSH:
    /// (generation of the newest write dropped, what and why).
    dropped: Mutex<Vec<(u64, String)>>,
    fetch: fetch::Fetcher,
    /// The SSD tier, if configured.
    disk: Option<crate::cache::DiskCache>,
    /// The engine runtime (readahead is spawned here, from any thread).
    runtime: tokio::runtime::Handle,
    /// Writers wake the background flusher once `flush_bytes` are dirty,
    /// so encoding and uploading overlap with the writes that follow
    /// instead of waiting for the writer to hit the dirty limit.
    flush_wanted: Arc<tokio::sync::Notify>,
    /// A FLUSH was acknowledged from a Host journal: the background
    /// flusher uploads at once (docs/rfcs/0006).
    upload_wanted: AtomicBool,
    /// FLUSHes acknowledged from a Host journal (not waiting for the
    /// bucket).
    local_flushes: AtomicU64,
    /// One journal sync at a time: a FLUSH that finds one running waits,
    /// then syncs what was appended since.
    journal_sync: tokio::sync::Mutex<()>,
    /// Room promised to writers between their dirty-limit check and their
    /// chunk landing in the dirty table: added under the state lock with
    /// the check, given back without it (see `wait_for_space`).
    reserved: AtomicUsize,
    /// Signalled when a writer's reserved room is released.
    room: tokio::sync::Notify,
    /// What garbage collection knows of the bucket.
    gc: Mutex<gc::Collector>,
    /// One collection pass at a time (background or asked for).
    gc_pass: tokio::sync::Mutex<()>,
    /// Checkpoints, stored off the FLUSH path one at a time.
    checkpointer: checkpoint::Checkpointer,
}

pub struct Volume {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
    collector: Option<JoinHandle<()>>,
    summary: LogSummary,
}

/// A journal to replay: its epoch, its claim's tag, the key its records
/// are under, whether that claim's build wrote plaintext, its segments.
struct Replay {
    epoch: u64,
    tag: journal::ClaimTag,
    key: crate::store::keys::SubKey,
    plaintext_allowed: bool,
    paths: Vec<std::path::PathBuf>,
    /// The segment with a Host journal's torn end and those after it:
    /// kept as `.skipped`, not replayed after the tear.
    skipped: Vec<std::path::PathBuf>,
    /// The claim tag its files' names carry (None: format 2).
    named: Option<journal::ClaimTag>,
}

impl Replay {
    fn owner<'a>(&'a self, volume_id: &'a [u8; 16]) -> journal::Owner<'a> {
        journal::Owner {
            volume_id,
            epoch: self.epoch,
            tag: &self.tag,
            key: &self.key,
            plaintext_allowed: self.plaintext_allowed,
        }
    }
}

enum JournalFate {
    /// Replay it (everything but the paths).
    Replay(Box<Replay>),
    /// A writer in between may have written over it (why, its claim tag).
    Stale(String, journal::ClaimTag),
    /// Not this bucket's (same volume id, other claim): not ours to delete.
    Foreign(String),
}

/// One chunk's part of a request: chunk number, offset inside the chunk,
/// and the byte range of the request buffer.
struct Span {
    chunk: u64,
    at: usize,
    buf: std::ops::Range<usize>,
}

fn spans(offset: u64, len: usize, chunk_size: usize) -> impl Iterator<Item = Span> {
    let cs = chunk_size as u64;
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let abs = offset + pos as u64;
        let at = (abs % cs) as usize;
        let n = (chunk_size - at).min(len - pos);
        let span = Span {
            chunk: abs / cs,
            at,
            buf: pos..pos + n,
        };
        pos += n;
        Some(span)
    })
}

impl Volume {
    /// Create a new, empty volume in `store`.
    pub async fn create(
        store: &DynStore,
        params: &CreateParams,
        secret: &Secret,
        allow_unconditional: bool,
    ) -> Result<Superblock> {
        LogStore::create(store, params, secret, allow_unconditional).await
    }

    /// Open a volume: writer (claims and fences) or read-only, with
    /// these settings and no SSD tier (`builder` for one).
    pub async fn open(
        store: DynStore,
        secret: &Secret,
        opts: OpenOptions,
        cfg: VolumeConfig,
    ) -> Result<Volume> {
        Self::builder(store, secret)
            .options(opts)
            .config(cfg)
            .open()
            .await
    }

    /// Open a volume step by step: the components (the store, an SSD
    /// tier) go in as they are; the settings are plain data.
    pub fn builder(store: DynStore, secret: &Secret) -> VolumeBuilder<'_> {
        VolumeBuilder {
            store,
            secret,
            opts: OpenOptions {
                mode: OpenMode::ReadOnly,
            },
            cfg: VolumeConfig::default(),
            disk: None,
        }
    }

    async fn open_with(b: VolumeBuilder<'_>) -> Result<Volume> {
        let VolumeBuilder {
            store,
            secret,
            opts,
            cfg,
            disk,
        } = b;
        if cfg.dirty_limit < cfg.flush_bytes.min(cfg.segment_target) {
            return Err(Error::InvalidArgument(
                "dirty limit must be at least the flush threshold".into(),
            ));
        }
        let (log, index, summary) = LogStore::open(store, secret, opts.mode).await?;
        let sb = log.superblock().params.clone();
        let codec = Codec::new(log.keys().clone(), sb.codec.zstd_level, sb.chunk_size);
        let replayed = summary.replayed_segments as u64;
        let disk = disk.map(|d| d.for_volume(&log.keys().volume_id));
        let inner = Arc::new(Inner {
            codec,
            cache: ChunkCache::new(cfg.cache_bytes),
            state: Mutex::new(State::new(index)),
            // A long replay tail is checkpointed at the first opportunity.
            flush: tokio::sync::Mutex::new(FlushState::new(replayed)),
            pipeline: pipeline::Pipeline::new(cfg.flush_depth),
            fenced: AtomicBool::new(false),
            last_flush_unix: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            partial_writes: AtomicU64::new(0),
            patches_written: AtomicU64::new(0),
            patches_folded: AtomicU64::new(0),
            patched_reads: AtomicU64::new(0),
            fold_permits: tokio::sync::Semaphore::new(partial::READS_AT_ONCE),
            dropped: Mutex::new(Vec::new()),
            fetch: fetch::Fetcher::default(),
            disk,
            runtime: tokio::runtime::Handle::current(),
            flush_wanted: Arc::new(tokio::sync::Notify::new()),
            upload_wanted: AtomicBool::new(false),
            local_flushes: AtomicU64::new(0),
            journal_sync: tokio::sync::Mutex::new(()),
            reserved: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
            gc: Mutex::new(gc::Collector::new(
                &summary.inventory,
                log.epoch().unwrap_or(0),
            )),
            gc_pass: tokio::sync::Mutex::new(()),
            checkpointer: checkpoint::Checkpointer::new(summary.chain.clone()),
            chunk_size: sb.chunk_size as usize,
            log,
            cfg,
        });
        let flusher = (inner.cfg.background_flush && inner.log.epoch().is_some()).then(|| {
            tokio::spawn(flush::background(
                Arc::downgrade(&inner),
                Arc::clone(&inner.flush_wanted),
            ))
        });
        let collector = (inner.cfg.gc.policy == gc::GcPolicy::Background
            && inner.log.epoch().is_some())
        .then(|| tokio::spawn(gc::background(Arc::downgrade(&inner))));
        Ok(Volume {
            inner,
            flusher,
            collector,
            summary,
        })
    }

    pub fn size(&self) -> u64 {
        self.inner.log.superblock().params.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk_size as u32
    }

    pub fn superblock(&self) -> &Superblock {
        self.inner.log.superblock()
    }

    /// What recovery found when this volume was opened.
    pub fn summary(&self) -> &LogSummary {
        &self.summary
    }

    pub fn stats(&self) -> VolumeStats {
        let st = self.inner.state.lock();
        VolumeStats {
            size: self.size(),
            chunk_size: self.chunk_size(),
            mapped_chunks: st.index.len() as u64,
            live_bytes: st.index.live_bytes(),
            dirty_chunks: st.dirty.len(),
            dirty_bytes: st.dirty.bytes(),
            dirty_peak_bytes: st.dirty.peak(),
            cache: self.inner.cache.stats(),
            epoch: self.inner.log.epoch(),
            last_flush_unix: self.inner.last_flush_unix.load(Ordering::Relaxed),
            flushes: self.inner.flushes.load(Ordering::Relaxed),
            partial_writes: self.inner.partial_writes.load(Ordering::Relaxed),
            patches_written: self.inner.patches_written.load(Ordering::Relaxed),
            patches_folded: self.inner.patches_folded.load(Ordering::Relaxed),
            patched_reads: self.inner.patched_reads.load(Ordering::Relaxed),
            local_flushes: self.inner.local_flushes.load(Ordering::Relaxed),
            upload_lag: st.journal.as_ref().map(|j| j.lag()),
        }
    }

    /// Store requests and bytes by kind since open.
    pub fn request_stats(&self) -> crate::store::backend::RequestStats {
        self.inner.log.request_stats()
    }

    /// A copy of the current index (for tools and tests).
    pub fn index_snapshot(&self) -> Index {
        self.inner.state.lock().index.clone()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::InvalidArgument(format!(
                "offset {offset} and length {len} must be multiples of {SECTOR}"
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::InvalidArgument(format!(
                "range {offset}+{len} is beyond the end of the volume ({} bytes)",
                self.size()
            )));
        }
        Ok(())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.inner.check_writable()
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.note_read(offset, buf.len());
        // Spans in memory (dirty, unmapped, cached) first; the chunks to
        // fetch are fetched concurrently (a 1 MiB read of cold 128 KiB
        // chunks is 8 GETs at once, not one after another).
        let mut fetch = Vec::new();
        let mut pending: Vec<Span> = spans(offset, buf.len(), self.inner.chunk_size).collect();
        while !pending.is_empty() {
            let mut partial = Vec::new();
            for span in pending {
                match self
                    .inner
                    .copy_from_memory(&span, &mut buf[span.buf.clone()])
                {
                    Missing::None => {}
                    Missing::Stored(loc) => fetch.push((span, loc)),
                    Missing::Partial => partial.push(span),
                }
            }
            // The rest of the partial chunks: laid over their stored
            // versions, concurrently, for this read only (volume::partial,
            // `compose`); a chunk no longer partial is looked at again.
            let composed =
                futures::future::try_join_all(partial.iter().map(|s| self.inner.compose(s.chunk)))
                    .await?;
            pending = Vec::new();
            for (span, data) in partial.into_iter().zip(composed) {
                match data {
                    Some(data) => {
                        let out = &mut buf[span.buf.clone()];
                        out.copy_from_slice(&data[span.at..span.at + out.len()]);
                    }
                    None => pending.push(span),
                }
            }
        }
        if fetch.is_empty() {
            return Ok(());
        }
        let loaded = self.inner.load_all(&fetch).await?;
        for ((span, _), data) in fetch.iter().zip(loaded) {
            let out = &mut buf[span.buf.clone()];
            out.copy_from_slice(&data[span.at..span.at + out.len()]);
        }
        Ok(())
    }

    /// Serve a read from memory only — dirty table, clean cache, zeros —
    /// without waiting for anything. `Ok(false)` when some part would need
    /// the store (the buffer is then partly filled; read it normally).
    /// Lets the frontend answer hot reads on its own thread.
    pub fn try_read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.check_range(offset, buf.len() as u64)?;
        self.note_read(offset, buf.len());
        for span in spans(offset, buf.len(), self.inner.chunk_size) {
            if !matches!(
                self.inner
                    .copy_from_memory(&span, &mut buf[span.buf.clone()]),
                Missing::None
            ) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn note_read(&self, offset: u64, len: usize) {
        if len > 0 {
            let cs = self.inner.chunk_size as u64;
            self.inner
                .note_read(offset / cs, (offset + len as u64 - 1) / cs);
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        for span in spans(offset, data.len(), self.inner.chunk_size) {
            let _room = self.inner.wait_for_space().await?;
            self.inner
                .write_chunk(span.chunk, span.at, &data[span.buf])?;
        }
        self.inner.wake_flusher_if_due();
        Ok(())
    }

    /// Apply a write at once when nothing has to be waited for — room
    /// under the dirty limit (and the journal's) for all its chunks now
    /// — on the caller's thread. `Ok(false)`: nothing was written; use
    /// `write`. Lets the frontend answer writes on its own thread, as it
    /// does hot reads (no write waits for the store: `partial`).
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Result<bool> {
        self.check_writable(offset, data.len() as u64)?;
        let cs = self.inner.chunk_size;
        let need = spans(offset, data.len(), cs).count() * cs;
        let room = {
            let st = self.inner.state.lock();
            self.inner.room_now(&st, need)
        };
        let Ok(_room) = room else {
            return Ok(false);
        };
        for span in spans(offset, data.len(), cs) {
            self.inner
                .write_chunk(span.chunk, span.at, &data[span.buf])?;
        }
        self.inner.wake_flusher_if_due();
        Ok(true)
    }

    /// Make a range read as zeros. Whole chunks become zero records (no
    /// frame, no data); partial chunks are rewritten.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        let len = usize::try_from(len).map_err(|_| Error::InvalidArgument("length".into()))?;
        for span in spans(offset, len, self.inner.chunk_size) {
            let _room = self.inner.wait_for_space().await?;
            let n = span.buf.len();
            if n == self.inner.chunk_size {
                let mut st = self.inner.state.lock();
                if st.holds_data(span.chunk) {
                    let offset = span.chunk * n as u64;
                    st.journal(|| journal::Record::Zeroes {
                        offset,
                        len: n as u64,
                    })?;
                    st.zero_chunk(span.chunk);
                }
            } else if self.inner.state.lock().holds_data(span.chunk) {
                let zeros = vec![0u8; n];
                self.inner.write_chunk(span.chunk, span.at, &zeros)?;
            }
        }
        Ok(())
    }

    /// DISCARD: this volume guarantees discarded ranges read as zeros, so
    /// it is the same operation as WRITE_ZEROES.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Make every write completed before this call durable; see module docs.
    ///
    /// Writes before this FLUSH that were dropped (into chunks whose
    /// stored version cannot be read: `partial`) fail it with
    /// `WritesDropped` once everything else is durable — reported once,
    /// by the first FLUSH that covers them, as a disk reports a failed
    /// write; a FLUSH that started before them does not take the report.
    ///
    /// With a Host journal (`attach_journal_as`, `Durability::Host`): once
    /// the journal is synced to its disk, and the bucket within the lag
    /// bound, the bucket follows in the background (docs/rfcs/0006).
    pub async fn flush(&self) -> Result<()> {
        let covers = self.inner.state.lock().generation();
        if let Some(lag) = self.inner.host_lag() {
            // A fenced writer acknowledges nothing (its uploads found out).
            self.inner.check_writable()?;
            self.inner.sync_journal(None).await?;
            self.inner.check_writable()?;
            // A same-host takeover (`--force`) marks the journal before
            // it reads it: past that mark nothing is acknowledged here.
            let (within, taken) = {
                let st = self.inner.state.lock();
                match st.journal.as_ref() {
                    Some(j) => (j.within(&lag), j.taken_over()?),
                    None => (false, false),
                }
            };
            if taken {
                let epoch = self.inner.log.epoch().unwrap_or(0);
                return Err(self.inner.fenced_by(Error::Fenced(epoch)));
            }
            if within {
                self.inner.upload_wanted.store(true, Ordering::SeqCst);
                self.inner.flush_wanted.notify_one();
                self.inner.local_flushes.fetch_add(1, Ordering::Relaxed);
                return self.inner.take_dropped(covers);
            }
        }
        self.inner.flush().await?;
        self.inner.take_dropped(covers)
    }

    /// Make every write that completed before this call durable in the
    /// bucket: what `flush` does without a Host journal, and what the
    /// background upload does with one.
    pub async fn flush_to_bucket(&self) -> Result<()> {
        let covers = self.inner.state.lock().generation();
        self.inner.flush().await?;
        self.inner.take_dropped(covers)
    }

    /// Keep acknowledged writes in a journal under `dir` (tmpfs) so they
    /// outlive this process, after first replaying every journal this host
    /// holds for the volume that no later writer took over, and flushing
    /// it. Call before serving I/O. Returns how many records were replayed.
    ///
    /// A journal of epoch `e` is replayed unless a writer between `e` and
    /// us may have written over it: every epoch in between must have been
    /// claimed on this host since this boot by a writer journaling in this
    /// same directory — which replays and removes all pending journals
    /// before it serves anything, so if `e`'s journal is still here, nobody
    /// in between served I/O — and no writer may have taken it over yet
    /// (the `.consumed` mark: what a fenced server of `e` writes after a
    /// takeover is never replayed). A failed recovery attempt thus never
    /// costs the dead server's journal. The volume must have been opened
    /// with this directory's `journal::dir_identity`. See ARCHITECTURE.md,
    /// "Which journals a new server replays".
    pub async fn attach_journal(&self, dir: &std::path::Path) -> Result<usize> {
        self.attach_journal_as(dir, journal::Durability::Process)
            .await
    }

    /// `attach_journal`, in a directory of the given durability: a Host
    /// directory (`--journal-dir`, on a local disk) makes FLUSH wait for
    /// the journal's disk and the bucket follow behind (see `flush`;
    /// docs/rfcs/0006 for what changes in replay). The volume must have
    /// been opened with `journal::host_dir_identity` for a Host directory.
    pub async fn attach_journal_as(
        &self,
        dir: &std::path::Path,
        durability: journal::Durability,
    ) -> Result<usize> {
        let log = &self.inner.log;
        let (Some(epoch), Some(claim)) = (log.epoch(), log.claim()) else {
            return Err(Error::InvalidArgument("volume is open read-only".into()));
        };
        let host = durability.is_host();
        let here = if host {
            journal::host_dir_identity(dir)?
        } else {
            journal::dir_identity(dir)?
        };
        if claim.journal != here {
            return Err(Error::InvalidArgument(format!(
                "the volume was opened for the journal directory {:?}, not {here}",
                claim.journal
            )));
        }
        if self.inner.state.lock().journal.is_some() {
            return Err(Error::InvalidArgument(
                "the journal is attached already".into(),
            ));
        }
        let id = log.keys().volume_id;
        journal::remove_unfinished(dir, &id, epoch);
        // One journal per claim: by epoch, and by the claim tag in the
        // names (two copies of one volume on this host share the epoch).
        type Claimed = (u64, Option<journal::ClaimTag>);
        let mut by_claim: std::collections::BTreeMap<Claimed, Vec<std::path::PathBuf>> =
            Default::default();
        for f in journal::find(dir, &id) {
            if f.epoch < epoch {
                by_claim.entry((f.epoch, f.tag)).or_default().push(f.path);
            }
        }
        let mut replay = Vec::new();
        let mut done_with = Vec::new();
        for ((e, named), paths) in by_claim {
            let first = &paths[0];
            let tag = match journal::read_tag(first) {
                Ok(tag) => tag,
                // After a power cut the lowest surviving segment's header
                // may be torn (created after the last sync): its name
                // carries the claim tag too, and the check pass below ends
                // the replay there.
                Err(e) if host => named.ok_or(e)?,
                Err(e) => return Err(e),
            };
            match self.journal_fate(e, tag, epoch, dir, &here).await? {
                JournalFate::Replay(mut r) => {
                    r.paths = paths;
                    r.named = named;
                    replay.push(*r);
                }
                JournalFate::Stale(why, tag) => {
                    tracing::warn!("discarding the journal of epoch {e}: {why}");
                    done_with.push((e, tag, paths));
                }
                JournalFate::Foreign(why) => {
                    tracing::warn!("leaving the journal of epoch {e} alone: {why}");
                }
            }
        }
        // In a Process directory only an epoch's newest segment may end in
        // a torn record; in a Host one, after a power cut, the first torn
        // record or segment header ends the epoch (docs/rfcs/0006, 7).
        let tail = |i: usize, r: &Replay| {
            if host || i + 1 == r.paths.len() {
                journal::Tail::MayBeTorn
            } else {
                journal::Tail::Whole
            }
        };
        // Its writer may still run (a same-host --force): from this mark
        // on it acknowledges no FLUSH from a Host journal, so none comes
        // after what is read below (docs/rfcs/0006, 10).
        for r in &replay {
            journal::mark_taking(dir, &id, r.epoch, &r.tag)?;
        }
        // And list again: a segment that writer created between the
        // listing above and the mark may hold a FLUSH it acknowledged.
        if !replay.is_empty() {
            let now = journal::find(dir, &id);
            for r in &mut replay {
                r.paths = now
                    .iter()
                    .filter(|f| f.epoch == r.epoch && f.tag == r.named)
                    .map(|f| f.path.clone())
                    .collect();
            }
            replay.retain(|r| !r.paths.is_empty());
        }
        // What is read below is replayed and then uploaded: in a Host
        // directory it must be on the disk first, or a power cut during
        // this replay could leave the bucket ahead of what the next
        // replay reads (docs/rfcs/0006, point 4; the dead server's last
        // records may be in the page cache only).
        if host && !replay.is_empty() {
            let paths: Vec<std::path::PathBuf> = replay
                .iter()
                .flat_map(|r| r.paths.iter().cloned())
                .collect();
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || -> Result<()> {
                for path in &paths {
                    std::fs::File::open(path)
                        .and_then(|f| f.sync_data())
                        .map_err(|e| {
                            Error::Store(StoreError::Backend(format!(
                                "journal {}: {e}",
                                path.display()
                            )))
                        })?;
                }
                journal::sync_dir(&dir)
            })
            .await
            .map_err(|e| Error::Store(StoreError::Backend(format!("journal sync: {e}"))))??;
        }
        // Check every segment before applying any (a corrupt one must not
        // leave half a replay behind), then apply record by record: replay
        // holds one record in memory, not the journal.
        for r in &mut replay {
            let mut cut = None;
            for (i, path) in r.paths.iter().enumerate() {
                let mut records = match journal::read_segment(path, &r.owner(&id), tail(i, r)) {
                    Err(Error::Integrity(why)) if host => {
                        cut = Some((i, i, format!("its header, torn ({why})")));
                        break;
                    }
                    records => records?,
                };
                for record in &mut records {
                    record?;
                }
                if records.ended_torn() && host {
                    cut = Some((i + 1, i, "a torn record".to_string()));
                    break;
                }
            }
            if let Some((keep, at, why)) = cut {
                // A power cut tears what followed the last sync, so no
                // later segment holds a record that authenticates; if one
                // does, the journal's disk corrupted this one (or the
                // power went between a rotation and the next sync).
                let authentic_after = {
                    let owner = r.owner(&id);
                    r.paths[keep..].iter().any(|p| {
                        journal::read_segment(p, &owner, journal::Tail::MayBeTorn)
                            .ok()
                            .and_then(|mut records| records.next())
                            .is_some_and(|first| first.is_ok())
                    })
                };
                let skipped: u64 = r.paths[keep..]
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                // Either way the files are kept (`.skipped`), not deleted.
                if authentic_after {
                    tracing::error!(
                        "the journal of epoch {} ends at {why} in segment {at} of {}, and \
                         records that authenticate follow it ({skipped} bytes in later \
                         segments, skipped): the journal's disk corrupted it, or the power went \
                         between a rotation and the next sync; kept as *.journal.skipped",
                        r.epoch,
                        r.paths.len()
                    );
                } else {
                    tracing::warn!(
                        "the journal of epoch {} ends at {why} in segment {at} of {}: writes \
                         after the last sync, lost with the power (no FLUSH acknowledged them); \
                         kept as *.journal.skipped",
                        r.epoch,
                        r.paths.len()
                    );
                }
                r.skipped = r.paths[at..].to_vec();
                r.paths.truncate(keep);
            }
        }
        let mut replayed = 0;
        let mut quarantine = Vec::new();
        for r in &replay {
            for (i, path) in r.paths.iter().enumerate() {
                for record in journal::read_segment(path, &r.owner(&id), tail(i, r))? {
                    match record? {
                        journal::Record::Data { offset, data } => {
                            match self.write(offset, &data).await {
                                // Into a chunk whose stored version a flush
                                // during this replay found unreadable: as
                                // dropped as the records before it.
                                Err(e @ Error::Integrity(_)) => {
                                    let generation = self.inner.state.lock().generation();
                                    self.inner.note_dropped(
                                        generation,
                                        format!("the replayed write at {offset} ({e})"),
                                    );
                                }
                                r => r?,
                            }
                        }
                        journal::Record::Zeroes { offset, len } => {
                            self.write_zeroes(offset, len).await?
                        }
                    }
                    replayed += 1;
                }
            }
            let paths = r.paths.iter().filter(|p| !r.skipped.contains(p)).cloned();
            done_with.push((r.epoch, r.tag, paths.collect()));
            quarantine.extend(r.skipped.iter().cloned());
        }
        if replayed > 0 {
            // The engine's flush: writes it drops (their chunks' stored
            // versions cannot be read, so no server can complete them)
            // stay noted for the first FLUSH the device sends — it covers
            // them (the kernel saw them complete before the old server
            // died) — rather than failing the start over them.
            self.inner.flush().await?;
            let epochs: Vec<u64> = replay.iter().map(|r| r.epoch).collect();
            tracing::warn!(
                "replayed {replayed} acknowledged writes from the journal of epochs {epochs:?} (servers that died)"
            );
        }
        // Only now, with their contents durable under our epoch, may the
        // replayed journals go; if one cannot be removed we must not serve
        // (a later writer would replay it over our newer writes). First the
        // mark: whatever the old server may still write under its epoch
        // (it runs on, fenced) is never replayed over ours.
        // In a Host directory the marks are durable before any deletion,
        // and the deletions before we serve (docs/rfcs/0006, 8): a power
        // cut in between leaves marked, stale journals, never a part of
        // one to replay over what this replay made durable.
        for (e, tag, _) in &done_with {
            journal::mark_consumed(dir, &id, *e, tag)?;
        }
        if host && !done_with.is_empty() {
            journal::sync_dir(dir)?;
        }
        for path in done_with.iter().flat_map(|(_, _, paths)| paths) {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Store(crate::store::backend::StoreError::Backend(
                        format!("cannot remove replayed journal {}: {e}", path.display()),
                    )));
                }
            }
        }
        for path in quarantine {
            let kept = path.with_extension("journal.skipped");
            if let Err(e) = std::fs::rename(&path, &kept) {
                // Marked consumed: never replayed, deleted by a later writer.
                tracing::warn!("cannot keep {} as {}: {e}", path.display(), kept.display());
            }
        }
        if host && !done_with.is_empty() {
            journal::sync_dir(dir)?;
        }
        journal::prepare_dir(dir)?;
        let limit = journal::budget(
            dir,
            journal::free_bytes(dir)?,
            self.inner.cfg.dirty_limit as u64,
            self.inner.chunk_size as u64,
        )?;
        let mut j = journal::Journal::create(
            dir,
            &id,
            epoch,
            journal::claim_tag(&claim.token),
            journal::journal_key(log.keys(), epoch, &claim.token),
            durability,
        )?;
        j.set_limit(limit);
        tracing::info!(
            "journal in {}: up to {} MiB before writers flush",
            dir.display(),
            limit >> 20
        );
        self.inner.state.lock().journal = Some(j);
        Ok(replayed)
    }

    /// What a power cut now would leave of a Host journal: each live
    /// segment file, how much of it is synced, and whether its directory
    /// entry is. For tests that simulate one (tests/journal.rs, the model).
    #[doc(hidden)]
    pub fn journal_durable_state(&self) -> Vec<(std::path::PathBuf, u64, bool)> {
        let st = self.inner.state.lock();
        st.journal
            .as_ref()
            .map(|j| j.durable_state())
            .unwrap_or_default()
    }

    /// Whether the journal of epoch `e`, written under the claim `tag`, is
    /// ours to replay; see `attach_journal`.
    async fn journal_fate(
        &self,
        e: u64,
        tag: journal::ClaimTag,
        ours: u64,
        dir: &std::path::Path,
        here: &str,
    ) -> Result<JournalFate> {
        let log = &self.inner.log;
        if journal::is_consumed(dir, &log.keys().volume_id, e, &tag)? {
            return Ok(JournalFate::Stale(
                format!(
                    "a later writer took it over already; these records were written after that, by the server of epoch {e} still running (fenced)"
                ),
                tag,
            ));
        }
        let Some(owner) = log.fence().claim_if_present(e).await? else {
            return Ok(JournalFate::Foreign(format!(
                "this bucket has no claim of epoch {e} (a copy of the volume elsewhere?)"
            )));
        };
        if journal::claim_tag(&owner.token) != tag {
            return Ok(JournalFate::Foreign(format!(
                "it was written under another claim of epoch {e} than this bucket's (a copy of the volume elsewhere?)"
            )));
        }
        for k in e + 1..ours {
            let Some(between) = log.fence().claim_if_present(k).await? else {
                return Ok(JournalFate::Stale(
                    format!(
                        "the claim of epoch {k} is gone, so whether it wrote over the journal is unknown"
                    ),
                    tag,
                ));
            };
            // A Host directory's identity outlives reboots, and its
            // writers' takeovers are durable (docs/rfcs/0006, 8).
            let same_dir = between.journal == here
                && (between.is_this_boot() || journal::is_host_identity(here));
            if !same_dir {
                return Ok(JournalFate::Stale(
                    format!(
                        "epoch {k} ({}) did not replay it and may have written newer data",
                        between.describe()
                    ),
                    tag,
                ));
            }
        }
        Ok(JournalFate::Replay(Box::new(Replay {
            epoch: e,
            tag,
            key: journal::journal_key(log.keys(), e, &owner.token),
            plaintext_allowed: !owner.keys_bound,
            paths: Vec::new(),
            skipped: Vec::new(),
            named: None,
        })))
    }

    /// One garbage-collection pass now (see `volume::gc`), deleting what
    /// has been unneeded for `grace`. Marks as soon as anything can be.
    pub async fn collect(&self, grace: Duration) -> Result<gc::GcPass> {
        self.inner.collect(grace, true).await
    }

    /// Wait until no checkpoint is being stored (a flush that makes one
    /// due starts it in the background and returns).
    pub async fn checkpoint_settled(&self) {
        self.inner.checkpoint_settled().await
    }

    /// Whether a checkpoint is being stored now (a flush that returned
    /// has already started the one it made due).
    pub fn checkpoint_running(&self) -> bool {
        self.inner.checkpoint_running()
    }

    /// Garbage-collection totals since open.
    pub fn gc_stats(&self) -> gc::GcStats {
        self.inner.gc.lock().stats()
    }

    /// Flush, checkpoint and release ownership (a clean shutdown).
    pub async fn close(mut self) -> Result<()> {
        self.stop_tasks();
        let result = self.shutdown().await;
        if let Some(disk) = &self.inner.disk {
            disk.close().await;
        }
        result
    }

    async fn shutdown(&self) -> Result<()> {
        if self.inner.log.epoch().is_none() {
            return Ok(());
        }
        self.inner.flush().await?;
        // Writes dropped (volume::partial) are reported, after the close:
        // everything else is durable, and nothing can complete them.
        let dropped = self.inner.take_dropped(u64::MAX);
        let journal = self.inner.state.lock().journal.take();
        if let Some(j) = journal {
            j.remove();
        }
        self.inner.write_checkpoint(false).await?;
        self.inner.log.fence().release().await?;
        dropped
    }
}

/// Room under the dirty limit promised to one chunk write; given back when
/// the write is done (its chunk then counts as dirty bytes instead).
struct Room<'a> {
    inner: &'a Inner,
    bytes: usize,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.inner.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
        self.inner.room.notify_waiters();
    }
}

impl Volume {
    fn stop_tasks(&mut self) {
        for task in [self.flusher.take(), self.collector.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        // A checkpoint in the background too: what it picked is carried
        // to the next one (close writes it).
        self.inner.checkpointer.abort();
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("store", &self.inner.log.store().describe())
            .field("epoch", &self.inner.log.epoch())
            .finish_non_exhaustive()
    }
}

impl Drop for Volume {
    /// Dropping without `close` is a crash as far as the bucket is
    /// concerned: nothing more is written.
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// What a span needs beyond memory.
enum Missing {
    None,
    /// The clean chunk, from this mapping.
    Stored(Mapping),
    /// The stored version of a partial chunk.
    Partial,
}

impl Inner {
    /// Fail with the dropped writes up to generation `covers` not yet
    /// reported, if any (they are then reported).
    fn take_dropped(&self, covers: u64) -> Result<()> {
        let mut dropped = self.dropped.lock();
        let (report, keep): (Vec<_>, Vec<_>) = dropped.drain(..).partition(|(g, _)| *g <= covers);
        *dropped = keep;
        if report.is_empty() {
            return Ok(());
        }
        let what: Vec<String> = report.into_iter().map(|(_, what)| what).collect();
        Err(Error::WritesDropped(what.join(", ")))
    }

    /// The lag bound, when the journal is in a Host directory.
    fn host_lag(&self) -> Option<journal::UploadLag> {
        match self.state.lock().journal.as_ref().map(|j| j.durability()) {
            Some(journal::Durability::Host(lag)) => Some(lag),
            _ => None,
        }
    }

    /// Make the journal's records in segments below `before` (all: None)
    /// durable on its disk — a Host directory's only; nothing otherwise.
    /// The files are synced without the state lock; one sync at a time.
    pub(super) async fn sync_journal(&self, before: Option<u64>) -> Result<()> {
        let _one = self.journal_sync.lock().await;
        let plan = match self.state.lock().journal.as_ref() {
            Some(j) => j.sync_plan(before),
            None => return Ok(()),
        };
        if plan.is_empty() {
            return Ok(());
        }
        let (plan, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = plan.run();
            (plan, outcome)
        })
        .await
        .map_err(|e| Error::Store(StoreError::Backend(format!("journal sync: {e}"))))?;
        if let Some(j) = self.state.lock().journal.as_mut() {
            j.synced(&plan, &outcome);
        }
        outcome.map_err(|why| {
            tracing::error!("journal sync failed: {why}");
            Error::Store(StoreError::Backend(format!("journal: {why}")))
        })
    }

    fn check_writable(&self) -> Result<()> {
        match self.log.epoch() {
            None => Err(Error::InvalidArgument("volume is open read-only".into())),
            Some(epoch) if self.fenced.load(Ordering::SeqCst) => Err(Error::Fenced(epoch)),
            Some(_) => Ok(()),
        }
    }

    /// Serve a span from memory — the dirty table, zeros for an unmapped
    /// chunk, or the clean-chunk cache — without waiting. Returns where the
    /// clean chunk lives when it has to be fetched instead.
    fn copy_from_memory(&self, span: &Span, out: &mut [u8]) -> Missing {
        let mapping = {
            let st = self.state.lock();
            match st.dirty.get(span.chunk) {
                Some(data) if data.read(span.at, out) => return Missing::None,
                Some(_) => return Missing::Partial,
                None => st.index.get(span.chunk),
            }
        };
        let Some(mapping) = mapping else {
            out.fill(0);
            return Missing::None;
        };
        match self.cache.get(&mapping.last()) {
            Some(data) => {
                out.copy_from_slice(&data[span.at..span.at + out.len()]);
                Missing::None
            }
            None => Missing::Stored(mapping),
        }
    }

    /// Load several clean chunks. Decoding is CPU work, so a read of many
    /// chunks splits them into one group per core: this task decodes the
    /// first group, spawned tasks the others (one task per chunk would cost
    /// more in wakeups than a fast decode takes).
    async fn load_all(self: &Arc<Self>, fetch: &[(Span, Mapping)]) -> Result<Vec<ChunkData>> {
        let cores = cores();
        let per = fetch.len().div_ceil(cores).max(1);
        // Within a group the fetches still overlap (one GET's latency for
        // the group, not one per chunk); only the decoding is sequential.
        let group = |part: Vec<(u64, Mapping)>, inner: Arc<Self>| async move {
            futures::future::try_join_all(part.iter().map(|(chunk, m)| inner.load(*chunk, m))).await
        };
        let mut parts = fetch.chunks(per).map(|p| {
            p.iter()
                .map(|(s, m)| (s.chunk, m.clone()))
                .collect::<Vec<_>>()
        });
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|p| self.runtime.spawn(group(p, Arc::clone(self))))
            .collect();
        let mut loaded = group(first, Arc::clone(self)).await?;
        for task in others {
            loaded.extend(task.await.expect("chunk load task")?);
        }
        Ok(loaded)
    }

    /// Put `bytes` at `at` inside `chunk`, without waiting for the store:
    /// a dirty chunk is patched; a whole chunk replaced; a chunk that reads
    /// as zeros, or whose stored version is cached, becomes whole; any
    /// other becomes partial — the sectors written, the rest read later
    /// (in the background from now on: volume::partial).
    fn write_chunk(self: &Arc<Self>, chunk: u64, at: usize, bytes: &[u8]) -> Result<()> {
        let cs = self.chunk_size;
        let record = || journal::Record::Data {
            offset: chunk * cs as u64 + at as u64,
            data: std::borrow::Cow::Borrowed(bytes),
        };
        let mut st = self.state.lock();
        if bytes.len() == cs {
            st.journal(record)?;
            st.set_dirty(chunk, Content::Whole(Arc::new(bytes.to_vec())), None);
            return Ok(());
        }
        if st.dirty.get(chunk).is_some() {
            st.journal(record)?;
            st.patch_dirty(chunk, at, bytes, cs);
            return Ok(());
        }
        let mapping = st.index.get(chunk);
        let content = {
            let base = match &mapping {
                None => Some(None),
                Some(m) if st.is_unreadable(m) => {
                    return Err(Error::Integrity(format!(
                        "chunk {chunk}: a partial write needs its stored version, which cannot be read"
                    )));
                }
                Some(m) => self.cache.get(&m.last()).map(Some),
            };
            match base {
                Some(base) => {
                    let mut data = base.map_or_else(|| vec![0u8; cs], |b| b.as_ref().clone());
                    data[at..at + bytes.len()].copy_from_slice(bytes);
                    Content::Whole(Arc::new(data))
                }
                None => Content::Partial(Arc::new(Partial::new(cs, at, bytes))),
            }
        };
        let partial = matches!(content, Content::Partial(_));
        let since = dirty::sectors(at, bytes.len());
        // Read the stored version now only if the flush would (it does not
        // for a patch: docs/rfcs/0007).
        let fold = partial && self.needs_base(&since, mapping.as_ref());
        st.journal(record)?;
        st.set_dirty(chunk, content, Some(since));
        drop(st);
        if partial {
            self.partial_writes.fetch_add(1, Ordering::Relaxed);
        }
        if fold {
            self.fold_later(chunk);
        }
        Ok(())
    }

    fn wake_flusher_if_due(&self) {
        if self.state.lock().dirty.bytes() >= self.cfg.flush_bytes {
            self.flush_wanted.notify_one();
        }
    }

    /// Back-pressure: room for one chunk under the dirty limit, reserved
    /// in the same critical section as the check — writers that checked
    /// and then waited (for a read, when partial writes read first) could
    /// otherwise all land at once, far past the limit. Without room the writer flushes
    /// first, or, when the room is promised to writers still under way,
    /// waits for them. Also bounds the journal: rewriting the same chunks
    /// keeps the dirty table small but appends to the journal (memory, on
    /// tmpfs) each time.
    /// Room for `need` bytes now, reserved (the caller holds the state
    /// lock: the check and the reservation are one critical section).
    /// `Err(flush_first)`: none; whether a flush would make some, rather
    /// than writers still under way giving theirs back.
    fn room_now(&self, st: &State, need: usize) -> std::result::Result<Room<'_>, bool> {
        let used = st.dirty.bytes() + self.reserved.load(Ordering::Acquire);
        let journal_full = st.journal.as_ref().is_some_and(|j| j.is_full()) && !st.dirty.is_empty();
        if !journal_full && (used == 0 || used + need <= self.cfg.dirty_limit) {
            self.reserved.fetch_add(need, Ordering::AcqRel);
            return Ok(Room {
                inner: self,
                bytes: need,
            });
        }
        Err(journal_full || !st.dirty.is_empty())
    }

    async fn wait_for_space(self: &Arc<Self>) -> Result<Room<'_>> {
        self.check_writable()?;
        let need = self.chunk_size;
        loop {
            let released = self.room.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let flush_first = {
                let st = self.state.lock();
                match self.room_now(&st, need) {
                    Ok(room) => return Ok(room),
                    Err(flush_first) => flush_first,
                }
            };
            if flush_first {
                self.flush().await?;
            } else {
                released.await;
            }
        }
    }
}
