//! The chunk codec: zstd, then AES-256-GCM.
//!
//! A frame is `flag || AES-256-GCM(K_seg, nonce, aad, payload)` where
//! - flag = 1 for a zstd payload, 0 for the raw chunk. It is stored in the
//!   clear (a frame's length already tells a raw chunk apart) but bound by
//!   the AAD, so flipping it fails authentication. Outside the ciphertext,
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

const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;

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

/// What compression decided for one chunk: store it raw, or these zstd
/// bytes.
pub enum Plain {
    Raw,
    Zstd(Vec<u8>),
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

    /// Bytes the frame of a compressed chunk takes.
    pub fn frame_len(&self, plain: &Plain) -> usize {
        let payload = match plain {
            Plain::Raw => self.chunk_size,
            Plain::Zstd(z) => z.len(),
        };
        payload + 1 + TAG_LEN
    }

    /// Write the frame of `data` (compressed as `plain` says) into `out`,
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
        let (flag, rest) = out.split_at_mut(1);
        let (payload, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        flag[0] = match plain {
            Plain::Raw => {
                payload.copy_from_slice(data);
                FLAG_RAW
            }
            Plain::Zstd(z) => {
                payload.copy_from_slice(z);
                FLAG_ZSTD
            }
        };
        let nonce = counter_nonce(domain::FRAME, offset);
        let aad = aad(&self.keys.volume_id, key.segment, offset, chunk, flag[0]);
        tag.copy_from_slice(&key.key.encrypt_in_place(&nonce, &aad, payload));
    }

    /// Decide how a chunk is stored: zstd when it saves at least 1/64 of
    /// the chunk, raw otherwise.
    pub fn compress(&self, data: &[u8]) -> Plain {
        assert_eq!(data.len(), self.chunk_size, "whole chunks only");
        if self.looks_incompressible(data) {
            return Plain::Raw;
        }
        ZSTD.with_borrow_mut(|(cctx, _, scratch)| {
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(data.len()));
            match cctx.compress(scratch, data, self.level) {
                Ok(n) if n < data.len() - data.len() / 64 => Plain::Zstd(scratch[..n].to_vec()),
                _ => Plain::Raw,
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

    /// Authenticate, decrypt and decompress one frame. Any failure is an
    /// integrity error naming the chunk; never data.
    pub fn decode(&self, loc: Loc, chunk: u64, frame: &[u8]) -> Result<Vec<u8>> {
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
        let data = match flag {
            FLAG_RAW => plain,
            FLAG_ZSTD => {
                let mut out = Vec::with_capacity(self.chunk_size);
                ZSTD.with_borrow_mut(|(_, dctx, _)| dctx.decompress(&mut out, &plain))
                    .map_err(|code| {
                        fail(&format!(
                            "does not decompress ({})",
                            zstd::zstd_safe::get_error_name(code)
                        ))
                    })?;
                out
            }
            other => return Err(fail(&format!("unknown frame flag {other}"))),
        };
        if data.len() != self.chunk_size {
            return Err(fail(&format!(
                "decodes to {} bytes, not a chunk",
                data.len()
            )));
        }
        Ok(data)
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
