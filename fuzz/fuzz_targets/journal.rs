//! A journal segment file as the next server reads it after a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zerofs_ublk::volume::journal;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.journal");
    for last in [false, true] {
        let _ = journal::parse_segment(path, data, &[9; 16], 3, &[5; 16], last);
    }
    // The same bytes behind a valid header, so the record parser is reached.
    let mut file = journal::header_for_fuzzing(&[9; 16], 3, &[5; 16], 0);
    file.extend_from_slice(data);
    let _ = journal::parse_segment(path, &file, &[9; 16], 3, &[5; 16], true);
});
