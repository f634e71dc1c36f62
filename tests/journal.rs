//! The dirty journal: acknowledged-but-unflushed writes survive the death
//! of the server process and are replayed by the next writer, so a FLUSH
//! re-issued to the new server really covers them.

mod common;

use common::*;
use zerofs_ublk::volume::Volume;

#[tokio::test]
async fn unflushed_writes_survive_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    let a = create_and_open(&store, 16).await;
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
    drop(lost);
    // ...and once another writer (epoch 2) has come between, epoch 1's
    // journal is stale for epoch 3: discarded, never replayed over newer data.
    let b = Volume::open(store.clone(), &secret(), writer(true), test_config())
        .await
        .unwrap();
    assert_eq!(
        b.attach_journal(dir.path()).await.unwrap(),
        0,
        "stale journal ignored"
    );
    drop(b);
}

#[tokio::test]
async fn next_writer_replays_and_flushes_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = memory();
    let a = create_and_open(&store, 16).await;
    a.attach_journal(dir.path()).await.unwrap();
    a.write(0, &pattern(1, 4 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.write(512, &pattern(2, 1024)).await.unwrap();
    a.discard(3 * 4096, 4096).await.unwrap();
    a.write(12 * 4096, &pattern(3, 2 * 4096)).await.unwrap();
    let expect = a.read(0, 16 * 4096).await.unwrap();
    drop(a);

    let b = Volume::open(store.clone(), &secret(), writer(true), test_config())
        .await
        .unwrap();
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
    let vol = Volume::open(store.clone(), &secret(), writer(false), cfg)
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
