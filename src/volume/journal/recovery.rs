//! Recovery's side of the journal directory: which files belong to a
//! volume, which epochs' journals a later writer took over, and leftovers
//! of a crash while rotating.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::Result;

/// Journal files of `volume_id` in `dir`, as (epoch, segment, path), sorted.
pub fn find(dir: &Path, volume_id: &[u8; 16]) -> Vec<Found> {
    let volume = hex::encode(volume_id);
    let mut out: Vec<Found> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (epoch, tag, segment) = parse_name(&name, &volume)?;
            Some(Found {
                epoch,
                tag,
                segment,
                path: e.path(),
            })
        })
        .collect();
    out.sort();
    out
}

/// A journal segment file found in a directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub epoch: u64,
    /// The claim tag its name carries (None: named by a format-2 build;
    /// the header has it).
    pub tag: Option<ClaimTag>,
    pub segment: u64,
    pub path: PathBuf,
}

/// The identity of a journal directory, as claims record it: its path, and
/// the device and inode behind it (another mount at the same path — a
/// container's own `/run` — is another directory). Creates the directory
/// (0700) if needed.
pub fn dir_identity(dir: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    prepare_dir(dir)?;
    let real = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
    let meta = std::fs::metadata(&real).map_err(|e| io(&real, e))?;
    Ok(format!(
        "{} (device {}, inode {})",
        real.display(),
        meta.dev(),
        meta.ino()
    ))
}

/// The file in a Host journal directory holding its identity.
pub(super) const ID_FILE: &str = "zerofs-ublk-journal.id";
use crate::store::fencing::DURABLE_JOURNAL as HOST_PREFIX;

/// The identity of a journal directory on a local disk (`--journal-dir`,
/// `Durability::Host`), as claims record it: a random id kept in the
/// directory, which outlives reboots (device numbers need not), and the
/// path. Creates the directory and the id (durably) if needed; refuses a
/// directory on tmpfs or ramfs, which would not outlive the host.
pub fn host_dir_identity(dir: &Path) -> Result<String> {
    refuse_memory_filesystem(dir)?;
    prepare_dir(dir)?;
    let real = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
    let path = real.join(ID_FILE);
    let id = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            let tmp = real.join(format!("{ID_FILE}{UNFINISHED}"));
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io(&tmp, e))?;
            use std::io::Write;
            f.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| io(&path, e))?;
            sync_dir(&real)?;
            // The directory itself may be new.
            if let Some(parent) = real.parent() {
                sync_dir(parent)?;
            }
            id
        }
        Err(e) => return Err(io(&path, e)),
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Integrity(format!(
            "{} does not hold a journal directory id",
            path.display()
        )));
    }
    Ok(format!("{HOST_PREFIX}{id} at {}", real.display()))
}

/// A Host journal directory must outlive the host: refuse one on tmpfs
/// or ramfs. Checked before anything is created: the directory, or the
/// nearest ancestor that exists.
pub fn refuse_memory_filesystem(dir: &Path) -> Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("."));
    match memory_filesystem(existing)? {
        Some(kind) => Err(Error::InvalidArgument(format!(
            "the journal directory {} is on {kind}, which does not survive the host; give a directory on a local disk (or leave --journal-dir out)",
            dir.display()
        ))),
        None => Ok(()),
    }
}

/// Whether a claim's journal identity names a Host directory.
pub fn is_host_identity(identity: &str) -> bool {
    identity.starts_with(HOST_PREFIX)
}

/// "tmpfs" or "ramfs" when `dir` is on one.
fn memory_filesystem(dir: &Path) -> Result<Option<&'static str>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("bad path {}", dir.display())))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(dir, std::io::Error::last_os_error()));
    }
    Ok(match st.f_type as i64 {
        0x0102_1994 => Some("tmpfs"),
        0x8584_58f6 => Some("ramfs"),
        _ => None,
    })
}

/// Mark the journal of `epoch` as taken over: its pending records were
/// replayed (or judged stale) by a later writer. A file of that epoch that
/// appears afterwards was written by its server after the takeover (a
/// fenced writer still running) and must never be replayed.
pub fn mark_consumed(dir: &Path, volume_id: &[u8; 16], epoch: u64, tag: &ClaimTag) -> Result<()> {
    mark(&dir.join(consumed_name(&hex::encode(volume_id), epoch, Some(tag))))
}

/// Whether a later writer took over the journal of the claim `tag` of
/// `epoch` (or, as format-2 builds marked it, every journal of `epoch`).
pub fn is_consumed(dir: &Path, volume_id: &[u8; 16], epoch: u64, tag: &ClaimTag) -> Result<bool> {
    let volume = hex::encode(volume_id);
    for name in [
        consumed_name(&volume, epoch, Some(tag)),
        consumed_name(&volume, epoch, None),
    ] {
        let path = dir.join(name);
        if path.try_exists().map_err(|e| io(&path, e))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Mark the journal of `epoch` as being taken over, before the taker
/// reads it: its writer, still running (a same-host `--force`), stops
/// acknowledging FLUSHes from a Host journal once it sees the mark
/// (`taken_over`), so none of its acknowledged records comes after what
/// the taker reads. Unlike the consumed mark it does not make the journal
/// stale: a taker that fails leaves it for the next.
pub fn mark_taking(dir: &Path, volume_id: &[u8; 16], epoch: u64, tag: &ClaimTag) -> Result<()> {
    mark(&dir.join(taking_name(&hex::encode(volume_id), epoch, tag)))
}

/// An empty file at `path` (0600), if there is none.
fn mark(path: &Path) -> Result<()> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| io(path, e))
}

/// Whether a later writer is taking over, or took over, the journal of the
/// claim `tag` of `epoch`.
pub fn taken_over(dir: &Path, volume_id: &[u8; 16], epoch: u64, tag: &ClaimTag) -> Result<bool> {
    let path = dir.join(taking_name(&hex::encode(volume_id), epoch, tag));
    Ok(path.try_exists().map_err(|e| io(&path, e))? || is_consumed(dir, volume_id, epoch, tag)?)
}

fn taking_name(volume: &str, epoch: u64, tag: &ClaimTag) -> String {
    format!("{volume}-{epoch:016x}-{}.taking", hex::encode(tag))
}

fn consumed_name(volume: &str, epoch: u64, tag: Option<&ClaimTag>) -> String {
    match tag {
        Some(t) => format!("{volume}-{epoch:016x}-{}.consumed", hex::encode(t)),
        None => format!("{volume}-{epoch:016x}.consumed"),
    }
}

/// Delete the segment files of `volume_id` that a server of an epoch
/// before `epoch` died creating (no header yet, never held a record).
pub fn remove_unfinished(dir: &Path, volume_id: &[u8; 16], epoch: u64) {
    let volume = hex::encode(volume_id);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(done) = name.strip_suffix(UNFINISHED) else {
            continue;
        };
        if parse_name(done, &volume).is_some_and(|(e, _, _)| e < epoch) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
