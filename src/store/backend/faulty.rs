//! A fault-injecting wrapper, used by the crash tests (and available to any
//! test): writes start failing after a budget, either before reaching the
//! store or after (the write lands but the caller is told it failed, as
//! when a response is lost).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{DynStore, ObjectInfo, ObjectStore, StoreError, StoreResult};

#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Writes (put / put_if_absent / delete) allowed before failures start.
    pub writes_before_failure: Option<u64>,
    /// When failing, store the object anyway and then report an error.
    pub land_then_fail: bool,
    /// Fail every request, reads included (a dead endpoint).
    pub all_fail: bool,
    /// How many writes fail once failures start (None: all of them); after
    /// that, writes succeed again (a transient fault).
    pub failures: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: DynStore,
    plan: Arc<Mutex<FaultPlan>>,
}

impl FaultyStore {
    pub fn new(inner: DynStore) -> Self {
        FaultyStore {
            inner,
            plan: Arc::default(),
        }
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock() = plan;
    }

    fn injected() -> StoreError {
        StoreError::Backend("injected fault".into())
    }

    fn check_read(&self) -> StoreResult<()> {
        if self.plan.lock().all_fail {
            return Err(Self::injected());
        }
        Ok(())
    }

    /// Decide the fate of one write: Ok(true) = proceed normally,
    /// Ok(false) = proceed then fail, Err = fail without writing.
    fn admit_write(&self) -> StoreResult<bool> {
        let mut plan = self.plan.lock();
        if plan.all_fail {
            return Err(Self::injected());
        }
        let land_then_fail = plan.land_then_fail;
        match plan.writes_before_failure.as_mut() {
            None => return Ok(true),
            Some(n) if *n > 0 => {
                *n -= 1;
                return Ok(true);
            }
            Some(_) => {}
        }
        match plan.failures.as_mut() {
            Some(0) => return Ok(true),
            Some(n) => *n -= 1,
            None => {}
        }
        if land_then_fail {
            Ok(false)
        } else {
            Err(Self::injected())
        }
    }

    fn finish<T>(&self, succeed: bool, result: StoreResult<T>) -> StoreResult<T> {
        match result {
            Ok(_) if !succeed => Err(Self::injected()),
            other => other,
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let succeed = self.admit_write()?;
        let result = self.inner.put(key, data).await;
        self.finish(succeed, result)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let succeed = self.admit_write()?;
        let result = self.inner.put_if_absent(key, data).await;
        self.finish(succeed, result)
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.check_read()?;
        self.inner.get(key).await
    }

    async fn get_sized(&self, key: &str, size: u64) -> StoreResult<Bytes> {
        self.check_read()?;
        self.inner.get_sized(key, size).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.check_read()?;
        self.inner.get_range(key, range).await
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.check_read()?;
        self.inner.exists(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        self.check_read()?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let succeed = self.admit_write()?;
        let result = self.inner.delete(key).await;
        self.finish(succeed, result)
    }

    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}
