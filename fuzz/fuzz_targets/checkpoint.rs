//! A checkpoint (a root, or a whole index of formats 2 to 4) and an index
//! run: raw bytes, and arbitrary (compressed or not) plaintext encrypted
//! under the volume's key, so the decompression and the parsers see
//! hostile input that passes authentication.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::store::SegmentId;
use zerofs_ublk::store::checkpoint::{self, RunId, RunKind, RunRef};
use zerofs_ublk::store::keys::{DataKey, VolumeKeys};

fuzz_target!(|data: &[u8]| {
    let keys = VolumeKeys::new([7; 16], DataKey::random());
    let pos = SegmentId { epoch: 2, seq: 5 };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chunks = 1 + u64::from(mode & 0x3f) * 97;
    // Bit 7: an index run (bit 6: a delta) rather than a checkpoint.
    if mode & 0x80 != 0 {
        let run = RunId {
            position: pos,
            kind: if mode & 0x40 != 0 {
                RunKind::Delta
            } else {
                RunKind::Base
            },
            part: 3,
        };
        let object = match mode % 3 {
            0 => bytes::Bytes::copy_from_slice(rest),
            1 => checkpoint::encrypt_run_for_fuzzing(&keys, run, &zstd_compress(rest)),
            _ => checkpoint::encrypt_run_for_fuzzing(&keys, run, rest),
        };
        // The entry count as the root would say: what the plaintext's
        // count field holds, when it has one, so the parser goes deep.
        let entries = rest
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let named = RunRef {
            id: run,
            entries,
            size: object.len() as u64,
        };
        let _ = checkpoint::decode_run(&keys, &named, &object, chunks);
        return;
    }
    let object = match mode % 3 {
        0 => bytes::Bytes::copy_from_slice(rest),
        // Plaintext as the encoder makes it: zstd of the encoding.
        1 => checkpoint::encrypt_for_fuzzing(&keys, pos, &zstd_compress(rest)),
        // The compressed stream itself is hostile (bombs, bad frames).
        _ => checkpoint::encrypt_for_fuzzing(&keys, pos, rest),
    };
    let _ = checkpoint::decode(&keys, pos, &object, chunks);
});

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses any input")
}
