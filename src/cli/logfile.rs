//! The background server's log: `add` starts the server with its stderr
//! appended to `/run/zerofs-ublk/<name>.log` and names that file in
//! `ZEROFS_UBLK_LOG_PATH`. A server that runs for months must not fill
//! `/run` (tmpfs, memory): once a minute it checks the file, and past
//! [`LIMIT`] renames it to `<name>.log.1` (replacing the previous one) and
//! points its stderr at a new file — tracing output, panics and all.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable naming the server's log file.
pub const LOG_PATH_ENV: &str = "ZEROFS_UBLK_LOG_PATH";
/// A log larger than this is rotated (so at most twice this is kept).
pub const LIMIT: u64 = 16 << 20;

/// Rotate the log named by `ZEROFS_UBLK_LOG_PATH`, if any, every minute.
pub fn spawn_rotation() {
    let Some(path) = std::env::var_os(LOG_PATH_ENV).map(PathBuf::from) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = rotate_if_larger(&path, LIMIT, libc::STDERR_FILENO) {
                tracing::warn!("cannot rotate {}: {e}", path.display());
            }
        }
    });
}

/// If the file open as `fd` (and named `path`) is larger than `limit`,
/// rename it to `path.1` and make `fd` a new, empty `path`. Returns
/// whether it rotated.
pub fn rotate_if_larger(path: &Path, limit: u64, fd: i32) -> std::io::Result<bool> {
    // SAFETY: fstat fills the struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || (st.st_size as u64) <= limit {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::rename(path, &old)?;
    let fresh = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // SAFETY: both descriptors are open; dup2 replaces `fd` atomically.
    if unsafe { libc::dup2(fresh.as_raw_fd(), fd) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::{FromRawFd, IntoRawFd};

    #[test]
    fn a_log_past_the_limit_moves_aside_and_writing_continues_in_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.log");
        let fd = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap()
            .into_raw_fd();
        // SAFETY: we own fd (into_raw_fd above) and close it once, below.
        let mut log = unsafe { std::fs::File::from_raw_fd(fd) };
        log.write_all(&[b'a'; 100]).unwrap();
        assert!(
            !super::rotate_if_larger(&path, 100, fd).unwrap(),
            "at the limit"
        );
        log.write_all(b"b").unwrap();
        assert!(super::rotate_if_larger(&path, 100, fd).unwrap());
        log.write_all(b"after").unwrap();
        let old = dir.path().join("vol.log.1");
        assert_eq!(std::fs::metadata(&old).unwrap().len(), 101);
        assert_eq!(std::fs::read(&path).unwrap(), b"after");
        // Again: the previous .1 is replaced, not kept forever.
        log.write_all(&[b'c'; 200]).unwrap();
        assert!(super::rotate_if_larger(&path, 100, fd).unwrap());
        assert_eq!(std::fs::metadata(&old).unwrap().len(), 205);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
