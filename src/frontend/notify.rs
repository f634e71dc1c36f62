//! Cross-thread wakeup of a ublk queue thread.
//!
//! A queue thread sleeps in `io_uring_enter`. Requests are served on the
//! engine's tokio runtime; when one completes, its result is handed back
//! through a oneshot channel (which schedules the waiting tag task on the
//! queue's executor) and this eventfd is written, which completes a read
//! that is always pending in the queue's ring — so the ring wakes up and
//! the executor runs the tag task.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wake the queue thread. Writes coalesce in the eventfd counter.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN)
        // still leaves the fd readable, which is all a wakeup needs.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
