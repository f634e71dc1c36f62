//! A journal segment file as the next server reads it after a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use zerofs_ublk::store::keys::{DataKey, SubKey, VolumeKeys};
use zerofs_ublk::volume::journal;

fn key() -> &'static SubKey {
    static KEY: OnceLock<SubKey> = OnceLock::new();
    KEY.get_or_init(|| journal::journal_key(&VolumeKeys::new([9; 16], DataKey::random()), 3, "t"))
}

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.journal");
    let owner = journal::Owner {
        volume_id: &[9; 16],
        epoch: 3,
        tag: &[5; 16],
        key: key(),
        plaintext_allowed: true,
    };
    for tail in [journal::Tail::Whole, journal::Tail::MayBeTorn] {
        let _ = journal::parse_segment(path, data, &owner, tail);
    }
    // The same bytes behind a valid header, so the record parser is reached
    // (records themselves only authenticate if encrypted under the key; the parser must
    // still never panic or over-allocate on them).
    let mut file = journal::header_for_fuzzing(&owner, 0);
    file.extend_from_slice(data);
    let _ = journal::parse_segment(path, &file, &owner, journal::Tail::MayBeTorn);
});
