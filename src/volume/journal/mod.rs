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
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use sha2::Digest;

mod reader;
mod recovery;
mod writer;

pub use reader::{Records, Tail, parse_segment, read_segment, read_tag};
pub use recovery::{
    Found, dir_identity, find, host_dir_identity, is_consumed, is_host_identity, mark_consumed,
    mark_taking, refuse_memory_filesystem, remove_unfinished, taken_over,
};
pub use writer::{Journal, Release, SyncPlan, budget, free_bytes};

/// What a journal survives, and so what a FLUSH waits for
/// (docs/rfcs/0006-host-durable-journal.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On tmpfs (`/run`): survives the server process, not the host.
    /// FLUSH waits for the bucket.
    Process,
    /// On a local disk (`--journal-dir`): survives the host. FLUSH waits
    /// for `fdatasync`, and for the bucket only past the lag bound.
    Host(UploadLag),
}

impl Durability {
    pub fn is_host(&self) -> bool {
        matches!(self, Durability::Host(_))
    }
}

/// How far the bucket may fall behind FLUSHes acknowledged from a Host
/// journal: bytes of records not yet in the bucket, and the age of the
/// oldest of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLag {
    pub bytes: u64,
    pub age: std::time::Duration,
}

impl Default for UploadLag {
    fn default() -> Self {
        UploadLag {
            bytes: 64 << 20,
            age: std::time::Duration::from_secs(10),
        }
    }
}

use crate::error::{Error, Result};
use crate::store::keys::{SubKey, TAG_LEN, VolumeKeys, counter_nonce, domain};
use crate::store::wire::{Decoder, Encoder};

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

/// A segment file's header (for the fuzz targets).
#[doc(hidden)]
pub fn header_for_fuzzing(owner: &Owner, segment: u64) -> Vec<u8> {
    header(owner, segment)
}

fn header(owner: &Owner, segment: u64) -> Vec<u8> {
    let mut h = Header {
        magic: *MAGIC,
        volume_id: *owner.volume_id,
        epoch: owner.epoch,
        tag: *owner.tag,
        segment,
    }
    .encode();
    let check = owner
        .key
        .encrypt_in_place(&header_nonce(segment), &h, &mut []);
    h.extend_from_slice(&check);
    h
}

/// A segment file's header fields (both formats), then a CRC of them.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    magic: [u8; 8],
    volume_id: [u8; 16],
    epoch: u64,
    tag: ClaimTag,
    segment: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(HEADER_LEN);
        e.fixed(&self.magic)
            .fixed(&self.volume_id)
            .u64(self.epoch)
            .fixed(&self.tag)
            .u64(self.segment);
        let crc = crc32c::crc32c(&e.0);
        e.u32(crc);
        e.0
    }

    /// The fields of `h` (the first `HEADER_LEN` bytes of a file), if its
    /// magic is a journal's and its CRC matches.
    fn decode(h: &[u8], path: &Path) -> Result<Header> {
        let bad = |why: &str| Error::Integrity(format!("journal {}: {why}", path.display()));
        if h.len() < HEADER_LEN || (&h[..8] != MAGIC && &h[..8] != MAGIC_V2) {
            return Err(bad("bad header (or the format of another version)"));
        }
        let mut d = Decoder::new(&h[..HEADER_LEN], "journal header");
        let header = Header {
            magic: d.array()?,
            volume_id: d.array()?,
            epoch: d.u64()?,
            tag: d.array()?,
            segment: d.u64()?,
        };
        if crc32c::crc32c(&h[..HEADER_LEN - 4]) != d.u32()? {
            return Err(bad("header checksum mismatch"));
        }
        d.finish()?;
        Ok(header)
    }
}

fn header_nonce(segment: u64) -> [u8; crate::store::keys::NONCE_LEN] {
    counter_nonce(domain::JOURNAL_HEADER, segment)
}

fn record_crc(kind: u8, offset: u64, len: u64, data: &[u8]) -> u32 {
    let mut h = Encoder::with_capacity(17);
    h.u8(kind).u64(offset).u64(len);
    crc32c::crc32c_append(crc32c::crc32c(&h.0), data)
}

/// Make the entries of `dir` (files created, renamed or removed) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
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

#[cfg(test)]
mod tests;
