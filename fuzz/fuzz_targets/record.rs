//! Claims and seals (small JSON records, sealed with random nonces):
//! raw bytes, and arbitrary JSON that passes authentication.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::store::fencing::{Claim, Seal, SealChain, decrypt_record, encrypt_record_bytes};
use zerofs_ublk::store::keys::{DataKey, VolumeKeys};

fuzz_target!(|data: &[u8]| {
    let keys = VolumeKeys::new([7; 16], DataKey::random());
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        bytes::Bytes::copy_from_slice(rest)
    } else {
        encrypt_record_bytes(&keys, "seal", 4, rest)
    };
    let _ = decrypt_record::<Claim>(&keys, "seal", 4, &bytes).map(|c| c.describe());
    if let Ok(seal) = decrypt_record::<Seal>(&keys, "seal", 4, &bytes) {
        // What open does with seals: chain them and ask about segments.
        let chain = SealChain::from_seals([(4, seal)].into());
        let _ = chain.named_segments().count();
        let _ = chain.latest();
    }
});
