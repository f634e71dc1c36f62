//! One conformance suite, run against every backend: memory, local
//! directory, and a real S3-compatible server (moto) on 127.0.0.1.
//! First the object-store contract the engine relies on, then the volume
//! semantics end to end on that backend.

mod common;

use bytes::Bytes;
use common::*;
use zerofs_ublk::Error;
use zerofs_ublk::store::backend::{DynStore, MULTIPART_THRESHOLD, StoreError};
use zerofs_ublk::volume::{OpenOptions, Volume};

async fn object_store_contract(store: DynStore) {
    // put / get / overwrite
    store
        .put("a/one", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(store.get("a/one").await.unwrap().as_ref(), b"hello");
    store
        .put("a/one", Bytes::from_static(b"world!"))
        .await
        .unwrap();
    assert_eq!(store.get("a/one").await.unwrap().as_ref(), b"world!");
    // missing objects
    assert!(matches!(
        store.get("a/missing").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(!store.exists("a/missing").await.unwrap());
    assert!(store.exists("a/one").await.unwrap());
    // ranged reads are exact; out-of-range is an error, never short data
    assert_eq!(
        store.get_range("a/one", 1..4).await.unwrap().as_ref(),
        b"orl"
    );
    assert_eq!(
        store.get_range("a/one", 0..6).await.unwrap().as_ref(),
        b"world!"
    );
    assert!(store.get_range("a/one", 2..99).await.is_err());
    // listing: sorted, by prefix, with sizes
    store
        .put("a/two", Bytes::from(vec![7u8; 1000]))
        .await
        .unwrap();
    store
        .put("b/three", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let listed = store.list("a/").await.unwrap();
    let keys: Vec<_> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["a/one", "a/two"]);
    assert_eq!(listed[1].size, 1000);
    assert!(store.list("nothing/").await.unwrap().is_empty());
    // conditional create: exactly once, the first content stays
    assert!(
        store
            .put_if_absent("c/claim", Bytes::from_static(b"first"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_if_absent("c/claim", Bytes::from_static(b"second"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("c/claim").await.unwrap().as_ref(), b"first");
    // ... also for a body as large as a segment: a server may answer 412
    // before it has read the body (s3s-fs does), and the client must take
    // that answer rather than fail on the body it could not finish
    // sending.
    let big = Bytes::from(vec![3u8; 24 << 20]);
    assert!(store.put_if_absent("c/big", big.clone()).await.unwrap());
    assert!(
        !store
            .put_if_absent("c/big", Bytes::from(vec![4u8; 24 << 20]))
            .await
            .unwrap()
    );
    assert_eq!(store.get("c/big").await.unwrap(), big);
    // concurrent conditional creates of one key: exactly one winner
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put_if_absent("c/race", Bytes::from(vec![i as u8; 16]))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += r.await.unwrap() as u32;
    }
    assert_eq!(winners, 1, "exactly one concurrent create wins");
    // large objects (multipart on S3) come back whole, ranges included
    let big = Bytes::from(pattern(5, MULTIPART_THRESHOLD + (4 << 20)));
    store.put("big/segment", big.clone()).await.unwrap();
    assert_eq!(store.get("big/segment").await.unwrap(), big);
    let mid = (9 << 20) - 100..(9 << 20) + 100;
    assert_eq!(
        store.get_range("big/segment", mid.clone()).await.unwrap(),
        big.slice(mid.start as usize..mid.end as usize)
    );
    // delete, including a missing key; a listing after it omits the key
    let listed = |key: &'static str| {
        let store = store.clone();
        async move { store.list("a/").await.unwrap().iter().any(|o| o.key == key) }
    };
    assert!(listed("a/one").await);
    store.delete("a/one").await.unwrap();
    store.delete("a/one").await.unwrap();
    assert!(!store.exists("a/one").await.unwrap());
    assert!(!listed("a/one").await, "list after delete");
    assert!(matches!(
        store.get("a/one").await,
        Err(zerofs_ublk::store::backend::StoreError::NotFound(_))
    ));
    assert!(store.supports_conditional_create());
}

async fn volume_semantics(store: DynStore) {
    let chunks = 32u64;
    let cs = CHUNK as u64;
    let vol = create_and_open(&store, chunks).await;
    // never-written space reads as zeros
    assert_eq!(vol.read(0, 8192).await.unwrap(), vec![0u8; 8192]);
    // a write spanning chunks, unaligned to chunks but sector-aligned
    let a = pattern(1, 3 * cs as usize);
    vol.write(cs / 2, &a).await.unwrap();
    assert_eq!(
        vol.read(cs / 2, a.len()).await.unwrap(),
        a,
        "read your writes"
    );
    vol.flush().await.unwrap();
    // partial overwrite after flush (read-modify-write from the store)
    let b = pattern(2, 1024);
    vol.write(cs + 512, &b).await.unwrap();
    // zeroes and discard
    vol.write_zeroes(10 * cs, 2 * cs).await.unwrap();
    vol.write(20 * cs, &pattern(3, cs as usize)).await.unwrap();
    vol.flush().await.unwrap();
    vol.discard(20 * cs, cs).await.unwrap();
    vol.write_zeroes(cs / 2, 512).await.unwrap();
    let mut expect = vec![0u8; (chunks * cs) as usize];
    expect[cs as usize / 2..cs as usize / 2 + a.len()].copy_from_slice(&a);
    expect[(cs + 512) as usize..(cs + 512) as usize + b.len()].copy_from_slice(&b);
    expect[cs as usize / 2..cs as usize / 2 + 512].fill(0);
    assert_eq!(vol.read(0, expect.len()).await.unwrap(), expect);
    vol.close().await.unwrap();
    // everything came back from the bucket
    let vol = Volume::open(store.clone(), &secret(), writer(false), test_config())
        .await
        .unwrap();
    assert_eq!(vol.read(0, expect.len()).await.unwrap(), expect);
    // bad requests are errors, not I/O
    assert!(matches!(
        vol.read(100, 512).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        vol.write(chunks * cs, &[0u8; 512]).await,
        Err(Error::InvalidArgument(_))
    ));
    vol.close().await.unwrap();
    let ro = Volume::open(store.clone(), &secret(), read_only(), test_config())
        .await
        .unwrap();
    assert_eq!(ro.read(0, expect.len()).await.unwrap(), expect);
    assert!(
        ro.write(0, &[1u8; 512]).await.is_err(),
        "read-only refuses writes"
    );
}

macro_rules! on_every_backend {
    ($suite:ident) => {
        mod $suite {
            use super::*;

            #[tokio::test]
            async fn memory() {
                super::$suite(common::memory()).await;
            }

            #[tokio::test]
            async fn local_dir() {
                let (_dir, store) = common::local_dir();
                super::$suite(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn s3() {
                let store = S3Server::shared().store(&unique(stringify!($suite)).replace('_', "-"));
                super::$suite(store).await;
            }
        }
    };
}

/// Garbage collection on the backend: overwrite, collect with no grace
/// period, and what is left is exactly what a reopen needs.
async fn volume_collection(store: DynStore) {
    use std::time::Duration;
    let chunks = 16u64;
    let cs = CHUNK as usize;
    let vol = create_and_open(&store, chunks).await;
    let mut expect = vec![0u8; chunks as usize * cs];
    for round in 0..4u64 {
        for c in 0..chunks {
            if (c + round) % 3 != 0 {
                let data = pattern(round * 100 + c, cs);
                vol.write(c * cs as u64, &data).await.unwrap();
                expect[c as usize * cs..(c as usize + 1) * cs].copy_from_slice(&data);
            }
        }
        vol.flush().await.unwrap();
    }
    let segments_before = store.list("segments/").await.unwrap().len();
    for _ in 0..20 {
        let pass = vol.collect(Duration::ZERO).await.unwrap();
        if pass.is_idle() && pass.pending == 0 {
            break;
        }
    }
    assert!(vol.gc_stats().objects_deleted > 0, "{:?}", vol.gc_stats());
    let segments_after = store.list("segments/").await.unwrap().len();
    assert!(
        segments_after < segments_before,
        "{segments_before} segments before, {segments_after} after"
    );
    assert_eq!(vol.read(0, expect.len()).await.unwrap(), expect);
    drop(vol); // a crash
    let vol = Volume::open(store.clone(), &secret(), writer(true), test_config())
        .await
        .unwrap();
    assert_eq!(vol.read(0, expect.len()).await.unwrap(), expect);
}

on_every_backend!(object_store_contract);
on_every_backend!(volume_semantics);
on_every_backend!(volume_collection);

/// The frontend's hot path: a read served from memory must equal the
/// normal read, and must decline (not guess) when the store is needed.
#[tokio::test]
async fn cached_reads_match_and_decline_on_miss() {
    let store = common::memory();
    let vol = create_and_open(&store, 16).await;
    let cs = CHUNK as u64;
    let data = pattern(7, 3 * cs as usize);
    vol.write(cs, &data).await.unwrap();
    let mut buf = vec![0u8; 4 * cs as usize];
    // Dirty data and unmapped zeros are in memory.
    assert!(vol.try_read_cached(0, &mut buf).unwrap());
    assert_eq!(buf, vol.read(0, buf.len()).await.unwrap());
    vol.close().await.unwrap();
    // A cold volume: the chunks are only in the store.
    let vol = Volume::open(store.clone(), &secret(), writer(false), test_config())
        .await
        .unwrap();
    assert!(
        !vol.try_read_cached(cs, &mut buf[..512]).unwrap(),
        "declines on a miss"
    );
    vol.read(cs, cs as usize).await.unwrap(); // warms the cache for chunk 1
    let mut hot = vec![0u8; 1024];
    assert!(vol.try_read_cached(cs + 512, &mut hot).unwrap());
    assert_eq!(hot, data[512..1536]);
    assert!(vol.try_read_cached(3, &mut hot).is_err(), "misaligned");
}

#[tokio::test]
async fn backend_without_conditional_create_is_refused_unless_accepted() {
    let store: DynStore = std::sync::Arc::new(IgnoresConditions(common::memory()));
    let err = Volume::create(&store, &params(8), &secret(), false)
        .await
        .expect_err("probe must catch the overwrite");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("--allow-unsafe-no-conditional-create"),
        "{err}"
    );
    // Nothing but the (deleted) probe was written.
    assert!(store.list("").await.unwrap().is_empty());
    // Explicitly accepting the risk works, for create and for open.
    Volume::create(&store, &params(8), &secret(), true)
        .await
        .unwrap();
    let refused = Volume::open(store.clone(), &secret(), writer(false), test_config()).await;
    assert!(matches!(refused, Err(Error::Unsupported(_))));
    let unsafe_writer = OpenOptions {
        mode: zerofs_ublk::store::OpenMode::Writer(zerofs_ublk::store::WriterOptions {
            force: false,
            allow_unconditional: true,
            journal: None,
        }),
    };
    let vol = Volume::open(store.clone(), &secret(), unsafe_writer, test_config())
        .await
        .unwrap();
    vol.write(0, &pattern(1, 4096)).await.unwrap();
    vol.close().await.unwrap();
}
