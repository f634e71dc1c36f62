//! Request accounting: what workloads cost in store requests, counted by
//! the log store's own accounting layer.

mod common;

use std::time::Duration;

use common::*;
use zerofs_ublk::volume::{Volume, VolumeConfig};

#[tokio::test]
async fn open_flush_and_read_cost_what_they_should() {
    let store = memory();
    let vol = create_and_open(&store, 64).await;
    let opened = vol.request_stats();
    // Probe (2 conditional creates + delete), claim, seal.
    assert_eq!(opened.conditional_put, 4, "{opened:?}");
    assert_eq!(opened.delete, 1);
    assert_eq!(opened.put, 0, "opening writes no data");

    // 4k random writes with a flush every 50: every PUT is a segment or a
    // checkpoint that is really in the bucket, and no flush reads anything.
    for i in 0..500u64 {
        let chunk = (i * 37) % 64;
        vol.write(chunk * CHUNK as u64, &pattern(i, 4096))
            .await
            .unwrap();
        if i % 50 == 49 {
            vol.flush().await.unwrap();
        }
    }
    vol.checkpoint_settled().await;
    let s = vol.request_stats();
    let segments = store.list("segments/").await.unwrap().len() as u64;
    let checkpoints = store.list("checkpoints/").await.unwrap().len() as u64;
    let runs = store.list("index/").await.unwrap().len() as u64;
    assert_eq!(
        s.conditional_put - opened.conditional_put,
        segments,
        "{s:?}"
    );
    assert_eq!(s.put, checkpoints + runs, "{s:?}");
    assert_eq!(s.head, opened.head, "no ownership check on the FLUSH path");
    assert_eq!(
        s.get + s.ranged_get,
        opened.get + opened.ranged_get,
        "{s:?}"
    );

    // A flush with nothing dirty costs nothing.
    let before = vol.request_stats();
    vol.flush().await.unwrap();
    assert_eq!(vol.request_stats(), before);
    vol.close().await.unwrap();

    // Cold read: one ranged GET for the chunk; the second read is cached.
    let vol = Volume::open(store.clone(), &secret(), read_only(), test_config())
        .await
        .unwrap();
    let before = vol.request_stats();
    vol.read(5 * CHUNK as u64, 4096).await.unwrap();
    let after = vol.request_stats();
    assert_eq!(after.ranged_get - before.ranged_get, 1);
    assert_eq!(after.total() - before.total(), 1, "{after:?}");
    vol.read(5 * CHUNK as u64 + 512, 1024).await.unwrap();
    assert_eq!(vol.request_stats(), after, "cache hit: no request");
    // Never-written space costs no request at all.
    let empty = memory();
    let v = create_and_open(&empty, 8).await;
    let b = v.request_stats();
    v.read(0, 8 * CHUNK as usize).await.unwrap();
    assert_eq!(v.request_stats(), b);
}

/// Issue 11: a FLUSH is one store round trip. A 4 KiB write and a FLUSH
/// cost exactly one request, the segment's conditional PUT: no ownership
/// check (HEAD), no read (docs/rfcs/0003). (Every `checkpoint_every`
/// segments a flush also writes a checkpoint; this volume never does.)
#[tokio::test]
async fn a_small_write_and_flush_cost_exactly_one_put() {
    let store = memory();
    Volume::create(&store, &params(64), &secret(), false)
        .await
        .unwrap();
    let cfg = VolumeConfig {
        checkpoint_every: u64::MAX,
        ..test_config()
    };
    let vol = Volume::open(store.clone(), &secret(), writer(false), cfg)
        .await
        .unwrap();
    for i in 0..20u64 {
        vol.write((i * 7 % 64) * CHUNK as u64, &pattern(i, 4096))
            .await
            .unwrap();
        let before = vol.request_stats();
        vol.flush().await.unwrap();
        let after = vol.request_stats();
        assert_eq!(after.conditional_put - before.conditional_put, 1);
        assert_eq!(after.total() - before.total(), 1, "{after:?}");
    }
}

/// A new 16-chunk volume opened as writer with the background flusher on.
async fn with_flusher(cfg: VolumeConfig) -> Volume {
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let cfg = VolumeConfig {
        background_flush: true,
        ..cfg
    };
    Volume::open(store, &secret(), writer(false), cfg)
        .await
        .unwrap()
}

/// Wait (bounded: up to `tries` × 10 ms) until nothing is dirty.
async fn wait_until_clean(vol: &Volume, tries: u32) {
    for _ in 0..tries {
        if vol.stats().dirty_chunks == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_idle_volume_makes_no_requests() {
    let vol = with_flusher(VolumeConfig {
        flush_age: Duration::from_millis(40),
        ..test_config()
    })
    .await;
    vol.write(0, &pattern(1, 8192)).await.unwrap();
    // The background flusher makes it durable on its own (bounded wait)...
    wait_until_clean(&vol, 200).await;
    assert_eq!(vol.stats().dirty_chunks, 0, "background flush by age");
    // ...and then, idle for many flush periods, asks nothing of the store.
    let idle = vol.request_stats();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(vol.request_stats(), idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_data_past_flush_bytes_wakes_the_flusher_at_once() {
    // The timer alone would not flush for hours: only the writer's wake
    // can, once flush_bytes (here 2 chunks) are dirty.
    let vol = with_flusher(VolumeConfig {
        flush_age: Duration::from_secs(4 * 3600),
        flush_bytes: 2 * 4096,
        ..test_config()
    })
    .await;
    vol.write(0, &pattern(1, 4096)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(vol.stats().flushes, 0, "below flush_bytes: no wake");
    vol.write(4096, &pattern(2, 4096)).await.unwrap();
    wait_until_clean(&vol, 500).await;
    assert_eq!(
        vol.stats().dirty_chunks,
        0,
        "flushed without an explicit flush"
    );
    assert_eq!(vol.stats().flushes, 1);
}

/// A volume of `chunks` chunks of random data behind a store with 25 ms
/// per request, reopened cold (empty cache).
async fn cold_volume_behind_latency(chunks: u64, readahead: u64) -> Volume {
    let store = memory();
    let vol = create_and_open(&store, chunks).await;
    vol.write(0, &pattern(9, (chunks * CHUNK as u64) as usize))
        .await
        .unwrap();
    vol.close().await.unwrap();
    let slow = behind_latency(store, Duration::from_millis(25));
    let cfg = VolumeConfig {
        readahead_chunks: readahead,
        cache_bytes: 64 << 20,
        ..test_config()
    };
    Volume::open(slow, &secret(), read_only(), cfg)
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_readahead_window_setting_reads_correctly() {
    // 1 is a legal window (prefetch the next chunk) and must not panic.
    for readahead in [0, 1, 2, 3] {
        let vol = cold_volume_behind_latency(6, readahead).await;
        for c in 0..6u64 {
            let got = vol.read(c * CHUNK as u64, CHUNK as usize).await.unwrap();
            let want = pattern(9, 6 * CHUNK as usize);
            let want = &want[(c * CHUNK as u64) as usize..((c + 1) * CHUNK as u64) as usize];
            assert!(got[..] == *want, "readahead {readahead}, chunk {c}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_get() {
    let vol = cold_volume_behind_latency(8, 0).await;
    let before = vol.request_stats();
    let (a, b, c) = tokio::join!(
        vol.read(3 * CHUNK as u64, 512),
        vol.read(3 * CHUNK as u64 + 1024, 512),
        vol.read(3 * CHUNK as u64 + 2048, 2048),
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let after = vol.request_stats();
    assert_eq!(after.ranged_get - before.ranged_get, 1, "{after:?}");
}

#[tokio::test(start_paused = true)]
async fn sequential_cold_read_overlaps_requests() {
    // Virtual clock: elapsed time counts simulated store latency only.
    let chunks = 64u64;
    let without = cold_volume_behind_latency(chunks, 0).await;
    let t = tokio::time::Instant::now();
    for c in 0..chunks {
        without
            .read(c * CHUNK as u64, CHUNK as usize)
            .await
            .unwrap();
    }
    let serial = t.elapsed();
    let with = cold_volume_behind_latency(chunks, 32).await;
    let before = with.request_stats();
    let t = tokio::time::Instant::now();
    for c in 0..chunks {
        with.read(c * CHUNK as u64, CHUNK as usize).await.unwrap();
    }
    let ahead = t.elapsed();
    let gets = with.request_stats().ranged_get - before.ranged_get;
    assert_eq!(gets, chunks, "each chunk fetched exactly once");
    assert!(
        ahead * 4 < serial,
        "readahead overlaps requests: {ahead:?} vs {serial:?} one at a time"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cold_multi_chunk_read_waits_for_one_request_not_one_per_chunk() {
    // Virtual clock: elapsed time counts simulated store latency only.
    let vol = cold_volume_behind_latency(8, 0).await;
    let before = vol.request_stats();
    let t = tokio::time::Instant::now();
    vol.read(0, 8 * CHUNK as usize).await.unwrap();
    let took = t.elapsed();
    assert_eq!(vol.request_stats().ranged_get - before.ranged_get, 8);
    assert!(
        took < Duration::from_millis(50),
        "8 chunks fetched together: {took:?}, one request is 25 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn open_fetches_the_seals_concurrently() {
    // Every writer open seals the log: 48 opens leave 48 seals.
    let store = memory();
    create_and_open(&store, 4).await.close().await.unwrap();
    for _ in 1..48 {
        Volume::open(store.clone(), &secret(), writer(false), test_config())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    }
    let seals = store.list("seals/").await.unwrap().len() as u32;
    assert_eq!(seals, 48);
    let slow = behind_latency(store, Duration::from_millis(25));
    let t = tokio::time::Instant::now();
    let vol = Volume::open(slow, &secret(), read_only(), test_config())
        .await
        .unwrap();
    let took = t.elapsed();
    // One at a time, the seals alone would take 48 × 25 ms = 1.2 s.
    assert!(
        took < Duration::from_millis(25) * seals / 2,
        "open took {took:?} with {seals} seals"
    );
    drop(vol);
}

/// A bucket whose 64 chunks hold `pattern(1, …)`, closed.
async fn sixty_four_chunks_stored() -> zerofs_ublk::store::backend::DynStore {
    let store = memory();
    let vol = create_and_open(&store, 64).await;
    vol.write(0, &pattern(1, 64 * CHUNK as usize))
        .await
        .unwrap();
    vol.close().await.unwrap();
    store
}

/// Those 64 chunks with `patch` written 1 KiB into each.
fn patched_at_1k(patch: &[u8]) -> Vec<u8> {
    let mut want = pattern(1, 64 * CHUNK as usize);
    for c in 0..64usize {
        let at = c * CHUNK as usize + 1024;
        want[at..at + patch.len()].copy_from_slice(patch);
    }
    want
}

#[tokio::test(start_paused = true)]
async fn concurrent_partial_writes_stay_within_the_dirty_limit() {
    // 64 chunks in the bucket; then 64 writers at once, each patching 1 KiB
    // of its own chunk, so each first reads its chunk (25 ms). All of them
    // pass a dirty-limit check made before that read.
    let store = sixty_four_chunks_stored().await;
    let slow = behind_latency(store, Duration::from_millis(25));
    let limit = 4 * CHUNK as usize;
    let cfg = VolumeConfig {
        dirty_limit: limit,
        flush_bytes: 3 * CHUNK as usize,
        ..test_config()
    };
    let vol = Volume::open(slow, &secret(), writer(false), cfg)
        .await
        .unwrap();
    let patch = pattern(2, 1024);
    let writes = (0..64u64).map(|c| vol.write(c * CHUNK as u64 + 1024, &patch));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let peak = vol.stats().dirty_peak_bytes;
    assert!(peak <= limit, "dirty peak {peak} over the limit {limit}");
    let want = patched_at_1k(&patch);
    assert!(vol.read(0, want.len()).await.unwrap()[..] == want[..]);
}

#[tokio::test]
async fn a_flush_fills_its_segments_evenly_instead_of_leaving_a_tiny_tail() {
    // test_config: segment target = 3 chunks. Six incompressible chunks
    // are 2.0 targets of frames (each frame a little over a chunk): two
    // segments of three, where filling greedily would make three of two.
    let store = memory();
    let vol = create_and_open(&store, 16).await;
    let segments = || async { store.list("segments/").await.unwrap().len() };
    vol.write(0, &pattern(4, 6 * CHUNK as usize)).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(
        segments().await,
        2,
        "segments for 2 targets' worth of frames"
    );
    // ...and a flush of 1.4 targets is one segment, not a full one and a
    // small one.
    vol.write(8 * CHUNK as u64, &pattern(5, 4 * CHUNK as usize))
        .await
        .unwrap();
    vol.flush().await.unwrap();
    assert_eq!(segments().await, 3);
    assert_eq!(
        vol.read(0, 12 * CHUNK as usize).await.unwrap()[8 * CHUNK as usize..],
        pattern(5, 4 * CHUNK as usize)[..]
    );
}

/// The frontend's write fast path: a write with room under the dirty
/// limit is applied on the caller's thread with no request (a partial
/// one into a stored, uncached chunk too — its read starts behind it);
/// a write that would pass the limit is refused untouched, for `write`
/// (which flushes first) to take.
#[tokio::test]
async fn try_write_applies_only_with_room_and_makes_no_request() {
    let store = memory();
    let cfg = VolumeConfig {
        dirty_limit: 2 * CHUNK as usize,
        flush_bytes: 2 * CHUNK as usize,
        ..test_config()
    };
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let vol = Volume::open(store.clone(), &secret(), writer(false), cfg.clone())
        .await
        .unwrap();
    vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    vol.close().await.unwrap();
    let vol = Volume::open(store.clone(), &secret(), writer(false), cfg)
        .await
        .unwrap();
    let before = vol.request_stats();
    // A partial write into chunk 0 (stored, not cached) and a whole one.
    assert!(vol.try_write(512, &pattern(2, 1024)).unwrap());
    let requests = vol.request_stats().total() - before.total();
    assert!(
        vol.try_write(CHUNK as u64, &pattern(3, CHUNK as usize))
            .unwrap()
    );
    assert_eq!(requests, 0, "the write itself asked the store nothing");
    // Two chunks dirty: the limit. A third chunk is refused, untouched.
    assert!(!vol.try_write(2 * CHUNK as u64, &pattern(4, 512)).unwrap());
    assert_eq!(vol.stats().dirty_chunks, 2);
    // Rewriting a dirty chunk still needs room for it (one chunk).
    assert!(!vol.try_write(CHUNK as u64, &pattern(5, 512)).unwrap());
    // `write` makes room by flushing.
    vol.write(2 * CHUNK as u64, &pattern(4, 512)).await.unwrap();
    let mut expect = pattern(1, CHUNK as usize);
    expect[512..1536].copy_from_slice(&pattern(2, 1024));
    assert_eq!(vol.read(0, CHUNK as usize).await.unwrap(), expect);
    assert_eq!(
        vol.read(CHUNK as u64, CHUNK as usize).await.unwrap(),
        pattern(3, CHUNK as usize)
    );
    assert_eq!(
        vol.read(2 * CHUNK as u64, 512).await.unwrap(),
        pattern(4, 512)
    );
    // Bad input is an error, not a refusal.
    assert!(vol.try_write(100, &[0u8; 512]).is_err());
    vol.close().await.unwrap();
}

/// Reading partial chunks (their unwritten sectors come from the bucket)
/// leaves them partial: each still counts only its own bytes against the
/// dirty limit (docs/rfcs/0007, "The dirty limit"). Folding them whole on
/// a read grew the count by a chunk each, unreserved.
#[tokio::test]
async fn reading_partial_chunks_leaves_what_they_count_unchanged() {
    let store = sixty_four_chunks_stored().await;
    let vol = Volume::open(store, &secret(), writer(false), test_config())
        .await
        .unwrap();
    let patch = pattern(2, 1024);
    for c in 0..64u64 {
        vol.write(c * CHUNK as u64 + 1024, &patch).await.unwrap();
    }
    let before = vol.stats();
    assert_eq!(before.dirty_chunks, 64);
    assert!(
        before.dirty_bytes < 64 * CHUNK as usize / 2,
        "partial chunks count {} bytes",
        before.dirty_bytes
    );
    let want = patched_at_1k(&patch);
    assert!(vol.read(0, want.len()).await.unwrap()[..] == want[..]);
    let after = vol.stats();
    assert_eq!(
        (after.dirty_chunks, after.dirty_bytes),
        (64, before.dirty_bytes),
        "a read changes what the dirty chunks count"
    );
}
