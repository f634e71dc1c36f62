//! Segments: immutable objects holding the frames written by one flush.
//!
//! Layout (table version 2; version 1, read still, has no patches):
//! ```text
//! frame 0 | frame 1 | … | table ciphertext | trailer (16 bytes)
//! trailer = table_len u32 LE | version u32 LE | magic "ZUBLKSEG"
//! ```
//! Frames start at offset 0 and are opaque here (the codec encrypts them).
//! The table lists every chunk the segment sets — with its frame's offset
//! and length, or length 0 for "this chunk is now zeros"; the length's top
//! bit marks a patch, laid over the chunk's frames before it
//! (docs/rfcs/0007) — plus the length
//! and CRC32C of the frame area. It is encrypted under a subkey bound to the
//! segment's name, so the index can be rebuilt from segments alone and a
//! segment cannot be renamed or moved to another volume.

use bytes::Bytes;

use super::index::Loc;
use super::keys::{SubKey, TAG_LEN, VolumeKeys, counter_nonce, domain};
use super::wire::{Decoder, Encoder};
use crate::error::{Error, Result};

/// A segment's identity: the writer epoch that wrote it and its sequence
/// number within that epoch. Ordered as the log is: by epoch, then seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub epoch: u64,
    pub seq: u64,
}

impl SegmentId {
    pub fn name(&self) -> String {
        format!("{:016x}-{:016x}", self.epoch, self.seq)
    }

    /// Parse `EEEE…-SSSS…` (the name part of a key).
    pub fn parse(name: &str) -> Option<Self> {
        let (e, s) = name.split_once('-')?;
        if e.len() != 16 || s.len() != 16 {
            return None;
        }
        Some(SegmentId {
            epoch: u64::from_str_radix(e, 16).ok()?,
            seq: u64::from_str_radix(s, 16).ok()?,
        })
    }
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

const MAGIC: &[u8; 8] = b"ZUBLKSEG";
const VERSION: u32 = 2;
/// Tables of this version hold no patch (formats 2 to 5).
const VERSION_WITHOUT_PATCHES: u32 = 1;
/// The top bit of an entry's length: the frame is a patch.
const PATCH_BIT: u32 = 1 << 31;
pub const TRAILER_LEN: usize = 16;
const ENTRY_LEN: usize = 16;
/// How much of a segment's tail one GET fetches to find its table.
pub const TAIL_READ: u64 = 64 * 1024;

/// One table entry: `len == 0` means the chunk was zeroed/discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    pub chunk: u64,
    pub offset: u32,
    pub len: u32,
    /// The frame is a patch (docs/rfcs/0007), not a whole chunk.
    pub patch: bool,
}

impl TableEntry {
    pub fn loc(&self, segment: SegmentId) -> Option<Loc> {
        (self.len > 0).then_some(Loc {
            segment,
            offset: self.offset,
            len: self.len,
        })
    }
}

fn table_key(keys: &VolumeKeys, id: SegmentId) -> SubKey {
    keys.segment_key("segment-table", id.epoch, &id.name())
}

/// Seal `plain` as segment `id`'s table: lets the fuzz targets feed the
/// table parser plaintext that passes authentication.
#[doc(hidden)]
pub fn encrypt_table_for_fuzzing(keys: &VolumeKeys, id: SegmentId, plain: &[u8]) -> Vec<u8> {
    table_key(keys, id).encrypt(
        &counter_nonce(domain::TABLE, 0),
        &table_aad(keys, id),
        plain,
    )
}

fn table_aad(keys: &VolumeKeys, id: SegmentId) -> Vec<u8> {
    let mut aad = b"segment-table".to_vec();
    aad.extend_from_slice(&keys.volume_id);
    aad.extend_from_slice(id.name().as_bytes());
    aad
}

/// One segment, laid out before its frames are written: a flush knows each
/// frame's size once the chunks are compressed, so it allocates the whole
/// object once (`object_len`) and the codec encrypts every frame in place
/// inside it (no per-frame buffers, no copy into the object).
pub struct SegmentLayout {
    pub id: SegmentId,
    frames_len: usize,
    entries: Vec<TableEntry>,
}

/// Plaintext bytes of a table with `entries` entries.
fn table_plain_len(entries: usize) -> usize {
    4 + 8 + entries * ENTRY_LEN + 8 + 4
}

impl SegmentLayout {
    pub fn new(id: SegmentId) -> Self {
        SegmentLayout {
            id,
            frames_len: 0,
            entries: Vec::new(),
        }
    }

    /// Bytes of frames so far: where the next frame goes.
    pub fn frames_len(&self) -> usize {
        self.frames_len
    }

    /// Reserve the next `len` bytes for the frame of `chunk` (a patch when
    /// `patch`).
    pub fn add_frame(&mut self, chunk: u64, len: usize, patch: bool) -> Loc {
        let offset = u32::try_from(self.frames_len).expect("segments stay below 4 GiB");
        let len = u32::try_from(len).expect("frame below 4 GiB");
        assert!(
            len > 0 && len < PATCH_BIT,
            "frames are never empty, nor 2 GiB"
        );
        self.frames_len += len as usize;
        self.entries.push(TableEntry {
            chunk,
            offset,
            len,
            patch,
        });
        Loc {
            segment: self.id,
            offset,
            len,
        }
    }

    /// Record that `chunk` is now zeros (no frame).
    pub fn add_zero(&mut self, chunk: u64) {
        self.entries.push(TableEntry {
            chunk,
            offset: 0,
            len: 0,
            patch: false,
        });
    }

    /// The whole object's size: frames, encrypted table, trailer.
    pub fn object_len(&self) -> usize {
        self.frames_len + table_plain_len(self.entries.len()) + TAG_LEN + TRAILER_LEN
    }

    /// Given the object buffer (`object_len` bytes) with every frame
    /// written, encrypt the table into its tail and produce the object.
    pub fn finish(self, keys: &VolumeKeys, mut object: Vec<u8>) -> Bytes {
        assert_eq!(object.len(), self.object_len(), "segment buffer size");
        let (frames, tail) = object.split_at_mut(self.frames_len);
        let mut table = Encoder::with_capacity(table_plain_len(self.entries.len()));
        table.u32(VERSION).u64(self.entries.len() as u64);
        for e in &self.entries {
            let len = if e.patch { e.len | PATCH_BIT } else { e.len };
            table.u64(e.chunk).u32(e.offset).u32(len);
        }
        table
            .u64(self.frames_len as u64)
            .u32(crc32c::crc32c(frames));
        let (encrypted, trailer) = tail.split_at_mut(tail.len() - TRAILER_LEN);
        let (body, tag) = encrypted.split_at_mut(encrypted.len() - TAG_LEN);
        body.copy_from_slice(&table.0);
        tag.copy_from_slice(&table_key(keys, self.id).encrypt_in_place(
            &counter_nonce(domain::TABLE, 0),
            &table_aad(keys, self.id),
            body,
        ));
        let encrypted_len = encrypted.len() as u32;
        trailer[..4].copy_from_slice(&encrypted_len.to_le_bytes());
        trailer[4..8].copy_from_slice(&VERSION.to_le_bytes());
        trailer[8..].copy_from_slice(MAGIC);
        Bytes::from(object)
    }
}

/// Where a segment's table lies, from its trailer: (offset, len).
pub fn table_range(id: SegmentId, tail: &[u8], object_len: u64) -> Result<(u64, u64)> {
    let bad = |why: &str| Error::Integrity(format!("segment {id}: {why}"));
    if tail.len() < TRAILER_LEN {
        return Err(bad("shorter than its trailer"));
    }
    let trailer = &tail[tail.len() - TRAILER_LEN..];
    if &trailer[8..] != MAGIC {
        return Err(bad("bad trailer magic"));
    }
    let version = u32::from_le_bytes(trailer[4..8].try_into().expect("4"));
    if version != VERSION && version != VERSION_WITHOUT_PATCHES {
        return Err(bad(&format!("unsupported segment version {version}")));
    }
    let table_len = u32::from_le_bytes(trailer[..4].try_into().expect("4")) as u64;
    let table_end = object_len - TRAILER_LEN as u64;
    if table_len > table_end {
        return Err(bad("table longer than the object"));
    }
    Ok((table_end - table_len, table_len))
}

/// Decrypt and check a segment's table. `frames_len` is where the table
/// starts, which must match what the table itself says.
pub fn decode_table(
    keys: &VolumeKeys,
    id: SegmentId,
    encrypted: &[u8],
    frames_len: u64,
) -> Result<(Vec<TableEntry>, u32)> {
    let plain = table_key(keys, id)
        .decrypt(
            &counter_nonce(domain::TABLE, 0),
            &table_aad(keys, id),
            encrypted,
        )
        .ok_or_else(|| Error::Integrity(format!("segment {id}: table failed authentication")))?;
    let mut d = Decoder::new(&plain, "segment table");
    let version = d.u32()?;
    if version != VERSION && version != VERSION_WITHOUT_PATCHES {
        return Err(Error::Integrity(format!(
            "segment {id}: table version mismatch"
        )));
    }
    let n = d.count(ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let (chunk, offset, len) = (d.u64()?, d.u32()?, d.u32()?);
        let patch = version == VERSION && len & PATCH_BIT != 0;
        let e = TableEntry {
            chunk,
            offset,
            len: if patch { len & !PATCH_BIT } else { len },
            patch,
        };
        if patch && e.len == 0 {
            return Err(Error::Integrity(format!(
                "segment {id}: an empty patch of chunk {chunk}"
            )));
        }
        if e.len > 0 && e.offset as u64 + e.len as u64 > frames_len {
            return Err(Error::Integrity(format!(
                "segment {id}: frame of chunk {} lies outside the frame area",
                e.chunk
            )));
        }
        entries.push(e);
    }
    let stated_len = d.u64()?;
    let crc = d.u32()?;
    d.finish()?;
    if stated_len != frames_len {
        return Err(Error::Integrity(format!(
            "segment {id}: frame area is {frames_len} bytes, table says {stated_len}"
        )));
    }
    Ok((entries, crc))
}
