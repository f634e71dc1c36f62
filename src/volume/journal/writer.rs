//! Appending: one segment file at a time, rotated at each flush capture,
//! released once a flush made it durable; the footprint it may take.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    file: File,
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
    /// Bytes in each segment not yet released (the journal's footprint in
    /// tmpfs, which is memory).
    sizes: std::collections::BTreeMap<u64, u64>,
    /// Footprint past which writers flush before appending more.
    limit: u64,
}

impl Journal {
    /// Start this writer's journal (segment 0) for the claim `tag` of
    /// `epoch`.
    pub fn create(
        dir: &Path,
        volume_id: &[u8; 16],
        epoch: u64,
        tag: ClaimTag,
        key: SubKey,
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
        Ok(Journal {
            dir: dir.to_path_buf(),
            volume,
            volume_id: *volume_id,
            epoch,
            tag,
            key,
            counter: 0,
            segment: 0,
            file,
            len,
            torn: None,
            #[cfg(test)]
            fail_undo: false,
            #[cfg(test)]
            short_write: None,
            sizes: [(0, len)].into(),
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
                .and_then(|()| self.file.seek(std::io::SeekFrom::Start(self.len)));
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
        *self.sizes.entry(self.segment).or_default() += buf.len() as u64;
        Ok(())
    }

    fn write_record(&mut self, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.short_write.take() {
            self.file.write_all(&buf[..n.min(buf.len())])?;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.file.write_all(buf)
    }

    /// Bytes the journal holds now (segments not yet released).
    pub fn live_bytes(&self) -> u64 {
        self.sizes.values().sum()
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
        self.file = file;
        self.len = len;
        self.segment = next;
        self.sizes.insert(next, len);
        Ok(next)
    }

    /// A flush made everything in segments below `segment` durable.
    pub fn release_before(&mut self, segment: u64) {
        let released: Vec<u64> = self.sizes.range(..segment).map(|(s, _)| *s).collect();
        for s in released {
            let path = self
                .dir
                .join(file_name(&self.volume, self.epoch, &self.tag, s));
            let gone = match std::fs::remove_file(&path) {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            if gone && self.torn == Some(s) {
                self.torn = None;
            }
            self.sizes.remove(&s);
        }
    }

    /// Clean shutdown: everything is durable.
    pub fn remove(mut self) {
        self.release_before(self.segment + 1);
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
            "the journal directory {} has only {free} bytes free; the journal needs at least {}              (free space there, or set ZEROFS_UBLK_RUN_DIR to a tmpfs with room)",
            dir.display(),
            2 * floor
        )));
    }
    Ok(limit)
}
