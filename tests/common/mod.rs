//! Shared test helpers: backends (including a real S3-compatible server
//! started on 127.0.0.1), secrets, small volumes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use zerofs_ublk::store::backend::{BucketOptions, DynStore, MemoryStore, open_bucket};
use zerofs_ublk::store::keys::{Argon2Cost, Secret};
use zerofs_ublk::store::{CreateParams, OpenMode, WriterOptions};
use zerofs_ublk::volume::{OpenOptions, Volume, VolumeConfig};

pub const CHUNK: u32 = 4096;

pub fn key_bytes() -> Vec<u8> {
    vec![0x42; 32]
}

pub fn secret() -> Secret {
    Secret::key_file(key_bytes()).unwrap()
}

/// Cheap Argon2 so passphrase tests stay fast.
pub fn cheap_argon() -> Argon2Cost {
    Argon2Cost {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    }
}

pub fn params(chunks: u64) -> CreateParams {
    CreateParams {
        chunk_size: CHUNK,
        argon2: cheap_argon(),
        ..CreateParams::new(chunks * CHUNK as u64)
    }
}

pub fn test_config() -> VolumeConfig {
    VolumeConfig {
        dirty_limit: 64 << 20,
        flush_bytes: 32 << 20,
        segment_target: 3 * CHUNK as usize,
        checkpoint_every: 3,
        cache_bytes: 8 * CHUNK as usize,
        background_flush: false,
        // Tests collect when they say so, unpaced.
        gc: zerofs_ublk::volume::gc::GcConfig {
            policy: zerofs_ublk::volume::gc::GcPolicy::Manual,
            bytes_per_sec: u64::MAX,
            requests_per_sec: u32::MAX,
            ..Default::default()
        },
        ..VolumeConfig::default()
    }
}

pub fn writer(force: bool) -> OpenOptions {
    OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            force,
            allow_unconditional: false,
            journal: None,
        }),
    }
}

/// A writer that keeps a host-local journal in `dir` (as the device
/// server does).
pub fn journaled_writer(force: bool, dir: &std::path::Path) -> OpenOptions {
    OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            force,
            allow_unconditional: false,
            journal: Some(zerofs_ublk::volume::journal::dir_identity(dir).unwrap()),
        }),
    }
}

pub fn read_only() -> OpenOptions {
    OpenOptions {
        mode: OpenMode::ReadOnly,
    }
}

pub async fn create_and_open(store: &DynStore, chunks: u64) -> Volume {
    Volume::create(store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    Volume::open(store.clone(), &secret(), writer(false), test_config())
        .await
        .unwrap()
}

pub fn memory() -> DynStore {
    Arc::new(MemoryStore::new())
}

pub fn local_dir() -> (tempfile::TempDir, DynStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let store = open_bucket(&BucketOptions::new(url)).unwrap();
    (dir, store)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---- A real S3-compatible server (moto) on 127.0.0.1 ----------------------

pub struct S3Server {
    _child: Child,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Dummy credentials for the local server; no metadata-service lookups.
pub fn s3_env() -> [(&'static str, &'static str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

impl S3Server {
    /// The process-wide server, started on first use. It dies with the
    /// test process (PR_SET_PDEATHSIG).
    pub fn shared() -> &'static S3Server {
        static SERVER: OnceLock<S3Server> = OnceLock::new();
        SERVER.get_or_init(S3Server::start)
    }

    fn start() -> S3Server {
        for (k, v) in s3_env() {
            // SAFETY: set once, before any S3 client thread reads them.
            unsafe { std::env::set_var(k, v) };
        }
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // PDEATHSIG fires when the spawning *thread* exits, so spawn from a
        // thread that lives as long as the test process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(cmd.spawn()).unwrap();
            loop {
                std::thread::park();
            }
        });
        let child = rx.recv().unwrap().expect(
            "moto_server is needed for the S3 tests: pip install 'moto[server]' \
             (the README's test command installs it)",
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            _child: child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// A fresh bucket; returns its options (path-style, this endpoint).
    pub fn bucket(&self, name: &str) -> BucketOptions {
        let reply = http(
            self.port(),
            &format!(
                "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
        let mut o = BucketOptions::new(format!("s3://{name}/vol"));
        o.endpoint = Some(self.endpoint.clone());
        o.region = Some("us-east-1".into());
        o
    }

    pub fn store(&self, name: &str) -> DynStore {
        open_bucket(&self.bucket(name)).unwrap()
    }
}

/// A bucket name unique within this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `store` behind a fixed latency per request (no bandwidth cap).
pub fn behind_latency(store: DynStore, latency: std::time::Duration) -> DynStore {
    use zerofs_ublk::store::backend::{LatencyPlan, LatencyStore};
    Arc::new(LatencyStore::new(
        store,
        LatencyPlan {
            latency,
            ..LatencyPlan::default()
        },
    ))
}

// ---- A backend without conditional create ---------------------------------

/// A backend that ignores `If-None-Match: *` (as some S3-compatible
/// servers do): it claims support, but a second create overwrites.
#[derive(Debug)]
pub struct IgnoresConditions(pub zerofs_ublk::store::backend::DynStore);

#[async_trait::async_trait]
impl zerofs_ublk::store::backend::ObjectStore for IgnoresConditions {
    async fn put(&self, k: &str, d: bytes::Bytes) -> zerofs_ublk::store::backend::StoreResult<()> {
        self.0.put(k, d).await
    }
    async fn put_if_absent(
        &self,
        k: &str,
        d: bytes::Bytes,
    ) -> zerofs_ublk::store::backend::StoreResult<bool> {
        self.0.put(k, d).await.map(|_| true)
    }
    async fn get(&self, k: &str) -> zerofs_ublk::store::backend::StoreResult<bytes::Bytes> {
        self.0.get(k).await
    }
    async fn get_range(
        &self,
        k: &str,
        r: std::ops::Range<u64>,
    ) -> zerofs_ublk::store::backend::StoreResult<bytes::Bytes> {
        self.0.get_range(k, r).await
    }
    async fn exists(&self, k: &str) -> zerofs_ublk::store::backend::StoreResult<bool> {
        self.0.exists(k).await
    }
    async fn list(
        &self,
        p: &str,
    ) -> zerofs_ublk::store::backend::StoreResult<Vec<zerofs_ublk::store::backend::ObjectInfo>>
    {
        self.0.list(p).await
    }
    async fn delete(&self, k: &str) -> zerofs_ublk::store::backend::StoreResult<()> {
        self.0.delete(k).await
    }
    fn supports_conditional_create(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "ignores-conditions".into()
    }
}

/// A writer that accepts a backend without conditional create.
pub fn unsafe_writer(force: bool) -> OpenOptions {
    OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            force,
            allow_unconditional: true,
            journal: None,
        }),
    }
}

/// `cp -a` of a directory tree (a copy of a `file://` bucket).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A `file://` bucket at `path`.
pub fn dir_store(path: &std::path::Path) -> DynStore {
    open_bucket(&BucketOptions::new(format!("file://{}", path.display()))).unwrap()
}

// ---- A backend that stops once where a test says ---------------------------

use tokio::sync::{Notify, oneshot};
use zerofs_ublk::store::backend::{ObjectInfo, ObjectStore, StoreResult};

/// Where a `Pausing` store stops once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseAt {
    /// After the listing of the segments (an opener, before it fences
    /// or seals).
    SegmentListing,
    /// Before the first segment create.
    SegmentPut,
    /// Before the first checkpoint PUT.
    CheckpointPut,
}

/// A store that stops once at `at` (or where `arm_at` says), when armed,
/// until the test lets it go on.
#[derive(Debug)]
pub struct Pausing {
    inner: DynStore,
    at: PauseAt,
    pub reached: Arc<Notify>,
    go_on: parking_lot::Mutex<Vec<(PauseAt, oneshot::Receiver<()>)>>,
}

impl Pausing {
    /// Armed at once; the sender lets it go on.
    pub fn armed(inner: DynStore, at: PauseAt) -> (Arc<Self>, oneshot::Sender<()>) {
        let p = Self::unarmed(inner, at);
        let go = p.arm();
        (p, go)
    }

    /// Stop at the next request that matches; the sender lets it go on.
    pub fn arm(&self) -> oneshot::Sender<()> {
        self.arm_at(self.at)
    }

    /// The same at another place (several can be armed at once).
    pub fn arm_at(&self, at: PauseAt) -> oneshot::Sender<()> {
        let (go, wait) = oneshot::channel();
        self.go_on.lock().push((at, wait));
        go
    }

    pub fn unarmed(inner: DynStore, at: PauseAt) -> Arc<Self> {
        Arc::new(Pausing {
            inner,
            at,
            reached: Arc::new(Notify::new()),
            go_on: parking_lot::Mutex::new(Vec::new()),
        })
    }

    async fn pause_if(&self, at: PauseAt, key: &str) {
        let object = match at {
            PauseAt::CheckpointPut => "checkpoints/",
            PauseAt::SegmentListing | PauseAt::SegmentPut => "segments/",
        };
        let wait = key.starts_with(object).then(|| {
            let mut armed = self.go_on.lock();
            let i = armed.iter().position(|(a, _)| *a == at)?;
            Some(armed.remove(i).1)
        });
        let wait = wait.flatten();
        if let Some(wait) = wait {
            self.reached.notify_one();
            let _ = wait.await;
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Pausing {
    async fn put(&self, key: &str, data: bytes::Bytes) -> StoreResult<()> {
        self.pause_if(PauseAt::CheckpointPut, key).await;
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> StoreResult<bool> {
        self.pause_if(PauseAt::SegmentPut, key).await;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> StoreResult<bytes::Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> StoreResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        let listed = self.inner.list(prefix).await?;
        self.pause_if(PauseAt::SegmentListing, prefix).await;
        Ok(listed)
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A writer journaling in the Host directory `dir` (`--journal-dir`).
pub fn host_journaled_writer(force: bool, dir: &std::path::Path) -> OpenOptions {
    OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            force,
            allow_unconditional: false,
            journal: Some(zerofs_ublk::volume::journal::host_dir_identity(dir).unwrap()),
        }),
    }
}

/// The host loses power: `vol` stops where it is, and of its Host
/// journal only what was synced survives — each segment with bytes
/// appended since its last sync cut back to its synced length, with
/// garbage after it (a page written back without the one before it; a
/// synced file's length is durable, fdatasync saw to it), a segment whose
/// directory entry was never synced gone, empty, or cut back with garbage.
pub fn power_cut(vol: zerofs_ublk::volume::Volume, seed: u64) {
    let state = vol.journal_durable_state();
    drop(vol);
    cut_power(state, seed);
}

/// `power_cut`'s work on the files, given `Volume::journal_durable_state`
/// taken once the writer stopped.
pub fn cut_power(state: Vec<(std::path::PathBuf, u64, bool)>, seed: u64) {
    for (n, (path, synced, entry)) in state.into_iter().enumerate() {
        if !entry {
            // Its name may or may not have reached the disk; if it did,
            // what of its header and records did is anyone's guess.
            match seed.wrapping_add(n as u64) % 3 {
                0 => {
                    let _ = std::fs::remove_file(&path);
                }
                1 => std::fs::write(&path, b"").unwrap(),
                _ => {
                    let mut bytes = std::fs::read(&path).unwrap();
                    bytes.truncate(synced as usize);
                    bytes.extend_from_slice(&pattern(seed, 700));
                    std::fs::write(&path, bytes).unwrap();
                }
            }
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        if bytes.len() as u64 > synced {
            // Appended since the last sync: lost, but for a torn piece.
            bytes.truncate(synced as usize);
            bytes.extend_from_slice(&pattern(seed, 700));
            std::fs::write(&path, bytes).unwrap();
        }
    }
}
