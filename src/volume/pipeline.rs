//! The order of overlapping flushes (docs/rfcs/0005): at most `depth`
//! flushes in flight; each captures the dirty table and allocates its
//! segment ids under one lock, taking a turn there, and publishes in turn
//! order — so flushes publish in the order of their ids, and flush N+1
//! encodes and uploads while flush N is still uploading.
//!
//! The pipeline also answers the question a checkpoint pick asks: which
//! ids are allocated to flushes that have not published (or failed) yet.

use std::collections::{BTreeMap, BTreeSet};

use parking_lot::Mutex;
use tokio::sync::{MutexGuard, Semaphore, SemaphorePermit, watch};

use crate::store::SegmentId;

pub(super) struct Pipeline {
    /// Held from a flush's capture to the allocation of its ids (and by a
    /// collector's copy from its check of the index to its allocation,
    /// and by whoever drains the pipeline).
    allocation: tokio::sync::Mutex<()>,
    /// One permit per flush in flight.
    slots: Semaphore,
    turns: Mutex<Turns>,
    /// The first turn not over yet.
    first_open: watch::Sender<u64>,
}

#[derive(Default)]
struct Turns {
    next: u64,
    first_open: u64,
    /// Turns over before some earlier one.
    over: BTreeSet<u64>,
    /// The lowest segment id of each turn that has not ended.
    ids: BTreeMap<u64, SegmentId>,
}

/// Held from a flush's capture to its allocation; turns are taken under it.
pub(super) struct Allocating<'a> {
    _lock: MutexGuard<'a, ()>,
}

/// The pipeline is empty, and stays so while this is held: no flush is in
/// flight, and none can allocate.
pub(super) struct Drained<'a> {
    _allocating: Allocating<'a>,
}

/// A flush's place in the order. Ends when dropped: published, failed or
/// cancelled, the next turn may then publish.
pub(super) struct Turn<'a> {
    pipeline: &'a Pipeline,
    n: u64,
    _slot: SemaphorePermit<'a>,
}

/// The most flushes in flight at once: each may lay one patch over a
/// mapping another flush in flight decided on, which the bound on a
/// mapping's patches counts (docs/rfcs/0007).
pub const MAX_DEPTH: usize = 4;

impl Pipeline {
    /// `depth`: the most flushes in flight at once (1: one at a time).
    pub(super) fn new(depth: usize) -> Self {
        Pipeline {
            allocation: tokio::sync::Mutex::new(()),
            slots: Semaphore::new(depth.clamp(1, MAX_DEPTH)),
            turns: Mutex::new(Turns::default()),
            first_open: watch::Sender::new(0),
        }
    }

    /// Wait for room for one more flush in flight.
    pub(super) async fn slot(&self) -> SemaphorePermit<'_> {
        self.slots.acquire().await.expect("never closed")
    }

    pub(super) async fn allocating(&self) -> Allocating<'_> {
        Allocating {
            _lock: self.allocation.lock().await,
        }
    }

    /// Wait until every turn taken is over, holding off new ones.
    pub(super) async fn drain(&self) -> Drained<'_> {
        let allocating = self.allocating().await;
        let last = self.turns.lock().next;
        let mut open = self.first_open.subscribe();
        open.wait_for(|first| *first >= last)
            .await
            .expect("the sender lives in self");
        Drained {
            _allocating: allocating,
        }
    }

    /// The next turn, for a flush whose lowest segment id is `lowest`
    /// (None: it captured nothing), taken under the allocation lock.
    pub(super) fn take<'a>(
        &'a self,
        _allocating: &Allocating<'a>,
        slot: SemaphorePermit<'a>,
        lowest: Option<SegmentId>,
    ) -> Turn<'a> {
        let mut t = self.turns.lock();
        let n = t.next;
        t.next += 1;
        if let Some(id) = lowest {
            t.ids.insert(n, id);
        }
        Turn {
            pipeline: self,
            n,
            _slot: slot,
        }
    }

    /// The lowest segment id a flush in flight holds (allocated, neither
    /// published nor given up yet).
    pub(super) fn lowest_in_flight(&self) -> Option<SegmentId> {
        self.turns.lock().ids.values().min().copied()
    }
}

impl Turn<'_> {
    /// Its ids are published (the turn still holds its place until it is
    /// dropped): they are no longer in flight.
    pub(super) fn published(&self) {
        self.pipeline.turns.lock().ids.remove(&self.n);
    }

    /// Wait until every earlier turn is over.
    pub(super) async fn wait(&self) {
        let mut open = self.pipeline.first_open.subscribe();
        open.wait_for(|first| *first >= self.n)
            .await
            .expect("the sender lives in the pipeline");
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut t = self.pipeline.turns.lock();
        t.ids.remove(&self.n);
        t.over.insert(self.n);
        while t.over.first() == Some(&t.first_open) {
            t.over.pop_first();
            t.first_open += 1;
        }
        // Sent under the lock: two turns ending at once on two threads
        // must not send their values in the wrong order (the watch would
        // go back, and the next turn would wait forever).
        self.pipeline.first_open.send_replace(t.first_open);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn id(seq: u64) -> SegmentId {
        SegmentId { epoch: 1, seq }
    }

    #[tokio::test]
    async fn turns_end_in_any_order_and_wait_in_order() {
        let p = Pipeline::new(3);
        let (a, b, c) = {
            let alloc = p.allocating().await;
            let a = p.take(&alloc, p.slot().await, Some(id(1)));
            let b = p.take(&alloc, p.slot().await, None);
            let c = p.take(&alloc, p.slot().await, Some(id(5)));
            (a, b, c)
        };
        assert_eq!(p.lowest_in_flight(), Some(id(1)));
        // The first turn never waits; the third waits for the first two.
        tokio::time::timeout(Duration::from_secs(1), a.wait())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.wait())
                .await
                .is_err()
        );
        // Over out of order: the third still waits for the first.
        drop(b);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.wait())
                .await
                .is_err()
        );
        drop(a);
        assert_eq!(p.lowest_in_flight(), Some(id(5)));
        tokio::time::timeout(Duration::from_secs(1), c.wait())
            .await
            .unwrap();
        drop(c);
        assert_eq!(p.lowest_in_flight(), None);
    }

    /// Turns ending at the same moment on two threads leave the pipeline
    /// open for the next (the review found the watch going back when its
    /// value was sent after the lock: every later flush then hung).
    #[test]
    fn turns_ending_at_once_on_two_threads_never_close_the_pipeline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = Pipeline::new(2);
        for _ in 0..5_000 {
            let (a, b) = rt.block_on(async {
                let alloc = p.allocating().await;
                let a = p.take(&alloc, p.slot().await, Some(id(1)));
                let b = p.take(&alloc, p.slot().await, Some(id(2)));
                (a, b)
            });
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    drop(a);
                });
                s.spawn(|| {
                    barrier.wait();
                    drop(b);
                });
            });
            let next = *p.first_open.borrow();
            assert_eq!(next, p.turns.lock().first_open, "the watch went back");
        }
    }

    #[tokio::test]
    async fn depth_bounds_the_flushes_in_flight_and_drain_waits_for_them() {
        let p = Arc::new(Pipeline::new(2));
        let alloc = p.allocating().await;
        let a = p.take(&alloc, p.slot().await, Some(id(1)));
        let b = p.take(&alloc, p.slot().await, Some(id(2)));
        drop(alloc);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), p.slot())
                .await
                .is_err()
        );
        let drained = {
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                drop(p.drain().await);
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drained.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drained.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .unwrap()
            .unwrap();
        let slot = tokio::time::timeout(Duration::from_secs(1), p.slot()).await;
        assert!(slot.is_ok(), "both slots are free again");
    }
}
