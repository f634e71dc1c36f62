//! Request accounting: every store request and byte, by kind. The log
//! store wraps its backend in this, so `status`, `inspect` and benchmarks
//! can say exactly what a workload cost in requests.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use super::{DynStore, ObjectInfo, ObjectStore, StoreResult};

#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    ranged_get: AtomicU64,
    put: AtomicU64,
    conditional_put: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    pub get: u64,
    pub ranged_get: u64,
    pub put: u64,
    pub conditional_put: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
    /// Bytes downloaded.
    pub bytes_in: u64,
    /// Bytes uploaded.
    pub bytes_out: u64,
}

impl RequestStats {
    pub fn total(&self) -> u64 {
        self.get
            + self.ranged_get
            + self.put
            + self.conditional_put
            + self.head
            + self.list
            + self.delete
    }
}

#[derive(Debug, Clone)]
pub struct CountingStore {
    inner: DynStore,
    counters: Arc<Counters>,
}

impl CountingStore {
    pub fn new(inner: DynStore) -> Self {
        CountingStore {
            inner,
            counters: Arc::default(),
        }
    }

    pub fn stats(&self) -> RequestStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestStats {
            get: g(&c.get),
            ranged_get: g(&c.ranged_get),
            put: g(&c.put),
            conditional_put: g(&c.conditional_put),
            head: g(&c.head),
            list: g(&c.list),
            delete: g(&c.delete),
            bytes_in: g(&c.bytes_in),
            bytes_out: g(&c.bytes_out),
        }
    }

    fn count(&self, which: &AtomicU64) {
        which.fetch_add(1, Ordering::Relaxed);
    }

    fn bytes(which: &AtomicU64, n: usize) {
        which.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.count(&self.counters.put);
        Self::bytes(&self.counters.bytes_out, data.len());
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        self.count(&self.counters.conditional_put);
        Self::bytes(&self.counters.bytes_out, data.len());
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.count(&self.counters.get);
        let data = self.inner.get(key).await?;
        Self::bytes(&self.counters.bytes_in, data.len());
        Ok(data)
    }

    async fn get_sized(&self, key: &str, size: u64) -> StoreResult<Bytes> {
        self.count(&self.counters.get);
        let data = self.inner.get_sized(key, size).await?;
        Self::bytes(&self.counters.bytes_in, data.len());
        Ok(data)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.count(&self.counters.ranged_get);
        let data = self.inner.get_range(key, range).await?;
        Self::bytes(&self.counters.bytes_in, data.len());
        Ok(data)
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.count(&self.counters.head);
        self.inner.exists(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.count(&self.counters.list);
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.count(&self.counters.delete);
        self.inner.delete(key).await
    }

    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
