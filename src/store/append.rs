//! Our epoch's segment names, and the rule that lets a new owner fence us
//! without a request on our FLUSH path (docs/rfcs/0003).
//!
//! Every segment is made by conditional create. A name already taken by
//! an object that is not byte for byte ours means a newer owner fenced
//! this epoch there: the writer is fenced. The window rule: the PUT of
//! segment `x` starts only once every id `<= x - WINDOW` of ours exists
//! as an object we created. A new owner that lists our highest segment
//! `m` and creates fence objects at every missing id in `(m - WINDOW, m]`
//! and at `m + 1 ..= m + WINDOW` therefore leaves no name at which a
//! segment of ours can land unlisted and still count — no PUT above the
//! fences can start, since one of its window is a fence.
//!
//! To keep the rule, every id we allocate ends up an object of ours: a
//! segment whose PUT failed is put again with the very same bytes (a PUT
//! that landed but reported failure is then recognized as ours), and an id
//! never encrypted for (a flush that failed before it, a checkpoint
//! position) is filled with an empty segment. Nothing is ever encrypted
//! twice under one segment name with different content.

use std::collections::BTreeMap;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::backend::DynStore;
use super::fencing::create_or_confirm;
use super::keys::VolumeKeys;
use super::paths;
use super::segment::{SegmentId, SegmentLayout};
use crate::error::{Error, Result};

/// How far a segment PUT may run ahead of the lowest id not yet created,
/// and so how many names above the highest listed segment a new owner
/// fences (docs/rfcs/0003). Above the segments a flush uploads at once
/// (4) plus the collector's copy.
pub const WINDOW: u64 = 8;

/// What settling does with a failed id whose window is not satisfied yet
/// (an id `WINDOW` below it is still in flight elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Wait for it (a PUT above needs this id settled).
    Wait,
    /// Leave it, and every higher one, to a later settle (a flush about to
    /// upload: its own PUTs' windows settle what they need).
    Skip,
}

#[derive(Debug)]
enum IdState {
    /// Handed out; its holder will put it or abandon it.
    Allocated,
    /// Its PUT is running.
    Putting,
    /// Its PUT failed (it may have landed): put these bytes again.
    Failed(Bytes),
    /// Never encrypted for, never sent: an empty segment fills it.
    Abandoned,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Ids at or above `low` that are not yet created (every id below
    /// `low` that is not in here is an object of ours).
    open: BTreeMap<u64, IdState>,
}

/// The segment ids of our epoch: allocation, the window, and settling
/// what failed.
pub struct Appender {
    epoch: u64,
    state: Mutex<State>,
    /// Bumped on every change of any id's state: the window's waiters
    /// look again (a change that does not move the lowest open id can
    /// still give them something to settle).
    changes: watch::Sender<u64>,
}

impl Appender {
    pub fn new(epoch: u64) -> Self {
        Appender {
            epoch,
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
        }
    }

    /// A fresh id, never handed out before.
    pub fn alloc(&self) -> SegmentId {
        let mut st = self.state.lock();
        let seq = st.next;
        st.next += 1;
        st.open.insert(seq, IdState::Allocated);
        SegmentId {
            epoch: self.epoch,
            seq,
        }
    }

    /// Ids that were allocated and will not be put as planned (their
    /// flush failed or was dropped): with the bytes encrypted for them, if
    /// any, which are put again later; without, an empty segment fills
    /// the id (nothing was ever encrypted under its name). Ids whose PUT
    /// started, or that are stored, are left as they are.
    pub fn give_up(&self, ids: impl IntoIterator<Item = (SegmentId, Option<Bytes>)>) {
        {
            let mut st = self.state.lock();
            for (id, data) in ids {
                if let Some(s @ IdState::Allocated) = st.open.get_mut(&id.seq) {
                    *s = match data {
                        Some(d) => IdState::Failed(d),
                        None => IdState::Abandoned,
                    };
                }
            }
        }
        self.changed();
    }

    /// Any failed or abandoned id at or below `upto` (all: None).
    pub fn unsettled(&self, upto: Option<u64>) -> bool {
        self.state
            .lock()
            .open
            .iter()
            .take_while(|(seq, _)| upto.is_none_or(|u| **seq <= u))
            .any(|(_, s)| matches!(s, IdState::Failed(_) | IdState::Abandoned))
    }

    /// Every id below this one is an object we created.
    fn low(&self) -> u64 {
        let st = self.state.lock();
        st.open.keys().next().copied().unwrap_or(st.next)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set(&self, seq: u64, state: Option<IdState>) {
        {
            let mut st = self.state.lock();
            match state {
                Some(s) => {
                    st.open.insert(seq, s);
                }
                None => {
                    st.open.remove(&seq);
                }
            }
        }
        self.changed();
    }

    /// Create segment `id` with `data` by conditional create, once the
    /// window allows. `Err(Fenced)`: a newer owner's object holds the name.
    pub async fn put(
        &self,
        store: &DynStore,
        keys: &VolumeKeys,
        id: SegmentId,
        data: Bytes,
    ) -> Result<()> {
        debug_assert_eq!(id.epoch, self.epoch);
        self.set(id.seq, Some(IdState::Putting));
        // Dropped mid-PUT (its flush failed elsewhere): it may land later.
        let mut guard = FailGuard {
            appender: self,
            seq: id.seq,
            data: Some(data.clone()),
        };
        self.wait_window(store, keys, id.seq).await?;
        self.create(store, id, data).await?;
        guard.data = None;
        self.set(id.seq, None);
        Ok(())
    }

    async fn create(&self, store: &DynStore, id: SegmentId, data: Bytes) -> Result<()> {
        let ours = |found: &Bytes| *found == data;
        if create_or_confirm(store, &paths::segment(id), data.clone(), ours).await? {
            Ok(())
        } else {
            Err(Error::Fenced(self.epoch))
        }
    }

    /// Wait until every id `<= seq - WINDOW` is created, settling failed
    /// and abandoned ones on the way.
    async fn wait_window(&self, store: &DynStore, keys: &VolumeKeys, seq: u64) -> Result<()> {
        let Some(below) = seq.checked_sub(WINDOW) else {
            return Ok(());
        };
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if self.low() > below {
                return Ok(());
            }
            if self.unsettled(Some(below)) {
                self.settle(store, keys, Some(below), Blocked::Wait).await?;
                continue;
            }
            // In flight elsewhere: wait for something to change.
            changes
                .changed()
                .await
                .expect("the appender outlives its waiters");
        }
    }

    /// Put again what failed and fill what was abandoned (ids `<= upto`,
    /// or all), lowest first, one at a time. No request when there is
    /// nothing to settle. A settling PUT keeps the window rule too: it
    /// waits while an id `WINDOW` below it is in flight elsewhere (with
    /// flushes overlapping, a failed id can be above an acknowledged
    /// flush's segments still uploading: docs/rfcs/0005).
    pub async fn settle(
        &self,
        store: &DynStore,
        keys: &VolumeKeys,
        upto: Option<u64>,
        blocked: Blocked,
    ) -> Result<()> {
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let next = {
                let mut st = self.state.lock();
                let low = st.open.keys().next().copied().unwrap_or(st.next);
                let lowest = st
                    .open
                    .iter_mut()
                    .take_while(|(seq, _)| upto.is_none_or(|u| **seq <= u))
                    .find(|(_, s)| matches!(s, IdState::Failed(_) | IdState::Abandoned));
                match lowest {
                    None => return Ok(()),
                    // An id a window below is still in flight elsewhere.
                    Some((seq, _)) if seq.checked_sub(WINDOW).is_some_and(|b| low <= b) => None,
                    Some((seq, s)) => {
                        let data = match std::mem::replace(s, IdState::Putting) {
                            IdState::Failed(d) => Some(d),
                            _ => None,
                        };
                        Some((*seq, data))
                    }
                }
            };
            let Some((seq, data)) = next else {
                if blocked == Blocked::Skip {
                    // Every higher one waits for the same id.
                    return Ok(());
                }
                changes
                    .changed()
                    .await
                    .expect("the appender outlives its settlers");
                continue;
            };
            let id = SegmentId {
                epoch: self.epoch,
                seq,
            };
            let data = data.unwrap_or_else(|| {
                let empty = SegmentLayout::new(id);
                let len = empty.object_len();
                empty.finish(keys, vec![0; len])
            });
            let mut guard = FailGuard {
                appender: self,
                seq,
                data: Some(data.clone()),
            };
            self.create(store, id, data).await?;
            guard.data = None;
            self.set(seq, None);
            tracing::info!("segment {id}: settled after an earlier failure");
        }
    }
}

/// Marks a PUT that did not finish as failed, keeping its bytes.
struct FailGuard<'a> {
    appender: &'a Appender,
    seq: u64,
    data: Option<Bytes>,
}

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            self.appender.set(self.seq, Some(IdState::Failed(data)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::backend::MemoryStore;
    use crate::store::keys::{DataKey, VolumeKeys};

    fn setup() -> (DynStore, VolumeKeys, Arc<Appender>) {
        let store: DynStore = Arc::new(MemoryStore::new());
        let keys = VolumeKeys::new([7; 16], DataKey::random());
        (store, keys, Arc::new(Appender::new(3)))
    }

    fn data(n: u8) -> Bytes {
        Bytes::from(vec![n; 100])
    }

    /// W2: a PUT waits while an id WINDOW below it is not created, and goes
    /// as soon as it is.
    #[tokio::test]
    async fn a_put_waits_for_the_id_a_window_below() {
        let (store, keys, a) = setup();
        let ids: Vec<SegmentId> = (0..=WINDOW).map(|_| a.alloc()).collect();
        for id in &ids[1..WINDOW as usize] {
            a.put(&store, &keys, *id, data(1)).await.unwrap();
        }
        let last = ids[WINDOW as usize];
        let (s, k, a2) = (store.clone(), keys.clone(), Arc::clone(&a));
        let waiting = tokio::spawn(async move { a2.put(&s, &k, last, data(2)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "id 0 is not created yet");
        assert!(!store.exists(&paths::segment(last)).await.unwrap());
        a.put(&store, &keys, ids[0], data(0)).await.unwrap();
        waiting.await.unwrap().unwrap();
        assert!(store.exists(&paths::segment(last)).await.unwrap());
    }

    /// A settling PUT keeps the window too: a failed id a window above an
    /// id still uploading elsewhere (an acknowledged flush's, with flushes
    /// overlapping) waits for it (docs/rfcs/0005).
    #[tokio::test]
    async fn settling_waits_for_the_id_a_window_below() {
        let (store, keys, a) = setup();
        let ids: Vec<SegmentId> = (0..=WINDOW).map(|_| a.alloc()).collect();
        for id in &ids[1..WINDOW as usize] {
            a.put(&store, &keys, *id, data(1)).await.unwrap();
        }
        let last = ids[WINDOW as usize];
        a.give_up([(last, Some(data(2)))]);
        let (s, k, a2) = (store.clone(), keys.clone(), Arc::clone(&a));
        let settling = tokio::spawn(async move { a2.settle(&s, &k, None, Blocked::Wait).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!settling.is_finished(), "id 0 is still in flight");
        assert!(!store.exists(&paths::segment(last)).await.unwrap());
        a.put(&store, &keys, ids[0], data(0)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), settling)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(store.get(&paths::segment(last)).await.unwrap(), data(2));
    }

    /// W3 and W1: the window settles what failed (the same bytes again)
    /// and what was abandoned (an empty segment), and a name taken by
    /// someone else's object means fenced.
    #[tokio::test]
    async fn the_window_settles_failed_and_abandoned_ids_and_meets_fences() {
        let (store, keys, a) = setup();
        let ids: Vec<SegmentId> = (0..=WINDOW + 1).map(|_| a.alloc()).collect();
        a.give_up([(ids[0], Some(data(9))), (ids[1], None)]);
        assert!(a.unsettled(None));
        for id in &ids[2..] {
            let put = a.put(&store, &keys, *id, data(1));
            tokio::time::timeout(Duration::from_secs(5), put)
                .await
                .expect("the window settles, it does not wait forever")
                .unwrap();
        }
        assert!(!a.unsettled(None));
        assert_eq!(store.get(&paths::segment(ids[0])).await.unwrap(), data(9));
        let empty = store.get(&paths::segment(ids[1])).await.unwrap();
        let (off, len) =
            crate::store::segment::table_range(ids[1], &empty, empty.len() as u64).unwrap();
        let table = &empty[off as usize..(off + len) as usize];
        let (entries, _) = crate::store::segment::decode_table(&keys, ids[1], table, 0).unwrap();
        assert!(entries.is_empty(), "an empty segment of ours");

        // A newer owner's marker at our next name: fenced, at once or by
        // the window.
        let next = a.alloc();
        store
            .put_if_absent(&paths::segment(next), Bytes::from_static(b"fence"))
            .await
            .unwrap();
        let err = a.put(&store, &keys, next, data(3)).await.unwrap_err();
        assert!(matches!(err, Error::Fenced(3)), "{err:?}");
        // Our own bytes found at the name (a PUT that landed but reported
        // failure) are ours.
        let again = a.alloc();
        store.put(&paths::segment(again), data(4)).await.unwrap();
        a.put(&store, &keys, again, data(4)).await.unwrap();
    }
}

#[cfg(test)]
mod review_tests {
    //! The review of RFC 0003's first build: a failed settle stranded
    //! ids, a failure that did not move the lowest id woke no waiter.
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::backend::{FaultPlan, FaultyStore, MemoryStore};
    use crate::store::keys::{DataKey, VolumeKeys};

    fn keys() -> VolumeKeys {
        VolumeKeys::new([7; 16], DataKey::random())
    }

    #[tokio::test]
    async fn a_settle_that_fails_leaves_every_id_settleable() {
        let faulty = FaultyStore::new(Arc::new(MemoryStore::new()));
        let store: DynStore = Arc::new(faulty.clone());
        let (keys, a) = (keys(), Appender::new(1));
        let ids: Vec<SegmentId> = (0..4).map(|_| a.alloc()).collect();
        a.give_up(
            ids.iter()
                .map(|id| (*id, Some(Bytes::from(vec![id.seq as u8; 80])))),
        );
        faulty.set_plan(FaultPlan {
            writes_before_failure: Some(0),
            ..FaultPlan::default()
        });
        assert!(a.settle(&store, &keys, None, Blocked::Wait).await.is_err());
        faulty.set_plan(FaultPlan::default());
        a.settle(&store, &keys, None, Blocked::Wait).await.unwrap();
        assert!(!a.unsettled(None));
        assert_eq!(a.low(), 4, "every id stored");
    }

    #[tokio::test]
    async fn a_failure_below_a_waiting_put_wakes_it() {
        let faulty = FaultyStore::new(Arc::new(MemoryStore::new()));
        let store: DynStore = Arc::new(faulty.clone());
        let (keys, a) = (keys(), Arc::new(Appender::new(1)));
        let ids: Vec<SegmentId> = (0..=WINDOW).map(|_| a.alloc()).collect();
        for id in &ids[1..WINDOW as usize] {
            a.put(&store, &keys, *id, Bytes::from(vec![1; 80]))
                .await
                .unwrap();
        }
        let last = ids[WINDOW as usize];
        let (s, k, a2) = (store.clone(), keys.clone(), Arc::clone(&a));
        let waiting =
            tokio::spawn(async move { a2.put(&s, &k, last, Bytes::from(vec![2; 80])).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Id 0's PUT fails for good (three attempts): the lowest id does
        // not move, but the waiter must settle it and go on.
        faulty.set_plan(FaultPlan {
            writes_before_failure: Some(0),
            failures: Some(3),
            ..FaultPlan::default()
        });
        assert!(
            a.put(&store, &keys, ids[0], Bytes::from(vec![0; 80]))
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter was woken")
            .unwrap()
            .unwrap();
        assert_eq!(a.low(), WINDOW + 1);
    }
}
