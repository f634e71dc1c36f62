//! Argument groups shared by the commands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::units::parse_size;
use crate::store::backend::BucketOptions;
use crate::store::keys::{Argon2Cost, Secret};
use crate::store::superblock::{CreateParams, DEFAULT_ZSTD_LEVEL};
use crate::store::{OpenMode, WriterOptions};

pub const PASSPHRASE_ENV: &str = "ZEROFS_UBLK_PASSPHRASE";

#[derive(Args, Debug, Clone)]
pub struct BucketArgs {
    /// Where the volume lives: s3://bucket/prefix, file:///dir or memory://name.
    #[arg(long, env = "ZEROFS_UBLK_BUCKET", value_name = "URL")]
    pub bucket: String,
    /// S3 endpoint for S3-compatible servers (default: AWS; also AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Use virtual-hosted-style S3 addressing instead of path style.
    #[arg(long)]
    pub virtual_host_style: bool,
    /// S3: time allowed per request attempt on top of its transfer time.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub request_timeout: u64,
    /// S3: the slowest transfer tolerated per request, per second; an
    /// attempt moving N bytes may take request-timeout + N / this.
    #[arg(long, default_value = "512K", value_name = "SIZE")]
    pub min_throughput: String,
    /// S3: how long a failing request is retried before the I/O that needs
    /// it fails (reads and writes wait through a shorter outage).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub retry_for: u64,
}

impl BucketArgs {
    pub fn options(&self) -> Result<BucketOptions> {
        let mut o = BucketOptions::new(&self.bucket);
        o.endpoint = self.endpoint.clone();
        o.region = self.region.clone();
        o.virtual_host_style = self.virtual_host_style;
        o.retry.attempt_timeout = Duration::from_secs(self.request_timeout.max(1));
        o.retry.retry_for = Duration::from_secs(self.retry_for);
        o.retry.min_throughput = parse_size(&self.min_throughput)
            .with_context(|| format!("--min-throughput {:?}", self.min_throughput))?;
        if o.retry.min_throughput == 0 {
            bail!("--min-throughput must be more than 0");
        }
        Ok(o)
    }
}

#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// File with at least 32 random bytes protecting the volume's key.
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// File holding the passphrase (else ZEROFS_UBLK_PASSPHRASE is used).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeyArgs {
    pub fn load(&self) -> Result<Secret> {
        if let Some(path) = &self.key_file {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read key file {}", path.display()))?;
            return Ok(Secret::key_file(bytes)?);
        }
        if let Some(path) = &self.passphrase_file {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read passphrase file {}", path.display()))?;
            return Ok(Secret::passphrase(bytes)?);
        }
        match super::harden::passphrase() {
            Some(p) => Ok(Secret::passphrase(p.to_vec())?),
            None => bail!(
                "no key given: use --key-file FILE, --passphrase-file FILE or set {PASSPHRASE_ENV}"
            ),
        }
    }
}

/// Garbage collection (docs/rfcs/0002-garbage-collection.md).
#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// Keep an object this long after it became unneeded (readers that
    /// listed before can finish), e.g. 10m, 30s, 0.
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    pub grace: String,
    /// Copy a segment's live data forward once less than this share of it
    /// is live (0 to 1; higher keeps the bucket smaller and uploads more).
    #[arg(long, default_value_t = 0.5, value_name = "SHARE")]
    pub gc_live_below: f64,
    /// Store bandwidth garbage collection may use, per second.
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub gc_bandwidth: String,
    /// Store requests garbage collection may make, per second.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub gc_requests: u32,
}

impl GcArgs {
    /// The collector's configuration; `background`: run it in the server.
    pub fn config(&self, background: bool) -> Result<crate::volume::gc::GcConfig> {
        if !(0.0..=1.0).contains(&self.gc_live_below) {
            bail!(
                "--gc-live-below must be between 0 and 1, not {}",
                self.gc_live_below
            );
        }
        if self.gc_requests == 0 {
            bail!("--gc-requests must be at least 1");
        }
        let bytes_per_sec = super::parse_size(&self.gc_bandwidth)?;
        if bytes_per_sec == 0 {
            bail!("--gc-bandwidth must be more than 0");
        }
        Ok(crate::volume::gc::GcConfig {
            policy: if background {
                crate::volume::gc::GcPolicy::Background
            } else {
                crate::volume::gc::GcPolicy::Manual
            },
            grace: super::parse_duration(&self.grace)?,
            live_below: self.gc_live_below,
            bytes_per_sec,
            requests_per_sec: self.gc_requests,
            ..crate::volume::gc::GcConfig::default()
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct WriterArgs {
    /// Take over a volume another writer holds; that writer is fenced and
    /// its further flushes fail.
    #[arg(long)]
    pub force: bool,
    /// Accept a backend that does not enforce conditional create. UNSAFE:
    /// nothing then stops two writers from corrupting the volume.
    #[arg(long)]
    pub allow_unsafe_no_conditional_create: bool,
}

impl WriterArgs {
    /// `journal`: the identity of the directory the writer keeps its
    /// host-local journal in (the server), if any.
    pub fn mode(&self, journal: Option<String>) -> OpenMode {
        OpenMode::Writer(WriterOptions {
            force: self.force,
            allow_unconditional: self.allow_unsafe_no_conditional_create,
            journal,
        })
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Volume size, e.g. 100G (a multiple of the chunk size).
    #[arg(long)]
    pub size: String,
    /// Chunk size: a power of two from 4K to 16M, fixed for the volume.
    #[arg(long, default_value = "128K")]
    pub chunk_size: String,
    /// zstd level for chunk compression (1-19).
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Argon2id memory cost in MiB for passphrase-protected volumes.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub kdf_memory_mib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = 3)]
    pub kdf_passes: u32,
    /// Accept a backend that does not enforce conditional create (UNSAFE).
    #[arg(long)]
    pub allow_unsafe_no_conditional_create: bool,
}

impl CreateArgs {
    pub fn params(&self) -> Result<CreateParams> {
        let chunk_size = super::parse_chunk_size(&self.chunk_size)?;
        if self.kdf_memory_mib == 0 || self.kdf_passes == 0 {
            bail!("--kdf-memory-mib and --kdf-passes must be at least 1");
        }
        Ok(CreateParams {
            size: parse_size(&self.size)?,
            chunk_size,
            zstd_level: self.zstd_level,
            argon2: Argon2Cost {
                m_cost_kib: self.kdf_memory_mib.saturating_mul(1024),
                t_cost: self.kdf_passes,
                p_cost: 1,
            },
        })
    }
}
