//! The SSD cache tier: frames survive a restart of the volume (warm
//! restart: no GET), hold only ciphertext, and a corrupted entry is never
//! served — the frame is read from the store instead.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use zerofs_ublk::cache::DiskCache;
use zerofs_ublk::store::backend::{DynStore, MemoryStore};
use zerofs_ublk::volume::{OpenOptions, Volume, VolumeConfig};

/// Open with an SSD tier in `dir` (64 MiB), passed in as a component.
async fn open(store: DynStore, opts: OpenOptions, dir: &Path) -> Volume {
    let disk = DiskCache::open(dir, 64 << 20).await.unwrap();
    let cfg = VolumeConfig {
        readahead_chunks: 0,
        ..test_config()
    };
    let secret = secret();
    Volume::builder(store, &secret)
        .options(opts)
        .config(cfg)
        .disk_cache(disk)
        .open()
        .await
        .unwrap()
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

async fn volume_with_data(mem: &MemoryStore, cache: &Path) -> Vec<u8> {
    let store: DynStore = Arc::new(mem.clone());
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let vol = open(store, writer(false), cache).await;
    let data = pattern(4, 8 * CHUNK as usize);
    vol.write(0, &data).await.unwrap();
    vol.close().await.unwrap(); // flush fills the SSD tier
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_restart_reads_from_the_ssd_tier() {
    let cache = tempfile::tempdir().unwrap();
    let mem = MemoryStore::new();
    let data = volume_with_data(&mem, cache.path()).await;
    let store: DynStore = Arc::new(mem.clone());
    let vol = open(store, read_only(), cache.path()).await;
    let before = vol.request_stats();
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    let after = vol.request_stats();
    assert_eq!(
        after.ranged_get, before.ranged_get,
        "served by the SSD tier: {after:?}"
    );
    // Only ciphertext on the cache disk: no plaintext run of the data.
    for f in files(cache.path()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == &data[4096..4160]),
            "plaintext in {}",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_cache_entry_falls_back_to_the_store() {
    let cache = tempfile::tempdir().unwrap();
    let mem = MemoryStore::new();
    let data = volume_with_data(&mem, cache.path()).await;
    // Corrupt every byte run of the cache files that holds a frame: flip
    // a byte in the middle of each cache file's non-zero content.
    let mut flipped = 0;
    for f in files(cache.path()) {
        let mut bytes = std::fs::read(&f).unwrap();
        let nonzero: Vec<usize> = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, _)| i)
            .collect();
        if nonzero.len() < 4096 {
            continue;
        }
        for i in nonzero.iter().step_by(512) {
            bytes[*i] ^= 0x20;
            flipped += 1;
        }
        std::fs::write(&f, bytes).unwrap();
    }
    assert!(flipped > 0, "cache files hold the frames");
    let store: DynStore = Arc::new(mem.clone());
    let vol = open(store, read_only(), cache.path()).await;
    // Whatever the cache returns or fails to, the data is right, and it
    // came from the store (the corrupted entries were not used).
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    assert!(vol.request_stats().ranged_get > 0, "fell back to the store");
}
