//! Deadlines and retries for a remote store.
//!
//! Every attempt gets a deadline in proportion to what it moves:
//! `attempt_timeout + bytes / min_throughput`, so a 48 MiB segment on a
//! slow uplink has the time it needs while a stalled 4 KiB read is given
//! up on quickly. A failed attempt (an [`StoreError::Unavailable`] error or
//! a missed deadline) is retried with jittered exponential backoff for as
//! long as `retry_for` allows — the outage bound: I/O waits through a
//! shorter outage of the store and fails, with the cause, after a longer
//! one. Missing objects and permanent errors (access denied, a bad
//! request) are returned at once.
//!
//! This replaces opendal's `TimeoutLayer` + `RetryLayer`, whose I/O timeout
//! is one fixed value (10 s by default) for a whole PUT body whatever its
//! size, and whose retries are counted rather than timed
//! (docs/ARCHITECTURE.md, "Decisions").

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{DynStore, ObjectInfo, ObjectStore, StoreError, StoreResult};

/// What one LIST may move, for its deadline: all pages of a listing of
/// ~100,000 keys (about 16 MiB of XML), fetched by one call.
const LIST_BUDGET_BYTES: u64 = 16 << 20;

/// How long a request may take and how long a failing one is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Per attempt, on top of the transfer time: connection setup and the
    /// server's own time.
    pub attempt_timeout: Duration,
    /// The slowest transfer tolerated, in bytes per second per request.
    pub min_throughput: u64,
    /// Retry a failing request for this long before its error reaches the
    /// caller (no new attempt starts after it).
    pub retry_for: Duration,
    /// First backoff delay; doubles up to `max_delay` (with jitter).
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(30),
            min_throughput: 512 << 10,
            retry_for: Duration::from_secs(120),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The deadline of one attempt that moves `bytes`.
    pub fn attempt_deadline(&self, bytes: u64) -> Duration {
        let transfer =
            Duration::try_from_secs_f64(bytes as f64 / self.min_throughput.max(1) as f64)
                .unwrap_or(Duration::MAX);
        self.attempt_timeout.saturating_add(transfer)
    }
}

/// A store whose requests have deadlines and are retried (see the module).
#[derive(Debug)]
pub struct RetryStore {
    inner: DynStore,
    policy: RetryPolicy,
}

impl RetryStore {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> Self {
        RetryStore { inner, policy }
    }

    /// Run `attempt` until it succeeds, fails for good, or `retry_for` is
    /// spent. `bytes` is what one attempt moves (for its deadline).
    async fn run<T, F, Fut>(&self, what: &str, key: &str, bytes: u64, attempt: F) -> StoreResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let started = Instant::now();
        let deadline = self.policy.attempt_deadline(bytes);
        let mut delay = self.policy.min_delay;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let error = match tokio::time::timeout(deadline, attempt()).await {
                Ok(Err(StoreError::Unavailable(e))) => e,
                Ok(result) => return result,
                Err(_) => format!("no answer within {deadline:?}"),
            };
            // Full jitter on the upper half: spread retries of many
            // requests that failed together.
            let sleep = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            if started.elapsed() + sleep >= self.policy.retry_for {
                tracing::error!(
                    "{what} {key}: giving up after {tries} attempts in {:?}: {error}",
                    started.elapsed()
                );
                return Err(StoreError::GaveUp(format!(
                    "{what} {key}: {error} (gave up after {tries} attempts in {} s)",
                    started.elapsed().as_secs()
                )));
            }
            tracing::warn!("{what} {key}: {error}; retrying in {sleep:?}");
            tokio::time::sleep(sleep).await;
            delay = (delay * 2).min(self.policy.max_delay);
        }
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.run("PUT", key, data.len() as u64, || {
            self.inner.put(key, data.clone())
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        // A retry after a create that landed but whose answer was lost
        // reports "exists"; callers that care compare the content.
        self.run("PUT (if absent)", key, data.len() as u64, || {
            self.inner.put_if_absent(key, data.clone())
        })
        .await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.run("GET", key, 0, || self.inner.get(key)).await
    }

    async fn get_sized(&self, key: &str, size: u64) -> StoreResult<Bytes> {
        self.run("GET", key, size, || self.inner.get_sized(key, size))
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.run("GET (range)", key, range.end - range.start, || {
            self.inner.get_range(key, range.clone())
        })
        .await
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.run("HEAD", key, 0, || self.inner.exists(key)).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.run("LIST", prefix, LIST_BUDGET_BYTES, || {
            self.inner.list(prefix)
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("DELETE", key, 0, || self.inner.delete(key)).await
    }

    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
