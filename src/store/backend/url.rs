//! Bucket URLs: `s3://bucket/prefix`, `file:///dir`, `memory://name`.

use std::sync::Arc;

use super::s3::S3Config;
use super::{
    DynStore, LocalDirStore, MemoryStore, RetryPolicy, RetryStore, S3Store, StoreError, StoreResult,
};

/// Where the volume lives and how to talk to it.
#[derive(Debug, Clone)]
pub struct BucketOptions {
    pub url: String,
    /// S3 endpoint override (also read from `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// S3 region (also read from `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    pub virtual_host_style: bool,
    /// Deadlines and the outage bound of S3 requests.
    pub retry: RetryPolicy,
}

impl BucketOptions {
    pub fn new(url: impl Into<String>) -> Self {
        BucketOptions {
            url: url.into(),
            endpoint: None,
            region: None,
            virtual_host_style: false,
            retry: RetryPolicy::default(),
        }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Open the object store a bucket URL names.
pub fn open_bucket(opts: &BucketOptions) -> StoreResult<DynStore> {
    let url = opts.url.as_str();
    let invalid = |why: &str| StoreError::Backend(format!("invalid bucket URL {url:?}: {why}"));
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(invalid(
                "file:// needs an absolute path, e.g. file:///var/lib/vol",
            ));
        }
        return Ok(Arc::new(LocalDirStore::open(path)?));
    }
    if let Some(name) = url.strip_prefix("memory://") {
        return Ok(Arc::new(MemoryStore::named(name)));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid(
                "missing bucket name, e.g. s3://my-bucket/volumes/db",
            ));
        }
        let config = S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: opts
                .endpoint
                .clone()
                .or_else(|| env_var("AWS_ENDPOINT_URL")),
            region: opts
                .region
                .clone()
                .or_else(|| env_var("AWS_REGION"))
                .or_else(|| env_var("AWS_DEFAULT_REGION")),
            virtual_host_style: opts.virtual_host_style,
        };
        let s3: DynStore = Arc::new(S3Store::new(&config)?);
        return Ok(Arc::new(RetryStore::new(s3, opts.retry)));
    }
    Err(invalid(
        "expected s3://bucket/prefix, file:///path or memory://name",
    ))
}
