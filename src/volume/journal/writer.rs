//! Appending: one segment file at a time, rotated at each flush capture,
//! released once a flush made it durable; the footprint it may take; in
//! a Host directory, the syncs that make it outlive the host
//! (docs/rfcs/0006-host-durable-journal.md).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::error::{Error, Result};
use crate::store::keys::{SubKey, TAG_LEN, counter_nonce, domain};
use crate::store::wire::Encoder;

pub struct Journal {
    dir: PathBuf,
    volume: String,
    volume_id: [u8; 16],
    epoch: u64,
    tag: ClaimTag,
    key: SubKey,
    /// Nonce of the next append; never reused, even after a failed one.
    counter: u64,
    segment: u64,
    file: Arc<File>,
    durability: Durability,
    /// Length of the current segment file (an append that fails is cut
    /// back to it).
    len: u64,
    /// The segment where an append failed and could not be cut back: no
    /// record may be acknowledged after the torn one, in that segment or a
    /// later one (replay stops at a torn record), until a flush has made
    /// that segment obsolete and it is deleted.
    torn: Option<u64>,
    /// Test hook: cutting back the next failed append fails too.
    #[cfg(test)]
    pub(super) fail_undo: bool,
    /// Test hook: the next append writes only this many bytes, then fails
    /// (a short write, as on ENOSPC).
    #[cfg(test)]
    pub(super) short_write: Option<usize>,
    /// The segments not yet released (the journal's footprint).
    segments: std::collections::BTreeMap<u64, Segment>,
    /// Host: the newest segment whose directory entry is durable.
    entries_synced: u64,
    /// Host: a sync failed. The kernel may have dropped those pages, and a
    /// later sync that succeeds would not bring them back: every later
    /// sync fails too (the server must be restarted, which replays what
    /// the disk really holds).
    poisoned: Poison,
    /// Released segments whose files could not be deleted yet, in order:
    /// no later segment is deleted before them (the survivors of an epoch
    /// are a suffix of its segments).
    undeleted: Vec<(u64, PathBuf)>,
    /// Footprint past which writers flush before appending more.
    limit: u64,
}

/// One live segment.
struct Segment {
    /// Its file's length (header and records).
    bytes: u64,
    /// Host: how much of it a sync has made durable.
    synced: u64,
    /// Host: the file, kept open while it holds unsynced bytes.
    file: Option<Arc<File>>,
    /// When its first record was appended (the upload lag's age).
    first_record: Option<Instant>,
}

/// The segments a sync must make durable, taken under the state lock and
/// run without it (`run`), then recorded (`Journal::synced`).
pub struct SyncPlan {
    files: Vec<(u64, Arc<File>, u64)>,
    dir: Option<PathBuf>,
    /// The newest segment whose entry the directory sync covers.
    entries: u64,
    poisoned: Poison,
}

/// A failed sync, shared by the journal and its plans: recorded by the
/// sync that failed, even if whoever awaited it is gone.
type Poison = Arc<parking_lot::Mutex<Option<String>>>;

impl SyncPlan {
    /// Nothing to sync.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none() && self.poisoned.lock().is_none()
    }

    /// `fdatasync` each segment, then the directory (blocking).
    pub fn run(&self) -> std::result::Result<(), String> {
        if let Some(why) = self.poisoned.lock().as_ref() {
            return Err(why.clone());
        }
        let outcome = self.sync();
        if let Err(why) = &outcome {
            self.poisoned.lock().get_or_insert_with(|| {
                format!("an earlier journal sync failed ({why}); restart the server")
            });
        }
        outcome
    }

    fn sync(&self) -> std::result::Result<(), String> {
        for (segment, file, _) in &self.files {
            file.sync_data()
                .map_err(|e| format!("fdatasync of journal segment {segment}: {e}"))?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Released segments to delete, lowest first, without the state lock
/// (`run`); what could not be deleted goes back (`Journal::deleted`).
pub struct Release {
    paths: Vec<(u64, PathBuf)>,
    /// Host: sync the directory after each deletion.
    dir: Option<PathBuf>,
}

impl Release {
    /// Delete in order; stop at the first that fails and return it and
    /// the rest (blocking in a Host directory: a directory sync each).
    #[must_use]
    pub fn run(mut self) -> Vec<(u64, PathBuf)> {
        for i in 0..self.paths.len() {
            let path = &self.paths[i].1;
            let gone = match std::fs::remove_file(path) {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            let durable = gone && self.dir.as_ref().is_none_or(|d| sync_dir(d).is_ok());
            if !durable {
                tracing::warn!(
                    "cannot delete the released journal segment {} (kept; retried at the next release)",
                    path.display()
                );
                return self.paths.split_off(i);
            }
        }
        Vec::new()
    }
}

impl Journal {
    /// Start this writer's journal (segment 0) for the claim `tag` of
    /// `epoch`. In a Host directory segment 0 and its directory entry are
    /// synced before this returns (replay reads the claim from it).
    pub fn create(
        dir: &Path,
        volume_id: &[u8; 16],
        epoch: u64,
        tag: ClaimTag,
        key: SubKey,
        durability: Durability,
    ) -> Result<Self> {
        prepare_dir(dir)?;
        let volume = hex::encode(volume_id);
        let owner = Owner {
            volume_id,
            epoch,
            tag: &tag,
            key: &key,
            plaintext_allowed: false,
        };
        let (file, len) = Self::open_segment(dir, &volume, &owner, 0)?;
        if durability.is_host() {
            file.sync_data().map_err(|e| io(dir, e))?;
            sync_dir(dir)?;
        }
        let file = Arc::new(file);
        Ok(Journal {
            dir: dir.to_path_buf(),
            volume,
            volume_id: *volume_id,
            epoch,
            tag,
            key,
            counter: 0,
            segment: 0,
            file: file.clone(),
            durability,
            len,
            torn: None,
            #[cfg(test)]
            fail_undo: false,
            #[cfg(test)]
            short_write: None,
            segments: [(
                0,
                Segment {
                    bytes: len,
                    synced: len,
                    file: Some(file),
                    first_record: None,
                },
            )]
            .into(),
            entries_synced: 0,
            poisoned: Poison::default(),
            undeleted: Vec::new(),
            limit: u64::MAX,
        })
    }

    /// A new segment file with its header. It is written under a temporary
    /// name and renamed into place, so a file under a segment's name always
    /// has a whole header — even when the process dies in between (a
    /// `kill -9`, or an exit while the flusher rotates). On failure no
    /// file is left; after a crash at most a `.new` file, which
    /// [`remove_unfinished`] deletes.
    fn open_segment(dir: &Path, volume: &str, owner: &Owner, segment: u64) -> Result<(File, u64)> {
        let epoch = owner.epoch;
        let name = file_name(volume, epoch, owner.tag, segment);
        let path = dir.join(&name);
        let new = dir.join(format!("{name}{UNFINISHED}"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&new)
            .map_err(|e| io(&new, e))?;
        #[cfg(test)]
        if CRASH_AFTER_CREATE.with(|c| c.replace(false)) {
            return Err(io(&new, std::io::Error::other("simulated crash")));
        }
        let h = header(owner, segment);
        if let Err(e) = file
            .write_all(&h)
            .and_then(|()| std::fs::rename(&new, &path))
        {
            let _ = std::fs::remove_file(&new);
            return Err(io(&path, e));
        }
        Ok((file, h.len() as u64))
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir
            .join(file_name(&self.volume, self.epoch, &self.tag, self.segment))
    }

    /// Append one record with a single write; returns once it is in the
    /// file (page cache of tmpfs: enough to outlive the process). On
    /// failure the partial record is cut off again; if even that fails,
    /// every later append fails too.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        if let Some(s) = self.torn {
            return Err(io(
                &self.path(),
                std::io::Error::other(format!(
                    "an earlier append to segment {s} failed and could not be undone; \
                     writes fail until a flush makes that segment obsolete"
                )),
            ));
        }
        let (kind, offset, len, data): (u8, u64, u64, &[u8]) = match record {
            Record::Data { offset, data } => (KIND_DATA, *offset, data.len() as u64, data),
            Record::Zeroes { offset, len } => (KIND_ZEROES, *offset, *len, &[]),
        };
        let counter = self.counter;
        self.counter += 1;
        let mut record = Encoder::with_capacity(RECORD_HEADER + data.len());
        record
            .u8(kind)
            .u64(offset)
            .u64(len)
            .u64(counter)
            .fixed(&[0u8; TAG_LEN])
            .fixed(data);
        let mut buf = record.0;
        let (head, body) = buf.split_at_mut(RECORD_HEADER);
        let tag = self.key.encrypt_in_place(
            &counter_nonce(domain::JOURNAL, counter),
            &head[..RECORD_AAD],
            body,
        );
        head[RECORD_AAD..].copy_from_slice(&tag);
        if let Err(e) = self.write_record(&buf) {
            // The file offset moved with whatever part was written; cut the
            // file back and put the offset where the next record starts.
            use std::io::Seek;
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| (&*self.file).seek(std::io::SeekFrom::Start(self.len)));
            #[cfg(test)]
            let undone = if std::mem::take(&mut self.fail_undo) {
                Err(std::io::Error::other("simulated"))
            } else {
                undone
            };
            if undone.is_err() {
                self.torn = Some(self.segment);
            }
            return Err(io(&self.path(), e));
        }
        self.len += buf.len() as u64;
        let seg = self.segments.get_mut(&self.segment).expect("current");
        seg.bytes = self.len;
        seg.first_record.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn write_record(&mut self, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.short_write.take() {
            (&*self.file).write_all(&buf[..n.min(buf.len())])?;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        (&*self.file).write_all(buf)
    }

    /// Bytes the journal holds now (segments not yet released).
    pub fn live_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Whether the records not yet in the bucket are within `lag`.
    pub fn within(&self, lag: &UploadLag) -> bool {
        let now = self.lag();
        now.bytes <= lag.bytes && now.age <= lag.age
    }

    /// How far the bucket is behind this journal now: bytes not yet
    /// released, and the age of the oldest record among them.
    pub fn lag(&self) -> UploadLag {
        let oldest = self.segments.values().filter_map(|s| s.first_record).min();
        UploadLag {
            bytes: self.live_bytes(),
            age: oldest.map_or(std::time::Duration::ZERO, |t| t.elapsed()),
        }
    }

    /// What a sync must do for the records appended so far in the
    /// segments below `before` (all segments: None). Empty outside a Host
    /// directory.
    pub fn sync_plan(&self, before: Option<u64>) -> SyncPlan {
        let mut plan = SyncPlan {
            files: Vec::new(),
            dir: None,
            entries: 0,
            poisoned: self.poisoned.clone(),
        };
        if !self.durability.is_host() {
            return plan;
        }
        // And every segment whose header is not synced yet: the directory
        // sync below makes its name durable, and the lowest surviving
        // segment's header names the claim replay must match.
        for (n, seg) in &self.segments {
            let wanted = before.is_none_or(|b| *n < b) || seg.synced == 0;
            if let (true, true, Some(file)) = (wanted, seg.synced < seg.bytes, &seg.file) {
                plan.files.push((*n, file.clone(), seg.bytes));
            }
        }
        // Segments created since the last directory sync: their entries.
        if self.segment > self.entries_synced {
            plan.dir = Some(self.dir.clone());
            plan.entries = self.segment;
        }
        plan
    }

    /// A sync of `plan` ended: on success what it covered is durable (on
    /// failure `run` poisoned the journal: every later sync fails too).
    pub fn synced(&mut self, plan: &SyncPlan, outcome: &std::result::Result<(), String>) {
        if outcome.is_err() {
            return;
        }
        for (n, _, len) in &plan.files {
            if let Some(seg) = self.segments.get_mut(n) {
                seg.synced = seg.synced.max(*len);
                if seg.synced >= seg.bytes && *n != self.segment {
                    seg.file = None;
                }
            }
        }
        self.entries_synced = self.entries_synced.max(plan.entries);
    }

    /// Cap the footprint (see [`budget`]); writers flush past it.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Whether writers must flush (which releases segments) first.
    pub fn is_full(&self) -> bool {
        self.live_bytes() >= self.limit
    }

    /// Start a new segment; records before this point are in segments
    /// below the returned number.
    pub fn rotate(&mut self) -> Result<u64> {
        let next = self.segment + 1;
        let owner = Owner {
            volume_id: &self.volume_id,
            epoch: self.epoch,
            tag: &self.tag,
            key: &self.key,
            plaintext_allowed: false,
        };
        let (file, len) = Self::open_segment(&self.dir, &self.volume, &owner, next)?;
        let file = Arc::new(file);
        let host = self.durability.is_host();
        if let Some(old) = self.segments.get_mut(&self.segment)
            && (!host || old.synced >= old.bytes)
        {
            old.file = None;
        }
        self.file = file.clone();
        self.len = len;
        self.segment = next;
        self.segments.insert(
            next,
            Segment {
                bytes: len,
                synced: 0,
                file: Some(file),
                first_record: None,
            },
        );
        Ok(next)
    }

    /// A flush made everything in segments below `segment` durable: they
    /// are forgotten now, and their files are deleted by the returned
    /// `Release` (lowest first; after any left undeleted before).
    pub fn release_before(&mut self, segment: u64) -> Release {
        let released: Vec<u64> = self.segments.range(..segment).map(|(s, _)| *s).collect();
        let mut paths = std::mem::take(&mut self.undeleted);
        for s in released {
            self.segments.remove(&s);
            paths.push((
                s,
                self.dir
                    .join(file_name(&self.volume, self.epoch, &self.tag, s)),
            ));
        }
        Release {
            paths,
            dir: self.durability.is_host().then(|| self.dir.clone()),
        }
    }

    /// `Release::run` left `rest` undeleted (none: all gone). A torn
    /// segment no longer blocks appends once its file is gone.
    pub fn deleted(&mut self, rest: Vec<(u64, PathBuf)>) {
        if self
            .torn
            .is_some_and(|t| !self.segments.contains_key(&t) && !rest.iter().any(|(s, _)| *s == t))
        {
            self.torn = None;
        }
        let mut rest = rest;
        rest.append(&mut self.undeleted);
        self.undeleted = rest;
    }

    /// Whether a later writer is taking this journal over (see
    /// `mark_taking`): then this writer is fenced.
    pub fn taken_over(&self) -> Result<bool> {
        taken_over(&self.dir, &self.volume_id, self.epoch, &self.tag)
    }

    /// What a power cut now would leave (Host): each live segment's file,
    /// how much of it is durable, and whether its directory entry is.
    /// For tests that simulate one.
    pub fn durable_state(&self) -> Vec<(PathBuf, u64, bool)> {
        self.segments
            .iter()
            .map(|(n, seg)| {
                let path = self
                    .dir
                    .join(file_name(&self.volume, self.epoch, &self.tag, *n));
                (path, seg.synced, *n <= self.entries_synced)
            })
            .collect()
    }

    /// Release and delete every segment below `segment` now (blocking).
    pub fn release_now(&mut self, segment: u64) {
        let rest = self.release_before(segment).run();
        self.deleted(rest);
    }

    /// Clean shutdown: everything is durable.
    pub fn remove(mut self) {
        self.release_now(self.segment + 1);
    }
}

/// Bytes available to unprivileged writers in the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("bad path {}", dir.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(dir, std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// How large the journal may grow in a directory with `free` bytes free:
/// twice the dirty limit (rewrites of dirty chunks grow the journal, not
/// the dirty table), but at most half of what is free — tmpfs is memory
/// shared with everyone else in `/run`, and ENOSPC there would fail
/// writes. Writers flush when it is reached. Too little room for a few
/// chunks is an error, naming the way out.
pub fn budget(dir: &Path, free: u64, dirty_limit: u64, chunk_size: u64) -> Result<u64> {
    let floor = 4 * (chunk_size + RECORD_HEADER as u64) + HEADER_V3 as u64;
    let limit = (2 * dirty_limit).min(free / 2);
    if limit < floor {
        return Err(Error::InvalidArgument(format!(
            "the journal directory {} has only {free} bytes free; the journal needs at least {} (free space there, or give another directory: --journal-dir, or ZEROFS_UBLK_RUN_DIR for the tmpfs one)",
            dir.display(),
            2 * floor
        )));
    }
    Ok(limit)
}
