//! Single-writer fencing against a real S3-compatible server (moto on
//! 127.0.0.1), plus the same scenarios on a local directory.

mod common;

use common::*;
use zerofs_ublk::Error;
use zerofs_ublk::store::backend::DynStore;
use zerofs_ublk::volume::Volume;

async fn open(store: &DynStore, force: bool) -> Result<Volume, Error> {
    Volume::open(store.clone(), &secret(), writer(force), test_config()).await
}

async fn second_opener_is_refused(store: DynStore) {
    let a = create_and_open(&store, 16).await;
    a.write(0, &pattern(1, 4096)).await.unwrap();
    a.flush().await.unwrap();
    let err = open(&store, false)
        .await
        .expect_err("second writer refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::InUse(_)), "{err:?}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())) && msg.contains("--force"),
        "names the owner and the way out: {msg}"
    );
    // The refused opener changed nothing: the owner keeps working.
    a.write(4096, &pattern(2, 4096)).await.unwrap();
    a.flush().await.unwrap();
    a.close().await.unwrap();
    // After a clean close no --force is needed.
    let b = open(&store, false).await.unwrap();
    assert_eq!(
        b.read(0, 8192).await.unwrap(),
        [pattern(1, 4096), pattern(2, 4096)].concat()
    );
}

async fn forced_takeover_fences_the_old_writer(store: DynStore) {
    let a = create_and_open(&store, 16).await;
    let acked = pattern(10, 3 * 4096);
    a.write(0, &acked).await.unwrap();
    a.flush().await.unwrap();
    let unacked = pattern(11, 4096);
    a.write(8 * 4096, &unacked).await.unwrap();

    let b = open(&store, true).await.unwrap();
    // Everything A acknowledged is there; A's unflushed write is not.
    assert_eq!(b.read(0, acked.len()).await.unwrap(), acked);
    assert_eq!(b.read(8 * 4096, 4096).await.unwrap(), vec![0u8; 4096]);

    // A's next flush finds its segment's name taken by B's fence marker.
    let err = a.flush().await.expect_err("fenced writer's flush fails");
    assert!(matches!(err, Error::Fenced(_)), "{err:?}");
    assert!(matches!(
        a.write(0, &[1u8; 512]).await,
        Err(Error::Fenced(_))
    ));
    assert!(matches!(a.flush().await, Err(Error::Fenced(_))));

    // B writes on; A's late segment must never appear, now or after B.
    let b_data = pattern(12, 4096);
    b.write(9 * 4096, &b_data).await.unwrap();
    b.close().await.unwrap();
    let c = open(&store, false).await.unwrap();
    assert_eq!(c.read(0, acked.len()).await.unwrap(), acked);
    assert_eq!(
        c.read(8 * 4096, 4096).await.unwrap(),
        vec![0u8; 4096],
        "zombie ignored"
    );
    assert_eq!(c.read(9 * 4096, 4096).await.unwrap(), b_data);
    assert_eq!(
        c.summary().ignored_segments,
        0,
        "the fenced segment never landed"
    );
    assert_eq!(
        c.summary().fences,
        zerofs_ublk::store::append::WINDOW as usize,
        "B fenced A's next names"
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_second_opener_is_refused() {
    second_opener_is_refused(S3Server::shared().store(&unique("fence-a"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_forced_takeover_fences_the_old_writer() {
    forced_takeover_fences_the_old_writer(S3Server::shared().store(&unique("fence-b"))).await;
}

#[tokio::test]
async fn local_second_opener_is_refused() {
    let (_dir, store) = local_dir();
    second_opener_is_refused(store).await;
}

#[tokio::test]
async fn local_forced_takeover_fences_the_old_writer() {
    let (_dir, store) = local_dir();
    forced_takeover_fences_the_old_writer(store).await;
}

#[tokio::test]
async fn concurrent_openers_one_wins() {
    // Two writers racing to claim the same epoch: exactly one succeeds.
    let store = memory();
    Volume::create(&store, &params(8), &secret(), false)
        .await
        .unwrap();
    let (a, b) = tokio::join!(open(&store, false), open(&store, false));
    assert!(a.is_ok() != b.is_ok(), "exactly one writer: {a:?} / {b:?}");
}

/// Issue 10, finding 8: the claim's and the seal's conditional creates are
/// retry-safe: a create that landed but whose response was lost (the
/// caller saw an error) is recognized as ours, instead of burning the
/// epoch (claim) or failing the open (seal).
/// `store`, where write number `fail_at` (0-based) lands but reports an
/// error (a lost response), once.
fn lost_response_at(store: &DynStore, fail_at: u64) -> DynStore {
    use zerofs_ublk::store::backend::{FaultPlan, FaultyStore};
    let faulty = FaultyStore::new(store.clone());
    faulty.set_plan(FaultPlan {
        writes_before_failure: Some(fail_at),
        land_then_fail: true,
        failures: Some(1),
        ..FaultPlan::default()
    });
    std::sync::Arc::new(faulty)
}

/// Review of issue 10: a create whose conditional PUT landed but whose
/// answer was lost (the retry then finds the object) is still this
/// create's — for the backend probe and for the superblock. (Failed
/// before: "does not enforce conditional create", or "volume exists" for
/// the volume just created.)
#[tokio::test]
async fn a_lost_response_to_the_probe_or_superblock_does_not_fail_the_create() {
    // Writes of a create: probe create, probe create, probe delete,
    // superblock.
    for (fail_at, what) in [(0, "probe"), (3, "superblock")] {
        let store = memory();
        let faulty = lost_response_at(&store, fail_at);
        Volume::create(&faulty, &params(16), &secret(), false)
            .await
            .unwrap_or_else(|e| panic!("lost response to the {what}: {e}"));
        let v = Volume::open(store, &secret(), writer(false), test_config())
            .await
            .unwrap();
        v.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_lost_response_to_the_claim_or_seal_does_not_fail_the_open() {
    let store = memory();
    let a = create_and_open(&store, 16).await;
    a.write(0, &pattern(1, 4096)).await.unwrap();
    a.close().await.unwrap();
    // Writes of an open: the conditional-create probe (3), claim, seal.
    for (fail_at, what) in [(3, "claim"), (4, "seal")] {
        let faulty = lost_response_at(&store, fail_at);
        let v = Volume::open(faulty, &secret(), writer(false), test_config())
            .await
            .unwrap_or_else(|e| panic!("lost response to the {what}: {e}"));
        assert_eq!(v.read(0, 4096).await.unwrap(), pattern(1, 4096));
        v.close().await.unwrap();
    }
}

// ---- Fencing by segment name (docs/rfcs/0003) ------------------------------

use std::sync::Arc;

use zerofs_ublk::store::append::WINDOW;
use zerofs_ublk::store::backend::{FaultPlan, FaultyStore};

/// B takes over with --force and stops after its listing; A, not knowing
/// yet, writes 4 KiB at chunk 5 and its flush is acknowledged (nothing
/// fenced that name yet); `meanwhile` runs; B goes on. Returns B and the
/// data A's acknowledged flush holds.
async fn takeover_racing_a_flush(
    store: &DynStore,
    a: &Volume,
    meanwhile: impl FnOnce(),
) -> (Volume, Vec<u8>) {
    let (pausing, go) = Pausing::armed(store.clone(), PauseAt::SegmentListing);
    let listed = Arc::clone(&pausing.reached);
    let b_store: DynStore = pausing;
    let opening = tokio::spawn(async move { open(&b_store, true).await });
    listed.notified().await;
    let late = pattern(2, 4096);
    a.write(5 * 4096, &late).await.unwrap();
    a.flush().await.expect("nothing fenced this name yet");
    meanwhile();
    go.send(()).unwrap();
    let b = opening.await.unwrap().expect("B lists again and opens");
    (b, late)
}

/// The race the HEAD used to close: the old writer's segment lands after
/// the new owner listed, at the very name the new owner is about to fence.
/// The new owner's marker create finds it, so it lists again and seals it:
/// the acknowledged flush survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_landing_between_listing_and_fencing_is_sealed() {
    let store = memory();
    let a = create_and_open(&store, 16).await;
    a.write(0, &pattern(1, 4096)).await.unwrap();
    a.flush().await.unwrap();

    let (b, late) = takeover_racing_a_flush(&store, &a, || {}).await;
    assert_eq!(b.read(5 * 4096, 4096).await.unwrap(), late, "acknowledged");
    assert_eq!(b.read(0, 4096).await.unwrap(), pattern(1, 4096));
    // And A is fenced from its next flush on.
    a.write(6 * 4096, &pattern(3, 4096)).await.unwrap();
    assert!(matches!(a.flush().await, Err(Error::Fenced(_))));
    b.close().await.unwrap();
    let c = open(&store, false).await.unwrap();
    assert_eq!(c.read(5 * 4096, 4096).await.unwrap(), late);
}

/// After 24 chunks of `first` at 0, one chunk and a flush each, more
/// times than the window: each flush must finish (an id left behind
/// below them would stall the window). Returns the image expected.
async fn flushes_past_the_window(a: &Volume, first: Vec<u8>) -> Vec<u8> {
    let mut expect = first;
    for i in 0..WINDOW + 4 {
        let at = (24 + i as usize) * CHUNK as usize;
        let data = pattern(100 + i, CHUNK as usize);
        a.write(at as u64, &data).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), a.flush())
            .await
            .expect("ids left behind do not stall the window")
            .unwrap();
        expect.resize(at, 0);
        expect.extend_from_slice(&data);
    }
    expect
}

/// A flush that fails half-way leaves ids it never stored (one whose PUT
/// failed, others never encrypted for). The next flush settles them — the
/// same bytes again, or an empty segment — so later segments, more than
/// the window above them, can be stored; and a takeover then recovers
/// every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_failed_flush_left_are_settled_by_the_next() {
    for land_then_fail in [false, true] {
        let mem = memory();
        let faulty = FaultyStore::new(mem.clone());
        let store: DynStore = Arc::new(faulty.clone());
        let a = create_and_open(&store, 64).await;
        // 24 chunks in segments of 3: eight segments, four in flight at
        // once. Every PUT after the first fails (retries included), so the
        // flush stops with segments 4..7 never encrypted for.
        let first = pattern(1, 24 * CHUNK as usize);
        a.write(0, &first).await.unwrap();
        faulty.set_plan(FaultPlan {
            writes_before_failure: Some(1),
            land_then_fail,
            ..FaultPlan::default()
        });
        assert!(a.flush().await.is_err(), "the second segment's PUT failed");
        faulty.set_plan(FaultPlan::default());
        // More than the window's worth of flushes after it.
        let expect = flushes_past_the_window(&a, first).await;
        drop(a); // crash
        // Every id epoch 1 allocated is a segment of its own: no gap.
        let seqs: Vec<u64> = mem
            .list("segments/0000000000000001-")
            .await
            .unwrap()
            .iter()
            .map(|o| u64::from_str_radix(&o.key[o.key.len() - 16..], 16).unwrap())
            .collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        assert!(seqs.len() as u64 > 8 + WINDOW, "{seqs:?}");
        let b = open(&mem, true).await.unwrap();
        assert_eq!(b.read(0, expect.len()).await.unwrap(), expect);
        b.close().await.unwrap();
    }
}

/// Review of RFC 0003: a flush cancelled mid-way (its task aborted, as
/// `close` aborts the background flusher) gives up the ids it allocated,
/// so later segments more than the window above them are still stored,
/// and a crash after recovers every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_flush_does_not_stall_later_ones() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let (holding, go) = Pausing::armed(mem.clone(), PauseAt::SegmentPut);
    let reached = Arc::clone(&holding.reached);
    let store: DynStore = holding;
    let a = Arc::new(open(&store, false).await.unwrap());
    // 24 chunks in segments of 3: eight segments; the first PUT is held.
    let first = pattern(1, 24 * CHUNK as usize);
    a.write(0, &first).await.unwrap();
    let v = Arc::clone(&a);
    let flushing = tokio::spawn(async move { v.flush().await });
    reached.notified().await;
    flushing.abort();
    assert!(flushing.await.unwrap_err().is_cancelled());
    drop(go);
    let expect = flushes_past_the_window(&a, first).await;
    drop(a); // crash
    let b = open(&mem, true).await.unwrap();
    assert_eq!(b.read(0, expect.len()).await.unwrap(), expect);
}

/// Review of RFC 0003: whether the writer we take over from can still run
/// is judged when we claim, before our listing — not when we fence, after
/// it. Here A's claim names a process that is alive at the claim and dies
/// between B's listing and B's fencing, after A's segment landed unlisted
/// and its flush was acknowledged: B must still fence (and so find the
/// segment and list again), not skip A as provably dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_dies_after_the_listing_is_still_fenced() {
    use zerofs_ublk::store::LogStore;
    use zerofs_ublk::store::fencing::{Claim, decrypt_record, encrypt_record};
    use zerofs_ublk::store::paths;
    let store = memory();
    let a = create_and_open(&store, 16).await;
    a.write(0, &pattern(1, 4096)).await.unwrap();
    a.flush().await.unwrap();
    // A's claim now names a child process of this host, boot and PID
    // namespace: alive, so not provably dead — until it is killed.
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let keys = LogStore::read_superblock(&store)
        .await
        .unwrap()
        .unlock(&secret())
        .unwrap();
    let found = store.get(&paths::claim(1)).await.unwrap();
    let mut claim: Claim = decrypt_record(&keys, "claim", 1, &found).unwrap();
    claim.pid = child.id();
    store
        .put(&paths::claim(1), encrypt_record(&keys, "claim", 1, &claim))
        .await
        .unwrap();

    let (b, late) = takeover_racing_a_flush(&store, &a, || {
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(claim.is_provably_dead(), "the claimant is gone now");
    })
    .await;
    assert_eq!(b.read(5 * 4096, 4096).await.unwrap(), late, "acknowledged");
}

/// Why a new owner fences `W` names above the highest listed segment, not
/// one: the old writer's collector holds the next id (a copy allocated
/// under the flush lock, uploading outside it) while its next flush takes
/// the ids after that and lands them after the new owner listed. With a
/// marker at the next name only, that flush would be acknowledged and
/// lost; with `W` of them it fails, fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_behind_a_copy_in_flight_is_fenced() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let holding = Pausing::unarmed(mem.clone(), PauseAt::SegmentPut);
    let store: DynStore = Arc::clone(&holding) as DynStore;
    let a = Arc::new(open(&store, false).await.unwrap());
    // Three segments of three chunks, then two thirds of them rewritten:
    // the first segments fall below half live, and the collector copies.
    a.write(0, &pattern(1, 9 * CHUNK as usize)).await.unwrap();
    a.flush().await.unwrap();
    a.write(0, &pattern(2, 2 * CHUNK as usize)).await.unwrap();
    a.write(3 * CHUNK as u64, &pattern(3, 2 * CHUNK as usize))
        .await
        .unwrap();
    a.flush().await.unwrap();
    let go = holding.arm();
    let v = Arc::clone(&a);
    let collecting = tokio::spawn(async move { v.collect(std::time::Duration::ZERO).await });
    holding.reached.notified().await;
    // The copy's PUT is held. B takes over and fences A.
    let b = open(&mem, true).await.unwrap();
    let x = pattern(4, CHUNK as usize);
    a.write(20 * CHUNK as u64, &x).await.unwrap();
    let acked = a.flush().await;
    drop(go);
    let _ = collecting.await;
    match acked {
        Err(Error::Fenced(_)) => {}
        Err(e) => panic!("A's flush failed, but not as fenced: {e}"),
        Ok(()) => {
            // Acknowledged: it must be in what B opened.
            assert_eq!(
                b.read(20 * CHUNK as u64, CHUNK as usize).await.unwrap(),
                x,
                "an acknowledged flush of the old writer is lost"
            );
        }
    }
}
