//! Local directory object store (`file:///dir`), the embedded default.
//!
//! Not opendal's `fs` service, for two reasons recorded in ARCHITECTURE.md:
//! an acknowledged write must survive power loss (data file *and* directory
//! entry fsynced), and conditional create must be atomic against other
//! processes. Both are done here with the POSIX primitives that give them:
//! write a temporary file, fsync it, then `rename` (plain put) or `link`
//! (create-if-absent: fails with EEXIST atomically), then fsync the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectStore, StoreError, StoreResult, check_range, sorted};

const TMP_DIR: &str = ".tmp";

#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// Open (and create if missing) the directory `root`.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        fs::create_dir_all(root.join(TMP_DIR)).map_err(|e| io_error(&root, e))?;
        Ok(LocalDirStore { root })
    }

    fn path(&self, key: &str) -> StoreResult<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(StoreError::Backend(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    /// Write `data` to a fresh, fsynced temporary file in this store.
    fn write_temp(&self, data: &[u8]) -> StoreResult<PathBuf> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        );
        let tmp = self.root.join(TMP_DIR).join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(&tmp, e))?;
        file.write_all(data).map_err(|e| io_error(&tmp, e))?;
        file.sync_all().map_err(|e| io_error(&tmp, e))?;
        Ok(tmp)
    }

    fn put_blocking(&self, key: &str, data: &[u8], exclusive: bool) -> StoreResult<bool> {
        let dest = self.path(key)?;
        let parent = dest.parent().expect("key has a parent").to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| io_error(&parent, e))?;
        let tmp = self.write_temp(data)?;
        let created = if exclusive {
            let linked = fs::hard_link(&tmp, &dest);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
                Err(e) => return Err(io_error(&dest, e)),
            }
        } else {
            fs::rename(&tmp, &dest).map_err(|e| io_error(&dest, e))?;
            true
        };
        sync_dir(&parent)?;
        Ok(created)
    }
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == ErrorKind::NotFound {
        StoreError::NotFound(path.display().to_string())
    } else {
        StoreError::Backend(format!("{}: {e}", path.display()))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("I/O task failed: {e}")))?
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, &data, false).map(|_| ())).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, &data, true)).await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| match io_error(&path, e) {
                    StoreError::NotFound(_) => StoreError::NotFound(key),
                    other => other,
                })
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            let mut file = File::open(&path).map_err(|e| match io_error(&path, e) {
                StoreError::NotFound(_) => StoreError::NotFound(key.clone()),
                other => other,
            })?;
            let len = file.metadata().map_err(|e| io_error(&path, e))?.len();
            check_range(&key, &range, len)?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.seek(SeekFrom::Start(range.start))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| io_error(&path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Only "no such file" is absence; any other error (EIO, ESTALE on an
    /// NFS-mounted bucket, EACCES) is an error, never "absent" — the
    /// ownership check before a FLUSH relies on it.
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        let path = self.path(key)?;
        blocking(move || path.try_exists().map_err(|e| io_error(&path, e))).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        let (dir_part, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let dir = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let (dir_part, name_prefix) = (dir_part.to_string(), name_prefix.to_string());
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_error(&dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let meta = entry.metadata().map_err(|e| io_error(&entry.path(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !meta.is_file() || !name.starts_with(&name_prefix) {
                    continue;
                }
                let key = if dir_part.is_empty() {
                    name
                } else {
                    format!("{dir_part}/{name}")
                };
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                });
            }
            Ok(sorted(out))
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path(key)?;
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("key has a parent")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path, e)),
        })
        .await
    }

    fn supports_conditional_create(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, finding 6: an I/O error while checking for an object (EIO,
    /// ESTALE on NFS; here ENAMETOOLONG, which root cannot bypass) must be
    /// an error, not "absent" — the ownership check before every FLUSH
    /// asks `exists("epochs/<next>")`.
    #[tokio::test]
    async fn exists_reports_errors_instead_of_absence() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        assert!(!store.exists("epochs/0000000000000002").await.unwrap());
        store
            .put("epochs/1", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(store.exists("epochs/1").await.unwrap());
        let too_long = format!("epochs/{}", "9".repeat(300));
        assert!(store.exists(&too_long).await.is_err());
    }
}
