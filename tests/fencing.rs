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

    // A's next flush uploads its segment, then finds it was fenced.
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
        1,
        "the fenced segment is in no seal"
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
