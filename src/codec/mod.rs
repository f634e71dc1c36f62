//! The chunk codec: zstd, then AES-256-GCM.
//!
//! A frame is `flag || AES-256-GCM(K_seg, nonce, aad, payload)` where
//! - flag = 1 for a zstd payload, 0 for the raw chunk; 3 and 2 the same
//!   for a patch (some sectors of the chunk: `patch`, docs/rfcs/0007). It
//!   is stored in the clear (a frame's length already tells a raw chunk
//!   apart) but bound by the AAD, so flipping it fails authentication and
//!   a patch never passes for a chunk or the reverse. Outside the ciphertext,
//!   a raw frame decrypts in place into exactly the chunk's bytes: no shift,
//!   and a buffer of exactly the chunk size (no allocator slack held in the
//!   cache),
//! - `K_seg` = HKDF(data key, salt = volume id, "segment-frames/<segment>"),
//! - nonce = (domain FRAME, frame offset in the segment): unique per frame,
//!   since frames of one segment never share an offset and a segment name
//!   is never reused for different content,
//! - aad = "frame" || volume id || chunk number || segment name || offset ||
//!   flag, so a frame moved to another chunk, segment, offset or volume
//!   fails.
//!
//! Encryption and decryption work in place: a flush lays a whole segment
//! out first and encrypts each frame inside the object's own buffer, and a
//! read decrypts inside the buffer it returns. zstd contexts are kept per
//! thread rather than created per chunk.

use std::cell::RefCell;

use zstd::zstd_safe::{CCtx, DCtx};

use crate::error::{Error, Result};
use crate::store::keys::{SubKey, TAG_LEN, VolumeKeys, counter_nonce, domain};
use crate::store::{Loc, SegmentId};

pub mod patch;

const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;
const FLAG_PATCH_RAW: u8 = 2;
const FLAG_PATCH_ZSTD: u8 = 3;

#[derive(Clone)]
pub struct Codec {
    keys: VolumeKeys,
    level: i32,
    chunk_size: usize,
}

/// The frame key of one segment; derive once per segment, not per frame.
#[derive(Clone)]
pub struct FrameKey {
    segment: SegmentId,
    key: SubKey,
}

/// What a frame holds: a whole chunk, or a patch of some of its sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Chunk,
    Patch,
}

/// What compression decided for one frame's body (a chunk, or a patch's
/// body): store it raw, or these zstd bytes.
pub struct Plain {
    kind: FrameKind,
    raw_len: usize,
    zstd: Option<Vec<u8>>,
}

impl Plain {
    fn flag(&self) -> u8 {
        match (self.kind, self.zstd.is_some()) {
            (FrameKind::Chunk, false) => FLAG_RAW,
            (FrameKind::Chunk, true) => FLAG_ZSTD,
            (FrameKind::Patch, false) => FLAG_PATCH_RAW,
            (FrameKind::Patch, true) => FLAG_PATCH_ZSTD,
        }
    }

    pub fn kind(&self) -> FrameKind {
        self.kind
    }
}

thread_local! {
    /// zstd contexts cost more to create than to compress a small chunk.
    static ZSTD: RefCell<(CCtx<'static>, DCtx<'static>, Vec<u8>)> =
        RefCell::new((CCtx::create(), DCtx::create(), Vec::new()));
}

fn aad(volume_id: &[u8; 16], segment: SegmentId, offset: u64, chunk: u64, flag: u8) -> Vec<u8> {
    let mut aad = Vec::with_capacity(5 + 16 + 8 + 33 + 8 + 1);
    aad.extend_from_slice(b"frame");
    aad.extend_from_slice(volume_id);
    aad.extend_from_slice(&chunk.to_le_bytes());
    aad.extend_from_slice(segment.name().as_bytes());
    aad.extend_from_slice(&offset.to_le_bytes());
    aad.push(flag);
    aad
}

impl Codec {
    /// A frame with flag byte `flag` whose authenticated body is `body`
    /// (for the fuzz targets: lets them reach decompression).
    #[doc(hidden)]
    pub fn encrypt_frame_for_fuzzing(
        &self,
        loc: Loc,
        chunk: u64,
        flag: u8,
        body: &[u8],
    ) -> Vec<u8> {
        let (key, nonce, aad) = self.frame_crypto(loc, chunk, flag);
        let mut frame = vec![flag];
        frame.extend_from_slice(&key.encrypt(&nonce, &aad, body));
        frame
    }

    /// Key, nonce and AAD of the frame of `chunk` at `loc` with `flag`.
    fn frame_crypto(&self, loc: Loc, chunk: u64, flag: u8) -> (SubKey, [u8; 12], Vec<u8>) {
        let key = self
            .keys
            .segment_key("segment-frames", loc.segment.epoch, &loc.segment.name());
        let nonce = counter_nonce(domain::FRAME, loc.offset as u64);
        let aad = aad(
            &self.keys.volume_id,
            loc.segment,
            loc.offset as u64,
            chunk,
            flag,
        );
        (key, nonce, aad)
    }

    pub fn new(keys: VolumeKeys, level: i32, chunk_size: u32) -> Self {
        Codec {
            keys,
            level,
            chunk_size: chunk_size as usize,
        }
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    pub fn frame_key(&self, segment: SegmentId) -> FrameKey {
        FrameKey {
            segment,
            key: self
                .keys
                .segment_key("segment-frames", segment.epoch, &segment.name()),
        }
    }

    /// Compress (when it pays) and encrypt one chunk as the frame stored at
    /// `offset` of the key's segment.
    pub fn encode(&self, key: &FrameKey, offset: u64, chunk: u64, data: &[u8]) -> Vec<u8> {
        let plain = self.compress(data);
        let mut frame = vec![0u8; self.frame_len(&plain)];
        self.encrypt_into(key, offset, chunk, data, &plain, &mut frame);
        frame
    }

    /// Bytes the frame of a compressed body takes.
    pub fn frame_len(&self, plain: &Plain) -> usize {
        plain.zstd.as_ref().map_or(plain.raw_len, |z| z.len()) + 1 + TAG_LEN
    }

    /// Write the frame of `data` — a chunk, or a patch's body — (compressed
    /// as `plain` says) into `out`,
    /// which is exactly `frame_len` bytes at `offset` of the key's segment,
    /// and encrypt it there. Split from `compress` so a flush can compress
    /// in parallel, lay the segment out, then encrypt in parallel in place.
    pub fn encrypt_into(
        &self,
        key: &FrameKey,
        offset: u64,
        chunk: u64,
        data: &[u8],
        plain: &Plain,
        out: &mut [u8],
    ) {
        assert_eq!(out.len(), self.frame_len(plain), "frame buffer size");
        assert_eq!(data.len(), plain.raw_len, "the body compressed");
        let (flag, rest) = out.split_at_mut(1);
        let (payload, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        payload.copy_from_slice(plain.zstd.as_deref().unwrap_or(data));
        flag[0] = plain.flag();
        let nonce = counter_nonce(domain::FRAME, offset);
        let aad = aad(&self.keys.volume_id, key.segment, offset, chunk, flag[0]);
        tag.copy_from_slice(&key.key.encrypt_in_place(&nonce, &aad, payload));
    }

    /// Decide how a chunk is stored: zstd when it saves at least 1/64 of
    /// the chunk, raw otherwise.
    pub fn compress(&self, data: &[u8]) -> Plain {
        assert_eq!(data.len(), self.chunk_size, "whole chunks only");
        self.compress_body(FrameKind::Chunk, data)
    }

    /// `compress` for a patch's body (`patch::encode`).
    pub fn compress_patch(&self, body: &[u8]) -> Plain {
        self.compress_body(FrameKind::Patch, body)
    }

    fn compress_body(&self, kind: FrameKind, data: &[u8]) -> Plain {
        let raw = Plain {
            kind,
            raw_len: data.len(),
            zstd: None,
        };
        if self.looks_incompressible(data) {
            return raw;
        }
        ZSTD.with_borrow_mut(|(cctx, _, scratch)| {
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(data.len()));
            match cctx.compress(scratch, data, self.level) {
                Ok(n) if n < data.len() - data.len() / 64 => Plain {
                    zstd: Some(scratch[..n].to_vec()),
                    ..raw
                },
                _ => raw,
            }
        })
    }

    /// Compressing the first 4 KiB predicts the rest: random or already
    /// compressed data (media, encrypted files, compressed filesystems)
    /// then skips the full zstd attempt, which would be thrown away.
    fn looks_incompressible(&self, data: &[u8]) -> bool {
        const SAMPLE: usize = 4096;
        if data.len() <= 2 * SAMPLE {
            return false;
        }
        ZSTD.with_borrow_mut(|(cctx, _, scratch)| {
            scratch.clear();
            scratch.reserve(SAMPLE + 128);
            match cctx.compress(scratch, &data[..SAMPLE], self.level) {
                Ok(n) => n >= SAMPLE - SAMPLE / 32,
                Err(_) => true,
            }
        })
    }

    /// Authenticate, decrypt and decompress one chunk frame. Any failure
    /// (a patch frame too) is an integrity error naming the chunk; never
    /// data.
    pub fn decode(&self, loc: Loc, chunk: u64, frame: &[u8]) -> Result<Vec<u8>> {
        self.open(loc, chunk, frame, FrameKind::Chunk)
    }

    /// `decode` for a patch frame: its body, checked (`patch::apply` lays
    /// it over the chunk).
    pub fn decode_patch(&self, loc: Loc, chunk: u64, frame: &[u8]) -> Result<Vec<u8>> {
        self.open(loc, chunk, frame, FrameKind::Patch)
    }

    fn open(&self, loc: Loc, chunk: u64, frame: &[u8], kind: FrameKind) -> Result<Vec<u8>> {
        let fail = |why: &str| {
            let msg = format!(
                "chunk {chunk} (segment {}, offset {}): {why}",
                loc.segment, loc.offset
            );
            tracing::error!("integrity error: {msg}");
            Error::Integrity(msg)
        };
        if frame.len() < 1 + TAG_LEN {
            return Err(fail("frame shorter than its tag"));
        }
        let flag = frame[0];
        let (body, tag) = frame[1..].split_at(frame.len() - 1 - TAG_LEN);
        let (key, nonce, aad) = self.frame_crypto(loc, chunk, flag);
        let mut plain = body.to_vec();
        let tag = tag.try_into().expect("tag length");
        if !key.decrypt_in_place(&nonce, &aad, &mut plain, tag) {
            return Err(fail("frame failed authentication"));
        }
        let (is, zstd) = match flag {
            FLAG_RAW => (FrameKind::Chunk, false),
            FLAG_ZSTD => (FrameKind::Chunk, true),
            FLAG_PATCH_RAW => (FrameKind::Patch, false),
            FLAG_PATCH_ZSTD => (FrameKind::Patch, true),
            other => return Err(fail(&format!("unknown frame flag {other}"))),
        };
        if is != kind {
            return Err(fail(&format!(
                "a {is:?} frame where a {kind:?} was expected"
            )));
        }
        // A patch's body is at most a bitmap and every sector.
        let most = patch::body_len(self.chunk_size, self.chunk_size / patch::SECTOR);
        let data = match zstd {
            false => plain,
            true => {
                let mut out = Vec::with_capacity(match kind {
                    FrameKind::Chunk => self.chunk_size,
                    FrameKind::Patch => most,
                });
                ZSTD.with_borrow_mut(|(_, dctx, _)| dctx.decompress(&mut out, &plain))
                    .map_err(|code| {
                        fail(&format!(
                            "does not decompress ({})",
                            zstd::zstd_safe::get_error_name(code)
                        ))
                    })?;
                out
            }
        };
        match kind {
            FrameKind::Chunk if data.len() != self.chunk_size => Err(fail(&format!(
                "decodes to {} bytes, not a chunk",
                data.len()
            ))),
            FrameKind::Patch => match patch::check(&data, self.chunk_size) {
                Ok(()) => Ok(data),
                Err(why) => Err(fail(&why)),
            },
            FrameKind::Chunk => Ok(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::DataKey;

    fn codec() -> Codec {
        Codec::new(VolumeKeys::new([7; 16], DataKey::random()), 1, 4096)
    }

    const SEG: SegmentId = SegmentId { epoch: 1, seq: 2 };

    fn loc(offset: u32, len: usize) -> Loc {
        Loc {
            segment: SEG,
            offset,
            len: len as u32,
        }
    }

    #[test]
    fn roundtrip_compressible_and_random() {
        let c = codec();
        let key = c.frame_key(SEG);
        let zeros = vec![0u8; 4096];
        let random: Vec<u8> = (0..4096).map(|_| rand::random()).collect();
        for (i, data) in [zeros, random].iter().enumerate() {
            let frame = c.encode(&key, 100 * i as u64, 9, data);
            assert_eq!(
                &c.decode(loc(100 * i as u32, frame.len()), 9, &frame)
                    .unwrap(),
                data
            );
        }
    }

    #[test]
    fn compressible_tail_behind_a_random_head_still_roundtrips() {
        let c = Codec::new(VolumeKeys::new([7; 16], DataKey::random()), 1, 65536);
        let mut data: Vec<u8> = (0..4096).map(|_| rand::random()).collect();
        data.resize(65536, 0);
        let frame = c.encode(&c.frame_key(SEG), 0, 1, &data);
        assert_eq!(c.decode(loc(0, frame.len()), 1, &frame).unwrap(), data);
        let text = b"all work and no play ".repeat(4000)[..65536].to_vec();
        let frame = c.encode(&c.frame_key(SEG), 0, 2, &text);
        assert!(frame.len() < 8192, "text compresses: {}", frame.len());
    }

    #[test]
    fn incompressible_chunk_is_stored_raw() {
        let c = codec();
        let random: Vec<u8> = (0..4096).map(|_| rand::random()).collect();
        let frame = c.encode(&c.frame_key(SEG), 0, 1, &random);
        assert_eq!(frame.len(), 4096 + 1 + TAG_LEN);
    }

    /// A patch frame round-trips to its body, and is never taken for a
    /// chunk frame (nor a chunk frame for a patch): the flag is in the AAD.
    #[test]
    fn a_patch_is_not_a_chunk_and_a_chunk_is_not_a_patch() {
        let c = codec();
        let key = c.frame_key(SEG);
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let sectors: bit_set::BitSet = [2usize, 5].into_iter().collect();
        let body = patch::encode_chunk(&data, &sectors);
        let plain = c.compress_patch(&body);
        assert_eq!(plain.kind(), FrameKind::Patch);
        let mut frame = vec![0u8; c.frame_len(&plain)];
        c.encrypt_into(&key, 0, 9, &body, &plain, &mut frame);
        let l = loc(0, frame.len());
        assert_eq!(c.decode_patch(l, 9, &frame).unwrap(), body);
        assert!(matches!(c.decode(l, 9, &frame), Err(Error::Integrity(_))));
        let chunk = c.encode(&key, 0, 9, &data);
        let l = loc(0, chunk.len());
        assert!(matches!(
            c.decode_patch(l, 9, &chunk),
            Err(Error::Integrity(_))
        ));
        // Relabelling the flag fails authentication either way.
        let mut relabelled = frame.clone();
        relabelled[0] ^= 2;
        let l = loc(0, frame.len());
        assert!(c.decode(l, 9, &relabelled).is_err());
        assert!(c.decode_patch(l, 9, &relabelled).is_err());
    }

    #[test]
    fn moved_or_flipped_frame_fails() {
        let c = codec();
        let data = vec![5u8; 4096];
        let frame = c.encode(&c.frame_key(SEG), 64, 3, &data);
        let l = loc(64, frame.len());
        assert!(c.decode(l, 4, &frame).is_err(), "other chunk");
        assert!(
            c.decode(loc(0, frame.len()), 3, &frame).is_err(),
            "other offset"
        );
        let other_seg = Loc {
            segment: SegmentId { epoch: 1, seq: 3 },
            ..l
        };
        assert!(c.decode(other_seg, 3, &frame).is_err(), "other segment");
        for i in [0, frame.len() / 2, frame.len() - 1] {
            let mut bad = frame.clone();
            bad[i] ^= 1;
            assert!(matches!(c.decode(l, 3, &bad), Err(Error::Integrity(_))));
        }
    }
}
