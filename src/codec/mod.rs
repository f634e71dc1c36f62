//! The chunk codec: zstd, then AES-256-GCM.
//!
//! A frame is `AES-256-GCM(K_seg, nonce, aad, flag || payload)` where
//! - `K_seg` = HKDF(data key, salt = volume id, "segment-frames/<segment>"),
//! - nonce = (domain FRAME, frame offset in the segment): unique per frame,
//!   since frames of one segment never share an offset and a segment name
//!   is never reused for different content,
//! - aad = "frame" || volume id || chunk number || segment name || offset,
//!   so a frame moved to another chunk, segment, offset or volume fails,
//! - flag = 1 for zstd payload, 0 for raw (incompressible) payload.

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

fn aad(volume_id: &[u8; 16], segment: SegmentId, offset: u64, chunk: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(5 + 16 + 8 + 33 + 8);
    aad.extend_from_slice(b"frame");
    aad.extend_from_slice(volume_id);
    aad.extend_from_slice(&chunk.to_le_bytes());
    aad.extend_from_slice(segment.name().as_bytes());
    aad.extend_from_slice(&offset.to_le_bytes());
    aad
}

impl Codec {
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
            key: self.keys.subkey("segment-frames", &segment.name()),
        }
    }

    /// Compress (when it pays) and encrypt one chunk as the frame stored at
    /// `offset` of the key's segment.
    pub fn encode(&self, key: &FrameKey, offset: u64, chunk: u64, data: &[u8]) -> Vec<u8> {
        let plain = self.compress(data);
        self.seal(key, offset, chunk, &plain)
    }

    /// Bytes a frame of this plaintext takes.
    pub fn sealed_len(plain: &[u8]) -> usize {
        plain.len() + TAG_LEN
    }

    /// Encrypt a frame plaintext from `compress` for `offset` of the key's
    /// segment. Split from `compress` so a flush can compress in parallel,
    /// lay frames out, then encrypt in parallel.
    pub fn seal(&self, key: &FrameKey, offset: u64, chunk: u64, plain: &[u8]) -> Vec<u8> {
        let nonce = counter_nonce(domain::FRAME, offset);
        let aad = aad(&self.keys.volume_id, key.segment, offset, chunk);
        key.key.seal(&nonce, &aad, plain)
    }

    /// The frame plaintext: flag byte, then zstd output or the raw chunk.
    pub fn compress(&self, data: &[u8]) -> Vec<u8> {
        assert_eq!(data.len(), self.chunk_size, "whole chunks only");
        let mut plain = Vec::with_capacity(data.len() + 1 + TAG_LEN);
        plain.push(FLAG_ZSTD);
        let bound = zstd::zstd_safe::compress_bound(data.len());
        plain.resize(1 + bound, 0);
        let compressed = if self.looks_incompressible(data) {
            Err(std::io::Error::other("skipped"))
        } else {
            zstd::bulk::compress_to_buffer(data, &mut plain[1..], self.level)
        };
        match compressed {
            // Keep zstd only when it saves at least 1/64 of the chunk.
            Ok(n) if n < data.len() - data.len() / 64 => plain.truncate(1 + n),
            _ => {
                plain.clear();
                plain.push(FLAG_RAW);
                plain.extend_from_slice(data);
            }
        }
        plain
    }

    /// Compressing the first 4 KiB predicts the rest: random or already
    /// compressed data (media, encrypted files, compressed filesystems)
    /// then skips the full zstd attempt, which would be thrown away.
    fn looks_incompressible(&self, data: &[u8]) -> bool {
        const SAMPLE: usize = 4096;
        if data.len() <= 2 * SAMPLE {
            return false;
        }
        let mut out = [0u8; SAMPLE + 128];
        match zstd::bulk::compress_to_buffer(&data[..SAMPLE], &mut out, self.level) {
            Ok(n) => n >= SAMPLE - SAMPLE / 32,
            Err(_) => true,
        }
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
        let key = self.keys.subkey("segment-frames", &loc.segment.name());
        let nonce = counter_nonce(domain::FRAME, loc.offset as u64);
        let aad = aad(&self.keys.volume_id, loc.segment, loc.offset as u64, chunk);
        let mut plain = key
            .open(&nonce, &aad, frame)
            .ok_or_else(|| fail("frame failed authentication"))?;
        if plain.is_empty() {
            return Err(fail("empty frame"));
        }
        let data = match plain[0] {
            FLAG_RAW => {
                plain.remove(0);
                plain
            }
            FLAG_ZSTD => {
                let mut out = vec![0u8; self.chunk_size];
                let n = zstd::bulk::decompress_to_buffer(&plain[1..], &mut out)
                    .map_err(|e| fail(&format!("does not decompress ({e})")))?;
                out.truncate(n);
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
        assert_eq!(frame.len(), 1 + 4096 + TAG_LEN);
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
