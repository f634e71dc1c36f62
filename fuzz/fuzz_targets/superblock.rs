//! The superblock: the one object read before any key exists (public
//! parameters, KDF salt and cost, the wrapped data key). Unlocked with a
//! key file (HKDF), never a passphrase: Argon2 at the capped cost would
//! make each run take a second.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::store::keys::Secret;
use zerofs_ublk::store::superblock::Superblock;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        let secret = Secret::key_file(vec![1; 32]).expect("a valid key file");
        let _ = sb.unlock(&secret);
        let _ = sb.encode();
    }
});
