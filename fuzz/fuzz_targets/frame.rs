//! A frame, from the bucket or from the SSD cache tier (which stores frames
//! as they are in the bucket): raw bytes, and an arbitrary body that passes
//! authentication under any of the four flags (a chunk or a patch, raw or
//! zstd), so decompression and the patch parser see hostile input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::codec::Codec;
use zerofs_ublk::store::{Loc, SegmentId};
use zerofs_ublk::store::keys::{DataKey, VolumeKeys};

fuzz_target!(|data: &[u8]| {
    let codec = Codec::new(VolumeKeys::new([7; 16], DataKey::random()), 3, 64 << 10);
    let loc = Loc {
        segment: SegmentId { epoch: 1, seq: 2 },
        offset: 4096,
        len: data.len() as u32,
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let frame = if mode < 128 {
        rest.to_vec()
    } else {
        codec.encrypt_frame_for_fuzzing(loc, 11, mode & 3, rest)
    };
    if let Ok(plain) = codec.decode(loc, 11, &frame) {
        assert_eq!(plain.len(), 64 << 10, "a decoded frame is a whole chunk");
    }
    if let Ok(body) = codec.decode_patch(loc, 11, &frame) {
        let mut chunk = vec![0u8; 64 << 10];
        zerofs_ublk::codec::patch::apply(&body, &mut chunk);
    }
});
