//! Tampering: one flipped, moved or foreign byte in any object is an
//! integrity error, never different data.

mod common;

use zerofs_ublk::store::fencing::is_fence;

use zerofs_ublk::store::paths;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use zerofs_ublk::Error;
use zerofs_ublk::store::backend::{DynStore, MemoryStore};
use zerofs_ublk::store::{Loc, SegmentId};
use zerofs_ublk::volume::Volume;

fn store_with_raw() -> (MemoryStore, DynStore) {
    let mem = MemoryStore::new();
    let store: DynStore = Arc::new(mem.clone());
    (mem, store)
}

fn flip(mem: &MemoryStore, key: &str, at: usize) {
    let objects = mem.raw_objects();
    let mut objects = objects.lock();
    let data = objects
        .get_mut(key)
        .unwrap_or_else(|| panic!("{key} exists"));
    let mut bytes = data.to_vec();
    bytes[at] ^= 0x01;
    *data = Bytes::from(bytes);
}

fn keys_with_prefix(mem: &MemoryStore, prefix: &str) -> Vec<String> {
    mem.raw_objects()
        .lock()
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

async fn open(store: &DynStore) -> Result<Volume, Error> {
    Volume::open(store.clone(), &secret(), writer(true), test_config()).await
}

/// Two chunks of random (incompressible: equal-length frames) data,
/// flushed and closed cleanly. Returns their locations.
async fn two_chunks(store: &DynStore) -> (Loc, Loc) {
    let vol = create_and_open(store, 8).await;
    vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    vol.write(CHUNK as u64, &pattern(2, CHUNK as usize))
        .await
        .unwrap();
    vol.flush().await.unwrap();
    let index = vol.index_snapshot();
    vol.close().await.unwrap();
    (index.get(0).unwrap().last(), index.get(1).unwrap().last())
}

fn assert_integrity<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::Integrity(msg)) => assert!(msg.contains(needle), "{msg:?} names {needle:?}"),
        other => panic!("expected an integrity error naming {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn flipped_frame_byte_fails_that_chunk_only() {
    let (mem, store) = store_with_raw();
    let (loc0, _) = two_chunks(&store).await;
    for at in [0, loc0.len as usize / 2, loc0.len as usize - 1] {
        flip(
            &mem,
            &paths::segment(loc0.segment),
            loc0.offset as usize + at,
        );
        let vol = open(&store).await.unwrap();
        assert_integrity(vol.read(0, 512).await, "chunk 0");
        assert_eq!(
            vol.read(CHUNK as u64, CHUNK as usize).await.unwrap(),
            pattern(2, CHUNK as usize),
            "other chunks still read"
        );
        drop(vol);
        flip(
            &mem,
            &paths::segment(loc0.segment),
            loc0.offset as usize + at,
        );
    }
}

#[tokio::test]
async fn swapped_frames_fail_to_decrypt() {
    let (mem, store) = store_with_raw();
    let (loc0, loc1) = two_chunks(&store).await;
    assert_eq!(loc0.len, loc1.len);
    {
        let objects = mem.raw_objects();
        let mut objects = objects.lock();
        let seg = objects.get_mut(&paths::segment(loc0.segment)).unwrap();
        let mut b = seg.to_vec();
        let (a, c) = (loc0.offset as usize, loc1.offset as usize);
        let n = loc0.len as usize;
        let f0 = b[a..a + n].to_vec();
        b.copy_within(c..c + n, a);
        b[c..c + n].copy_from_slice(&f0);
        *seg = Bytes::from(b);
    }
    let vol = open(&store).await.unwrap();
    assert_integrity(vol.read(0, 512).await, "chunk 0");
    assert_integrity(vol.read(CHUNK as u64, 512).await, "chunk 1");
}

#[tokio::test]
async fn flipped_segment_table_fails_recovery() {
    let (mem, store) = store_with_raw();
    let vol = create_and_open(&store, 8).await;
    vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    vol.flush().await.unwrap();
    drop(vol); // crash: no checkpoint, recovery must replay the table
    let seg = keys_with_prefix(&mem, "segments/").pop().unwrap();
    let len = mem.raw_objects().lock()[&seg].len();
    flip(&mem, &seg, len - 20); // inside the sealed table
    assert_integrity(open(&store).await, "segment");
}

#[tokio::test]
async fn renamed_segment_is_rejected() {
    let (mem, store) = store_with_raw();
    let vol = create_and_open(&store, 8).await;
    vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    vol.flush().await.unwrap();
    drop(vol);
    let seg = keys_with_prefix(&mem, "segments/").pop().unwrap();
    let copy = mem.raw_objects().lock()[&seg].clone();
    let id = SegmentId::parse(seg.trim_start_matches("segments/")).unwrap();
    let replayed = SegmentId {
        epoch: id.epoch,
        seq: id.seq + 1,
    };
    mem.raw_objects()
        .lock()
        .insert(paths::segment(replayed), copy);
    assert_integrity(open(&store).await, "segment");
}

#[tokio::test]
async fn flipped_checkpoint_fails_open() {
    let (mem, store) = store_with_raw();
    two_chunks(&store).await;
    let cp = keys_with_prefix(&mem, "checkpoints/")
        .pop()
        .expect("close checkpoints");
    flip(&mem, &cp, 12);
    assert_integrity(open(&store).await, "checkpoint");
}

#[tokio::test]
async fn flipped_superblock_fails_open() {
    let (mem, store) = store_with_raw();
    two_chunks(&store).await;
    let len = mem.raw_objects().lock()["superblock"].len();
    for at in [10, len / 2, len - 5] {
        flip(&mem, "superblock", at);
        assert_integrity(open(&store).await, "superblock");
        flip(&mem, "superblock", at);
    }
    assert!(open(&store).await.is_ok(), "restored superblock opens");
}

#[tokio::test]
async fn rewritten_public_parameter_breaks_the_key() {
    // An attacker who edits the size and fixes the checksum still fails:
    // the public parameters are the key wrap's AAD.
    let (mem, store) = store_with_raw();
    two_chunks(&store).await;
    let text = String::from_utf8(mem.raw_objects().lock()["superblock"].to_vec()).unwrap();
    let (body, _) = text.rsplit_once("\nsha256:").unwrap();
    let size = 8 * CHUNK as u64;
    let body = body.replace(
        &format!("\"size\": {size}"),
        &format!("\"size\": {}", size * 2),
    );
    use sha2::Digest;
    let forged = format!(
        "{body}\nsha256:{}\n",
        hex::encode(sha2::Sha256::digest(body.as_bytes()))
    );
    mem.raw_objects()
        .lock()
        .insert("superblock".into(), Bytes::from(forged));
    assert!(matches!(open(&store).await, Err(Error::WrongKey)));
}

#[tokio::test]
async fn flipped_claim_or_seal_fails_open() {
    for prefix in ["epochs/", "seals/"] {
        let (mem, store) = store_with_raw();
        // A crashed (unreleased) writer: its claim must be read on open.
        let vol = create_and_open(&store, 8).await;
        vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
        vol.flush().await.unwrap();
        drop(vol);
        let key = keys_with_prefix(&mem, prefix).pop().unwrap();
        flip(&mem, &key, 20);
        // The claim is read even with --force (to name whom we fence).
        let r = Volume::open(store.clone(), &secret(), writer(true), test_config()).await;
        assert_integrity(r, if prefix == "epochs/" { "claim" } else { "seal" });
    }
}

#[tokio::test]
async fn segment_from_another_volume_is_foreign() {
    // Same key file, different volume: ids differ, so subkeys differ.
    let (mem_a, store_a) = store_with_raw();
    let (mem_b, store_b) = store_with_raw();
    two_chunks(&store_a).await;
    two_chunks(&store_b).await;
    let seg_a = keys_with_prefix(&mem_a, "segments/").pop().unwrap();
    let data = mem_a.raw_objects().lock()[&seg_a].clone();
    // Overwrite b's segment of the same name with a's.
    let seg_b = keys_with_prefix(&mem_b, "segments/").pop().unwrap();
    assert_eq!(seg_a, seg_b);
    mem_b.raw_objects().lock().insert(seg_b, data);
    let vol = open(&store_b).await.unwrap();
    assert_integrity(vol.read(0, 512).await, "chunk 0");
}

/// Issue 10, finding 10: a segment the seal chain names but the bucket no
/// longer holds (lost, deleted by hand, a partial copy of the bucket) used
/// to be skipped silently, rolling its chunks back to older versions.
#[tokio::test]
async fn a_sealed_segment_missing_from_the_bucket_is_an_error_naming_it() {
    let (mem, store) = store_with_raw();
    let a = create_and_open(&store, 16).await;
    a.write(0, &pattern(1, 2 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.write(0, &pattern(2, 2 * 4096)).await.unwrap();
    a.flush().await.unwrap();
    drop(a); // crash: no checkpoint covers these segments
    // Epoch 2 seals epoch 1's two segments, and crashes too.
    drop(
        Volume::open(store.clone(), &secret(), writer(true), test_config())
            .await
            .unwrap(),
    );
    // Segments, not the fence markers epoch 2 made at epoch 1's next names.
    let segments: Vec<String> = keys_with_prefix(&mem, "segments/")
        .into_iter()
        .filter(|k| !is_fence(mem.raw_objects().lock()[k].len() as u64))
        .collect();
    assert_eq!(segments.len(), 2, "{segments:?}");
    let newest = segments.iter().max().unwrap().clone();
    mem.raw_objects().lock().remove(&newest);
    for opts in [writer(true), read_only()] {
        let err = Volume::open(store.clone(), &secret(), opts, test_config())
            .await
            .expect_err("must not open with a hole in the log");
        assert!(matches!(err, Error::Integrity(_)), "{err:?}");
        assert!(err.to_string().contains(&newest), "{err}");
    }
}

/// Found by the checkpoint fuzz target: decoding allocated 4 GiB up front
/// for every checkpoint, whatever it held (an out-of-memory abort under a
/// memory limit, and a decompression bomb could fill it). The size the
/// zstd frame declares is checked against what a checkpoint of the volume
/// can hold before anything is allocated.
#[test]
fn a_checkpoint_declaring_more_than_the_volume_can_hold_is_refused() {
    use zerofs_ublk::store::SegmentId;
    use zerofs_ublk::store::checkpoint;
    use zerofs_ublk::store::keys::{DataKey, VolumeKeys};
    let keys = VolumeKeys::new([3; 16], DataKey::random());
    let pos = SegmentId { epoch: 1, seq: 0 };
    // Authentic (sealed with the volume's key), but 64 MiB of plaintext
    // for a 16-chunk volume, whose checkpoint is at most 596 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    let object = checkpoint::encrypt_for_fuzzing(&keys, pos, &bomb);
    let err = checkpoint::decode(&keys, pos, &object, 16).unwrap_err();
    assert!(err.to_string().contains("declares 67108864 bytes"), "{err}");
    // A real checkpoint of that volume still decodes.
    let good = checkpoint::encode_root(&keys, pos, &checkpoint::Root::default());
    assert!(checkpoint::decode(&keys, pos, &good, 16).is_ok());
}

/// The two-chunk volume of `two_chunks` with chunk 0's frame tampered.
async fn chunk_zero_tampered() -> DynStore {
    let (mem, store) = store_with_raw();
    let (loc0, _) = two_chunks(&store).await;
    flip(
        &mem,
        &paths::segment(loc0.segment),
        loc0.offset as usize + 7,
    );
    store
}

/// A whole-chunk write replaces tampered chunk 0: it reads back.
async fn heal_chunk_zero(vol: &Volume) {
    vol.write(0, &pattern(4, CHUNK as usize)).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(
        vol.read(0, CHUNK as usize).await.unwrap(),
        pattern(4, CHUNK as usize)
    );
}

/// A partial write over half a chunk whose stored frame is tampered is
/// acknowledged (it does not read the chunk: volume::partial), but it can
/// never be completed (too big for a patch: docs/rfcs/0007, the flush
/// must upload the chunk whole): the next FLUSH makes everything else durable and
/// fails naming that chunk, the FLUSH after it succeeds, and a later
/// partial write into the chunk fails at once. Reads of it stay errors,
/// never data; a whole-chunk write heals it.
#[tokio::test]
async fn a_partial_write_over_a_tampered_chunk_is_dropped_and_reported_once() {
    let store = chunk_zero_tampered().await;
    let vol = open(&store).await.unwrap();
    vol.write(512, &[5u8; 2560]).await.expect("acknowledged");
    vol.write(2 * CHUNK as u64, &pattern(3, CHUNK as usize))
        .await
        .unwrap();
    match vol.flush().await {
        Err(Error::WritesDropped(what)) => assert!(what.contains("chunk 0"), "{what}"),
        other => panic!("expected the dropped write to fail the FLUSH, got {other:?}"),
    }
    vol.flush().await.expect("reported once");
    assert_integrity(vol.write(1024, &[6u8; 512]).await, "chunk 0");
    assert_integrity(vol.read(0, 512).await, "chunk 0");
    drop(vol);
    // Everything else was durable.
    let vol = open(&store).await.unwrap();
    assert_eq!(
        vol.read(2 * CHUNK as u64, CHUNK as usize).await.unwrap(),
        pattern(3, CHUNK as usize)
    );
    assert_integrity(vol.read(0, 512).await, "chunk 0");
    heal_chunk_zero(&vol).await;
}

/// A small partial write over a tampered chunk is written as a patch
/// (docs/rfcs/0007): the FLUSH succeeds without reading the chunk, but
/// the chunk still reads as an integrity error — before and after a
/// restart, the written sectors too — never as data; a whole-chunk write
/// heals it.
#[tokio::test]
async fn a_patch_over_a_tampered_chunk_reads_as_an_error_never_data() {
    let store = chunk_zero_tampered().await;
    let vol = open(&store).await.unwrap();
    vol.write(512, &[5u8; 512]).await.expect("acknowledged");
    vol.flush().await.expect("a patch needs no read");
    assert_eq!(vol.stats().patches_written, 1);
    assert_integrity(vol.read(512, 512).await, "chunk 0");
    assert_integrity(vol.read(0, 512).await, "chunk 0");
    drop(vol);
    let vol = open(&store).await.unwrap();
    assert_integrity(vol.read(512, 512).await, "chunk 0");
    heal_chunk_zero(&vol).await;
}
