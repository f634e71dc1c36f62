//! Device lifecycle: `add`, `del`, `list`, `recover`, `status`.
//!
//! `add` runs a server: in the foreground with `--foreground` (systemd),
//! otherwise it starts itself in the background (a new session, logging to
//! `<run dir>/<name>.log`) and returns once the device is live, printing
//! its path, or fails with the server's reason. Each running device has a
//! record `<run dir>/<id>.json` and a status socket `<run dir>/<id>.sock`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::args::{BucketArgs, KeyArgs, WriterArgs};
use super::{format_bytes, open_store, parse_size};
use crate::clock::unix_now;
use crate::frontend::{self, Counters, DeviceInfo, DeviceOptions, Shared};
use crate::store::LogStore;
use crate::store::superblock::CreateParams;
use crate::volume::journal::{Durability, UploadLag};
use crate::volume::{OpenOptions, Volume, VolumeConfig};

const READY: &str = "ZEROFS_UBLK_READY";

pub fn run_dir() -> PathBuf {
    std::env::var_os("ZEROFS_UBLK_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/zerofs-ublk"))
}

#[derive(Args, Debug, Clone)]
pub struct AddArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub writer: WriterArgs,
    /// A name for the volume (udev: /dev/disk/by-zerofs/NAME). Default: the
    /// last part of the bucket URL.
    #[arg(long)]
    pub name: Option<String>,
    /// Create the volume first if the bucket holds none (needs --size).
    #[arg(long)]
    pub create: bool,
    /// Size for --create, e.g. 100G.
    #[arg(long)]
    pub size: Option<String>,
    /// Chunk size for --create.
    #[arg(long, default_value = "128K")]
    pub chunk_size: String,
    /// Hardware queues (threads); default: one per CPU.
    #[arg(long)]
    pub queues: Option<u16>,
    /// Queue depth (requests in flight per queue).
    #[arg(long, default_value_t = 128)]
    pub depth: u16,
    /// Logical block size: 4096 or 512.
    #[arg(long, default_value_t = 4096)]
    pub logical_block: u32,
    /// Device id to request (default: the kernel picks).
    #[arg(long, default_value_t = -1)]
    pub id: i32,
    /// Memory cache for clean chunks, e.g. 1G.
    #[arg(long, default_value = "1G")]
    pub cache_memory: String,
    /// SSD cache tier directory (holds only encrypted frames; kept across
    /// restarts). No SSD tier without it.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// SSD cache tier size.
    #[arg(long, default_value = "10G")]
    pub cache_disk: String,
    #[command(flatten)]
    pub gc: super::args::GcArgs,
    /// No garbage collection in this server (the bucket then only grows;
    /// `zerofs-ublk gc` collects while no server runs).
    #[arg(long)]
    pub no_gc: bool,
    /// Keep the write journal in DIR on a local disk (not tmpfs): a FLUSH
    /// then returns once the journal is synced there (fdatasync), and the
    /// bucket follows within --max-upload-lag. After a crash of the host,
    /// `add` on this host with the same DIR replays it. Without it, the
    /// journal is in /run and every FLUSH waits for the bucket.
    #[arg(long, value_name = "DIR")]
    pub journal_dir: Option<PathBuf>,
    /// With --journal-dir: how far the bucket may fall behind acknowledged
    /// FLUSHes, as SIZE,DURATION [default: 64M,10s]; past it a FLUSH waits
    /// for the bucket. What losing the host for good loses at most.
    #[arg(long, value_name = "SIZE,DURATION", requires = "journal_dir")]
    pub max_upload_lag: Option<String>,
    /// Run the server in this process instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Reattach to device ID whose server died (used by `recover`).
    #[arg(long, hide = true)]
    pub recover_id: Option<u32>,
}

/// What `list`, `del`, `recover` and `status` know about a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: u32,
    pub device: String,
    pub name: String,
    pub bucket: String,
    pub pid: u32,
    pub started_unix: u64,
    /// The arguments the server was started with (no secrets: key and
    /// passphrase are given as file paths or by environment).
    pub args: Vec<String>,
    /// Set when a stop failed to make everything durable: why. The record
    /// stays (and so does the journal) until the device is recovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_error: Option<String>,
}

fn record_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

fn read_record(id: u32) -> Result<DeviceRecord> {
    let path = record_path(id);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no zerofs-ublk device {id} (no {})", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))
}

fn all_records() -> Vec<DeviceRecord> {
    let mut out: Vec<DeviceRecord> = std::fs::read_dir(run_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: u32 = name.strip_suffix(".json")?.parse().ok()?;
            read_record(id).ok()
        })
        .collect();
    out.sort_by_key(|r| r.id);
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn default_name(bucket: &str) -> String {
    bucket
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("volume")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `add`: in the foreground, or start ourselves in the background.
pub async fn add(mut a: AddArgs, raw_args: Vec<String>) -> Result<()> {
    // Bad arguments are refused before anything else (nothing written).
    let (dir, durability) = a.journal()?;
    if durability.is_host() {
        crate::volume::journal::refuse_memory_filesystem(&dir)?;
    }
    frontend::check_driver()?;
    // A device of this name whose server died is waiting for recovery:
    // reattach to it instead of making a second device (this is what a
    // systemd restart after a crash does).
    if a.recover_id.is_none() {
        let name = a
            .name
            .clone()
            .unwrap_or_else(|| default_name(&a.bucket.bucket));
        let waiting = all_records().into_iter().find(|r| {
            r.name == name
                && !pid_alive(r.pid)
                && matches!(
                    frontend::device_state(r.id).as_deref(),
                    Some("quiesced" | "fail-io")
                )
        });
        if let Some(r) = waiting {
            tracing::warn!("device {} ({name}) lost its server: recovering it", r.id);
            eprintln!(
                "zerofs-ublk: recovering device {} ({name}) whose server died",
                r.id
            );
            a.recover_id = Some(r.id);
        }
    }
    if a.foreground {
        return serve(a, raw_args).await;
    }
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| default_name(&a.bucket.bucket));
    std::fs::create_dir_all(run_dir())
        .with_context(|| format!("cannot create {}", run_dir().display()))?;
    let log_path = run_dir().join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let mut args: Vec<String> = raw_args;
    args.push("--foreground".into());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if std::env::var_os("ZEROFS_UBLK_LOG").is_none() {
        cmd.env("ZEROFS_UBLK_LOG", "info");
    }
    cmd.env(super::logfile::LOG_PATH_ENV, &log_path);
    super::harden::pass_passphrase(&mut cmd);
    // SAFETY: setsid is async-signal-safe; detaches from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the server")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix(READY) {
                let _ = tx.send(Some(rest.trim().to_string()));
                return;
            }
        }
        let _ = tx.send(None);
    });
    let outcome = tokio::task::spawn_blocking(move || rx.recv().ok().flatten()).await?;
    match outcome {
        Some(device) => {
            println!("{device}");
            Ok(())
        }
        None => {
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let reason = log
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("zerofs-ublk: error: "))
                .unwrap_or("the server exited before the device was ready");
            bail!("{reason} (log: {})", log_path.display())
        }
    }
}

async fn open_volume(a: &AddArgs) -> Result<Volume> {
    let secret = a.key.load()?;
    let store = open_store(&a.bucket)?;
    if a.create {
        match LogStore::read_superblock(&store).await {
            Ok(sb) => {
                if let Some(size) = &a.size
                    && parse_size(size)? != sb.params.size
                {
                    bail!(
                        "a volume of {} already exists at {} (not the --size given)",
                        format_bytes(sb.params.size),
                        a.bucket.bucket
                    );
                }
            }
            Err(crate::Error::NoVolume(_)) => {
                let Some(size) = &a.size else {
                    bail!("--create needs --size");
                };
                let mut params = CreateParams::new(parse_size(size)?);
                params.chunk_size = super::parse_chunk_size(&a.chunk_size)?;
                Volume::create(
                    &store,
                    &params,
                    &secret,
                    a.writer.allow_unsafe_no_conditional_create,
                )
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let cfg = VolumeConfig {
        cache_bytes: parse_size(&a.cache_memory)? as usize,
        gc: a.gc.config(!a.no_gc)?,
        ..VolumeConfig::default()
    };
    // The claim names the journal directory (see attach_journal in serve).
    let (dir, durability) = a.journal()?;
    let journal = if durability.is_host() {
        crate::volume::journal::host_dir_identity(&dir)?
    } else {
        crate::volume::journal::dir_identity(&dir)?
    };
    let mut volume = Volume::builder(store, &secret)
        .options(OpenOptions {
            mode: a.writer.mode(Some(journal)),
        })
        .config(cfg);
    if let Some(dir) = &a.cache_dir {
        volume = volume
            .disk_cache(crate::cache::DiskCache::open(dir, parse_size(&a.cache_disk)?).await?);
    }
    Ok(volume.open().await?)
}

fn journal_dir() -> PathBuf {
    run_dir().join("journal")
}

impl AddArgs {
    /// Where the journal is kept, and what it survives.
    fn journal(&self) -> Result<(PathBuf, Durability)> {
        let Some(dir) = &self.journal_dir else {
            return Ok((journal_dir(), Durability::Process));
        };
        let lag = match &self.max_upload_lag {
            Some(text) => parse_upload_lag(text)?,
            None => UploadLag::default(),
        };
        Ok((dir.clone(), Durability::Host(lag)))
    }
}

/// `SIZE,DURATION`, e.g. `64M,10s`.
fn parse_upload_lag(text: &str) -> Result<UploadLag> {
    let Some((size, age)) = text.split_once(',') else {
        bail!("--max-upload-lag {text:?}: expected SIZE,DURATION, e.g. 64M,10s");
    };
    let lag = UploadLag {
        bytes: parse_size(size.trim()).with_context(|| format!("--max-upload-lag {text:?}"))?,
        age: super::parse_duration(age).with_context(|| format!("--max-upload-lag {text:?}"))?,
    };
    if lag.bytes == 0 || lag.age.is_zero() {
        bail!(
            "--max-upload-lag {text:?}: both bounds must be more than 0 (without --journal-dir every FLUSH waits for the bucket)"
        );
    }
    Ok(lag)
}

/// Answer `status` requests on the device's socket.
fn spawn_status_server(
    id: u32,
    shared: Arc<Shared>,
    started: u64,
) -> Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(id);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    Ok(tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut conn, _)) = listener.accept().await {
            let stats = shared.volume.stats();
            let reply = serde_json::json!({
                "counters": shared.counters.snapshot(),
                "dirty_bytes": stats.dirty_bytes,
                "dirty_peak_bytes": stats.dirty_peak_bytes,
                "dirty_chunks": stats.dirty_chunks,
                "mapped_chunks": stats.mapped_chunks,
                "flushes": stats.flushes,
                "local_flushes": stats.local_flushes,
                "upload_lag_bytes": stats.upload_lag.map(|l| l.bytes),
                "upload_lag_ms": stats.upload_lag.map(|l| l.age.as_millis() as u64),
                "last_flush_unix": stats.last_flush_unix,
                "cache_bytes": stats.cache.bytes,
                "cache_hits": stats.cache.hits,
                "cache_misses": stats.cache.misses,
                "epoch": stats.epoch,
                "gc": shared.volume.gc_stats(),
                "started_unix": started,
                "store_requests": shared.volume.request_stats(),
            });
            let _ = conn.write_all(reply.to_string().as_bytes()).await;
        }
    }))
}

/// The server itself.
async fn serve(a: AddArgs, raw_args: Vec<String>) -> Result<()> {
    let (journal, durability) = a.journal()?;
    let volume = open_volume(&a).await?;
    // Acknowledged writes must outlive this process (kill -9 + recover),
    // and with --journal-dir the host (docs/rfcs/0006).
    volume
        .attach_journal_as(&journal, durability)
        .await
        .context("cannot set up the write journal")?;
    let volume = Arc::new(volume);
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| default_name(&a.bucket.bucket));
    let queues = a.queues.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16) as u16)
    });
    let opts = DeviceOptions {
        id: a.recover_id.map_or(a.id, |i| i as i32),
        queues,
        depth: a.depth,
        logical_block: a.logical_block,
        recover: a.recover_id.is_some(),
        target_json: serde_json::json!({ "name": name, "bucket": a.bucket.bucket }),
    };
    let shared = Arc::new(Shared {
        volume: volume.clone(),
        runtime: tokio::runtime::Handle::current(),
        counters: Counters::default(),
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<DeviceInfo>();
    let serve_shared = shared.clone();
    let server = std::thread::spawn(move || {
        frontend::serve(serve_shared, &opts, move |info| {
            let _ = ready_tx.send(info);
        })
    });
    let started = unix_now();
    let info = match ready_rx.await {
        Ok(info) => info,
        Err(_) => {
            let err = server.join().expect("server thread");
            return Err(err.err().map_or_else(
                || anyhow::anyhow!("the device stopped before it was ready"),
                Into::into,
            ));
        }
    };
    std::fs::create_dir_all(run_dir())?;
    let record = DeviceRecord {
        id: info.id,
        device: info.block_device.clone(),
        name: name.clone(),
        bucket: a.bucket.bucket.clone(),
        pid: std::process::id(),
        started_unix: started,
        args: raw_args.clone(),
        stop_error: None,
    };
    std::fs::write(record_path(info.id), serde_json::to_vec_pretty(&record)?)?;
    let status = spawn_status_server(info.id, shared.clone(), started)?;
    super::logfile::spawn_rotation();
    tracing::info!("serving {} as {}", a.bucket.bucket, info.block_device);
    println!("{READY} {}", info.block_device);
    let _ = std::io::stdout().flush();
    sd_notify(&format!("READY=1\nSTATUS=serving {}", info.block_device));

    // Run until SIGTERM/SIGINT (then stop the device) or until the device
    // is stopped from outside.
    let id = info.id;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let server = tokio::task::spawn_blocking(move || server.join());
    tokio::pin!(server);
    let asked = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: stopping device {id}"); true }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping device {id}"); true }
        r = &mut server => {
            tracing::info!("device {id} stopped: {:?}", r.as_ref().map(|_| ()));
            false
        }
    };
    sd_notify("STOPPING=1\nSTATUS=flushing");
    // Flush while the device is still there: if the bucket cannot take the
    // writes now, leave as a crashed server would — the device stays (I/O
    // waits, user recovery), the journal keeps every acknowledged write,
    // and the record says why; `del` reports the failure, `recover` (once
    // the bucket is reachable) finishes the job. Never remove a device
    // whose writes exist only on this host.
    match volume.flush().await {
        Ok(()) => {}
        // Everything else is durable; nothing can complete those writes.
        Err(e @ crate::Error::WritesDropped(_)) => tracing::error!("{e}"),
        Err(e) => keep_device(
            &record,
            format!(
                "the final flush failed ({e:#}); device {id} is kept with its writes in this host's journal: \
                 make the bucket reachable, then run `zerofs-ublk recover -n {id}`"
            ),
        ),
    }
    // A mounted device removed under its file system loses what the file
    // system has not written yet (its writes fail). Leave as a crashed
    // server would, the device kept (I/O waits until `recover` or the
    // unit's next start): what was acknowledged after the flush above is
    // in this host's journal, like everything a crashed server leaves.
    if asked && in_use(&record.device) {
        keep_device(
            &record,
            format!(
                "{} is in use (mounted, or held by a file system, ZFS, LVM or md): not removed; \
                 its writes are in the bucket or this host's journal. Serve it again on this host \
                 (`zerofs-ublk recover -n {id}`, or the unit's next start), then unmount it \
                 (unmounting writes), then `zerofs-ublk del -n {id}`",
                record.device
            ),
        )
    }
    let _ = frontend::stop(id);
    if !server.is_finished() {
        let _ = server.await;
    }
    status.abort();
    let _ = status.await;
    drop(shared);
    let _ = std::fs::remove_file(socket_path(id));
    // Flush, checkpoint and release; only then drop the device record.
    let closed = match wait_unique(volume).await {
        Ok(volume) => volume.close().await,
        Err(volume) => {
            tracing::error!("volume still in use at shutdown; flushing without release");
            volume.flush().await
        }
    };
    if let Err(e) = &closed {
        // The device is stopped already; what was written after the flush
        // above is in the journal, which a failed close keeps.
        let mut record = record.clone();
        record.stop_error = Some(format!(
            "closing the volume failed: {e:#}; writes not yet in the bucket, if any, are in this host's journal: add the volume again to finish"
        ));
        let _ = std::fs::write(record_path(id), serde_json::to_vec_pretty(&record)?);
        let _ = frontend::delete(id);
        return Err(anyhow::anyhow!("{e:#}").context("final flush failed"));
    }
    let _ = frontend::delete(id);
    let _ = std::fs::remove_file(record_path(id));
    tracing::info!("device {id} flushed and removed");
    Ok(())
}

/// Whether the block device is held: mounted, or open with O_EXCL (a file
/// system, ZFS, LVM, md). A plain open elsewhere does not count.
fn in_use(device: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    matches!(
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(device),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY)
    )
}

/// The stop cannot remove the device: exit as a crashed server, the device
/// kept (user recovery), `why` in the record for `del`.
fn keep_device(record: &DeviceRecord, why: String) -> ! {
    tracing::error!("{why}");
    let mut record = record.clone();
    record.stop_error = Some(why);
    if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
        let _ = std::fs::write(record_path(record.id), bytes);
    }
    sd_notify("STATUS=not removed; device kept for recovery");
    // Not a return: the runtime's shutdown would wait for the queue threads.
    std::process::exit(EXIT_STOP_FAILED)
}

/// Exit status of a server whose stop kept its device (the flush failed,
/// or the device is in use).
const EXIT_STOP_FAILED: i32 = 75;

/// Tell systemd (Type=notify) about our state, if it is listening.
pub fn sd_notify(message: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(message.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("sd_notify to {path} failed: {e}");
    }
}

/// For the udev rule: `ZEROFS_UBLK_NAME=<name>` of block device `ublkbN`,
/// from the json libublk writes before the device starts.
pub fn udev_name(kernel_name: &str) -> Result<()> {
    let dir = libublk::ctrl::UblkCtrl::run_dir();
    println!(
        "ZEROFS_UBLK_NAME={}",
        volume_name_of(Path::new(&dir), kernel_name)?
    );
    Ok(())
}

/// The volume name in libublk's json for `ublkbN` under `dir`. Read from
/// the file alone, with no control command to the driver: udev runs this
/// in a worker with a system-call filter and a timeout.
fn volume_name_of(dir: &Path, kernel_name: &str) -> Result<String> {
    let id: u32 = kernel_name
        .trim_start_matches("/dev/")
        .strip_prefix("ublkb")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{kernel_name} is not a ublk block device"))?;
    let path = dir.join(format!("{id:04}.json"));
    let bytes = std::fs::read(&path)
        .with_context(|| format!("ublk device {id}: cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("ublk device {id}: {} is not json", path.display()))?;
    json["target_data"]["name"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("ublk device {id} is not a zerofs-ublk volume"))
}

/// The queues hold clones of the volume until their threads end.
async fn wait_unique(mut v: Arc<Volume>) -> Result<Volume, Arc<Volume>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Arc::try_unwrap(v) {
            Ok(vol) => return Ok(vol),
            Err(back) if Instant::now() > deadline => return Err(back),
            Err(back) => {
                v = back;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_udev_name_comes_from_libublks_json_alone() {
        let dir = tempfile::tempdir().unwrap();
        let write = |id: &str, json: &str| std::fs::write(dir.path().join(id), json).unwrap();
        write(
            "0003.json",
            r#"{"dev_info": {}, "target_data": {"name": "db", "bucket": "s3://b/p"}}"#,
        );
        write("0004.json", r#"{"target_data": {"size": 1}}"#);
        write("0005.json", "{not json");
        let name = |k: &str| super::volume_name_of(dir.path(), k).map_err(|e| e.to_string());
        assert_eq!(name("ublkb3").unwrap(), "db");
        assert_eq!(name("/dev/ublkb3").unwrap(), "db");
        assert!(
            name("ublkb4")
                .unwrap_err()
                .contains("not a zerofs-ublk volume")
        );
        assert!(name("ublkb5").unwrap_err().contains("not json"));
        assert!(name("ublkb6").unwrap_err().contains("cannot read"));
        assert!(name("sda").unwrap_err().contains("not a ublk block device"));
    }

    #[test]
    fn sd_notify_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: test-local; no other thread reads NOTIFY_SOCKET here.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        super::sd_notify("READY=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn default_names_are_safe_for_udev() {
        assert_eq!(super::default_name("s3://bucket/pg/main/"), "main");
        assert_eq!(super::default_name("file:///var/lib/x y"), "x_y");
    }
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    /// Device id.
    #[arg(short = 'n', long = "number", required_unless_present = "all")]
    pub id: Option<u32>,
    /// Every zerofs-ublk device.
    #[arg(long, conflicts_with = "id")]
    pub all: bool,
}

impl SelectArgs {
    fn records(&self) -> Result<Vec<DeviceRecord>> {
        match self.id {
            Some(id) => Ok(vec![read_record(id)?]),
            None => Ok(all_records()),
        }
    }
}

#[derive(Args, Debug)]
pub struct DelArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Seconds to wait for the server to flush and exit.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// `del`: ask the server to flush and remove its device, and wait.
pub async fn del(a: DelArgs) -> Result<()> {
    let records = a.select.records()?;
    // All checked before any is touched.
    if let Some(r) = records.iter().find(|r| in_use(&r.device)) {
        bail!(
            "{} ({}) is in use (mounted, or held by a file system, ZFS, LVM or md): unmount or export it first \
             (if its server is gone, `zerofs-ublk recover -n {}` first: unmounting writes); nothing was changed",
            r.device,
            r.name,
            r.id
        );
    }
    for r in records {
        if pid_alive(r.pid) {
            // SAFETY: plain kill(2) of a pid we recorded.
            unsafe { libc::kill(r.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(a.timeout);
            while pid_alive(r.pid) {
                if Instant::now() > deadline {
                    bail!(
                        "server pid {} of device {} did not exit in {} s",
                        r.pid,
                        r.id,
                        a.timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            eprintln!(
                "device {}: server pid {} is gone; removing the device (writes it had not flushed are lost)",
                r.id, r.pid
            );
            let _ = frontend::delete(r.id);
            let _ = std::fs::remove_file(record_path(r.id));
            let _ = std::fs::remove_file(socket_path(r.id));
        }
        if record_path(r.id).exists() {
            match read_record(r.id).ok().and_then(|r| r.stop_error) {
                Some(why) => bail!("device {} was not removed: {why}", r.id),
                None => bail!(
                    "device {} was not removed cleanly; see its log in {}",
                    r.id,
                    run_dir().display()
                ),
            }
        }
        println!("removed {} ({})", r.device, r.name);
    }
    Ok(())
}

/// `list`: one line per device.
pub fn list() -> Result<()> {
    println!(
        "{:<4} {:<14} {:<16} {:<9} {:<8} BUCKET",
        "ID", "DEVICE", "NAME", "STATE", "PID"
    );
    for r in all_records() {
        let state = frontend::device_state(r.id).unwrap_or_else(|| "gone".into());
        let pid = if pid_alive(r.pid) {
            r.pid.to_string()
        } else {
            format!("{}(dead)", r.pid)
        };
        println!(
            "{:<4} {:<14} {:<16} {:<9} {:<8} {}",
            r.id, r.device, r.name, state, pid, r.bucket
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Device id whose server died.
    #[arg(short = 'n', long = "number")]
    pub id: u32,
}

/// `recover`: start a new server for a device whose server died.
pub async fn recover(a: RecoverArgs) -> Result<()> {
    let r = read_record(a.id)?;
    if pid_alive(r.pid) {
        bail!("device {} is still served by pid {}", r.id, r.pid);
    }
    let state = frontend::device_state(r.id).unwrap_or_else(|| "gone".into());
    if state != "quiesced" && state != "fail-io" {
        bail!("device {} is {state}, not waiting for recovery", r.id);
    }
    let mut args: Vec<String> = r
        .args
        .iter()
        .filter(|s| s.as_str() != "--foreground")
        .cloned()
        .collect();
    args.extend(["--recover-id".into(), r.id.to_string()]);
    let parsed = super::reparse_add(&args)?;
    add(parsed, args).await
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `status`: counters from each running server.
pub fn status(a: StatusArgs) -> Result<()> {
    for r in a.select.records()? {
        let mut reply = String::new();
        std::os::unix::net::UnixStream::connect(socket_path(r.id))
            .and_then(|mut s| s.read_to_string(&mut reply))
            .with_context(|| format!("device {}: server not answering (pid {})", r.id, r.pid))?;
        let v: serde_json::Value = serde_json::from_str(&reply)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({ "id": r.id, "device": r.device, "status": v })
            );
            continue;
        }
        let c = &v["counters"];
        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
        let last = n(&v["last_flush_unix"]);
        println!("{} ({}), {}", r.device, r.name, r.bucket);
        println!(
            "  requests  reads {} writes {} flushes {} discards {} errors {}",
            n(&c["reads"]),
            n(&c["writes"]),
            n(&c["flushes"]),
            n(&c["discards"]),
            n(&c["errors"])
        );
        println!(
            "  bytes     read {} written {}",
            format_bytes(n(&c["bytes_read"])),
            format_bytes(n(&c["bytes_written"]))
        );
        println!(
            "  dirty     {} in {} chunks (peak {}); last flush {}",
            format_bytes(n(&v["dirty_bytes"])),
            n(&v["dirty_chunks"]),
            format_bytes(n(&v["dirty_peak_bytes"])),
            if last == 0 {
                "never".to_string()
            } else {
                format!("{} s ago", unix_now().saturating_sub(last))
            }
        );
        let r = &v["store_requests"];
        println!(
            "  store     GET {} ranged GET {} PUT {} conditional PUT {} HEAD {} LIST {} DELETE {}; in {} out {}",
            n(&r["get"]),
            n(&r["ranged_get"]),
            n(&r["put"]),
            n(&r["conditional_put"]),
            n(&r["head"]),
            n(&r["list"]),
            n(&r["delete"]),
            format_bytes(n(&r["bytes_in"])),
            format_bytes(n(&r["bytes_out"]))
        );
        println!(
            "  cache     {} (hits {} misses {})",
            format_bytes(n(&v["cache_bytes"])),
            n(&v["cache_hits"]),
            n(&v["cache_misses"])
        );
        let g = &v["gc"];
        println!(
            "  gc        {} passes: {} segments copied ({} chunks, {}), {} objects deleted ({}); {} waiting for the grace period ({}); {} segments, {}",
            n(&g["passes"]),
            n(&g["segments_copied"]),
            n(&g["chunks_moved"]),
            format_bytes(n(&g["bytes_copied"])),
            n(&g["objects_deleted"]),
            format_bytes(n(&g["bytes_deleted"])),
            n(&g["pending_objects"]),
            format_bytes(n(&g["pending_bytes"])),
            n(&g["segments"]),
            format_bytes(n(&g["segment_bytes"]))
        );
    }
    Ok(())
}
