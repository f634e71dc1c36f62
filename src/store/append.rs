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
    /// Every id below this value is an object we created.
    low: watch::Sender<u64>,
}

impl Appender {
    pub fn new(epoch: u64) -> Self {
        Appender {
            epoch,
            state: Mutex::new(State::default()),
            low: watch::Sender::new(0),
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
    /// flush failed): with the bytes encrypted for them, if any, which are
    /// put again later; without, an empty segment fills the id (nothing
    /// was ever encrypted under its name). Ids whose PUT started are left
    /// to it.
    pub fn give_up(&self, ids: impl IntoIterator<Item = (SegmentId, Option<Bytes>)>) {
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

    /// Any failed or abandoned id waiting to be settled.
    pub fn unsettled(&self) -> bool {
        self.state
            .lock()
            .open
            .values()
            .any(|s| matches!(s, IdState::Failed(_) | IdState::Abandoned))
    }

    fn set(&self, seq: u64, state: Option<IdState>) {
        let mut st = self.state.lock();
        match state {
            Some(s) => {
                st.open.insert(seq, s);
            }
            None => {
                st.open.remove(&seq);
            }
        }
        let low = st.open.keys().next().copied().unwrap_or(st.next);
        drop(st);
        self.low.send_if_modified(|l| {
            let moved = *l != low;
            *l = low;
            moved
        });
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
        let mut low = self.low.subscribe();
        loop {
            if *low.borrow_and_update() > below {
                return Ok(());
            }
            if self.unsettled() {
                self.settle(store, keys, Some(below)).await?;
                if *low.borrow_and_update() > below {
                    return Ok(());
                }
            }
            // In flight elsewhere: wait for it to land.
            low.changed()
                .await
                .expect("the appender outlives its waiters");
        }
    }

    /// Put again what failed and fill what was abandoned (ids `<= upto`,
    /// or all). No request when there is nothing to settle.
    pub async fn settle(
        &self,
        store: &DynStore,
        keys: &VolumeKeys,
        upto: Option<u64>,
    ) -> Result<()> {
        let work: Vec<(u64, Option<Bytes>)> = {
            let mut st = self.state.lock();
            st.open
                .iter_mut()
                .filter(|(seq, _)| upto.is_none_or(|u| **seq <= u))
                .filter_map(|(seq, s)| {
                    let data = match s {
                        IdState::Failed(d) => Some(d.clone()),
                        IdState::Abandoned => None,
                        _ => return None,
                    };
                    *s = IdState::Putting;
                    Some((*seq, data))
                })
                .collect()
        };
        for (seq, data) in work {
            let id = SegmentId {
                epoch: self.epoch,
                seq,
            };
            let data = match data {
                Some(d) => d,
                None => SegmentLayout::new(id)
                    .finish(keys, vec![0; SegmentLayout::new(id).object_len()]),
            };
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
        Ok(())
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

    /// W3 and W1: the window settles what failed (the same bytes again)
    /// and what was abandoned (an empty segment), and a name taken by
    /// someone else's object means fenced.
    #[tokio::test]
    async fn the_window_settles_failed_and_abandoned_ids_and_meets_fences() {
        let (store, keys, a) = setup();
        let ids: Vec<SegmentId> = (0..=WINDOW + 1).map(|_| a.alloc()).collect();
        a.give_up([(ids[0], Some(data(9))), (ids[1], None)]);
        assert!(a.unsettled());
        for id in &ids[2..] {
            let put = a.put(&store, &keys, *id, data(1));
            tokio::time::timeout(Duration::from_secs(5), put)
                .await
                .expect("the window settles, it does not wait forever")
                .unwrap();
        }
        assert!(!a.unsettled());
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
