//! A latency-injecting layer, for benchmarks and tests: a fixed delay per
//! request, a bandwidth cap shared by all requests (a token bucket over
//! time), and a random error rate.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{DynStore, ObjectInfo, ObjectStore, StoreError, StoreResult};

#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyPlan {
    /// Added to every request.
    pub latency: Duration,
    /// Bytes per second across all requests (None: unlimited).
    pub bandwidth: Option<u64>,
    /// Probability in [0, 1] that a request fails (before reaching the store).
    pub error_rate: f64,
}

#[derive(Debug, Clone)]
pub struct LatencyStore {
    inner: DynStore,
    plan: LatencyPlan,
    /// When the shared link is free again (bandwidth cap).
    link_free_at: Arc<Mutex<Instant>>,
}

impl LatencyStore {
    pub fn new(inner: DynStore, plan: LatencyPlan) -> Self {
        LatencyStore {
            inner,
            plan,
            link_free_at: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Wait as the simulated network would for a request moving `bytes`.
    async fn delay(&self, bytes: usize) -> StoreResult<()> {
        if self.plan.error_rate > 0.0 && rand::random::<f64>() < self.plan.error_rate {
            tokio::time::sleep(self.plan.latency).await;
            return Err(StoreError::Unavailable(
                "injected error (latency layer)".into(),
            ));
        }
        let transfer_done = match self.plan.bandwidth {
            Some(bw) if bw > 0 => {
                let needed = Duration::from_secs_f64(bytes as f64 / bw as f64);
                let mut free = self.link_free_at.lock();
                let start = (*free).max(Instant::now());
                *free = start + needed;
                *free
            }
            _ => Instant::now(),
        };
        let done = transfer_done.max(Instant::now()) + self.plan.latency;
        tokio::time::sleep_until(done).await;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for LatencyStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.delay(data.len()).await?;
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        self.delay(data.len()).await?;
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let data = self.inner.get(key).await?;
        self.delay(data.len()).await?;
        Ok(data)
    }

    async fn get_sized(&self, key: &str, size: u64) -> StoreResult<Bytes> {
        let data = self.inner.get_sized(key, size).await?;
        self.delay(data.len()).await?;
        Ok(data)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.delay((range.end - range.start) as usize).await?;
        self.inner.get_range(key, range).await
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.delay(0).await?;
        self.inner.exists(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.delay(0).await?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.delay(0).await?;
        self.inner.delete(key).await
    }

    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }

    fn describe(&self) -> String {
        format!("latency({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn latency_and_bandwidth_are_applied() {
        let store = LatencyStore::new(
            Arc::new(MemoryStore::new()),
            LatencyPlan {
                latency: Duration::from_millis(25),
                bandwidth: Some(1 << 20),
                error_rate: 0.0,
            },
        );
        let t = tokio::time::Instant::now();
        store
            .put("a", Bytes::from(vec![0u8; 1 << 20]))
            .await
            .unwrap();
        // 1 MiB at 1 MiB/s + 25 ms, on the paused (virtual) clock.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(1025), "{took:?}");
        let t = tokio::time::Instant::now();
        assert!(store.exists("a").await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(25));
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_one_always_fails() {
        let store = LatencyStore::new(
            Arc::new(MemoryStore::new()),
            LatencyPlan {
                error_rate: 1.0,
                ..LatencyPlan::default()
            },
        );
        assert!(store.put("a", Bytes::new()).await.is_err());
        assert!(
            !store.inner.exists("a").await.unwrap(),
            "failed before the store"
        );
    }
}
