//! S3 and S3-compatible object storage through opendal.
//!
//! Conditional create is S3's `If-None-Match: *` (opendal's `if_not_exists`).
//! Deadlines and retries are not opendal's: `open_bucket` wraps this store
//! in a [`super::RetryStore`], whose deadlines scale with the bytes moved.
//! Errors are classified here: opendal's "temporary" ones (no answer, a
//! dropped connection, 5xx, throttling) are `Unavailable`, worth a retry.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use opendal::{ErrorKind, HttpTransporter, OperationContext, Operator};
use opendal_http_transport_reqwest::ReqwestTransport;

use super::{ObjectInfo, ObjectStore, StoreError, StoreResult, sorted};

/// Objects from this size up go as multipart uploads. Above every segment
/// (at most 1.5 × the 32 MiB target) on purpose: S3 bills each part and the create/complete
/// calls as PUT-class requests, so a 32 MiB segment in 8 MiB parts would
/// cost 6 requests instead of 1, and the segments of one flush already
/// upload in parallel. Only very large checkpoints use parts.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
const MULTIPART_PART: usize = 8 << 20;
const MULTIPART_CONCURRENCY: usize = 4;

/// How to reach an S3-compatible bucket.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket ("" for the bucket root).
    pub prefix: String,
    /// Custom endpoint (MinIO, Ceph, a test server); None for AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Use virtual-host-style addressing instead of path style.
    pub virtual_host_style: bool,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    op: Operator,
    describe: String,
}

impl S3Store {
    /// Build the client. Credentials come from the standard AWS sources
    /// (environment variables, `~/.aws/credentials` and `config`, profiles).
    pub fn new(config: &S3Config) -> StoreResult<Self> {
        let mut builder = opendal::services::S3::default()
            .bucket(&config.bucket)
            .root(&format!("/{}", config.prefix.trim_matches('/')));
        if let Some(endpoint) = &config.endpoint {
            // A custom endpoint is not AWS: never wait on the EC2 metadata
            // service for credentials.
            builder = builder.endpoint(endpoint).disable_ec2_metadata();
        }
        builder = builder.region(config.region.as_deref().unwrap_or("us-east-1"));
        if config.virtual_host_style {
            builder = builder.enable_virtual_host_style();
        }
        let op = Operator::new(builder)
            .map_err(backend_error)?
            // A client (and connection pool) per store, owned by the runtime
            // that uses it, rather than one process-wide client.
            .with_context(
                OperationContext::new().with_http_transport(HttpTransporter::new(
                    ReqwestTransport::new(
                        reqwest::Client::builder()
                            .connect_timeout(Duration::from_secs(10))
                            .build()
                            .map_err(|e| StoreError::Backend(format!("HTTP client: {e}")))?,
                    ),
                )),
            );
        let describe = format!(
            "s3://{}/{}{}",
            config.bucket,
            config.prefix.trim_matches('/'),
            config
                .endpoint
                .as_deref()
                .map(|e| format!(" (endpoint {e})"))
                .unwrap_or_default()
        );
        Ok(S3Store { op, describe })
    }
}

fn backend_error(e: opendal::Error) -> StoreError {
    if e.is_temporary() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn map_error(key: &str, e: opendal::Error) -> StoreError {
    if e.kind() == ErrorKind::NotFound {
        StoreError::NotFound(key.to_string())
    } else {
        backend_error(e)
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        if data.len() < MULTIPART_THRESHOLD {
            return self
                .op
                .write(key, data)
                .await
                .map(|_| ())
                .map_err(|e| map_error(key, e));
        }
        // Large objects: multipart, parts uploaded concurrently. The object
        // appears only when the upload completes, so readers still see all
        // of it or nothing.
        let mut writer = self
            .op
            .writer_with(key)
            .chunk(MULTIPART_PART)
            .concurrent(MULTIPART_CONCURRENCY)
            .await
            .map_err(|e| map_error(key, e))?;
        writer.write(data).await.map_err(|e| map_error(key, e))?;
        writer
            .close()
            .await
            .map(|_| ())
            .map_err(|e| map_error(key, e))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        // A 409 (concurrent conditional writes on one key) is retried: the
        // next attempt resolves to created or 412. A lost response to a
        // successful create comes back as 412 on retry; callers that must
        // tell "mine" from "someone else's" compare the stored content.
        for attempt in 0..5u32 {
            match self
                .op
                .write_with(key, data.clone())
                .if_not_exists(true)
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::ConditionNotMatch => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => return Err(map_error(key, e)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "conditional create of {key} kept conflicting"
        )))
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.op
            .read(key)
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| map_error(key, e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let want = range.end - range.start;
        let data = self
            .op
            .read_with(key)
            .range(range.clone())
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| map_error(key, e))?;
        if data.len() as u64 != want {
            return Err(StoreError::Backend(format!(
                "short read of {key}: {} of {want} bytes",
                data.len()
            )));
        }
        Ok(data)
    }

    async fn exists(&self, key: &str) -> StoreResult<bool> {
        match self.op.stat(key).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        let entries = match self.op.list(prefix).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(backend_error(e)),
        };
        Ok(sorted(
            entries
                .into_iter()
                .filter(|e| e.metadata().is_file())
                .map(|e| ObjectInfo {
                    key: e.path().to_string(),
                    size: e.metadata().content_length(),
                })
                .collect(),
        ))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.op.delete(key).await.map_err(|e| map_error(key, e))
    }

    fn supports_conditional_create(&self) -> bool {
        self.op.info().capability().write_with_if_not_exists
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
