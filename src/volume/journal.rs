//! The dirty journal: acknowledged-but-unflushed writes, kept where they
//! outlive the server process.
//!
//! Why: a WRITE completes once it is in the (volatile) dirty table. If the
//! server is killed, the kernel keeps the device (user recovery) and
//! re-issues the FLUSH that was in flight to the next server — which, with
//! an empty dirty table, would acknowledge it although the writes it
//! covers are gone. So before a write is acknowledged it is appended here,
//! in a directory on tmpfs (`/run`): it survives the process, not the host
//! (when the host dies, nobody is left who was promised anything). The
//! next writer of the volume — the very next epoch — replays it before it
//! serves I/O, so the re-issued FLUSH really covers those writes.
//!
//! Files: `<volume id>-<epoch>-<claim tag>-<segment>.journal` (the tag
//! keeps two copies of one volume — same id, same epoch, other claims —
//! apart on one host; format-2 builds wrote no tag), a new segment at each
//! flush capture; a successful flush deletes the segments it covered.
//! Segment = header (magic, volume id, epoch, claim tag, segment, crc) then
//! records `kind u8 | offset u64 | len u64 | counter u64 | tag [16] | data`,
//! the data encrypted with AES-256-GCM under a key derived from the volume's
//! data key for this claim (epoch and claim token), nonce = the counter,
//! which rises with every append attempt (a failed append that was cut
//! back never gives its nonce to another record), the header fields as
//! associated data. (Format 2 journals — plaintext records with a CRC —
//! are still read, so a server upgraded while a device is live replays
//! what the old one left.) The claim
//! tag binds the file to the claim of its epoch in *this* bucket (a copy of
//! the bucket under another prefix has the same volume id). A torn record
//! at the end of an epoch's newest segment (the process died mid-append,
//! before the write was acknowledged) ends that epoch's replay; a failed
//! append is cut back off the file before the error is returned, so no
//! acknowledged record ever follows a torn one.
//!
//! The directory is 0700 and the files 0600; the records are encrypted,
//! so neither another user nor the swap device (tmpfs pages can be
//! swapped out) sees the volume's plaintext (ARCHITECTURE.md, "journal").

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, Result};
use crate::store::keys::{SubKey, TAG_LEN, VolumeKeys, counter_nonce, domain};

/// Encrypted records (what this build writes).
const MAGIC: &[u8; 8] = b"ZUBLKJN3";
/// Plaintext records with a CRC (read only, from older builds).
const MAGIC_V2: &[u8; 8] = b"ZUBLKJN2";
/// magic, volume id, epoch, claim tag, segment, crc (both formats).
const HEADER_LEN: usize = 8 + 16 + 8 + 16 + 8 + 4;
/// Format 3 adds a key check: a GCM tag over the header under the
/// journal's key (a journal under another key is an error, not a stream
/// of records that fail to authenticate and look torn).
const HEADER_V3: usize = HEADER_LEN + TAG_LEN;
/// kind, offset, len, counter: the associated data of a record.
const RECORD_AAD: usize = 1 + 8 + 8 + 8;
const RECORD_HEADER: usize = RECORD_AAD + TAG_LEN;
const RECORD_HEADER_V2: usize = 1 + 8 + 8 + 4;
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;
/// Data in one record: one chunk at most (the largest chunk size).
const MAX_RECORD_DATA: u64 = crate::store::superblock::MAX_CHUNK_SIZE as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// Borrowed when appending (no copy), owned when read back.
    Data {
        offset: u64,
        data: Cow<'a, [u8]>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
}

/// Binds a journal to one claim: 16 bytes of SHA-256 of the claim token.
pub type ClaimTag = [u8; 16];

pub fn claim_tag(token: &str) -> ClaimTag {
    sha2::Sha256::digest(token.as_bytes())[..16]
        .try_into()
        .expect("16 bytes")
}

/// The key the journal of the claim `token` of `epoch` is encrypted under
/// (one per claim: the token is random, so no two journals share a key).
pub fn journal_key(keys: &VolumeKeys, epoch: u64, token: &str) -> SubKey {
    let object = format!("{}/{token}", crate::store::paths::epoch_name(epoch));
    keys.subkey("journal", &object)
}

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
    fail_undo: bool,
    /// Test hook: the next append writes only this many bytes, then fails
    /// (a short write, as on ENOSPC).
    #[cfg(test)]
    short_write: Option<usize>,
    /// Bytes in each segment not yet released (the journal's footprint in
    /// tmpfs, which is memory).
    sizes: std::collections::BTreeMap<u64, u64>,
    /// Footprint past which writers flush before appending more.
    limit: u64,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Store(crate::store::backend::StoreError::Backend(format!(
        "journal {}: {e}",
        path.display()
    )))
}

fn file_name(volume: &str, epoch: u64, tag: &ClaimTag, segment: u64) -> String {
    format!(
        "{volume}-{epoch:016x}-{}-{segment:08x}.journal",
        hex::encode(tag)
    )
}

/// Suffix of a segment file whose header is not written yet.
const UNFINISHED: &str = ".new";

#[cfg(test)]
thread_local! {
    /// Make the next `open_segment` stop (as a crash would) right after
    /// creating its file.
    static CRASH_AFTER_CREATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// (epoch, claim tag when the name has one, segment) of a segment file.
fn parse_name(name: &str, volume: &str) -> Option<(u64, Option<ClaimTag>, u64)> {
    let rest = name.strip_prefix(volume)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".journal")?;
    let parts: Vec<&str> = rest.split('-').collect();
    let (e, tag, s) = match parts[..] {
        [e, s] => (e, None, s),
        [e, t, s] => (e, Some(hex::decode(t).ok()?.try_into().ok()?), s),
        _ => return None,
    };
    Some((
        u64::from_str_radix(e, 16).ok()?,
        tag,
        u64::from_str_radix(s, 16).ok()?,
    ))
}

/// A segment file's header (for the fuzz targets).
#[doc(hidden)]
pub fn header_for_fuzzing(owner: &Owner, segment: u64) -> Vec<u8> {
    header(owner, segment)
}

fn header(owner: &Owner, segment: u64) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(owner.volume_id);
    h.extend_from_slice(&owner.epoch.to_le_bytes());
    h.extend_from_slice(owner.tag);
    h.extend_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    let check = owner
        .key
        .encrypt_in_place(&header_nonce(segment), &h, &mut []);
    h.extend_from_slice(&check);
    h
}

fn header_nonce(segment: u64) -> [u8; crate::store::keys::NONCE_LEN] {
    counter_nonce(domain::JOURNAL_HEADER, segment)
}

fn record_crc(kind: u8, offset: u64, len: u64, data: &[u8]) -> u32 {
    let mut h = [0u8; 17];
    h[0] = kind;
    h[1..9].copy_from_slice(&offset.to_le_bytes());
    h[9..17].copy_from_slice(&len.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&h), data)
}

/// The journal directory, private to root: created 0700, and narrowed to
/// 0700 if it exists with wider permissions.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    let meta = std::fs::metadata(dir).map_err(|e| io(dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(dir, e))?;
    }
    Ok(())
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

    fn path(&self) -> PathBuf {
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
        let mut buf = Vec::with_capacity(RECORD_HEADER + data.len());
        buf.push(kind);
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&counter.to_le_bytes());
        buf.extend_from_slice(&[0u8; TAG_LEN]);
        buf.extend_from_slice(data);
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

/// The claim tag in a segment's header, if the header is intact.
pub fn read_tag(path: &Path) -> Result<ClaimTag> {
    let mut h = [0u8; HEADER_LEN];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .map_err(|e| io(path, e))?;
    check_header(path, &h)?;
    Ok(h[32..48].try_into().expect("16"))
}

fn check_header(path: &Path, h: &[u8]) -> Result<()> {
    if h.len() < HEADER_LEN || (&h[..8] != MAGIC && &h[..8] != MAGIC_V2) {
        return Err(Error::Integrity(format!(
            "journal {}: bad header (or the format of another version)",
            path.display()
        )));
    }
    let stored = u32::from_le_bytes(h[HEADER_LEN - 4..HEADER_LEN].try_into().expect("4"));
    if crc32c::crc32c(&h[..HEADER_LEN - 4]) != stored {
        return Err(Error::Integrity(format!(
            "journal {}: header checksum mismatch",
            path.display()
        )));
    }
    Ok(())
}

/// The records of one segment file, read one at a time: replay holds one
/// record in memory, not the segment (which can be hundreds of MiB), let
/// alone the segment twice. `last` allows a torn final record.
pub struct Records<R> {
    path: PathBuf,
    reader: R,
    key: SubKey,
    /// Format 2: plaintext records with a CRC.
    plaintext: bool,
    /// Counter of the last record read (they rise strictly).
    counter: Option<u64>,
    last: bool,
    done: bool,
}

/// Where a segment file must belong: the volume, the epoch and claim that
/// wrote it, and the key of that claim's journal.
pub struct Owner<'a> {
    pub volume_id: &'a [u8; 16],
    pub epoch: u64,
    pub tag: &'a ClaimTag,
    pub key: &'a SubKey,
    /// The claim was made by a format-2 build, which wrote plaintext
    /// records; for any other claim a plaintext journal is a forgery.
    pub plaintext_allowed: bool,
}

/// Open one segment file and check its header.
pub fn read_segment(
    path: &Path,
    owner: &Owner,
    last: bool,
) -> Result<Records<std::io::BufReader<File>>> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    Records::new(
        path,
        std::io::BufReader::with_capacity(1 << 20, file),
        owner,
        last,
    )
}

/// The records of one segment file's bytes (`path` names it in errors).
pub fn parse_segment(
    path: &Path,
    bytes: &[u8],
    owner: &Owner,
    last: bool,
) -> Result<Vec<Record<'static>>> {
    Records::new(path, bytes, owner, last)?.collect()
}

/// Fill `buf` from `r`; how many bytes there were (fewer only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> Records<R> {
    fn new(path: &Path, mut reader: R, owner: &Owner, last: bool) -> Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut reader, &mut h).map_err(|e| io(path, e))?;
        check_header(path, &h[..n])?;
        let mut records = Records {
            path: path.to_path_buf(),
            reader,
            key: owner.key.clone(),
            plaintext: &h[..8] == MAGIC_V2,
            counter: None,
            last,
            done: false,
        };
        if h[8..24] != owner.volume_id[..] {
            return Err(records.bad("volume mismatch"));
        }
        if u64::from_le_bytes(h[24..32].try_into().expect("8")) != owner.epoch {
            return Err(records.bad("epoch mismatch"));
        }
        if h[32..48] != owner.tag[..] {
            return Err(records.bad("claim mismatch"));
        }
        if records.plaintext && !owner.plaintext_allowed {
            return Err(records.bad("plaintext records under a claim whose journal is encrypted"));
        }
        if !records.plaintext {
            let mut check = [0u8; TAG_LEN];
            let n = read_full(&mut records.reader, &mut check).map_err(|e| io(path, e))?;
            let segment = u64::from_le_bytes(h[48..56].try_into().expect("8"));
            if n < TAG_LEN
                || !owner
                    .key
                    .decrypt_in_place(&header_nonce(segment), &h, &mut [], &check)
            {
                return Err(records.bad("not written under this claim's journal key"));
            }
        }
        Ok(records)
    }

    fn bad(&self, why: &str) -> Error {
        Error::Integrity(format!("journal {}: {why}", self.path.display()))
    }

    /// A torn record: the end of the newest segment, an error elsewhere.
    fn torn(&mut self) -> Option<Result<Record<'static>>> {
        self.done = true;
        if self.last {
            None
        } else {
            Some(Err(self.bad("torn record before the newest segment")))
        }
    }

    fn next_record(&mut self) -> Option<Result<Record<'static>>> {
        let header_len = if self.plaintext {
            RECORD_HEADER_V2
        } else {
            RECORD_HEADER
        };
        let mut h = [0u8; RECORD_HEADER];
        let h = &mut h[..header_len];
        match read_full(&mut self.reader, h) {
            Err(e) => return Some(Err(io(&self.path, e))),
            Ok(0) => {
                self.done = true;
                return None;
            }
            Ok(n) if n < header_len => return self.torn(),
            Ok(_) => {}
        }
        let kind = h[0];
        let offset = u64::from_le_bytes(h[1..9].try_into().expect("8"));
        let len = u64::from_le_bytes(h[9..17].try_into().expect("8"));
        let data_len = if kind == KIND_DATA { len } else { 0 };
        // A record is one chunk's write at most; a larger length is a torn
        // or corrupt header, and must not size an allocation.
        if data_len > MAX_RECORD_DATA {
            return self.torn();
        }
        let mut data = vec![0u8; data_len as usize];
        match read_full(&mut self.reader, &mut data) {
            Err(e) => return Some(Err(io(&self.path, e))),
            Ok(n) if n < data.len() => return self.torn(),
            Ok(_) => {}
        }
        let authentic = if self.plaintext {
            let crc = u32::from_le_bytes(h[17..21].try_into().expect("4"));
            record_crc(kind, offset, len, &data) == crc
        } else {
            let counter = u64::from_le_bytes(h[17..25].try_into().expect("8"));
            let tag: [u8; TAG_LEN] = h[RECORD_AAD..].try_into().expect("16");
            let nonce = counter_nonce(domain::JOURNAL, counter);
            if !self
                .key
                .decrypt_in_place(&nonce, &h[..RECORD_AAD], &mut data, &tag)
            {
                false
            } else if self.counter.is_some_and(|c| counter <= c) {
                self.done = true;
                return Some(Err(self.bad("records out of order")));
            } else {
                self.counter = Some(counter);
                true
            }
        };
        if !authentic {
            return self.torn();
        }
        Some(match kind {
            KIND_DATA => Ok(Record::Data {
                offset,
                data: Cow::Owned(data),
            }),
            KIND_ZEROES => Ok(Record::Zeroes { offset, len }),
            _ => {
                self.done = true;
                Err(self.bad("unknown record kind"))
            }
        })
    }
}

impl<R: Read> Iterator for Records<R> {
    type Item = Result<Record<'static>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_record()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: ClaimTag = [7; 16];

    fn key() -> &'static SubKey {
        static KEY: std::sync::OnceLock<SubKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            let keys = VolumeKeys::new([3; 16], crate::store::keys::DataKey::random());
            journal_key(&keys, 1, "token")
        })
    }

    fn read_with(
        path: &Path,
        id: &[u8; 16],
        epoch: u64,
        tag: &ClaimTag,
        key: &SubKey,
        last: bool,
    ) -> Result<Vec<Record<'static>>> {
        let owner = Owner {
            volume_id: id,
            epoch,
            tag,
            key,
            plaintext_allowed: true,
        };
        read_segment(path, &owner, last)?.collect()
    }

    fn read_all(
        path: &Path,
        id: &[u8; 16],
        epoch: u64,
        tag: &ClaimTag,
        last: bool,
    ) -> Result<Vec<Record<'static>>> {
        read_with(path, id, epoch, tag, key(), last)
    }

    #[test]
    fn records_are_encrypted_and_bound_to_the_claims_key() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let mut j = Journal::create(dir.path(), &id, 4, TAG, key().clone()).unwrap();
        let secret = b"plaintext that must not reach tmpfs or swap".repeat(40);
        let rec = Record::Data {
            offset: 8192,
            data: Cow::Owned(secret.clone()),
        };
        j.append(&rec).unwrap();
        let path = j.path();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(
            !on_disk.windows(24).any(|w| w == &secret[..24]),
            "the record's data is in the file in the clear"
        );
        assert_eq!(read_all(&path, &id, 4, &TAG, true).unwrap(), vec![rec]);
        // Another claim's key: a loud error, not an empty (torn) replay.
        let other = journal_key(
            &VolumeKeys::new(id, crate::store::keys::DataKey::random()),
            4,
            "token",
        );
        let err = read_with(&path, &id, 4, &TAG, &other, true).unwrap_err();
        assert!(err.to_string().contains("journal key"), "{err}");
    }

    #[test]
    fn a_failed_append_never_gives_its_nonce_to_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let mut j = Journal::create(dir.path(), &id, 4, TAG, key().clone()).unwrap();
        j.short_write = Some(30);
        let a = Record::Data {
            offset: 0,
            data: Cow::Owned(vec![1u8; 512]),
        };
        assert!(j.append(&a).is_err());
        let b = Record::Data {
            offset: 0,
            data: Cow::Owned(vec![2u8; 512]),
        };
        j.append(&b).unwrap();
        let on_disk = std::fs::read(j.path()).unwrap();
        let counter =
            u64::from_le_bytes(on_disk[HEADER_V3 + 17..HEADER_V3 + 25].try_into().unwrap());
        assert_eq!(
            counter, 1,
            "the record after a failed append reused nonce 0"
        );
        assert_eq!(read_all(&j.path(), &id, 4, &TAG, true).unwrap(), vec![b]);
    }

    /// A journal written by the previous format (plaintext records with a
    /// CRC) is still replayed: a server upgraded while a device is live
    /// must not lose what the old one acknowledged.
    #[test]
    fn format_2_journals_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let path = dir.path().join("v2.journal");
        let mut bytes = MAGIC_V2.to_vec();
        bytes.extend_from_slice(&id);
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(&TAG);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let data = vec![7u8; 1024];
        bytes.push(KIND_DATA);
        bytes.extend_from_slice(&4096u64.to_le_bytes());
        bytes.extend_from_slice(&1024u64.to_le_bytes());
        bytes.extend_from_slice(&record_crc(KIND_DATA, 4096, 1024, &data).to_le_bytes());
        bytes.extend_from_slice(&data);
        bytes.push(KIND_ZEROES);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&512u64.to_le_bytes());
        bytes.extend_from_slice(&record_crc(KIND_ZEROES, 0, 512, &[]).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        // Only for a claim of a format-2 build: under any other, plaintext
        // records are a forgery.
        let format3_claim = Owner {
            volume_id: &id,
            epoch: 5,
            tag: &TAG,
            key: key(),
            plaintext_allowed: false,
        };
        let err = read_segment(&path, &format3_claim, true).err().unwrap();
        assert!(err.to_string().contains("plaintext"), "{err}");
        assert_eq!(
            read_all(&path, &id, 5, &TAG, true).unwrap(),
            vec![
                Record::Data {
                    offset: 4096,
                    data: Cow::Owned(data)
                },
                Record::Zeroes {
                    offset: 0,
                    len: 512
                }
            ]
        );
    }

    #[test]
    fn the_budget_is_twice_the_dirty_limit_but_at_most_half_the_free_space() {
        let dir = Path::new("/run/x");
        let mib = 1u64 << 20;
        assert_eq!(
            budget(dir, 4096 * mib, 256 * mib, 128 << 10).unwrap(),
            512 * mib
        );
        assert_eq!(
            budget(dir, 300 * mib, 256 * mib, 128 << 10).unwrap(),
            150 * mib
        );
        let err = budget(dir, mib, 256 * mib, 128 << 10)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/run/x") && err.contains("ZEROFS_UBLK_RUN_DIR"),
            "{err}"
        );
    }

    #[test]
    fn free_bytes_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_corrupt_length_is_a_torn_record_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let mut j = Journal::create(dir.path(), &id, 2, TAG, key().clone()).unwrap();
        let a = Record::Zeroes {
            offset: 0,
            len: 4096,
        };
        j.append(&a).unwrap();
        let path = j.path();
        // A whole record header (kind, offset, len, counter, tag) whose
        // data claims 2^60 bytes.
        let mut rec = vec![KIND_DATA];
        rec.extend_from_slice(&0u64.to_le_bytes());
        rec.extend_from_slice(&(1u64 << 60).to_le_bytes());
        rec.extend_from_slice(&1u64.to_le_bytes());
        rec.extend_from_slice(&[0u8; TAG_LEN]);
        assert_eq!(rec.len(), RECORD_HEADER);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&rec)
            .unwrap();
        assert_eq!(read_all(&path, &id, 2, &TAG, true).unwrap(), vec![a]);
        assert!(read_all(&path, &id, 2, &TAG, false).is_err());
    }

    #[test]
    fn records_roundtrip_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let mut j = Journal::create(dir.path(), &id, 7, TAG, key().clone()).unwrap();
        let a = Record::Data {
            offset: 4096,
            data: vec![9; 1000].into(),
        };
        let z = Record::Zeroes {
            offset: 0,
            len: 512,
        };
        j.append(&a).unwrap();
        j.append(&z).unwrap();
        let files = find(dir.path(), &id);
        assert_eq!(files.len(), 1);
        let path = &files[0].path;
        assert_eq!(
            read_all(path, &id, 7, &TAG, true).unwrap(),
            vec![a.clone(), z.clone()]
        );
        // A torn append (process killed mid-write) is dropped, not misread.
        let full = std::fs::read(path).unwrap();
        std::fs::write(path, &full[..full.len() - 10]).unwrap();
        assert_eq!(read_all(path, &id, 7, &TAG, true).unwrap(), vec![a]);
        assert!(read_all(path, &id, 7, &TAG, false).is_err());
        assert!(
            read_all(path, &[4u8; 16], 7, &TAG, true).is_err(),
            "other volume"
        );
        assert!(read_all(path, &id, 8, &TAG, true).is_err(), "other epoch");
        assert!(
            read_all(path, &id, 7, &[8; 16], true).is_err(),
            "other claim (a copy of the bucket)"
        );
    }

    #[test]
    fn rotation_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let id = [5u8; 16];
        let mut j = Journal::create(dir.path(), &id, 1, TAG, key().clone()).unwrap();
        j.append(&Record::Zeroes {
            offset: 0,
            len: 512,
        })
        .unwrap();
        let covered = j.rotate().unwrap();
        j.append(&Record::Zeroes {
            offset: 512,
            len: 512,
        })
        .unwrap();
        assert_eq!(find(dir.path(), &id).len(), 2);
        j.release_before(covered);
        let left = find(dir.path(), &id);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].segment, 1);
        j.remove();
        assert!(find(dir.path(), &id).is_empty());
    }

    #[test]
    fn journal_is_private_to_its_owner() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("journal");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let id = [6u8; 16];
        let mut j = Journal::create(&dir, &id, 1, TAG, key().clone()).unwrap();
        j.rotate().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "an existing 0755 directory is narrowed");
        for Found { path, .. } in find(&dir, &id) {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }

    #[test]
    fn a_torn_record_that_could_not_be_cut_back_blocks_appends_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let id = [6u8; 16];
        let rec = |seed: u8| Record::Data {
            offset: seed as u64 * 4096,
            data: vec![seed; 4096].into(),
        };
        let mut j = Journal::create(dir.path(), &id, 3, TAG, key().clone()).unwrap();
        j.append(&rec(1)).unwrap();
        j.short_write = Some(100);
        j.fail_undo = true;
        assert!(j.append(&rec(2)).is_err());
        assert!(j.append(&rec(3)).is_err(), "nothing after a torn record");
        // A flush starts: later records would go to segment 1, after the
        // torn one in segment 0 — replay would refuse them. Still refused.
        let next = j.rotate().unwrap();
        assert!(j.append(&rec(4)).is_err(), "segment 0 is still torn");
        // The flush made segment 0 durable and obsolete: appends resume.
        j.release_before(next);
        j.append(&rec(5)).unwrap();
        let found = find(dir.path(), &id);
        assert_eq!(found.len(), 1);
        assert_eq!(
            read_all(&found[0].path, &id, 3, &TAG, true).unwrap(),
            vec![rec(5)]
        );
    }

    #[test]
    fn a_crash_while_rotating_leaves_a_readable_journal() {
        let dir = tempfile::tempdir().unwrap();
        let id = [5u8; 16];
        let rec = Record::Data {
            offset: 4096,
            data: vec![1; 4096].into(),
        };
        let mut j = Journal::create(dir.path(), &id, 3, TAG, key().clone()).unwrap();
        j.append(&rec).unwrap();
        CRASH_AFTER_CREATE.with(|c| c.set(true));
        assert!(j.rotate().is_err());
        // The process is gone here; the next server finds what is on disk.
        let found = find(dir.path(), &id);
        assert_eq!(found.len(), 1, "{found:?}");
        let Found {
            epoch,
            tag,
            segment,
            path,
        } = &found[0];
        assert_eq!((*epoch, *tag, *segment), (3, Some(TAG), 0));
        assert_eq!(read_tag(path).unwrap(), TAG);
        assert_eq!(read_all(path, &id, 3, &TAG, true).unwrap(), vec![rec]);
        let leftovers = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers(), 2, "segment 0 and the unfinished segment 1");
        remove_unfinished(dir.path(), &id, 3);
        assert_eq!(
            leftovers(),
            2,
            "epoch 3's own files are not touched by epoch 3"
        );
        remove_unfinished(dir.path(), &id, 4);
        assert_eq!(leftovers(), 1);
    }

    #[test]
    fn a_failed_append_leaves_no_torn_record_before_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let id = [9u8; 16];
        let mut j = Journal::create(dir.path(), &id, 3, TAG, key().clone()).unwrap();
        let rec = |seed: u8, len: usize| Record::Data {
            offset: seed as u64 * 65536,
            data: vec![seed; len].into(),
        };
        let (rec1, rec3) = (rec(1, 4096), rec(3, 4096));
        j.append(&rec1).unwrap();
        // ENOSPC after 6000 bytes of an 8 KiB record: more than record 3
        // covers, so bytes left behind would follow it in the file.
        j.short_write = Some(6000);
        assert!(j.append(&rec(2, 8192)).is_err());
        j.append(&rec3).unwrap(); // acknowledged after the failure
        let path = &find(dir.path(), &id)[0].path;
        // Not the last segment: any torn record would be an error, and
        // record 3 must not be lost behind record 2's remains.
        assert_eq!(
            read_all(path, &id, 3, &TAG, false).unwrap(),
            vec![rec1, rec3]
        );
    }
}
