//! Keep key material where it is needed and nowhere else: out of core
//! dumps, and the passphrase out of the process environment.
//!
//! [`harden`] runs first thing in `main`, before any thread of ours exists
//! (jemalloc's background purging thread may already run; it never reads
//! or writes the environment): it makes the process non-dumpable (no core file, no `/proc/PID/mem` for
//! other processes of the same user, no ptrace attach without
//! `CAP_SYS_PTRACE`), takes `ZEROFS_UBLK_PASSPHRASE` into memory that is
//! wiped on drop, overwrites the original bytes in the environment block
//! (which `/proc/PID/environ` shows for the life of the process) and
//! removes the variable. A server this process starts gets the passphrase
//! in its own environment and does the same at once.

use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::OnceLock;

use zeroize::Zeroizing;

use super::args::PASSPHRASE_ENV;

static PASSPHRASE: OnceLock<Option<Zeroizing<Vec<u8>>>> = OnceLock::new();

unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Call once, first thing in `main`, before the process starts threads
/// that could read the environment.
pub fn harden() {
    make_undumpable();
    let value = std::env::var_os(PASSPHRASE_ENV).map(|v| Zeroizing::new(v.into_vec()));
    if value.is_some() {
        wipe_from_environment(PASSPHRASE_ENV);
    }
    let _ = PASSPHRASE.set(value);
}

fn make_undumpable() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// The passphrase `ZEROFS_UBLK_PASSPHRASE` held when the process started
/// (read from the environment now if [`harden`] has not run).
pub fn passphrase() -> Option<&'static [u8]> {
    PASSPHRASE
        .get_or_init(|| {
            std::env::var_os(PASSPHRASE_ENV).map(|v| Zeroizing::new(v.as_bytes().to_vec()))
        })
        .as_deref()
        .map(|v| &v[..])
}

/// Give a child process the passphrase (it wipes it again on start).
pub fn pass_passphrase(cmd: &mut std::process::Command) {
    if let Some(p) = passphrase() {
        cmd.env(PASSPHRASE_ENV, OsStr::from_bytes(p));
    }
}

fn wipe_from_environment(name: &str) {
    let prefix = format!("{name}=");
    // SAFETY: called from `harden` before any thread of ours exists, so
    // nothing reads or changes the environment meanwhile; each entry is a NUL-terminated string in
    // writable memory (the initial block on the stack, or libc's copy).
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let s = *entry;
            let len = libc::strlen(s);
            let bytes = std::slice::from_raw_parts(s as *const u8, len);
            if bytes.starts_with(prefix.as_bytes()) {
                for i in prefix.len()..len {
                    std::ptr::write_volatile(s.add(i), 0);
                }
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hardened_process_is_not_dumpable() {
        // Not `harden` itself: the test harness is multi-threaded, and the
        // environment part is tested on the binary (tests/cli.rs).
        super::make_undumpable();
        // SAFETY: plain integer call.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
