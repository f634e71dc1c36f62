//! A segment's trailer (unauthenticated) and its table: raw bytes, and
//! arbitrary plaintext sealed under the volume's key (a writer with the key
//! and a bug, or an attacker who has it, must not crash a reader either).
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::store::SegmentId;
use zerofs_ublk::store::keys::{DataKey, VolumeKeys};
use zerofs_ublk::store::segment;

fuzz_target!(|data: &[u8]| {
    let keys = VolumeKeys::new([7; 16], DataKey::random());
    let id = SegmentId { epoch: 3, seq: 9 };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let frames_len = u64::from(mode) << 12;
    match mode % 3 {
        0 => {
            let _ = segment::table_range(id, rest, rest.len() as u64);
        }
        1 => {
            let _ = segment::decode_table(&keys, id, rest, frames_len);
        }
        _ => {
            let sealed = segment::encrypt_table_for_fuzzing(&keys, id, rest);
            let _ = segment::decode_table(&keys, id, &sealed, frames_len);
        }
    }
});
