//! Command line: `create`, `inspect`, `import`, `export`.
//!
//! Every failure prints one line (`zerofs-ublk: error: …`) and exits 1;
//! usage errors exit 2 (clap's convention).

mod args;
mod bench;
mod config;
mod device;
mod gc;
mod harden;
mod image;
mod inspect;
mod logfile;
mod units;
mod upgrade;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::store::backend::{DynStore, open_bucket};
use crate::volume::Volume;
pub use args::{BucketArgs, KeyArgs, WriterArgs};
pub use units::{format_bytes, format_duration, parse_chunk_size, parse_duration, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "zerofs-ublk",
    version,
    about = "A Linux block device whose bytes live in object storage",
    long_about = "zerofs-ublk keeps a block volume in an object store (S3, any \
S3-compatible server, or a local directory) as encrypted, compressed chunks. \
Secrets are read from files or the environment, never from the command line."
)]
struct Cli {
    /// Log to stderr at this level: error, warn, info, debug, trace. Off by
    /// default for one-shot commands, whose outcome is their last line.
    #[arg(long, global = true, env = "ZEROFS_UBLK_LOG", value_name = "LEVEL")]
    log_level: Option<tracing::Level>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty volume in a bucket.
    Create(args::CreateArgs),
    /// Show a volume's parameters, usage and owner.
    Inspect(inspect::InspectArgs),
    /// Copy a raw disk image (file or `-` for stdin) into a volume.
    Import(image::ImportArgs),
    /// Copy a volume out as a raw disk image (file or `-` for stdout).
    Export(image::ExportArgs),
    /// Collect garbage in a volume no server has attached: copy live data
    /// out of mostly-dead segments, delete what no recovery needs once the
    /// grace period is over (it waits).
    Gc(gc::GcCmdArgs),
    /// Upgrade a volume no server has attached to this build's format
    /// (any writer does it on its first open; older builds then refuse
    /// the volume).
    Upgrade(upgrade::UpgradeArgs),
    /// Serve a volume as /dev/ublkbN (in the background unless --foreground).
    /// `--config FILE` reads flags from a TOML file (keys = flag names).
    Add(Box<device::AddArgs>),
    /// Flush and remove a device.
    Del(device::DelArgs),
    /// List devices served by zerofs-ublk.
    List,
    /// Reattach a new server to a device whose server died.
    Recover(device::RecoverArgs),
    /// Per-device counters: requests, bytes, dirty data, last flush.
    Status(device::StatusArgs),
    /// Measure the engine (P1–P5, P8, P9) as ratios against same-run baselines.
    Bench(bench::BenchArgs),
    /// For the udev rule: print ZEROFS_UBLK_NAME of a ublkbN device.
    #[command(hide = true)]
    UdevName { kernel_name: String },
}

pub fn main() -> ExitCode {
    harden::harden();
    let args = match config::expand(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let cli = Cli::parse_from(&args);
    if let Some(level) = cli.log_level {
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli.command, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("zerofs-ublk: error: {e:#}");
    ExitCode::from(exit_status(&e))
}

/// Exit status of a command whose volume another writer holds
/// (`Error::InUse`; EX_NOPERM): nothing changes by retrying until someone
/// acts, so the systemd unit does not restart on it
/// (`RestartPreventExitStatus=77`) and says why once.
pub const EXIT_IN_USE: u8 = 77;

/// 1 for every error, but `EXIT_IN_USE` when the volume is claimed.
fn exit_status(e: &anyhow::Error) -> u8 {
    let in_use = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::Error>(),
            Some(crate::Error::InUse(_))
        )
    });
    if in_use { EXIT_IN_USE } else { 1 }
}

async fn run(command: Command, args: Vec<String>) -> Result<()> {
    match command {
        Command::Add(a) => device::add(*a, args).await,
        Command::Del(a) => device::del(a).await,
        Command::List => device::list(),
        Command::Recover(a) => device::recover(a).await,
        Command::Status(a) => device::status(a),
        Command::Bench(a) => bench::run(a).await,
        Command::UdevName { kernel_name } => device::udev_name(&kernel_name),
        Command::Create(a) => create(a).await,
        Command::Inspect(a) => inspect::run(a).await,
        Command::Import(a) => image::import(a).await,
        Command::Export(a) => image::export(a).await,
        Command::Gc(a) => gc::run(a).await,
        Command::Upgrade(a) => upgrade::run(a).await,
    }
}

/// Parse a recorded `add` command line again (for `recover`).
fn reparse_add(args: &[String]) -> Result<device::AddArgs> {
    match Cli::try_parse_from(args)?.command {
        Command::Add(a) => Ok(*a),
        _ => anyhow::bail!("recorded command is not `add`"),
    }
}

/// Open a volume read-only (inspect, export): no claim, nothing written.
pub async fn open_read_only(
    bucket: &BucketArgs,
    key: &KeyArgs,
    cfg: crate::volume::VolumeConfig,
) -> Result<Volume> {
    let secret = key.load()?;
    let store = open_store(bucket)?;
    let opts = crate::volume::OpenOptions {
        mode: crate::store::OpenMode::ReadOnly,
    };
    Ok(Volume::open(store, &secret, opts, cfg).await?)
}

/// Open the object store named by `--bucket`.
pub fn open_store(bucket: &BucketArgs) -> Result<DynStore> {
    Ok(open_bucket(&bucket.options()?)?)
}

async fn create(a: args::CreateArgs) -> Result<()> {
    let params = a.params()?;
    params.validate()?;
    let secret = a.key.load()?;
    let store = open_store(&a.bucket)?;
    let sb = Volume::create(
        &store,
        &params,
        &secret,
        a.allow_unsafe_no_conditional_create,
    )
    .await
    .with_context(|| format!("cannot create a volume at {}", a.bucket.bucket))?;
    println!(
        "created volume {} at {}: {} in {} chunks",
        sb.params.volume_id,
        a.bucket.bucket,
        format_bytes(sb.params.size),
        format_bytes(sb.params.chunk_size as u64)
    );
    Ok(())
}
