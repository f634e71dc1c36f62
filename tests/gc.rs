//! Garbage collection: the bucket stays proportional to the live data,
//! nothing a recovery needs is deleted (also by a fenced writer), an idle
//! collector makes no requests, and open stays bounded however many times
//! the volume was attached. The argument: docs/rfcs/0002.

mod common;

use std::time::Duration;

use common::*;
use zerofs_ublk::store::backend::{DynStore, ObjectInfo, ObjectStore, StoreResult};
use zerofs_ublk::volume::gc::{GcConfig, GcPolicy};
use zerofs_ublk::volume::{Volume, VolumeConfig};

fn gc_config(live_below: f64) -> VolumeConfig {
    VolumeConfig {
        gc: GcConfig {
            policy: GcPolicy::Manual,
            live_below,
            ..test_config().gc
        },
        ..test_config()
    }
}

async fn open_writer(store: &DynStore, cfg: VolumeConfig, force: bool) -> Volume {
    Volume::open(store.clone(), &secret(), writer(force), cfg)
        .await
        .unwrap()
}

/// Bytes and objects in the bucket, every prefix.
async fn bucket_bytes(store: &DynStore) -> (u64, usize) {
    let mut total = (0, 0);
    for prefix in [
        "superblock",
        "epochs/",
        "seals/",
        "released/",
        "segments/",
        "checkpoints/",
        "probe/",
    ] {
        let listed = store.list(prefix).await.unwrap();
        total.0 += listed.iter().map(|o| o.size).sum::<u64>();
        total.1 += listed.len();
    }
    total
}

/// Write `run` chunks from `first` (wrapping), recording them in `image`.
async fn write_run(vol: &Volume, image: &mut [u8], first: u64, run: u64, seed: u64) {
    let chunks = image.len() as u64 / CHUNK as u64;
    for k in 0..run {
        let chunk = (first + k) % chunks;
        let data = pattern(seed * 1000 + k, CHUNK as usize);
        vol.write(chunk * CHUNK as u64, &data).await.unwrap();
        let at = (chunk * CHUNK as u64) as usize;
        image[at..at + CHUNK as usize].copy_from_slice(&data);
    }
}

async fn count(store: &DynStore, prefix: &str) -> usize {
    store.list(prefix).await.unwrap().len()
}

/// Run passes with no grace until one does nothing.
async fn collect_all(vol: &Volume) {
    for _ in 0..200 {
        let pass = vol.collect(Duration::ZERO).await.unwrap();
        if pass.is_idle() && pass.pending == 0 {
            return;
        }
    }
    panic!("collection did not settle in 200 passes");
}

async fn read_all(vol: &Volume, chunks: u64) -> Vec<u8> {
    vol.read(0, (chunks * CHUNK as u64) as usize).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwriting_ten_times_keeps_the_bucket_near_the_live_data() {
    let (_dir, store) = local_dir();
    let chunks = 96u64;
    let size = (chunks * CHUNK as u64) as usize;
    Volume::create(&store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    let vol = open_writer(&store, gc_config(0.5), false).await;
    let mut image = vec![0u8; size];
    for round in 0..10u64 {
        // Random content over the whole volume, in scattered 8-chunk runs,
        // flushed every few runs, collected as it goes.
        for run in 0..12u64 {
            let at = ((run * 7 + round * 5) % 12) * 8 * CHUNK as u64;
            let data = pattern(round * 100 + run, 8 * CHUNK as usize);
            vol.write(at, &data).await.unwrap();
            image[at as usize..at as usize + data.len()].copy_from_slice(&data);
            if run % 3 == 2 {
                vol.flush().await.unwrap();
                vol.collect(Duration::ZERO).await.unwrap();
            }
        }
    }
    vol.flush().await.unwrap();
    collect_all(&vol).await;
    let live = vol.stats().live_bytes;
    let segments: u64 = store
        .list("segments/")
        .await
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum();
    let (total, objects) = bucket_bytes(&store).await;
    assert!(vol.gc_stats().chunks_moved > 0, "{:?}", vol.gc_stats());
    eprintln!(
        "live {live} B, segments {segments} B ({:.2}x), bucket {total} B in {objects} objects, gc {:?}",
        segments as f64 / live as f64,
        vol.gc_stats()
    );
    assert!(
        segments as f64 <= 1.3 * live as f64,
        "segments {segments} B for {live} live bytes"
    );
    assert_eq!(read_all(&vol, chunks).await, image);
    vol.close().await.unwrap();
    // Everything a recovery needs is still there.
    let vol = open_writer(&store, gc_config(0.5), false).await;
    assert_eq!(read_all(&vol, chunks).await, image);
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_collection_recovers_every_flushed_write() {
    let store = memory();
    let chunks = 48u64;
    Volume::create(&store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    let vol = open_writer(&store, gc_config(0.9), false).await;
    let mut image = vec![0u8; (chunks * CHUNK as u64) as usize];
    for i in 0..40u64 {
        write_run(&vol, &mut image, (i * 17) % chunks, 3, i).await;
        vol.flush().await.unwrap();
        if i % 5 == 4 {
            vol.collect(Duration::ZERO).await.unwrap();
        }
    }
    collect_all(&vol).await;
    assert!(vol.gc_stats().objects_deleted > 0, "{:?}", vol.gc_stats());
    assert!(vol.gc_stats().chunks_moved > 0, "{:?}", vol.gc_stats());
    drop(vol); // a crash: no close, no release
    let vol = open_writer(&store, gc_config(0.9), true).await;
    assert_eq!(read_all(&vol, chunks).await, image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_deleted_before_the_grace_period() {
    let store = memory();
    let vol = create_and_open(&store, 16).await;
    for i in 0..6u64 {
        vol.write(0, &pattern(i, CHUNK as usize)).await.unwrap();
        vol.flush().await.unwrap();
    }
    let before = bucket_bytes(&store).await.1;
    let pass = vol.collect(Duration::from_secs(3600)).await.unwrap();
    assert!(pass.marked > 0 && pass.deleted == 0, "{pass:?}");
    assert_eq!(pass.pending, pass.marked);
    let after = bucket_bytes(&store).await.1;
    // The pass may add a checkpoint; it deletes nothing.
    assert!(after >= before, "{before} objects before, {after} after");
    let pass = vol.collect(Duration::ZERO).await.unwrap();
    assert!(pass.deleted >= pass.pending, "{pass:?}");
    assert!(bucket_bytes(&store).await.1 < after);
}

/// Background collection every `interval`, no grace period.
fn collecting_in_the_background(interval: Duration) -> VolumeConfig {
    VolumeConfig {
        gc: GcConfig {
            policy: GcPolicy::Background,
            interval,
            grace: Duration::ZERO,
            ..test_config().gc
        },
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_collector_makes_no_requests() {
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let cfg = collecting_in_the_background(Duration::from_millis(20));
    let vol = open_writer(&store, cfg, false).await;
    for i in 0..6u64 {
        vol.write(0, &pattern(i, CHUNK as usize)).await.unwrap();
        vol.flush().await.unwrap();
    }
    // Let the background task settle what there is to do.
    collect_all(&vol).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = vol.request_stats();
    let passes = vol.gc_stats().passes;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(vol.gc_stats().passes >= passes + 10, "the task runs");
    assert_eq!(vol.request_stats(), before, "no request while idle");
}

/// The wording, literally: an idle volume with collection on and
/// nothing to collect makes no request for a minute — at the default pass
/// interval (10 s), in tokio's paused time (a minute passes at once).
#[tokio::test(start_paused = true)]
async fn an_idle_volume_makes_no_requests_for_a_minute() {
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let cfg = collecting_in_the_background(GcConfig::default().interval);
    assert_eq!(cfg.gc.interval, Duration::from_secs(10), "the default");
    let vol = open_writer(&store, cfg, false).await;
    for i in 0..6u64 {
        vol.write(0, &pattern(i, CHUNK as usize)).await.unwrap();
        vol.flush().await.unwrap();
    }
    collect_all(&vol).await;
    let before = vol.request_stats();
    let passes = vol.gc_stats().passes;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(vol.gc_stats().passes >= passes + 5, "the task ran");
    assert_eq!(vol.request_stats(), before, "no request in a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reads_a_bounded_number_of_objects_after_many_attaches() {
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let mut reads_at = Vec::new();
    for attach in 0..1000u64 {
        let vol = open_writer(&store, gc_config(0.5), false).await;
        if attach % 100 == 0 || attach == 999 {
            let s = vol.request_stats();
            reads_at.push((attach, s.get + s.ranged_get, bucket_bytes(&store).await.1));
        }
        vol.write(
            (attach % 16) * CHUNK as u64,
            &pattern(attach, CHUNK as usize),
        )
        .await
        .unwrap();
        vol.flush().await.unwrap();
        vol.collect(Duration::ZERO).await.unwrap();
        vol.close().await.unwrap();
    }
    eprintln!("(attach, GETs at open, objects): {reads_at:?}");
    // Bounded by the live data, not by the attaches: per epoch that still
    // keys a live chunk its claim and release marker, per live chunk a
    // segment, and a few fixed objects.
    let bound = 3 * 16 + 8;
    let (_, first_gets, _) = reads_at[1];
    for (attach, gets, objects) in &reads_at[1..] {
        assert!(
            *gets <= first_gets + 2,
            "open after {attach} attaches read {gets} objects (after 100: {first_gets})"
        );
        assert!(
            *objects <= bound,
            "{objects} objects after {attach} attaches"
        );
    }
    assert!(count(&store, "seals/").await <= 3);
    assert!(count(&store, "epochs/").await <= 16 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_never_deletes_what_the_new_owner_needs() {
    let store = memory();
    let chunks = 24u64;
    Volume::create(&store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    let old = open_writer(&store, gc_config(0.9), false).await;
    let mut image = vec![0u8; (chunks * CHUNK as u64) as usize];
    for i in 0..30u64 {
        write_run(&old, &mut image, (i * 7) % chunks, 3, i).await;
        old.flush().await.unwrap();
    }
    // Marked before the takeover (checkpoint and owner check passed),
    // deleted after it: still safe.
    let pass = old.collect(Duration::from_secs(3600)).await.unwrap();
    assert!(pass.pending > 0, "{pass:?}");
    let new = open_writer(&store, gc_config(0.9), true).await;
    assert_eq!(read_all(&new, chunks).await, image);
    // The zombie, unaware, deletes what it marked, copies forward, and
    // checkpoints; its owner check then fails, so it marks nothing more.
    let before = old.gc_stats().objects_deleted;
    let zombie = old.collect(Duration::ZERO).await;
    assert!(
        matches!(zombie, Err(zerofs_ublk::Error::Fenced(_))),
        "{zombie:?}"
    );
    assert!(old.gc_stats().objects_deleted > before, "it did delete");
    assert_eq!(read_all(&new, chunks).await, image);
    // It knows now: writes and flushes are refused.
    assert!(old.write(0, &pattern(999, CHUNK as usize)).await.is_err());
    assert!(old.flush().await.is_err());
    assert_eq!(read_all(&new, chunks).await, image);
    drop(new);
    let next = open_writer(&store, gc_config(0.9), true).await;
    assert_eq!(read_all(&next, chunks).await, image);
}

/// A zombie of epoch E is fenced only by the claim of E+1: retiring old
/// claims must keep that one for as long as E was never released (the
/// review's interleaving: a forced takeover, a clean restart, then the
/// zombie flushes and collects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_takeovers_claim_outlives_later_clean_restarts() {
    let store = memory();
    let chunks = 24u64;
    Volume::create(&store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    let zombie = open_writer(&store, gc_config(0.9), false).await;
    let mut image = vec![0u8; (chunks * CHUNK as u64) as usize];
    for i in 0..10u64 {
        write_run(&zombie, &mut image, i * 3, 3, i).await;
        zombie.flush().await.unwrap();
    }
    // Forced takeover, then clean restarts that collect with no grace.
    let b = open_writer(&store, gc_config(0.9), true).await;
    b.close().await.unwrap();
    for i in 0..3u64 {
        let owner = open_writer(&store, gc_config(0.9), false).await;
        write_run(&owner, &mut image, i * 5, 4, 100 + i).await;
        owner.flush().await.unwrap();
        collect_all(&owner).await;
        owner.close().await.unwrap();
    }
    let owner = open_writer(&store, gc_config(0.9), false).await;
    collect_all(&owner).await;
    assert!(
        store.exists("epochs/0000000000000002").await.unwrap(),
        "the claim fencing epoch 1's zombie was collected"
    );
    // The zombie's flush is refused, its pass fails at its owner check.
    let mut lost = image.clone();
    write_run(&zombie, &mut lost, 0, 2, 999).await;
    assert!(matches!(
        zombie.flush().await,
        Err(zerofs_ublk::Error::Fenced(1))
    ));
    assert_eq!(read_all(&owner, chunks).await, image);
    drop(owner);
    let next = open_writer(&store, gc_config(0.9), true).await;
    assert_eq!(read_all(&next, chunks).await, image);
}

/// Marking uses the snapshot of the checkpoint it confirms: a segment
/// written after that checkpoint is replayed by recovery from it, even
/// when nothing names it (a flush of discards only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_after_the_confirmed_checkpoint_is_kept() {
    let store = memory();
    let vol = create_and_open(&store, 16).await;
    // Three flushes: the third writes a checkpoint (checkpoint_every 3),
    // which the next pass confirms.
    for i in 0..3u64 {
        vol.write(i * CHUNK as u64, &pattern(i, CHUNK as usize))
            .await
            .unwrap();
        vol.flush().await.unwrap();
    }
    // A flush of a discard only: a segment no index entry names.
    vol.discard(0, CHUNK as u64).await.unwrap();
    vol.flush().await.unwrap();
    let pass = vol.collect(Duration::ZERO).await.unwrap();
    assert!(!pass.checkpointed, "{pass:?}");
    drop(vol); // crash
    let vol = open_writer(&store, test_config(), true).await;
    assert_eq!(
        vol.read(0, CHUNK as usize).await.unwrap(),
        vec![0u8; CHUNK as usize],
        "the discard was lost"
    );
}

/// Segments of small (compressed) frames: a copy's table and trailer are a
/// large share of it, yet collection settles — a segment it wrote is not
/// copied again (once it was, forever: found in the guest, `gc` never
/// finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_of_small_frames_settles() {
    let store = memory();
    let chunks = 30u64;
    Volume::create(&store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    let vol = open_writer(&store, gc_config(0.95), false).await;
    let mut image = vec![0u8; (chunks * CHUNK as u64) as usize];
    for round in 0..3u64 {
        for c in 0..chunks {
            if round == 0 || c % 3 == round {
                // Compresses to a few dozen bytes.
                let mut data = vec![0u8; CHUNK as usize];
                data[..8].copy_from_slice(&(round * 1000 + c + 1).to_le_bytes());
                vol.write(c * CHUNK as u64, &data).await.unwrap();
                let at = (c * CHUNK as u64) as usize;
                image[at..at + CHUNK as usize].copy_from_slice(&data);
            }
        }
        vol.flush().await.unwrap();
    }
    collect_all(&vol).await;
    assert!(vol.gc_stats().segments_copied > 0, "{:?}", vol.gc_stats());
    assert_eq!(read_all(&vol, chunks).await, image);
}

/// A store whose first listing of `prefix` names one more object, that
/// does not exist: an object collected between a reader's listing and its
/// fetch.
#[derive(Debug)]
struct Ghost {
    inner: DynStore,
    prefix: &'static str,
    ghost: String,
    shown: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl ObjectStore for Ghost {
    async fn put(&self, key: &str, data: bytes::Bytes) -> StoreResult<()> {
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> StoreResult<bool> {
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> StoreResult<bytes::Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> StoreResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn exists(&self, key: &str) -> StoreResult<bool> {
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        let mut listed = self.inner.list(prefix).await?;
        if prefix == self.prefix && !self.shown.swap(true, std::sync::atomic::Ordering::SeqCst) {
            listed.push(ObjectInfo {
                key: self.ghost.clone(),
                size: 4096,
            });
        }
        Ok(listed)
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    fn supports_conditional_create(&self) -> bool {
        self.inner.supports_conditional_create()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_lists_again_when_a_listed_object_was_collected() {
    let store = memory();
    let vol = create_and_open(&store, 16).await;
    let data = pattern(5, 4 * CHUNK as usize);
    vol.write(0, &data).await.unwrap();
    vol.close().await.unwrap();
    // A checkpoint and a segment newer than anything there, listed once.
    for (prefix, ghost) in [
        (
            "checkpoints/",
            "checkpoints/0000000000000001-00000000000000ff",
        ),
        ("segments/", "segments/0000000000000001-00000000000000ff"),
    ] {
        let reader: DynStore = std::sync::Arc::new(Ghost {
            inner: store.clone(),
            prefix,
            ghost: ghost.into(),
            shown: false.into(),
        });
        let ro = Volume::open(reader, &secret(), read_only(), test_config())
            .await
            .unwrap_or_else(|e| panic!("{prefix}: {e}"));
        assert_eq!(ro.read(0, data.len()).await.unwrap(), data);
    }
}

/// RFC 0003: fence markers are never collected. A zombie fenced by one
/// takeover stays fenced after later owners collect everything they can:
/// its next flush meets a marker, however many owners later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_markers_outlive_collection_by_later_owners() {
    let store = memory();
    Volume::create(&store, &params(16), &secret(), false)
        .await
        .unwrap();
    let zombie = open_writer(&store, gc_config(0.5), false).await;
    zombie.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    zombie.flush().await.unwrap();
    // B forces over it (and makes the markers), then closes; C and D
    // follow cleanly, each overwriting and collecting everything.
    let b = open_writer(&store, gc_config(0.5), true).await;
    assert_eq!(b.summary().fences, 0, "made after B's listing");
    b.close().await.unwrap();
    for owner in 0..2u64 {
        let v = open_writer(&store, gc_config(0.5), false).await;
        assert_eq!(
            v.summary().fences,
            zerofs_ublk::store::append::WINDOW as usize
        );
        for i in 0..4u64 {
            v.write(0, &pattern(10 + owner * 4 + i, CHUNK as usize))
                .await
                .unwrap();
            v.flush().await.unwrap();
        }
        collect_all(&v).await;
        v.close().await.unwrap();
    }
    zombie
        .write(CHUNK as u64, &pattern(99, CHUNK as usize))
        .await
        .unwrap();
    let err = zombie.flush().await.expect_err("still fenced");
    assert!(matches!(err, zerofs_ublk::Error::Fenced(1)), "{err:?}");
}

/// A collector copy of a chunk that reads as zeros stays a chunk frame,
/// never a zero record: a flush in flight may be patching the chunk as
/// mapped (docs/rfcs/0007, "Zero records").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_zeros_keeps_the_chunk_mapped() {
    let store = memory();
    create_and_open(&store, 16).await.close().await.unwrap();
    let vol = open_writer(&store, gc_config(0.9), false).await;
    let half = CHUNK as usize / 2;
    vol.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    vol.flush().await.unwrap();
    // Zeros over the stored version, in two writes: a chunk frame of zeros.
    vol.write(0, &vec![0u8; half]).await.unwrap();
    vol.write(half as u64, &vec![0u8; half]).await.unwrap();
    vol.write(CHUNK as u64, &pattern(2, CHUNK as usize))
        .await
        .unwrap();
    vol.flush().await.unwrap();
    assert!(vol.index_snapshot().get(0).is_some(), "zeros over a frame");
    // Chunk 1 moves on: the segment holding chunk 0's frame is sparse.
    vol.write(CHUNK as u64, &pattern(3, CHUNK as usize))
        .await
        .unwrap();
    vol.flush().await.unwrap();
    let before = vol.index_snapshot().get(0).unwrap();
    let pass = vol.collect(Duration::ZERO).await.unwrap();
    assert!(pass.chunks_moved >= 1, "{pass:?}");
    let after = vol.index_snapshot().get(0);
    assert!(
        after.is_some() && after != Some(before),
        "copied, still mapped"
    );
    assert_eq!(
        vol.read(0, CHUNK as usize).await.unwrap(),
        vec![0u8; CHUNK as usize]
    );
}
