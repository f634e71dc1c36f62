//! In-process object store, for tests and `memory://NAME` buckets.
//! Stores with the same name share their objects within one process, so a
//! test can "restart" a volume against the bucket it wrote.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{ObjectInfo, ObjectStore, StoreError, StoreResult, check_range};

type Objects = Arc<Mutex<BTreeMap<String, Bytes>>>;

#[derive(Debug, Clone)]
pub struct MemoryStore {
    name: String,
    objects: Objects,
}

impl MemoryStore {
    /// A fresh, private store.
    pub fn new() -> Self {
        MemoryStore {
            name: "anonymous".into(),
            objects: Arc::default(),
        }
    }

    /// The process-wide store called `name` (created empty on first use).
    pub fn named(name: &str) -> Self {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Objects>>> = OnceLock::new();
        let objects = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        MemoryStore {
            name: name.to_string(),
            objects,
        }
    }

    /// Direct access for tests that tamper with stored bytes.
    pub fn raw_objects(&self) -> Objects {
        self.objects.clone()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.objects.lock().insert(key.to_string(), data);
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let mut objects = self.objects.lock();
        if objects.contains_key(key) {
            return Ok(false);
        }
        objects.insert(key.to_string(), data);
        Ok(true)
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.objects
            .lock()
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let data = self.get(key).await?;
        check_range(key, &range, data.len() as u64)?;
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        Ok(self.objects.lock().contains_key(key))
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        Ok(self
            .objects
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.objects.lock().remove(key);
        Ok(())
    }

    fn supports_conditional_create(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("memory://{}", self.name)
    }
}
