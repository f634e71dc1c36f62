//! docs/rfcs/0001: objects are keyed to their writer's claim token, so two
//! writers of one epoch — two copies of a bucket, a backend without
//! conditional create — never encrypt under one key and nonce, and one's
//! objects in the other's place are an integrity error, never data. Also:
//! a volume of the previous format (a fixture written by that release)
//! opens, reads, and is upgraded with its old objects still readable.
//!
//! The key-use log is process-wide, so these tests run one at a time.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use zerofs_ublk::Error;
use zerofs_ublk::store::backend::{DynStore, ObjectInfo, ObjectStore, StoreResult};
use zerofs_ublk::store::keys::{Secret, key_use};
use zerofs_ublk::store::log::LogStore;
use zerofs_ublk::store::paths;
use zerofs_ublk::store::superblock::FORMAT_VERSION;
use zerofs_ublk::volume::{Volume, VolumeConfig};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn segment_2_0() -> String {
    paths::segment(zerofs_ublk::store::SegmentId { epoch: 2, seq: 0 })
}

/// Test 2 of the RFC: a restored backup or a `cp -a` of a `file://`
/// bucket, each copy then opened by a writer. Both claim epoch 2 in their
/// copy and write segment (2, 0) with a frame at offset 0.
#[tokio::test]
async fn a_copy_of_the_bucket_never_shares_a_key_with_the_original() {
    let _one_at_a_time = SERIAL.lock().await;
    key_use::start();
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    let a = dir_store(&pa);
    let v = create_and_open(&a, 16).await;
    v.write(0, &pattern(1, 4096)).await.unwrap();
    v.close().await.unwrap();
    copy_tree(&pa, &pb);
    let b = dir_store(&pb);
    for (store, seed) in [(&a, 2), (&b, 3)] {
        let v = Volume::open(store.clone(), &secret(), writer(false), test_config())
            .await
            .unwrap();
        assert_eq!(v.stats().epoch, Some(2));
        v.write(4096, &pattern(seed, 4096)).await.unwrap();
        v.close().await.unwrap();
    }
    assert_eq!(
        key_use::reuses(),
        0,
        "the two copies encrypted different data under one key and nonce"
    );
    // The copy's segment in the original's place: never the copy's bytes.
    std::fs::copy(pb.join(segment_2_0()), pa.join(segment_2_0())).unwrap();
    match Volume::open(a.clone(), &secret(), read_only(), test_config()).await {
        Err(e) => assert!(matches!(e, Error::Integrity(_)), "{e}"),
        Ok(v) => {
            assert_eq!(v.read(0, 4096).await.unwrap(), pattern(1, 4096));
            let got = v.read(4096, 4096).await;
            assert!(
                matches!(got, Err(Error::Integrity(_))),
                "a foreign copy's frame must not read as data: {:?}",
                got.map(|d| d == pattern(3, 4096))
            );
        }
    }
}

/// Creates of `epochs/` wait until two openers have arrived, so both list
/// the same latest epoch and both "win" the next one (the backend ignores
/// the condition).
#[derive(Debug)]
struct Rendezvous {
    inner: DynStore,
    barrier: Arc<tokio::sync::Barrier>,
}

#[async_trait::async_trait]
impl ObjectStore for Rendezvous {
    async fn put(&self, k: &str, d: bytes::Bytes) -> StoreResult<()> {
        self.inner.put(k, d).await
    }
    async fn put_if_absent(&self, k: &str, d: bytes::Bytes) -> StoreResult<bool> {
        if k.starts_with(paths::CLAIMS) {
            self.barrier.wait().await;
        }
        self.inner.put_if_absent(k, d).await
    }
    async fn get(&self, k: &str) -> StoreResult<bytes::Bytes> {
        self.inner.get(k).await
    }
    async fn get_range(&self, k: &str, r: std::ops::Range<u64>) -> StoreResult<bytes::Bytes> {
        self.inner.get_range(k, r).await
    }
    async fn exists(&self, k: &str) -> StoreResult<bool> {
        self.inner.exists(k).await
    }
    async fn list(&self, p: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.inner.list(p).await
    }
    async fn delete(&self, k: &str) -> StoreResult<()> {
        self.inner.delete(k).await
    }
    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }
    fn describe(&self) -> String {
        "rendezvous".into()
    }
}

/// Test 3 of the RFC: `--allow-unsafe-no-conditional-create` on a backend
/// that ignores the condition, two writers in one epoch. One loses its
/// writes (that is what conditional create is for), but no key and nonce
/// ever encrypt two messages, and a reader sees one writer's data or an
/// integrity error.
#[tokio::test]
async fn two_writers_of_one_epoch_never_share_a_key() {
    let _one_at_a_time = SERIAL.lock().await;
    key_use::start();
    let shared: DynStore = Arc::new(IgnoresConditions(memory()));
    Volume::create(&shared, &params(16), &secret(), true)
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let opener = |seed: u64| {
        let store: DynStore = Arc::new(Rendezvous {
            inner: shared.clone(),
            barrier: barrier.clone(),
        });
        async move {
            let v = Volume::open(store, &secret(), unsafe_writer(false), test_config())
                .await
                .unwrap();
            v.write(0, &pattern(seed, 8192)).await.unwrap();
            v.close().await.unwrap();
        }
    };
    tokio::join!(opener(10), opener(11));
    assert_eq!(
        key_use::reuses(),
        0,
        "two writers of one epoch encrypted different data under one key and nonce"
    );
    match Volume::open(shared.clone(), &secret(), read_only(), test_config()).await {
        Err(e) => assert!(matches!(e, Error::Integrity(_)), "{e}"),
        Ok(v) => match v.read(0, 8192).await {
            Ok(d) => assert!(d == pattern(10, 8192) || d == pattern(11, 8192)),
            Err(e) => assert!(matches!(e, Error::Integrity(_)), "{e}"),
        },
    }
}

/// Test 5 of the RFC: `tests/fixtures/format2` was written by the previous
/// release (`create --size 1M --chunk-size 64K` with the key file there,
/// then `import` of 192 KiB = pattern(7)). It opens read-only as it is,
/// a writer upgrades it to the current format, and old (unbound) and new
/// (bound) objects read back together.
#[tokio::test]
async fn a_format_2_volume_opens_upgrades_and_reads_old_and_new_objects() {
    let cs = 64 << 10;
    let mut expect = pattern(7, 3 * cs);
    expect.resize(6 * cs, 0);
    opens_upgrades_and_reads("format2", 2, expect).await;
}

/// RFC 0003: `tests/fixtures/format3` is the format-2 fixture after the
/// format-3 release (30559ad) imported 64 KiB of pattern(8) into it (the
/// volume upgraded to 3, and a writer of format 3 released it). A
/// format-4 writer upgrades it, fencing by segment name from then on.
#[tokio::test]
async fn a_format_3_volume_opens_upgrades_and_reads_old_and_new_objects() {
    let cs = 64 << 10;
    let mut expect = pattern(7, 3 * cs);
    expect[..cs].copy_from_slice(&pattern(8, cs));
    expect.resize(6 * cs, 0);
    opens_upgrades_and_reads("format3", 3, expect).await;
}

/// RFC 0004: `tests/fixtures/format4` is the format-3 fixture after a
/// format-4 build (247ab47 with the background checkpointer, which
/// changed no format) imported 128 KiB of pattern(10) into it: its
/// checkpoints hold the whole index (version 1). A format-5 writer reads
/// them, upgrades the volume, and its checkpoints are roots and runs.
#[tokio::test]
async fn a_format_4_volume_opens_upgrades_and_reads_old_and_new_objects() {
    let cs = 64 << 10;
    let mut expect = pattern(7, 3 * cs);
    expect[..2 * cs].copy_from_slice(&pattern(10, 2 * cs));
    expect.resize(6 * cs, 0);
    opens_upgrades_and_reads("format4", 4, expect).await;
}

async fn opens_upgrades_and_reads(fixture: &str, initial: u32, mut expect: Vec<u8>) {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    copy_tree(&fixture.join("bucket"), &dir.path().join("bucket"));
    let store = dir_store(&dir.path().join("bucket"));
    let secret = || Secret::key_file(std::fs::read(fixture.join("key")).unwrap()).unwrap();
    let cs = 64 << 10;
    let cfg = VolumeConfig {
        cache_bytes: 4 * cs,
        ..test_config()
    };
    let version = |store: DynStore| async move {
        LogStore::read_superblock(&store)
            .await
            .unwrap()
            .params
            .format_version
    };

    let ro = Volume::open(store.clone(), &secret(), read_only(), cfg.clone())
        .await
        .unwrap();
    assert_eq!(ro.read(0, 6 * cs).await.unwrap(), expect);
    assert_eq!(
        version(store.clone()).await,
        initial,
        "a reader does not upgrade"
    );
    drop(ro);

    let w = Volume::open(store.clone(), &secret(), writer(false), cfg.clone())
        .await
        .unwrap();
    assert_eq!(
        version(store.clone()).await,
        FORMAT_VERSION,
        "the writer upgraded the volume"
    );
    assert_eq!(w.read(0, 6 * cs).await.unwrap(), expect);
    // New objects (bound) next to old ones (unbound), and a partial write
    // that reads an old frame and writes a new one.
    w.write(5 * cs as u64, &pattern(8, cs)).await.unwrap();
    w.write(512, &pattern(9, 1024)).await.unwrap();
    expect[5 * cs..].copy_from_slice(&pattern(8, cs));
    expect[512..1536].copy_from_slice(&pattern(9, 1024));
    w.close().await.unwrap();
    assert!(
        !store.list("index/").await.unwrap().is_empty(),
        "the upgraded writer's checkpoint is a root and its runs"
    );

    for opts in [writer(false), read_only()] {
        let v = Volume::open(store.clone(), &secret(), opts, cfg.clone())
            .await
            .unwrap();
        assert!(v.summary().checkpoint_used.is_some());
        assert_eq!(v.read(0, 6 * cs).await.unwrap(), expect);
        v.close().await.unwrap();
    }
}

/// Review of RFC 0001: a format-2 build that read the superblock before a
/// format-3 writer upgraded it can still take over, and its seal records
/// no writer tokens. The format-3 epoch it sealed must still be keyed to
/// its writer — by its claim — or the volume no longer opens.
#[tokio::test]
async fn a_seal_written_by_a_format_2_build_over_a_format_3_epoch() {
    use zerofs_ublk::store::SegmentId;
    use zerofs_ublk::store::fencing::{Claim, Seal, encrypt_record};
    let _one_at_a_time = SERIAL.lock().await;
    let store = memory();
    let v = create_and_open(&store, 16).await;
    v.write(0, &pattern(20, 8192)).await.unwrap();
    v.flush().await.unwrap();
    drop(v); // epoch 1 (bound) dies
    // What the format-2 build's takeover writes: an unbound claim of epoch
    // 2 and a seal of epoch 1's objects without tokens.
    let keys = LogStore::read_superblock(&store)
        .await
        .unwrap()
        .unlock(&secret())
        .unwrap();
    let claim = Claim {
        keys_bound: false,
        ..Claim::mine(None)
    };
    store
        .put(
            "epochs/0000000000000002",
            encrypt_record(&keys, "claim", 2, &claim),
        )
        .await
        .unwrap();
    let ids = |prefix: &'static str| {
        let store = store.clone();
        async move {
            store
                .list(prefix)
                .await
                .unwrap()
                .iter()
                .filter_map(|o| SegmentId::parse(o.key.strip_prefix(prefix).unwrap()))
                .collect::<Vec<_>>()
        }
    };
    let seal = Seal::from_listing(
        1,
        2,
        &ids(paths::SEGMENTS).await,
        &ids(paths::CHECKPOINTS).await,
    );
    assert!(!seal.writers_recorded && seal.writers.is_empty());
    store
        .put(
            "seals/0000000000000002",
            encrypt_record(&keys, "seal", 2, &seal),
        )
        .await
        .unwrap();
    // A format-3 writer takes over from the dead format-2 one.
    let v = Volume::open(store.clone(), &secret(), writer(true), test_config())
        .await
        .expect("the volume opens");
    assert_eq!(v.read(0, 8192).await.unwrap(), pattern(20, 8192));
    v.close().await.unwrap();
    let v = Volume::open(store.clone(), &secret(), read_only(), test_config())
        .await
        .unwrap();
    assert_eq!(v.read(0, 8192).await.unwrap(), pattern(20, 8192));
}
