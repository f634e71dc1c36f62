//! Object storage backends: the narrow interface the log store needs, and
//! its implementations (memory, local directory, S3 through opendal).
//!
//! The interface is deliberately small. Everything above it relies on four
//! properties, which the conformance suite (`tests/conformance.rs`) checks
//! against every backend:
//! - `put` is atomic: a reader sees the whole object or none of it;
//! - `put_if_absent` is atomic and exclusive: of concurrent callers for one
//!   key exactly one creates it;
//! - an acknowledged write is durable and visible to the next `list`/`get`
//!   (read-after-write and list-after-write consistency);
//! - `get_range` returns exactly the requested bytes.

mod counting;
mod faulty;
mod latency;
mod local;
mod memory;
mod retry;
mod s3;
mod url;

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use counting::{CountingStore, RequestStats};
pub use faulty::{FaultPlan, FaultyStore};
pub use latency::{LatencyPlan, LatencyStore};
pub use local::LocalDirStore;
pub use memory::MemoryStore;
pub use retry::{RetryPolicy, RetryStore};
pub use s3::{MULTIPART_THRESHOLD, S3Store};
pub use url::{BucketOptions, open_bucket};

/// An object and its size, as returned by `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(String),
    /// A failure that says nothing about the object (refused, a bad
    /// request, access denied): retrying will not help.
    #[error("object store request failed: {0}")]
    Backend(String),
    /// The store did not answer, or answered "try again" (a timeout, a
    /// dropped connection, 5xx, throttling): worth retrying.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// Unavailable for the whole outage bound (`--retry-for`): the retry
    /// layer's final answer. Callers do not retry it again (that would
    /// multiply the bound).
    #[error("object store unavailable: {0}")]
    GaveUp(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The object storage interface. Keys are `/`-separated relative paths.
#[async_trait]
pub trait ObjectStore: Send + Sync + Debug {
    /// Write `data` at `key`, replacing what was there, atomically.
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()>;
    /// Create `key` only if it does not exist. `Ok(true)` when this call
    /// created it, `Ok(false)` when it already existed (nothing written).
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool>;
    async fn get(&self, key: &str) -> StoreResult<Bytes>;
    /// `get` of an object whose size the caller knows (from a listing):
    /// lets a deadline scale with it.
    async fn get_sized(&self, key: &str, size: u64) -> StoreResult<Bytes> {
        let _ = size;
        self.get(key).await
    }
    /// Bytes `range` of the object. A range past the end is an error.
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;
    async fn exists(&self, key: &str) -> StoreResult<bool>;
    /// Every object whose key starts with `prefix` (a directory-like prefix
    /// ending in `/`), sorted by key.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>>;
    /// Delete `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// Whether `put_if_absent` is truly atomic on this backend.
    fn supports_conditional_create(&self) -> bool;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
}

pub type DynStore = Arc<dyn ObjectStore>;

/// Sort and check a listing; shared by backends that list unordered.
fn sorted(mut objects: Vec<ObjectInfo>) -> Vec<ObjectInfo> {
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    objects
}

/// Validate a requested range against an object's length.
fn check_range(key: &str, range: &Range<u64>, len: u64) -> StoreResult<()> {
    if range.start > range.end || range.end > len {
        return Err(StoreError::Backend(format!(
            "range {}..{} out of bounds for {key} ({len} bytes)",
            range.start, range.end
        )));
    }
    Ok(())
}
