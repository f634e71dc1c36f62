//! Deadlines that scale with the transfer, retries bounded in time
//! (`RetryStore`), on a virtual clock: the memory store behind the latency
//! layer's bandwidth cap, or behind a store that stalls or fails on cue.

mod common;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{create_and_open, memory, pattern, secret, test_config, writer};
use zerofs_ublk::store::backend::{
    DynStore, LatencyPlan, LatencyStore, ObjectInfo, ObjectStore, RetryPolicy, RetryStore,
    StoreError, StoreResult,
};
use zerofs_ublk::volume::Volume;

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempt_timeout: Duration::from_secs(2),
        min_throughput: 512 << 10,
        retry_for: Duration::from_secs(30),
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
    }
}

/// Calls to the inner store, and how each behaves.
#[derive(Debug)]
struct Scripted {
    inner: DynStore,
    calls: AtomicU32,
    /// Calls with a number below this never answer.
    stall_first: u32,
    /// Calls with a number below this fail as "unavailable".
    fail_first: u32,
    /// Calls with a number at or above this fail too.
    fail_after: AtomicU32,
}

impl Scripted {
    fn new(stall_first: u32, fail_first: u32) -> Arc<Self> {
        Arc::new(Scripted {
            inner: memory(),
            calls: AtomicU32::new(0),
            stall_first,
            fail_first,
            fail_after: AtomicU32::new(u32::MAX),
        })
    }

    fn fail_from(&self, call: u32) {
        self.fail_after.store(call, Ordering::SeqCst);
    }

    async fn enter(&self) -> StoreResult<()> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.stall_first {
            std::future::pending::<()>().await;
        }
        if n < self.fail_first || n >= self.fail_after.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("503 Slow Down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Scripted {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.enter().await?;
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        self.enter().await?;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.enter().await?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.enter().await?;
        self.inner.get_range(key, range).await
    }
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.enter().await?;
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.enter().await?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.enter().await?;
        self.inner.delete(key).await
    }
    fn supports_conditional_create(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
}

#[tokio::test(start_paused = true)]
async fn a_large_put_on_a_slow_link_gets_the_time_it_needs() {
    // 1 MiB/s link: 8 MiB takes 8 s, four times the 2 s attempt timeout,
    // and within 2 s + 8 MiB / 512 KiB/s = 18 s.
    let slow: DynStore = Arc::new(LatencyStore::new(
        memory(),
        LatencyPlan {
            bandwidth: Some(1 << 20),
            ..LatencyPlan::default()
        },
    ));
    let store = RetryStore::new(slow.clone(), policy());
    let t = tokio::time::Instant::now();
    store
        .put("segments/big", Bytes::from(vec![7u8; 8 << 20]))
        .await
        .unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(9),
        "one attempt, at link speed: {took:?}"
    );
    // A read of it likewise.
    let got = store.get_range("segments/big", 0..(8 << 20)).await.unwrap();
    assert_eq!(got.len(), 8 << 20);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_request_is_abandoned_at_its_deadline_and_retried() {
    let inner = Scripted::new(1, 0);
    let store = RetryStore::new(inner.clone(), policy());
    let t = tokio::time::Instant::now();
    store.put("k", Bytes::from_static(b"small")).await.unwrap();
    let took = t.elapsed();
    // 2 s deadline (+ ~0 for 5 bytes), then a backoff of at most 100 ms.
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_millis(2110),
        "{took:?}"
    );
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"small"));
}

#[tokio::test(start_paused = true)]
async fn an_outage_shorter_than_the_bound_is_waited_out() {
    // 12 failures at backoff 0.1, 0.2, … capped at 5 s: ~25-40 s < 60 s.
    let inner = Scripted::new(0, 12);
    let store = RetryStore::new(
        inner.clone(),
        RetryPolicy {
            retry_for: Duration::from_secs(60),
            ..policy()
        },
    );
    store.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(inner.calls.load(Ordering::SeqCst), 13);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_bound_fails_in_time_naming_the_request() {
    let inner = Scripted::new(0, u32::MAX);
    let store = RetryStore::new(inner.clone(), policy());
    let t = tokio::time::Instant::now();
    let err = store.get("superblock").await.unwrap_err();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "stops within the bound: {took:?}"
    );
    assert!(
        took > Duration::from_secs(20),
        "retried most of it: {took:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("GET superblock") && msg.contains("503 Slow Down"),
        "{msg}"
    );
    assert!(matches!(err, StoreError::GaveUp(_)));
}

/// A FLUSH through an outage longer than the bound fails within about one
/// bound, not several: a segment's conditional create is not tried again
/// once the retry layer gave up (it was, three times: fsync failed after
/// 42 s with `--retry-for 10` in the guest).
#[tokio::test(start_paused = true)]
async fn a_flush_through_a_long_outage_fails_within_one_bound() {
    let inner = Scripted::new(0, 0);
    let store: DynStore = Arc::new(RetryStore::new(inner.clone(), policy()));
    let vol = create_and_open(&store, 4).await;
    vol.write(0, &pattern(9, common::CHUNK as usize))
        .await
        .unwrap();
    // From now on every request fails.
    inner.fail_from(inner.calls.load(Ordering::SeqCst));
    let t = tokio::time::Instant::now();
    let err = vol.flush().await.unwrap_err();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(31),
        "one bound (30 s), not several: {took:?} ({err})"
    );
}

#[tokio::test(start_paused = true)]
async fn missing_objects_and_permanent_errors_are_not_retried() {
    let inner = Scripted::new(0, 0);
    let store = RetryStore::new(inner.clone(), policy());
    assert!(matches!(
        store.get("nothing").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    // A permanent error (here: a range past the end) comes back at once.
    store.put("k", Bytes::from_static(b"v")).await.unwrap();
    let t = tokio::time::Instant::now();
    assert!(store.get_range("k", 0..100).await.is_err());
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_volume_on_a_flaky_slow_store_sees_no_errors() {
    // One request in five fails, 4 MiB/s shared: writes, flushes (3-chunk
    // segments), a reopen and reads all succeed, through retries only.
    let flaky: DynStore = Arc::new(RetryStore::new(
        Arc::new(LatencyStore::new(
            memory(),
            LatencyPlan {
                latency: Duration::from_millis(20),
                bandwidth: Some(4 << 20),
                error_rate: 0.2,
            },
        )),
        policy(),
    ));
    let vol = create_and_open(&flaky, 16).await;
    let data = pattern(4, 16 * common::CHUNK as usize);
    vol.write(0, &data).await.unwrap();
    vol.flush().await.unwrap();
    vol.close().await.unwrap();
    let vol = Volume::open(flaky, &secret(), writer(false), test_config())
        .await
        .unwrap();
    assert!(vol.read(0, data.len()).await.unwrap()[..] == data[..]);
}

#[test]
fn extreme_settings_saturate_instead_of_panicking() {
    let p = RetryPolicy {
        attempt_timeout: Duration::from_secs(u64::MAX),
        min_throughput: 1,
        ..policy()
    };
    assert_eq!(p.attempt_deadline(u64::MAX), Duration::MAX);
    assert_eq!(
        policy().attempt_deadline(1 << 20),
        Duration::from_secs(4),
        "2 s + 1 MiB at 512 KiB/s"
    );
}
