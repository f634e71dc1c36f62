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

/// Mark the journal of `epoch` as taken over: its pending records were
/// replayed (or judged stale) by a later writer. A file of that epoch that
/// appears afterwards was written by its server after the takeover (a
/// fenced writer still running) and must never be replayed.
pub fn mark_consumed(dir: &Path, volume_id: &[u8; 16], epoch: u64, tag: &ClaimTag) -> Result<()> {
    let path = dir.join(consumed_name(&hex::encode(volume_id), epoch, Some(tag)));
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map(drop)
        .map_err(|e| io(&path, e))
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
