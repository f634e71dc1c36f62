//! Checkpoints: stored off the FLUSH path (a FLUSH is never acknowledged
//! later because a checkpoint is due, and I/O never waits for one).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use zerofs_ublk::store::backend::{DynStore, FaultPlan, FaultyStore};
use zerofs_ublk::volume::{Volume, VolumeConfig};

/// Long enough for any in-memory step; a flush that waited for the held
/// checkpoint would wait for ever.
const PROMPT: Duration = Duration::from_secs(5);

fn every_segment() -> VolumeConfig {
    VolumeConfig {
        checkpoint_every: 1,
        ..test_config()
    }
}

async fn prompt<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PROMPT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} waited for the held checkpoint"))
}

/// Every flush makes a checkpoint due; the first checkpoint's PUT is held.
/// The flush that started it is acknowledged, and writes, reads and more
/// flushes go on while it is held; once it lands, a clean close writes the
/// last one and a reopen starts from it with everything there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_never_delays_a_flush_or_stalls_io() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let (holding, go) = Pausing::armed(mem.clone(), PauseAt::CheckpointPut);
    let reached = Arc::clone(&holding.reached);
    let store: DynStore = holding;
    let v = Volume::open(store, &secret(), writer(false), every_segment())
        .await
        .unwrap();
    let first = pattern(1, 2 * CHUNK as usize);
    v.write(0, &first).await.unwrap();
    prompt("the flush making a checkpoint due", v.flush())
        .await
        .unwrap();
    prompt("the test", reached.notified()).await;
    // The checkpoint PUT is held now.
    let second = pattern(2, CHUNK as usize);
    for round in 0..3u64 {
        let at = (4 + round) * CHUNK as u64;
        prompt("a write", v.write(at, &second)).await.unwrap();
        let back = prompt("a read", v.read(0, first.len())).await.unwrap();
        assert_eq!(back, first);
        prompt("a later flush", v.flush()).await.unwrap();
    }
    drop(go);
    v.close().await.unwrap();
    let again = Volume::open(mem.clone(), &secret(), writer(false), every_segment())
        .await
        .unwrap();
    let summary = again.summary();
    assert!(
        summary.checkpoint_used.is_some() && summary.replayed_segments == 0,
        "the close's checkpoint is the newest and covers everything: {summary:?}"
    );
    assert_eq!(again.read(0, first.len()).await.unwrap(), first);
    for round in 0..3u64 {
        let at = (4 + round) * CHUNK as u64;
        assert_eq!(again.read(at, second.len()).await.unwrap(), second);
    }
}

/// Checkpoint objects in the bucket, polled until `want` of them are
/// there (a background checkpoint lands some time after its flush).
async fn checkpoints_become(store: &DynStore, want: usize) -> usize {
    let start = std::time::Instant::now();
    loop {
        let n = store.list("checkpoints/").await.unwrap().len();
        if n == want || start.elapsed() > PROMPT {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A 64-chunk volume opened over a store whose writes can be made to fail.
async fn over_faults(cfg: VolumeConfig) -> (DynStore, Arc<FaultyStore>, Volume) {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let faulty = Arc::new(FaultyStore::new(mem.clone()));
    let store: DynStore = faulty.clone();
    let v = Volume::open(store, &secret(), writer(false), cfg)
        .await
        .unwrap();
    (mem, faulty, v)
}

/// The next write succeeds (a flush's segment), the one after fails once
/// (its checkpoint's first PUT).
fn fail_the_second_write(faulty: &FaultyStore) {
    faulty.set_plan(FaultPlan {
        writes_before_failure: Some(1),
        failures: Some(1),
        ..FaultPlan::default()
    });
}

/// A background checkpoint whose PUT fails is started again by the next
/// flush, though fewer segments than `checkpoint_every` followed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_is_retried_by_the_next_flush() {
    let cfg = VolumeConfig {
        checkpoint_every: 2,
        ..test_config()
    };
    let (mem, faulty, v) = over_faults(cfg).await;
    v.write(0, &pattern(1, CHUNK as usize)).await.unwrap();
    v.flush().await.unwrap();
    // The second segment makes a checkpoint due; its PUT (the write after
    // the segment's) fails once.
    fail_the_second_write(&faulty);
    v.write(CHUNK as u64, &pattern(2, CHUNK as usize))
        .await
        .unwrap();
    v.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(mem.list("checkpoints/").await.unwrap().len(), 0);
    // One more segment: not due by count (1 < 2), due because it failed.
    v.write(2 * CHUNK as u64, &pattern(3, CHUNK as usize))
        .await
        .unwrap();
    v.flush().await.unwrap();
    assert_eq!(
        checkpoints_become(&mem, 1).await,
        1,
        "the failed checkpoint was not retried"
    );
    drop(v);
}

// ---- Incremental checkpoints: a root, a base and deltas (docs/rfcs/0004) --

/// A volume of `chunks` 4 KiB chunks whose every flush starts a
/// checkpoint, with segments large enough that a whole-volume write is a
/// few objects.
async fn checkpointing_volume(store: &DynStore, chunks: u64) -> Volume {
    Volume::create(store, &params(chunks), &secret(), false)
        .await
        .unwrap();
    open_checkpointing(store, false).await
}

fn checkpointing() -> VolumeConfig {
    VolumeConfig {
        checkpoint_every: 1,
        segment_target: 4 << 20,
        cache_bytes: 1 << 20,
        ..test_config()
    }
}

async fn open_checkpointing(store: &DynStore, force: bool) -> Volume {
    Volume::open(store.clone(), &secret(), writer(force), checkpointing())
        .await
        .unwrap()
}

/// The bytes of every object a checkpoint wrote: its root and the runs
/// named after its position.
async fn written_by(store: &DynStore, position: zerofs_ublk::store::SegmentId) -> u64 {
    let name = position.name();
    let roots = store.list("checkpoints/").await.unwrap();
    let runs = store.list("index/").await.unwrap();
    roots
        .iter()
        .filter(|o| o.key == format!("checkpoints/{name}"))
        .chain(
            runs.iter()
                .filter(|o| o.key.starts_with(&format!("index/{name}."))),
        )
        .map(|o| o.size)
        .sum()
}

/// The newest checkpoint's position.
async fn newest_checkpoint(store: &DynStore) -> zerofs_ublk::store::SegmentId {
    let listed = store.list("checkpoints/").await.unwrap();
    zerofs_ublk::store::paths::listed_ids(&listed, "checkpoints/")
        .into_iter()
        .map(|(id, _)| id)
        .max()
        .expect("a checkpoint")
}

/// A checkpoint after 1 % of the chunks changed writes a delta, not the
/// whole index again: here under a tenth of what the base took (4,096
/// mapped chunks, 41 changed). Fails when every checkpoint is a new base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_writes_what_changed_not_the_whole_index() {
    let mem = memory();
    let chunks = 4096u64;
    let v = checkpointing_volume(&mem, chunks).await;
    v.write(0, &pattern(1, (chunks * CHUNK as u64) as usize))
        .await
        .unwrap();
    v.flush().await.unwrap();
    v.checkpoint_settled().await;
    let base = newest_checkpoint(&mem).await;
    let base_bytes = written_by(&mem, base).await;
    for i in 0..41u64 {
        let chunk = (i * 97) % chunks;
        v.write(chunk * CHUNK as u64, &pattern(100 + i, CHUNK as usize))
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    v.checkpoint_settled().await;
    let delta = newest_checkpoint(&mem).await;
    assert!(delta > base);
    let delta_bytes = written_by(&mem, delta).await;
    assert!(
        delta_bytes * 10 < base_bytes,
        "the checkpoint after 41 changed chunks wrote {delta_bytes} bytes, the base {base_bytes}"
    );
    drop(v);
    // A crash; the next writer starts from the base and the delta, and
    // its first checkpoint is a delta again (what it read is not
    // "changed").
    let w = open_checkpointing(&mem, true).await;
    assert_eq!(w.summary().checkpoint_used, Some(delta));
    assert_eq!(w.summary().replayed_segments, 0);
    w.write(7 * CHUNK as u64, &pattern(200, CHUNK as usize))
        .await
        .unwrap();
    w.flush().await.unwrap();
    w.checkpoint_settled().await;
    let after_open = newest_checkpoint(&mem).await;
    assert!(after_open.epoch > delta.epoch);
    let after_open_bytes = written_by(&mem, after_open).await;
    assert!(
        after_open_bytes * 10 < base_bytes,
        "the first checkpoint after the open wrote {after_open_bytes} bytes, the base {base_bytes}"
    );
}

/// What the volume holds, chunk by chunk, as a model of it.
struct Model {
    chunks: Vec<Option<u64>>,
}

impl Model {
    fn bytes(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|c| match c {
                Some(seed) => pattern(*seed, CHUNK as usize),
                None => vec![0; CHUNK as usize],
            })
            .collect()
    }
}

/// Many checkpoints — deltas that merge, new bases — across clean
/// reopens, crashes and collections: every open reads what was flushed,
/// and collection leaves exactly the runs the newest checkpoint names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_merge_rebase_and_reopen_to_the_same_volume() {
    let mem = memory();
    let chunks = 256u64;
    let mut v = checkpointing_volume(&mem, chunks).await;
    let mut model = Model {
        chunks: vec![None; chunks as usize],
    };
    let mut rng = 0x5eed_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut most_deltas = 0;
    for round in 0..60u64 {
        // A few chunks per round, now and then many (a rebase), some of
        // them discarded.
        let n = if round % 17 == 16 {
            150
        } else {
            1 + next() % 6
        };
        for _ in 0..n {
            let chunk = next() % chunks;
            if next() % 5 == 0 {
                v.discard(chunk * CHUNK as u64, CHUNK as u64).await.unwrap();
                model.chunks[chunk as usize] = None;
            } else {
                let seed = 1000 + round * 1000 + chunk;
                v.write(chunk * CHUNK as u64, &pattern(seed, CHUNK as usize))
                    .await
                    .unwrap();
                model.chunks[chunk as usize] = Some(seed);
            }
        }
        v.flush().await.unwrap();
        v.checkpoint_settled().await;
        let runs = mem.list("index/").await.unwrap();
        let deltas = runs.iter().filter(|o| o.key.contains(".d")).count();
        most_deltas = most_deltas.max(deltas);
        match round % 10 {
            3 => {
                v.close().await.unwrap();
                v = open_checkpointing(&mem, false).await;
            }
            7 => {
                drop(v); // a crash
                v = open_checkpointing(&mem, true).await;
                assert!(v.summary().checkpoint_used.is_some());
            }
            9 => {
                for _ in 0..10 {
                    let pass = v.collect(Duration::ZERO).await.unwrap();
                    if pass.is_idle() && pass.pending == 0 {
                        break;
                    }
                }
            }
            _ => {}
        }
        assert_eq!(
            v.read(0, (chunks * CHUNK as u64) as usize).await.unwrap(),
            model.bytes(),
            "round {round}"
        );
    }
    assert!(most_deltas >= 3, "deltas never chained: {most_deltas}");
    // Collected: the runs left are exactly those the newest checkpoint
    // names, and a reader opens from them.
    for _ in 0..10 {
        let pass = v.collect(Duration::ZERO).await.unwrap();
        if pass.is_idle() && pass.pending == 0 {
            break;
        }
    }
    let newest = newest_checkpoint(&mem).await;
    let runs: Vec<String> = mem
        .list("index/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let r = Volume::open(mem.clone(), &secret(), read_only(), checkpointing())
        .await
        .unwrap();
    assert_eq!(r.summary().checkpoint_used, Some(newest));
    let named: Vec<String> = r
        .summary()
        .chain
        .as_ref()
        .expect("a root")
        .runs()
        .map(|run| format!("index/{}", run.id.name()))
        .collect();
    let mut sorted = named.clone();
    sorted.sort();
    assert_eq!(
        runs, sorted,
        "collection left other runs than the newest checkpoint's"
    );
    assert_eq!(
        r.read(0, (chunks * CHUNK as u64) as usize).await.unwrap(),
        model.bytes()
    );
}

/// A checkpoint whose delta could not be stored leaves its chunks to the
/// next one: here the next checkpoint is the newest after a crash, no
/// segment is replayed over it, and the chunk changed before the failed
/// one reads its new data (it would read the old one, from the base, if
/// the failed delta's chunks were forgotten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delta_is_carried_into_the_next_checkpoint() {
    let (mem, faulty, v) = over_faults(checkpointing()).await;
    v.write(0, &pattern(1, 64 * CHUNK as usize)).await.unwrap();
    v.flush().await.unwrap();
    v.checkpoint_settled().await;
    // Chunk 5 changes; its flush's segment lands, its delta does not.
    fail_the_second_write(&faulty);
    let x = pattern(2, CHUNK as usize);
    v.write(5 * CHUNK as u64, &x).await.unwrap();
    v.flush().await.unwrap();
    v.checkpoint_settled().await;
    let y = pattern(3, CHUNK as usize);
    v.write(9 * CHUNK as u64, &y).await.unwrap();
    v.flush().await.unwrap();
    v.checkpoint_settled().await;
    drop(v); // a crash
    let w = open_checkpointing(&mem, true).await;
    reads_from_the_newest_checkpoint(&mem, &w, &[(5, &x), (9, &y)]).await;
}

/// `v` opened from the newest checkpoint, replayed no segment, and reads
/// `chunks` (chunk, data).
async fn reads_from_the_newest_checkpoint(store: &DynStore, v: &Volume, chunks: &[(u64, &[u8])]) {
    let newest = newest_checkpoint(store).await;
    assert_eq!(v.summary().checkpoint_used, Some(newest));
    assert_eq!(v.summary().replayed_segments, 0);
    for (chunk, data) in chunks {
        let back = v.read(chunk * CHUNK as u64, data.len()).await.unwrap();
        assert!(back == *data, "chunk {chunk} reads other data");
    }
}

/// Segments replayed at open are changes the next delta must hold: a
/// crash leaves chunk 5's segment after the last checkpoint, the next
/// writer replays it and checkpoints (a delta) above it, a second crash —
/// and chunk 5 still reads its new data from that delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_segments_are_in_the_next_delta() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let cfg = VolumeConfig {
        checkpoint_every: 2,
        ..checkpointing()
    };
    let secret = secret();
    let open = |force| Volume::open(mem.clone(), &secret, writer(force), cfg.clone());
    let v = open(false).await.unwrap();
    v.write(0, &pattern(1, 32 * CHUNK as usize)).await.unwrap();
    v.flush().await.unwrap();
    v.write(32 * CHUNK as u64, &pattern(2, 32 * CHUNK as usize))
        .await
        .unwrap();
    v.flush().await.unwrap(); // the second segment: a checkpoint (a base)
    v.checkpoint_settled().await;
    let x = pattern(3, CHUNK as usize);
    v.write(5 * CHUNK as u64, &x).await.unwrap();
    v.flush().await.unwrap(); // one segment: none due
    v.checkpoint_settled().await;
    drop(v); // a crash
    let w = open(true).await.unwrap();
    assert_eq!(w.summary().replayed_segments, 1);
    let y = pattern(4, CHUNK as usize);
    w.write(9 * CHUNK as u64, &y).await.unwrap();
    w.flush().await.unwrap(); // replayed + this one: a checkpoint (a delta)
    w.checkpoint_settled().await;
    drop(w); // a crash
    let z = open(true).await.unwrap();
    reads_from_the_newest_checkpoint(&mem, &z, &[(5, &x), (9, &y)]).await;
}

/// Review of RFC 0004: a checkpoint cancelled mid-way (the collector's
/// task aborted, as `close` aborts it) leaves what it picked to the next
/// checkpoint. Here the next one is written at close, above the segments
/// that changed chunks 1 and 5; the reopen replays nothing, so they read
/// their new data only if that checkpoint's delta holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_checkpoint_leaves_its_changes_to_the_next() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let cfg = || VolumeConfig {
        checkpoint_every: 1000,
        ..checkpointing()
    };
    let v = Volume::open(mem.clone(), &secret(), writer(false), cfg())
        .await
        .unwrap();
    v.write(0, &pattern(1, 32 * CHUNK as usize)).await.unwrap();
    v.close().await.unwrap(); // a base of 32 chunks: 3 changed make a delta
    let holding = Pausing::unarmed(mem.clone(), PauseAt::CheckpointPut);
    let store: DynStore = Arc::clone(&holding) as DynStore;
    let v = Arc::new(
        Volume::open(store, &secret(), writer(false), cfg())
            .await
            .unwrap(),
    );
    let (x1, x5) = (pattern(2, CHUNK as usize), pattern(3, CHUNK as usize));
    v.write(CHUNK as u64, &pattern(4, CHUNK as usize))
        .await
        .unwrap();
    v.flush().await.unwrap();
    v.write(CHUNK as u64, &x1).await.unwrap();
    v.write(5 * CHUNK as u64, &x5).await.unwrap();
    v.flush().await.unwrap();
    // The first segment is dead: the collector checkpoints (a delta of
    // chunks 1 and 5) to mark it; its root PUT is held, and the task
    // aborted there.
    let _go = holding.arm();
    let c = Arc::clone(&v);
    let collecting = tokio::spawn(async move { c.collect(Duration::ZERO).await });
    prompt("the collector's checkpoint", holding.reached.notified()).await;
    collecting.abort();
    assert!(collecting.await.unwrap_err().is_cancelled());
    let x9 = pattern(5, CHUNK as usize);
    v.write(9 * CHUNK as u64, &x9).await.unwrap();
    Arc::into_inner(v).unwrap().close().await.unwrap();
    let w = Volume::open(mem.clone(), &secret(), writer(false), cfg())
        .await
        .unwrap();
    reads_from_the_newest_checkpoint(&mem, &w, &[(1, &x1), (5, &x5), (9, &x9)]).await;
}

/// Review of RFC 0004: the collector confirms and marks only with no
/// checkpoint in flight. Pass 1 copies chunk 0 out of segment V into G
/// while chunks 1 and 2 (also copied into G) are overwritten and
/// checkpoint P (snapshot: chunk 0 at V) is picked; P lands after the
/// pass, so G is a third live. Pass 2 copies chunk 0 out of G into G2
/// while checkpoint Q (snapshot: chunk 0 at G) is picked and its root
/// held. Marking from P then would take G — which Q, the newest root,
/// names — and after a crash chunk 0 would be unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_never_marks_what_a_checkpoint_in_flight_names() {
    let mem = memory();
    Volume::create(&mem, &params(64), &secret(), false)
        .await
        .unwrap();
    let cfg = VolumeConfig {
        checkpoint_every: 1,
        segment_target: 8 * CHUNK as usize,
        ..test_config()
    };
    let holding = Pausing::unarmed(mem.clone(), PauseAt::SegmentPut);
    let store: DynStore = Arc::clone(&holding) as DynStore;
    let v = Arc::new(
        Volume::open(store, &secret(), writer(false), cfg.clone())
            .await
            .unwrap(),
    );
    let c0 = pattern(1, CHUNK as usize);
    // V: chunks 0..8; 3..8 overwritten elsewhere: V is 3/8 live.
    let mut first = c0.clone();
    first.extend(pattern(2, 7 * CHUNK as usize));
    v.write(0, &first).await.unwrap();
    v.flush().await.unwrap();
    v.write(3 * CHUNK as u64, &pattern(3, 5 * CHUNK as usize))
        .await
        .unwrap();
    v.flush().await.unwrap();
    v.checkpoint_settled().await;

    // Pass 1: P picked (chunks 1, 2 rewritten) while the copy is held.
    pass_racing_a_checkpoint(&v, &holding, 1, &pattern(4, 2 * CHUNK as usize)).await;
    // Pass 2: Q picked while the copy of G is held.
    pass_racing_a_checkpoint(&v, &holding, 21, &pattern(5, CHUNK as usize)).await;
    drop(Arc::into_inner(v)); // a crash
    let w = Volume::open(mem.clone(), &secret(), writer(true), cfg)
        .await
        .unwrap();
    assert_eq!(w.read(0, CHUNK as usize).await.unwrap(), c0);
}

/// A collection pass whose copy's PUT is held while `data` is written at
/// `chunk` and flushed — which picks a checkpoint, whose root is held in
/// turn; the copy lands, then (300 ms later) the root.
async fn pass_racing_a_checkpoint(v: &Arc<Volume>, holding: &Pausing, chunk: u64, data: &[u8]) {
    let go_copy = holding.arm_at(PauseAt::SegmentPut);
    let c = Arc::clone(v);
    let pass = tokio::spawn(async move { c.collect(Duration::ZERO).await });
    prompt("the copy", holding.reached.notified()).await;
    let go_root = holding.arm_at(PauseAt::CheckpointPut);
    v.write(chunk * CHUNK as u64, data).await.unwrap();
    v.flush().await.unwrap();
    prompt("the checkpoint's root", holding.reached.notified()).await;
    drop(go_copy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(go_root);
    prompt("the pass", pass).await.unwrap().unwrap();
    v.checkpoint_settled().await;
}
