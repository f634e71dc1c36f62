//! The SSD tier: foyer's hybrid cache holding *ciphertext* frames, keyed by
//! volume id and frame location. A stolen cache disk reveals nothing (the
//! frames are AES-256-GCM under keys that never touch it), and a corrupted
//! entry fails authentication when decoded — the volume then drops it and
//! reads the frame from the store. Locations are immutable, so an entry is
//! never stale. foyer recovers its index on restart (warm restart).

use std::path::Path;

use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, RecoverMode,
};

use crate::error::{Error, Result};
use crate::store::Loc;

/// foyer's own memory tier in front of the disk: small, because decoded
/// chunks already have the volume's memory cache.
const FOYER_MEMORY: usize = 16 << 20;

#[derive(Clone)]
pub struct DiskCache {
    cache: HybridCache<String, Vec<u8>>,
    /// The volume whose frames this handle reads and writes (hex id).
    volume: String,
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("SSD cache: {what}: {e}"))
}

impl DiskCache {
    /// Open (or recover) the tier in `dir`; `for_volume` gives the handle
    /// a volume uses.
    pub async fn open(dir: &Path, capacity: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(&format!("cannot create {}", dir.display()), e))?;
        let device = FsDeviceBuilder::new(dir)
            .with_capacity(capacity as usize)
            .build()
            .map_err(|e| failed("device", e))?;
        let cache = HybridCacheBuilder::new()
            .with_name("zerofs-ublk")
            // Straight to disk: survives restarts without waiting for an
            // eviction from foyer's small memory tier.
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .memory(FOYER_MEMORY)
            .with_weighter(|k: &String, v: &Vec<u8>| k.len() + v.len())
            .storage()
            .with_engine_config(BlockEngineConfig::new(device))
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(|e| failed("open", e))?;
        Ok(DiskCache {
            cache,
            volume: String::new(),
        })
    }

    /// The same tier, for the frames of volume `volume_id`.
    pub fn for_volume(&self, volume_id: &[u8; 16]) -> DiskCache {
        DiskCache {
            cache: self.cache.clone(),
            volume: hex::encode(volume_id),
        }
    }

    fn key(&self, loc: &Loc) -> String {
        format!(
            "{}/{}/{:x}/{:x}",
            self.volume, loc.segment, loc.offset, loc.len
        )
    }

    pub async fn get(&self, loc: &Loc) -> Option<Vec<u8>> {
        match self.cache.get(&self.key(loc)).await {
            Ok(Some(entry)) => Some(entry.value().clone()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("SSD cache read failed (reading from the store): {e}");
                None
            }
        }
    }

    pub fn insert(&self, loc: &Loc, frame: Vec<u8>) {
        self.cache.insert(self.key(loc), frame);
    }

    pub fn remove(&self, loc: &Loc) {
        self.cache.remove(&self.key(loc));
    }

    pub async fn close(&self) {
        if let Err(e) = self.cache.close().await {
            tracing::warn!("SSD cache close: {e}");
        }
    }
}
