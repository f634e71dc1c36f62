//! `gc`: collect garbage in a volume no server has attached — copy live
//! data out of mostly-dead segments, then delete what no recovery needs
//! once it has been unneeded for the grace period (waiting it out).

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use super::args::{BucketArgs, GcArgs, KeyArgs, WriterArgs};
use super::{format_bytes, format_duration};
use crate::volume::{OpenOptions, Volume, VolumeConfig};

#[derive(Args, Debug)]
pub struct GcCmdArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub writer: WriterArgs,
    #[command(flatten)]
    pub gc: GcArgs,
}

/// Passes after which a collection that still finds work is reported as
/// unfinished rather than run forever (each pass copies about one
/// segment's worth).
const MAX_PASSES: usize = 100_000;

pub async fn run(a: GcCmdArgs) -> Result<()> {
    let gc = a.gc.config(false)?;
    let grace = gc.grace;
    let secret = a.key.load()?;
    let store = super::open_store(&a.bucket)?;
    let cfg = VolumeConfig {
        cache_bytes: 0,
        gc,
        ..VolumeConfig::default()
    };
    let opts = OpenOptions {
        mode: a.writer.mode(None),
    };
    // A writer like any other: it claims the volume (a server holding it
    // makes this fail with "in use"), and fences whoever held it.
    let vol = Volume::open(store, &secret, opts, cfg).await?;
    let before = vol.summary().segment_bytes;
    let started = Instant::now();
    let mut waited = false;
    let mut done = false;
    for _ in 0..MAX_PASSES {
        let pass = vol.collect(grace).await?;
        if pass.is_idle() {
            if pass.pending == 0 {
                done = true;
                break;
            }
            // Everything left waits for the grace period.
            if !waited {
                eprintln!(
                    "waiting {} (--grace) before deleting {} unneeded objects",
                    format_duration(grace),
                    pass.pending
                );
                waited = true;
            }
            tokio::time::sleep(Duration::from_secs(1).min(grace.max(Duration::from_millis(50))))
                .await;
        }
    }
    let s = vol.gc_stats();
    let live = vol.stats().live_bytes;
    vol.close().await?;
    if !done {
        anyhow::bail!(
            "collection still finds work after {MAX_PASSES} passes; run gc again to go on"
        );
    }
    println!(
        "collected in {:.1} s: {} segments copied ({}), {} objects deleted ({}); segments {} → {}, live {}",
        started.elapsed().as_secs_f64(),
        s.segments_copied,
        format_bytes(s.bytes_copied),
        s.objects_deleted,
        format_bytes(s.bytes_deleted),
        format_bytes(before),
        format_bytes(s.segment_bytes),
        format_bytes(live),
    );
    Ok(())
}
