//! A checkpoint: raw bytes, and arbitrary (compressed or not) plaintext
//! encrypted under the volume's key, so the decompression and the index
//! parser see hostile input that passes authentication.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::store::checkpoint;
use zerofs_ublk::store::SegmentId;
use zerofs_ublk::store::keys::{DataKey, VolumeKeys};

fuzz_target!(|data: &[u8]| {
    let keys = VolumeKeys::new([7; 16], DataKey::random());
    let pos = SegmentId { epoch: 2, seq: 5 };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chunks = 1 + u64::from(mode) * 97;
    let object = match mode % 3 {
        0 => bytes::Bytes::copy_from_slice(rest),
        // Plaintext as the encoder makes it: zstd of the index encoding.
        1 => checkpoint::encrypt_for_fuzzing(
            &keys,
            pos,
            &zstd_compress(rest),
        ),
        // The compressed stream itself is hostile (bombs, bad frames).
        _ => checkpoint::encrypt_for_fuzzing(&keys, pos, rest),
    };
    let _ = checkpoint::decode(&keys, pos, &object, chunks);
});

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses any input")
}
