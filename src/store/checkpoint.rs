//! Checkpoints: the whole index as of one log position, so recovery replays
//! only the segments written after it.
//!
//! Object `checkpoints/<epoch>-<seq>` (the position of the last segment it
//! includes) = magic "ZUBLKCKP" | ciphertext of zstd(table), where the
//! table (format version 1) is:
//! `version u32 | segments: count u64, (epoch u64, seq u64)* |
//!  entries: count u64, (chunk u64, segment-ordinal u32, offset u32, len u32)*`.
//! The subkey and AAD are bound to the checkpoint's name.

use bytes::Bytes;

use super::index::{Index, Loc};
use super::keys::{VolumeKeys, counter_nonce, domain};
use super::segment::SegmentId;
use super::wire::{Decoder, Encoder};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"ZUBLKCKP";
const VERSION: u32 = 1;
/// Decompressed checkpoints larger than this are refused as corrupt
/// (≈ 200 M chunk entries: 25 TiB of written 128 KiB chunks).
const MAX_PLAIN: usize = 4 << 30;

fn aad(keys: &VolumeKeys, position: SegmentId) -> Vec<u8> {
    let mut aad = b"checkpoint".to_vec();
    aad.extend_from_slice(&keys.volume_id);
    aad.extend_from_slice(position.name().as_bytes());
    aad
}

/// A checkpoint object whose encrypted content is `compressed` (for the fuzz
/// targets: plaintext that passes authentication).
#[doc(hidden)]
pub fn encrypt_for_fuzzing(keys: &VolumeKeys, position: SegmentId, compressed: &[u8]) -> Bytes {
    let encrypted = keys
        .segment_key("checkpoint", position.epoch, &position.name())
        .encrypt(
            &counter_nonce(domain::TABLE, 0),
            &aad(keys, position),
            compressed,
        );
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&encrypted);
    Bytes::from(out)
}

pub fn encode(keys: &VolumeKeys, position: SegmentId, index: &Index) -> Bytes {
    let mut segments: Vec<SegmentId> = index.live_segments().keys().copied().collect();
    segments.sort();
    let ordinal: std::collections::HashMap<SegmentId, u32> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i as u32))
        .collect();
    let mut e = Encoder::with_capacity(32 + segments.len() * 16 + index.len() * 20);
    e.u32(VERSION).u64(segments.len() as u64);
    for s in &segments {
        e.u64(s.epoch).u64(s.seq);
    }
    e.u64(index.len() as u64);
    for (chunk, loc) in index.iter() {
        e.u64(chunk)
            .u32(ordinal[&loc.segment])
            .u32(loc.offset)
            .u32(loc.len);
    }
    let compressed = zstd::bulk::compress(&e.0, 3).expect("zstd compress to memory");
    let encrypted = keys
        .segment_key("checkpoint", position.epoch, &position.name())
        .encrypt(
            &counter_nonce(domain::TABLE, 0),
            &aad(keys, position),
            &compressed,
        );
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&encrypted);
    Bytes::from(out)
}

pub fn decode(keys: &VolumeKeys, position: SegmentId, bytes: &[u8], chunks: u64) -> Result<Index> {
    let bad = |why: &str| Error::Integrity(format!("checkpoint {position}: {why}"));
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("bad magic"));
    }
    let compressed = keys
        .segment_key("checkpoint", position.epoch, &position.name())
        .decrypt(
            &counter_nonce(domain::TABLE, 0),
            &aad(keys, position),
            &bytes[MAGIC.len()..],
        )
        .ok_or_else(|| bad("failed authentication"))?;
    // Allocate what the frame declares, and only if a checkpoint of this
    // volume could be that large: at most every chunk mapped, each in its
    // own segment (a 20-byte entry and a 16-byte segment id), plus the
    // header. (It allocated MAX_PLAIN, 4 GiB, for every checkpoint.)
    let most = MAX_PLAIN
        .min(usize::try_from(chunks.saturating_mul(36).saturating_add(20)).unwrap_or(usize::MAX));
    let declared = match zstd::zstd_safe::get_frame_content_size(&compressed) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(bad("its compressed form does not declare its size")),
        Err(_) => return Err(bad("does not decompress (bad zstd frame header)")),
    };
    if declared > most as u64 {
        return Err(bad(&format!(
            "declares {declared} bytes, more than a checkpoint of {chunks} chunks can hold"
        )));
    }
    let plain = zstd::bulk::decompress(&compressed, declared as usize)
        .map_err(|e| bad(&format!("does not decompress ({e})")))?;
    let mut d = Decoder::new(&plain, "checkpoint");
    if d.u32()? != VERSION {
        return Err(bad("unsupported version"));
    }
    let n_segments = d.count(16)?;
    let mut segments = Vec::with_capacity(n_segments);
    for _ in 0..n_segments {
        segments.push(SegmentId {
            epoch: d.u64()?,
            seq: d.u64()?,
        });
    }
    let n = d.count(20)?;
    let mut index = Index::default();
    for _ in 0..n {
        let chunk = d.u64()?;
        let ordinal = d.u32()? as usize;
        let (offset, len) = (d.u32()?, d.u32()?);
        let segment = *segments
            .get(ordinal)
            .ok_or_else(|| bad("entry names a missing segment"))?;
        Index::check_chunk(chunk, chunks, "checkpoint")?;
        index.set(
            chunk,
            Some(Loc {
                segment,
                offset,
                len,
            }),
        );
    }
    d.finish()?;
    Ok(index)
}
