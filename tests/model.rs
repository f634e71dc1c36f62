//! Model checker: random I/O sequences with random crash points, checked
//! against an in-memory model of the durability contract.
//!
//! - Every read while running must equal the model exactly.
//! - Store faults are injected at random (writes fail before landing, or
//!   land and then report failure); flushes that fail are allowed to.
//! - A crash drops the volume mid-stream (losing the dirty tail), clears
//!   the faults, reopens with --force, and checks every chunk: it must be
//!   one of the versions it held since the last *successful* flush — so
//!   every acknowledged flush survived, and each unflushed chunk is wholly
//!   old or wholly new, never torn or foreign.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use zerofs_ublk::store::backend::{DynStore, FaultPlan, FaultyStore, MemoryStore};
use zerofs_ublk::volume::{Volume, VolumeConfig};

const CHUNKS: u64 = 12;
const SECTORS_PER_CHUNK: u64 = CHUNK as u64 / 512;
const SECTORS: u64 = CHUNKS * SECTORS_PER_CHUNK;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    /// Arm faults: the next `after` store writes succeed, then they fail.
    Faults {
        after: u64,
        land_then_fail: bool,
    },
    Crash,
    CleanReopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| {
        let max = (SECTORS - s).min(3 * SECTORS_PER_CHUNK);
        (Just(s), 1..=max)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range().prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        3 => Just(Op::Flush),
        2 => (0..6u64, any::<bool>()).prop_map(|(after, land_then_fail)| Op::Faults { after, land_then_fail }),
        2 => Just(Op::Crash),
        1 => Just(Op::CleanReopen),
    ]
}

fn hash(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

struct Model {
    current: Vec<u8>,
    /// Per chunk: versions it may hold after a crash.
    allowed: Vec<HashSet<u64>>,
}

impl Model {
    fn new() -> Self {
        let current = vec![0u8; (CHUNKS * CHUNK as u64) as usize];
        let zero = hash(&current[..CHUNK as usize]);
        Model {
            current,
            allowed: (0..CHUNKS).map(|_| HashSet::from([zero])).collect(),
        }
    }

    fn chunk(&self, c: u64) -> &[u8] {
        let cs = CHUNK as usize;
        &self.current[c as usize * cs..(c as usize + 1) * cs]
    }

    fn apply(&mut self, offset: usize, data: &[u8]) {
        self.current[offset..offset + data.len()].copy_from_slice(data);
        let cs = CHUNK as usize;
        for c in offset / cs..=(offset + data.len() - 1) / cs {
            let h = hash(self.chunk(c as u64));
            self.allowed[c].insert(h);
        }
    }

    fn durable(&mut self) {
        for c in 0..CHUNKS {
            self.allowed[c as usize] = HashSet::from([hash(self.chunk(c))]);
        }
    }
}

static CRASH_POINTS: AtomicUsize = AtomicUsize::new(0);
static FAILED_FLUSHES: AtomicUsize = AtomicUsize::new(0);

fn config() -> VolumeConfig {
    VolumeConfig {
        cache_bytes: 4 * CHUNK as usize,
        ..test_config()
    }
}

async fn reopen(faulty: &FaultyStore) -> Volume {
    faulty.set_plan(FaultPlan::default());
    let store: DynStore = Arc::new(faulty.clone());
    Volume::open(store, &secret(), writer(true), config())
        .await
        .expect("reopen after crash")
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let inner: DynStore = Arc::new(MemoryStore::new());
    let faulty = FaultyStore::new(inner);
    let store: DynStore = Arc::new(faulty.clone());
    Volume::create(&store, &params(CHUNKS), &secret(), false)
        .await
        .unwrap();
    let mut vol = reopen(&faulty).await;
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern(seed, (sectors * 512) as usize);
                vol.write(sector * 512, &data).await.unwrap();
                model.apply((sector * 512) as usize, &data);
            }
            Op::Zeroes { sector, sectors } | Op::Discard { sector, sectors } => {
                let len = sectors * 512;
                if matches!(op, Op::Zeroes { .. }) {
                    vol.write_zeroes(sector * 512, len).await.unwrap();
                } else {
                    vol.discard(sector * 512, len).await.unwrap();
                }
                model.apply((sector * 512) as usize, &vec![0u8; len as usize]);
            }
            Op::Read { sector, sectors } => {
                let got = vol
                    .read(sector * 512, (sectors * 512) as usize)
                    .await
                    .unwrap();
                let off = (sector * 512) as usize;
                prop_assert!(got == model.current[off..off + got.len()], "read mismatch");
            }
            Op::Flush => match vol.flush().await {
                Ok(()) => model.durable(),
                Err(_) => {
                    FAILED_FLUSHES.fetch_add(1, Ordering::Relaxed);
                }
            },
            Op::Faults {
                after,
                land_then_fail,
            } => faulty.set_plan(FaultPlan {
                writes_before_failure: Some(after),
                land_then_fail,
                ..FaultPlan::default()
            }),
            Op::Crash => {
                drop(vol);
                vol = reopen(&faulty).await;
                CRASH_POINTS.fetch_add(1, Ordering::Relaxed);
                let image = vol.read(0, model.current.len()).await.unwrap();
                for c in 0..CHUNKS {
                    let cs = CHUNK as usize;
                    let got = hash(&image[c as usize * cs..(c as usize + 1) * cs]);
                    prop_assert!(
                        model.allowed[c as usize].contains(&got),
                        "chunk {} after crash is neither a flushed nor a later version",
                        c
                    );
                }
                model.current = image;
                model.durable();
            }
            Op::CleanReopen => {
                faulty.set_plan(FaultPlan::default());
                if vol.close().await.is_ok() {
                    model.durable();
                }
                vol = reopen(&faulty).await;
                let image = vol.read(0, model.current.len()).await.unwrap();
                prop_assert!(image == model.current, "clean reopen lost data");
            }
        }
    }
    Ok(())
}

#[test]
fn random_crashes_preserve_the_durability_contract() {
    let cases: u32 = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runner
        .run(&proptest::collection::vec(op(), 1..60), |ops| {
            rt.block_on(run_case(ops))
        })
        .unwrap();
    let crashes = CRASH_POINTS.load(Ordering::Relaxed);
    let failed = FAILED_FLUSHES.load(Ordering::Relaxed);
    println!("model checker: {cases} cases, {crashes} crash points, {failed} failed flushes");
    assert!(
        crashes >= 1000 || cases < 400,
        "expected at least 1000 crash points, got {crashes}"
    );
}
