//! `upgrade`: bring a volume to this build's format without serving it
//! (any writer open does the same: `add`, `import`, `gc`).

use anyhow::Result;
use clap::Args;

use super::args::{BucketArgs, KeyArgs, WriterArgs};
use crate::store::LogStore;
use crate::store::superblock::FORMAT_VERSION;
use crate::volume::{OpenOptions, Volume, VolumeConfig};

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub writer: WriterArgs,
}

pub async fn run(a: UpgradeArgs) -> Result<()> {
    let store = super::open_store(&a.bucket)?;
    let before = LogStore::read_superblock(&store)
        .await?
        .params
        .format_version;
    if before >= FORMAT_VERSION {
        println!("volume is at format {before} already");
        return Ok(());
    }
    let secret = a.key.load()?;
    let opts = OpenOptions {
        mode: a.writer.mode(None),
    };
    let cfg = VolumeConfig {
        cache_bytes: 0,
        ..VolumeConfig::default()
    };
    // A writer like any other: it claims the volume (a server holding it
    // makes this fail with "in use"), upgrades, and releases it.
    let vol = Volume::open(store, &secret, opts, cfg).await?;
    vol.close().await?;
    println!(
        "volume upgraded from format {before} to {FORMAT_VERSION}; older builds now refuse it"
    );
    Ok(())
}
