//! The dirty journal: acknowledged-but-unflushed writes survive the death
//! of the server process and are replayed by the next writer, so a FLUSH
//! re-issued to the new server really covers them.

mod common;

use common::*;
use zerofs_ublk::store::backend::DynStore;
use zerofs_ublk::volume::Volume;

/// A new volume opened by a journaled writer (the device server).
async fn create_and_open_journaled(store: &DynStore, chunks: u64) -> Volume {
    Volume::create(store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    open_journaled(store).await
}

async fn open_journaled(store: &DynStore) -> Volume {
    Volume::open(
        store.clone(),
        &secret(),
        journaled_writer(true),
        test_config(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn unflushed_writes_survive_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    let a = create_and_open_journaled(&store, 16).await;
    a.attach_journal(dir.path()).await.unwrap();
    a.write(0, &pattern(1, 3 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.write(4096, &pattern(2, 512)).await.unwrap(); // partial, after a flush
    a.write_zeroes(2 * 4096, 4096).await.unwrap();
    a.write(10 * 4096, &pattern(3, 4096)).await.unwrap();
    let expect = a.read(0, 16 * 4096).await.unwrap();
    drop(a); // killed: nothing more reaches the bucket

    // Without the journal, the unflushed writes are gone...
    let lost = Volume::open(store.clone(), &secret(), writer(true), test_config())
        .await
        .unwrap();
    assert_ne!(lost.read(0, 16 * 4096).await.unwrap(), expect);
    // ...and a writer that keeps no journal (import, bench) may write over
    // them: for epoch 3, epoch 1's journal is stale — discarded, never
    // replayed over epoch 2's newer, flushed data.
    lost.write(10 * 4096, &pattern(4, 4096)).await.unwrap();
    lost.flush().await.unwrap();
    let newer = lost.read(0, 16 * 4096).await.unwrap();
    drop(lost);
    let b = open_journaled(&store).await;
    assert_eq!(
        b.attach_journal(dir.path()).await.unwrap(),
        0,
        "stale journal ignored"
    );
    assert_eq!(b.read(0, 16 * 4096).await.unwrap(), newer);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "the stale journal is gone, b's own is there"
    );
    drop(b);
}

/// Issue 10, finding 1: server 1 dies with acknowledged, unflushed writes;
/// the recovery attempt (epoch 2) fails before its replay flush is durable;
/// the next attempt (epoch 3) must still replay epoch 1's journal — epoch 2
/// never served I/O, so nothing newer exists. (Failed on the old rule,
/// which replayed only epoch − 1 and deleted the rest.)
#[tokio::test]
async fn a_failed_recovery_attempt_keeps_the_dead_servers_journal() {
    use std::sync::Arc;
    use zerofs_ublk::store::backend::{FaultPlan, FaultyStore};
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    let a = create_and_open_journaled(&store, 16).await;
    a.attach_journal(dir.path()).await.unwrap();
    a.write(0, &pattern(1, 4 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.write(4096, &pattern(2, 2 * 4096)).await.unwrap();
    a.write(9 * 4096, &pattern(3, 4096)).await.unwrap();
    let expect = a.read(0, 16 * 4096).await.unwrap();
    drop(a); // killed

    // Recovery: the conditional-create probe (3 writes), the claim and the
    // seal succeed; the replay flush's segment PUT fails.
    let faulty = FaultyStore::new(store.clone());
    faulty.set_plan(FaultPlan {
        writes_before_failure: Some(5),
        ..FaultPlan::default()
    });
    let faulty: DynStore = Arc::new(faulty);
    let b = open_journaled(&faulty).await;
    assert!(
        b.attach_journal(dir.path()).await.is_err(),
        "replay flush fails"
    );
    drop(b);

    let c = open_journaled(&store).await;
    assert_eq!(c.stats().epoch, Some(3));
    assert!(c.attach_journal(dir.path()).await.unwrap() > 0);
    assert_eq!(c.read(0, 16 * 4096).await.unwrap(), expect);
    c.close().await.unwrap();
    let d = Volume::open(store.clone(), &secret(), read_only(), test_config())
        .await
        .unwrap();
    assert_eq!(d.read(0, 16 * 4096).await.unwrap(), expect, "durable");
}

/// Issue 10, finding 14: journals were keyed by volume id only; a copy of
/// the bucket (same volume id, its own claims) must not replay — or
/// delete — the original's journal.
#[tokio::test]
async fn a_copy_of_the_bucket_leaves_the_originals_journal_alone() {
    let dir = tempfile::tempdir().unwrap();
    let original = memory();
    Volume::create(&original, &params(16), &secret(), false)
        .await
        .unwrap();
    let copy = memory();
    for o in original.list("").await.unwrap() {
        let data = original.get(&o.key).await.unwrap();
        copy.put(&o.key, data).await.unwrap();
    }
    let a = open_journaled(&original).await;
    a.attach_journal(dir.path()).await.unwrap();
    a.write(0, &pattern(1, 4096)).await.unwrap();
    let expect = a.read(0, 16 * 4096).await.unwrap();
    drop(a); // killed with an unflushed write

    // The copy's own epoch 1 and 2: epoch 1 here is another claim.
    drop(open_journaled(&copy).await);
    let c = open_journaled(&copy).await;
    assert_eq!(c.attach_journal(dir.path()).await.unwrap(), 0);
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    drop(c);

    let b = open_journaled(&original).await;
    assert_eq!(b.attach_journal(dir.path()).await.unwrap(), 1);
    assert_eq!(b.read(0, 16 * 4096).await.unwrap(), expect);
}

#[tokio::test]
async fn next_writer_replays_and_flushes_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    let a = create_and_open_journaled(&store, 16).await;
    a.attach_journal(dir.path()).await.unwrap();
    a.write(0, &pattern(1, 4 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.write(512, &pattern(2, 1024)).await.unwrap();
    a.discard(3 * 4096, 4096).await.unwrap();
    a.write(12 * 4096, &pattern(3, 2 * 4096)).await.unwrap();
    let expect = a.read(0, 16 * 4096).await.unwrap();
    drop(a);

    let b = open_journaled(&store).await;
    assert_eq!(
        b.attach_journal(dir.path()).await.unwrap(),
        4,
        "one record per chunk span"
    );
    assert_eq!(b.read(0, 16 * 4096).await.unwrap(), expect);
    // Replayed writes were flushed to the bucket before serving.
    assert_eq!(b.stats().dirty_chunks, 0);
    b.close().await.unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "journal removed on close"
    );
    let c = Volume::open(store.clone(), &secret(), read_only(), test_config())
        .await
        .unwrap();
    assert_eq!(c.read(0, 16 * 4096).await.unwrap(), expect);
}

#[tokio::test]
async fn rewriting_one_chunk_keeps_the_journal_bounded() {
    use zerofs_ublk::volume::VolumeConfig;
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let limit = 8 * CHUNK as usize;
    let cfg = VolumeConfig {
        dirty_limit: limit,
        flush_bytes: limit,
        ..test_config()
    };
    let vol = Volume::open(store.clone(), &secret(), journaled_writer(false), cfg)
        .await
        .unwrap();
    vol.attach_journal(dir.path()).await.unwrap();
    // The dirty table never grows past one chunk, the journal would.
    let journal_size = || -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let mut largest = 0;
    for i in 0..2000u64 {
        vol.write(0, &pattern(i, 4096)).await.unwrap();
        largest = largest.max(journal_size());
    }
    assert!(
        largest <= 2 * limit as u64 + 8192,
        "journal reached {largest} bytes with a {limit}-byte dirty limit"
    );
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(1999, 4096));
}
