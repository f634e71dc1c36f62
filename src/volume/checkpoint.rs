//! Checkpoints off the FLUSH path: what a checkpoint holds is decided
//! under the flush lock (a position and an O(1) snapshot of the index),
//! and it is encoded and stored outside it, one at a time. A flush that
//! makes one due starts it in the background and is acknowledged without
//! waiting; the collector and a clean close wait for theirs.
//!
//! Why the position is still right when the object lands later: every
//! segment at or below it that will ever be published was published when
//! it was picked (flushes publish in the order of their ids, and no pick
//! is made while a flush in flight holds an id below the newest segment
//! published — a later flush picks: docs/rfcs/0005; a collector's copy
//! below it changes no chunk's content), so a later acknowledged flush has
//! ids above it — the case analysis of docs/rfcs/0003 (case 4) does not
//! depend on when the object is stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imbl::OrdSet;
use parking_lot::Mutex;

use super::Inner;
use super::flush::FlushState;
use super::pipeline::Drained;
use crate::error::Result;
use crate::store::checkpoint::Chain;
use crate::store::{Index, SegmentId};

/// One checkpoint at a time, what the next one builds on, and whether the
/// last one picked is stored.
#[derive(Default)]
pub(super) struct Checkpointer {
    /// Held from the pick until the checkpoint is stored (or has failed).
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    /// The last checkpoint picked is not stored (it failed, or was
    /// cancelled, or is running): the next flush starts one whatever the
    /// count of segments since.
    unstored: AtomicBool,
    /// The runs of the last checkpoint stored (None: none to build on —
    /// the next one writes a base).
    chain: Mutex<Option<Chain>>,
    /// Chunks changed since the last checkpoint stored: taken from the
    /// index at each pick, cleared only once a checkpoint holding them is
    /// stored — so one that fails or is cancelled leaves them to the next.
    carried: Mutex<OrdSet<u64>>,
    /// The checkpoint a flush started in the background.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Checkpointer {
    /// Building on the checkpoint recovery read (its runs, if any).
    pub(super) fn new(chain: Option<Chain>) -> Self {
        Checkpointer {
            chain: Mutex::new(chain),
            ..Default::default()
        }
    }

    /// Stop a background checkpoint (what it picked stays carried).
    pub(super) fn abort(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

/// What one checkpoint holds: the index as of its position.
struct Picked {
    position: SegmentId,
    index: Index,
}

impl Inner {
    /// Decide the next checkpoint, or None when none can be picked now.
    /// Its position must be at or above every id that will ever be
    /// published at or below it (docs/rfcs/0005): the newest segment
    /// published, unless a flush still in flight holds an id below it (a
    /// collector's copy published ahead of it) — then the next flush to
    /// publish picks. Nothing new since the last one (the collector forces
    /// one to make what it freed deletable): the position is a fresh,
    /// never-written segment id, so no position ever names two different
    /// checkpoints — allocated only with the pipeline drained.
    fn pick_checkpoint(
        &self,
        fs: &mut FlushState,
        drained: Option<&Drained<'_>>,
    ) -> Result<Option<Picked>> {
        let position = match fs.last_segment {
            Some(p) if fs.checkpointed_at != Some(p) => {
                if self.pipeline.lowest_in_flight().is_some_and(|low| low < p) {
                    return Ok(None);
                }
                p
            }
            _ if drained.is_some() => {
                // Names a checkpoint only; an empty segment fills it when
                // the window rule needs it (docs/rfcs/0003).
                let fresh = self.log.alloc_segment()?;
                self.log.give_up_segments([(fresh, None)]);
                fs.last_segment = Some(fresh);
                fresh
            }
            _ => return Ok(None),
        };
        fs.checkpointed_at = Some(position);
        fs.segments_since_checkpoint = 0;
        // O(1): the index and its changed set are persistent (see
        // store::index).
        let (index, changed) = {
            let mut st = self.state.lock();
            let changed = st.index.take_changed();
            (st.index.clone(), changed)
        };
        let cp = &self.checkpointer;
        let carried = std::mem::take(&mut *cp.carried.lock());
        *cp.carried.lock() = carried.union(changed);
        // Until it is stored: a checkpoint that fails, or whose task is
        // cancelled, is started again by the next flush.
        cp.unstored.store(true, Ordering::SeqCst);
        Ok(Some(Picked { position, index }))
    }

    /// Encode and store a picked checkpoint (what changed since the last
    /// one stored, or a new base: store::checkpoint::Chain::plan); the
    /// collector learns of it.
    async fn store_checkpoint(&self, picked: Picked) -> Result<()> {
        let Picked { position, index } = picked;
        let cp = &self.checkpointer;
        // Everything changed since the last checkpoint stored (no other
        // pick can add to it while this one holds `one_at_a_time`).
        let changed = cp.carried.lock().clone();
        let plan = Chain::plan(cp.chain.lock().as_ref(), position, index.clone(), &changed);
        // Known to the collector before they are written: runs of a
        // checkpoint that fails are collected like any unnamed run.
        self.gc.lock().runs_planned(plan.run_ids());
        let (chain, root_size) = self.log.put_checkpoint(plan).await?;
        let runs = chain.runs().map(|r| (r.id, r.size)).collect();
        *cp.chain.lock() = Some(chain);
        cp.carried.lock().clear();
        cp.unstored.store(false, Ordering::SeqCst);
        self.gc
            .lock()
            .checkpointed(position, root_size, index, runs);
        Ok(())
    }

    /// After a flush published (its flush lock still held): start a
    /// checkpoint in the background if one is due and none is running.
    /// Durability does not depend on checkpoints; a failed one is retried
    /// after the next flush.
    pub(super) fn checkpoint_if_due(self: &Arc<Self>, fs: &mut FlushState) {
        let due = fs.segments_since_checkpoint >= self.cfg.checkpoint_every
            || self.checkpointer.unstored.load(Ordering::SeqCst);
        if !due {
            return;
        }
        let Ok(running) = Arc::clone(&self.checkpointer.one_at_a_time).try_lock_owned() else {
            // The one running covers most of it; the next flush checks again.
            return;
        };
        let picked = match self.pick_checkpoint(fs, None) {
            Ok(Some(p)) => p,
            // Due still: the next flush to publish picks.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("checkpoint not started: {e}");
                return;
            }
        };
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _running = running;
            if let Err(e) = this.store_checkpoint(picked).await {
                tracing::warn!("checkpoint failed (will retry after the next flush): {e}");
            }
        });
        *self.checkpointer.task.lock() = Some(task);
    }

    /// Hold off checkpoints (after the one running) while `f` runs: the
    /// collector marks from the newest checkpoint stored, and none is
    /// picked meanwhile (docs/rfcs/0004).
    pub(super) async fn without_checkpoints(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.checkpointer.one_at_a_time.lock().await
    }

    /// Whether a checkpoint is being stored now.
    pub(super) fn checkpoint_running(&self) -> bool {
        self.checkpointer.one_at_a_time.try_lock().is_err()
    }

    /// Wait until no checkpoint is being stored.
    pub(super) async fn checkpoint_settled(&self) {
        drop(self.checkpointer.one_at_a_time.lock().await);
    }

    /// Write a checkpoint now and wait for it (after one in flight).
    /// `always`: even when nothing was published since the last one.
    pub(super) async fn write_checkpoint(&self, always: bool) -> Result<()> {
        let _one = self.checkpointer.one_at_a_time.lock().await;
        let picked = {
            // After the flushes in flight, and before any other: every id
            // below the position is then published or never will be.
            let drained = self.pipeline.drain().await;
            let mut fs = self.flush.lock().await;
            let wanted = always
                || fs.segments_since_checkpoint > 0
                || self.checkpointer.unstored.load(Ordering::SeqCst);
            if !wanted {
                return Ok(());
            }
            self.pick_checkpoint(&mut fs, Some(&drained))?
                .expect("a drained pipeline always picks")
        };
        self.store_checkpoint(picked).await
    }
}
