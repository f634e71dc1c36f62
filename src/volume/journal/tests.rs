//! The journal's unit tests: writer, reader and recovery together.

use std::io::Write;
use std::path::Path;

use super::*;

const TAG: ClaimTag = [7; 16];

fn key() -> &'static SubKey {
    static KEY: std::sync::OnceLock<SubKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let keys = VolumeKeys::new([3; 16], crate::store::keys::DataKey::random());
        journal_key(&keys, 1, "token")
    })
}

fn read_with(
    path: &Path,
    id: &[u8; 16],
    epoch: u64,
    tag: &ClaimTag,
    key: &SubKey,
    tail: Tail,
) -> Result<Vec<Record<'static>>> {
    let owner = Owner {
        volume_id: id,
        epoch,
        tag,
        key,
        plaintext_allowed: true,
    };
    read_segment(path, &owner, tail)?.collect()
}

fn read_all(
    path: &Path,
    id: &[u8; 16],
    epoch: u64,
    tag: &ClaimTag,
    tail: Tail,
) -> Result<Vec<Record<'static>>> {
    read_with(path, id, epoch, tag, key(), tail)
}

#[test]
fn records_are_encrypted_and_bound_to_the_claims_key() {
    let dir = tempfile::tempdir().unwrap();
    let id = [3u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 4, TAG, key().clone(), Durability::Process).unwrap();
    let secret = b"plaintext that must not reach tmpfs or swap".repeat(40);
    let rec = Record::Data {
        offset: 8192,
        data: Cow::Owned(secret.clone()),
    };
    j.append(&rec).unwrap();
    let path = j.path();
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        !on_disk.windows(24).any(|w| w == &secret[..24]),
        "the record's data is in the file in the clear"
    );
    assert_eq!(
        read_all(&path, &id, 4, &TAG, Tail::MayBeTorn).unwrap(),
        vec![rec]
    );
    // Another claim's key: a loud error, not an empty (torn) replay.
    let other = journal_key(
        &VolumeKeys::new(id, crate::store::keys::DataKey::random()),
        4,
        "token",
    );
    let err = read_with(&path, &id, 4, &TAG, &other, Tail::MayBeTorn).unwrap_err();
    assert!(err.to_string().contains("journal key"), "{err}");
}

#[test]
fn a_failed_append_never_gives_its_nonce_to_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let id = [3u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 4, TAG, key().clone(), Durability::Process).unwrap();
    j.short_write = Some(30);
    let a = Record::Data {
        offset: 0,
        data: Cow::Owned(vec![1u8; 512]),
    };
    assert!(j.append(&a).is_err());
    let b = Record::Data {
        offset: 0,
        data: Cow::Owned(vec![2u8; 512]),
    };
    j.append(&b).unwrap();
    let on_disk = std::fs::read(j.path()).unwrap();
    let counter = u64::from_le_bytes(on_disk[HEADER_V3 + 17..HEADER_V3 + 25].try_into().unwrap());
    assert_eq!(
        counter, 1,
        "the record after a failed append reused nonce 0"
    );
    assert_eq!(
        read_all(&j.path(), &id, 4, &TAG, Tail::MayBeTorn).unwrap(),
        vec![b]
    );
}

/// A journal written by the previous format (plaintext records with a
/// CRC) is still replayed: a server upgraded while a device is live
/// must not lose what the old one acknowledged.
#[test]
fn format_2_journals_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let id = [3u8; 16];
    let path = dir.path().join("v2.journal");
    let mut bytes = MAGIC_V2.to_vec();
    bytes.extend_from_slice(&id);
    bytes.extend_from_slice(&5u64.to_le_bytes());
    bytes.extend_from_slice(&TAG);
    bytes.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let data = vec![7u8; 1024];
    bytes.push(KIND_DATA);
    bytes.extend_from_slice(&4096u64.to_le_bytes());
    bytes.extend_from_slice(&1024u64.to_le_bytes());
    bytes.extend_from_slice(&record_crc(KIND_DATA, 4096, 1024, &data).to_le_bytes());
    bytes.extend_from_slice(&data);
    bytes.push(KIND_ZEROES);
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&512u64.to_le_bytes());
    bytes.extend_from_slice(&record_crc(KIND_ZEROES, 0, 512, &[]).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    // Only for a claim of a format-2 build: under any other, plaintext
    // records are a forgery.
    let format3_claim = Owner {
        volume_id: &id,
        epoch: 5,
        tag: &TAG,
        key: key(),
        plaintext_allowed: false,
    };
    let err = read_segment(&path, &format3_claim, Tail::MayBeTorn)
        .err()
        .unwrap();
    assert!(err.to_string().contains("plaintext"), "{err}");
    assert_eq!(
        read_all(&path, &id, 5, &TAG, Tail::MayBeTorn).unwrap(),
        vec![
            Record::Data {
                offset: 4096,
                data: Cow::Owned(data)
            },
            Record::Zeroes {
                offset: 0,
                len: 512
            }
        ]
    );
}

#[test]
fn the_budget_is_twice_the_dirty_limit_but_at_most_half_the_free_space() {
    let dir = Path::new("/run/x");
    let mib = 1u64 << 20;
    assert_eq!(
        budget(dir, 4096 * mib, 256 * mib, 128 << 10).unwrap(),
        512 * mib
    );
    assert_eq!(
        budget(dir, 300 * mib, 256 * mib, 128 << 10).unwrap(),
        150 * mib
    );
    let err = budget(dir, mib, 256 * mib, 128 << 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/run/x") && err.contains("ZEROFS_UBLK_RUN_DIR"),
        "{err}"
    );
}

#[test]
fn free_bytes_reads_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    assert!(free_bytes(dir.path()).unwrap() > 0);
    assert!(free_bytes(&dir.path().join("missing")).is_err());
}

#[test]
fn a_corrupt_length_is_a_torn_record_not_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let id = [3u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 2, TAG, key().clone(), Durability::Process).unwrap();
    let a = Record::Zeroes {
        offset: 0,
        len: 4096,
    };
    j.append(&a).unwrap();
    let path = j.path();
    // A whole record header (kind, offset, len, counter, tag) whose
    // data claims 2^60 bytes.
    let mut rec = vec![KIND_DATA];
    rec.extend_from_slice(&0u64.to_le_bytes());
    rec.extend_from_slice(&(1u64 << 60).to_le_bytes());
    rec.extend_from_slice(&1u64.to_le_bytes());
    rec.extend_from_slice(&[0u8; TAG_LEN]);
    assert_eq!(rec.len(), RECORD_HEADER);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&rec)
        .unwrap();
    assert_eq!(
        read_all(&path, &id, 2, &TAG, Tail::MayBeTorn).unwrap(),
        vec![a]
    );
    assert!(read_all(&path, &id, 2, &TAG, Tail::Whole).is_err());
}

#[test]
fn records_roundtrip_and_torn_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let id = [3u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 7, TAG, key().clone(), Durability::Process).unwrap();
    let a = Record::Data {
        offset: 4096,
        data: vec![9; 1000].into(),
    };
    let z = Record::Zeroes {
        offset: 0,
        len: 512,
    };
    j.append(&a).unwrap();
    j.append(&z).unwrap();
    let files = find(dir.path(), &id);
    assert_eq!(files.len(), 1);
    let path = &files[0].path;
    assert_eq!(
        read_all(path, &id, 7, &TAG, Tail::MayBeTorn).unwrap(),
        vec![a.clone(), z.clone()]
    );
    // A torn append (process killed mid-write) is dropped, not misread.
    let full = std::fs::read(path).unwrap();
    std::fs::write(path, &full[..full.len() - 10]).unwrap();
    assert_eq!(
        read_all(path, &id, 7, &TAG, Tail::MayBeTorn).unwrap(),
        vec![a]
    );
    assert!(read_all(path, &id, 7, &TAG, Tail::Whole).is_err());
    assert!(
        read_all(path, &[4u8; 16], 7, &TAG, Tail::MayBeTorn).is_err(),
        "other volume"
    );
    assert!(
        read_all(path, &id, 8, &TAG, Tail::MayBeTorn).is_err(),
        "other epoch"
    );
    assert!(
        read_all(path, &id, 7, &[8; 16], Tail::MayBeTorn).is_err(),
        "other claim (a copy of the bucket)"
    );
}

#[test]
fn rotation_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let id = [5u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 1, TAG, key().clone(), Durability::Process).unwrap();
    j.append(&Record::Zeroes {
        offset: 0,
        len: 512,
    })
    .unwrap();
    let covered = j.rotate().unwrap();
    j.append(&Record::Zeroes {
        offset: 512,
        len: 512,
    })
    .unwrap();
    assert_eq!(find(dir.path(), &id).len(), 2);
    j.release_now(covered);
    let left = find(dir.path(), &id);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].segment, 1);
    j.remove();
    assert!(find(dir.path(), &id).is_empty());
}

#[test]
fn journal_is_private_to_its_owner() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("journal");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let id = [6u8; 16];
    let mut j = Journal::create(&dir, &id, 1, TAG, key().clone(), Durability::Process).unwrap();
    j.rotate().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "an existing 0755 directory is narrowed");
    for Found { path, .. } in find(&dir, &id) {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[test]
fn a_torn_record_that_could_not_be_cut_back_blocks_appends_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let id = [6u8; 16];
    let rec = |seed: u8| Record::Data {
        offset: seed as u64 * 4096,
        data: vec![seed; 4096].into(),
    };
    let mut j =
        Journal::create(dir.path(), &id, 3, TAG, key().clone(), Durability::Process).unwrap();
    j.append(&rec(1)).unwrap();
    j.short_write = Some(100);
    j.fail_undo = true;
    assert!(j.append(&rec(2)).is_err());
    assert!(j.append(&rec(3)).is_err(), "nothing after a torn record");
    // A flush starts: later records would go to segment 1, after the
    // torn one in segment 0 — replay would refuse them. Still refused.
    let next = j.rotate().unwrap();
    assert!(j.append(&rec(4)).is_err(), "segment 0 is still torn");
    // The flush made segment 0 durable and obsolete: appends resume.
    j.release_now(next);
    j.append(&rec(5)).unwrap();
    let found = find(dir.path(), &id);
    assert_eq!(found.len(), 1);
    assert_eq!(
        read_all(&found[0].path, &id, 3, &TAG, Tail::MayBeTorn).unwrap(),
        vec![rec(5)]
    );
}

#[test]
fn a_crash_while_rotating_leaves_a_readable_journal() {
    let dir = tempfile::tempdir().unwrap();
    let id = [5u8; 16];
    let rec = Record::Data {
        offset: 4096,
        data: vec![1; 4096].into(),
    };
    let mut j =
        Journal::create(dir.path(), &id, 3, TAG, key().clone(), Durability::Process).unwrap();
    j.append(&rec).unwrap();
    CRASH_AFTER_CREATE.with(|c| c.set(true));
    assert!(j.rotate().is_err());
    // The process is gone here; the next server finds what is on disk.
    let found = find(dir.path(), &id);
    assert_eq!(found.len(), 1, "{found:?}");
    let Found {
        epoch,
        tag,
        segment,
        path,
    } = &found[0];
    assert_eq!((*epoch, *tag, *segment), (3, Some(TAG), 0));
    assert_eq!(read_tag(path).unwrap(), TAG);
    assert_eq!(
        read_all(path, &id, 3, &TAG, Tail::MayBeTorn).unwrap(),
        vec![rec]
    );
    let leftovers = || std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers(), 2, "segment 0 and the unfinished segment 1");
    remove_unfinished(dir.path(), &id, 3);
    assert_eq!(
        leftovers(),
        2,
        "epoch 3's own files are not touched by epoch 3"
    );
    remove_unfinished(dir.path(), &id, 4);
    assert_eq!(leftovers(), 1);
}

#[test]
fn a_failed_append_leaves_no_torn_record_before_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let id = [9u8; 16];
    let mut j =
        Journal::create(dir.path(), &id, 3, TAG, key().clone(), Durability::Process).unwrap();
    let rec = |seed: u8, len: usize| Record::Data {
        offset: seed as u64 * 65536,
        data: vec![seed; len].into(),
    };
    let (rec1, rec3) = (rec(1, 4096), rec(3, 4096));
    j.append(&rec1).unwrap();
    // ENOSPC after 6000 bytes of an 8 KiB record: more than record 3
    // covers, so bytes left behind would follow it in the file.
    j.short_write = Some(6000);
    assert!(j.append(&rec(2, 8192)).is_err());
    j.append(&rec3).unwrap(); // acknowledged after the failure
    let path = &find(dir.path(), &id)[0].path;
    // Not the last segment: any torn record would be an error, and
    // record 3 must not be lost behind record 2's remains.
    assert_eq!(
        read_all(path, &id, 3, &TAG, Tail::Whole).unwrap(),
        vec![rec1, rec3]
    );
}

/// The header's bytes stay where format 3 put them (journals written by an
/// older build are replayed by a newer one): magic, volume id, epoch, claim
/// tag, segment, CRC of those, then the key check.
#[test]
fn the_header_layout_is_format_3s() {
    let id = [3u8; 16];
    let owner = Owner {
        volume_id: &id,
        epoch: 0x0102_0304_0506_0708,
        tag: &TAG,
        key: key(),
        plaintext_allowed: false,
    };
    let h = header(&owner, 0x1122_3344);
    assert_eq!(h.len(), HEADER_V3);
    assert_eq!(&h[..8], b"ZUBLKJN3");
    assert_eq!(h[8..24], id);
    assert_eq!(h[24..32], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(h[32..48], TAG);
    assert_eq!(h[48..56], 0x1122_3344u64.to_le_bytes());
    assert_eq!(h[56..60], crc32c::crc32c(&h[..56]).to_le_bytes());
    let decoded = Header::decode(&h[..HEADER_LEN], Path::new("x")).unwrap();
    assert_eq!((decoded.epoch, decoded.segment), (owner.epoch, 0x1122_3344));
    let mut bad = h.clone();
    bad[30] ^= 1;
    assert!(
        Header::decode(&bad[..HEADER_LEN], Path::new("x")).is_err(),
        "CRC"
    );
    assert!(
        Header::decode(&h[..HEADER_LEN - 1], Path::new("x")).is_err(),
        "short"
    );
}
