//! The log store: creating a volume, opening it (its `Fence` claims and
//! seals, then recovery rebuilds the index), appending segments and
//! checkpoints.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::append::Appender;
use super::backend::{CountingStore, DynStore, RequestStats, StoreError};
use super::checkpoint;
use super::fencing::{self, Claim, Fence, SealChain};
use super::index::{Index, Loc};
use super::keys::{Secret, VolumeKeys};
use super::paths;
use super::segment::SegmentId;
use super::segment::{self, TAIL_READ};
use super::superblock::{CreateParams, Superblock};
use crate::error::{Error, Result};

/// How many segment tables recovery fetches at once.
const REPLAY_CONCURRENCY: usize = 8;
/// How many index runs a checkpoint reads or writes at once.
const RUN_CONCURRENCY: usize = 8;
/// How many times an opener lists again because a predecessor's segment
/// landed at a name it was fencing, before it gives up.
const FENCE_ROUNDS: u32 = 8;

#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    /// Take over from a writer that may still be alive (it will be fenced).
    pub force: bool,
    /// Accept a backend without atomic conditional create (unsafe: two
    /// writers could both believe they own the volume).
    pub allow_unconditional: bool,
    /// The journal directory the writer will keep its host-local journal
    /// in (`Volume::attach_journal`), as `volume::journal::dir_identity`
    /// names it; recorded in its claim. None: no journal.
    pub journal: Option<String>,
}

#[derive(Debug, Clone)]
pub enum OpenMode {
    ReadOnly,
    Writer(WriterOptions),
}

/// What recovery found, for `inspect` and logs.
#[derive(Debug, Clone, Default)]
pub struct LogSummary {
    /// Highest claimed epoch (ours when writing).
    pub epoch: u64,
    pub owner: Option<String>,
    pub released: bool,
    pub segments: usize,
    pub segment_bytes: u64,
    pub checkpoints: usize,
    pub checkpoint_bytes: u64,
    pub checkpoint_used: Option<SegmentId>,
    /// The index runs of that checkpoint (None: none, or a whole-index
    /// checkpoint of an older format): what the next one builds on.
    pub chain: Option<checkpoint::Chain>,
    pub replayed_segments: usize,
    /// Segments present but not part of the log (fenced writers' leftovers).
    pub ignored_segments: usize,
    /// Fence markers: names new owners took from writers they fenced
    /// (docs/rfcs/0003), kept for good.
    pub fences: usize,
    /// What the listings at open found (garbage collection starts from it).
    pub inventory: Inventory,
}

/// The objects of a bucket as listed (segments and checkpoints with their
/// sizes, the epochs of seals).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub segments: std::collections::BTreeMap<SegmentId, u64>,
    pub checkpoints: std::collections::BTreeMap<SegmentId, u64>,
    pub seals: Vec<u64>,
}

pub struct LogStore {
    store: DynStore,
    counting: CountingStore,
    superblock: Superblock,
    keys: VolumeKeys,
    /// Claims, seals, the owner check; our claim when writing.
    fence: Fence,
    /// Our segment ids and the window rule, when writing (docs/rfcs/0003).
    appender: Option<Appender>,
}

impl LogStore {
    /// Write a new volume's superblock. Fails if one exists.
    pub async fn create(
        store: &DynStore,
        params: &CreateParams,
        secret: &Secret,
        allow_unconditional: bool,
    ) -> Result<Superblock> {
        params.validate()?;
        fencing::require_conditional_create(store, allow_unconditional).await?;
        if !store
            .list("")
            .await?
            .iter()
            .all(|o| o.key.starts_with(paths::PROBES))
        {
            return Err(Error::VolumeExists(store.describe()));
        }
        let (sb, _) = Superblock::new(params, secret)?;
        let encoded = Bytes::from(sb.encode());
        let ours = |d: &Bytes| *d == encoded;
        if !fencing::create_or_confirm(store, paths::SUPERBLOCK, encoded.clone(), ours).await? {
            return Err(Error::VolumeExists(store.describe()));
        }
        Ok(sb)
    }

    pub async fn read_superblock(store: &DynStore) -> Result<Superblock> {
        match store.get(paths::SUPERBLOCK).await {
            Ok(bytes) => Superblock::decode(&bytes),
            Err(StoreError::NotFound(_)) => Err(Error::NoVolume(store.describe())),
            Err(e) => Err(e.into()),
        }
    }

    /// Open the volume: unlock the key, claim a writer epoch (unless
    /// read-only), seal the previous log, and rebuild the index.
    pub async fn open(
        store: DynStore,
        secret: &Secret,
        mode: OpenMode,
    ) -> Result<(LogStore, Index, LogSummary)> {
        let counting = CountingStore::new(store);
        let store: DynStore = Arc::new(counting.clone());
        let superblock = Self::read_superblock(&store).await?;
        let keys = superblock.unlock(secret)?;
        let mut log = LogStore {
            fence: Fence::new(store.clone(), keys.clone()),
            store,
            counting,
            superblock,
            keys,
            appender: None,
        };
        let mut summary = LogSummary::default();
        if let OpenMode::Writer(opts) = mode {
            fencing::require_conditional_create(&log.store, opts.allow_unconditional).await?;
            let epoch = log
                .fence
                .claim_next(opts.force, opts.journal.clone())
                .await?;
            log.appender = Some(Appender::new(epoch));
            // Before any object of ours exists: an older build must refuse
            // the volume rather than fail on every object keyed to us.
            log.upgrade_format(secret).await?;
        }
        // Listing strictly after the claim: see ARCHITECTURE.md, fencing.
        // A reader's listing can name an object that garbage collection
        // deletes before the reader fetches it (at the end of its grace
        // period): list again. A writer cannot meet this — what is deleted
        // under it is older than the checkpoint it recovers from
        // (docs/rfcs/0002) — and has written its seal from the listing.
        let read_only = log.fence.epoch().is_none();
        let mut attempt = 0;
        let (index, _) = loop {
            attempt += 1;
            match log.recover(&mut summary).await {
                Err(Error::Store(StoreError::NotFound(key))) if read_only && attempt < 3 => {
                    tracing::warn!("{key} was deleted after the listing; listing again");
                    summary = LogSummary::default();
                }
                result => break result?,
            }
        };
        Ok((log, index, summary))
    }

    /// List the log, seal it (writer), load the newest valid checkpoint and
    /// replay the valid segments after it.
    async fn recover(&self, summary: &mut LogSummary) -> Result<(Index, Option<SegmentId>)> {
        let mut round = 0;
        let (seals, segments, checkpoints) = loop {
            round += 1;
            // Checkpoints before segments: every segment at or below a
            // listed checkpoint landed before it, so before this listing
            // of the segments (docs/rfcs/0003, case 4).
            let seals_listed = self.store.list(paths::SEALS).await?;
            let cp_listed = self.store.list(paths::CHECKPOINTS).await?;
            let seg_listed = self.store.list(paths::SEGMENTS).await?;
            let seals = self.fence.read_seals(&seals_listed).await?;
            let listed = paths::listed_ids(&seg_listed, paths::SEGMENTS);
            let checkpoints = paths::listed_ids(&cp_listed, paths::CHECKPOINTS);
            if self.fence.epoch().is_some() {
                // Before our seal: fence whoever may still write, so no
                // segment of theirs lands after this listing and counts.
                let from = SealChain::from_seals(seals.clone()).latest();
                let kinds: Vec<(SegmentId, bool)> = listed
                    .iter()
                    .map(|(id, size)| (*id, fencing::is_fence(*size)))
                    .collect();
                let cps: Vec<SegmentId> = checkpoints.iter().map(|(id, _)| *id).collect();
                if self
                    .fence
                    .fence_predecessors(from, &kinds, &cps)
                    .await?
                    .is_none()
                {
                    if round >= FENCE_ROUNDS {
                        return Err(Error::InUse(
                            "the previous writer keeps writing segments while it is being fenced; \
                             stop it, then open again"
                                .into(),
                        ));
                    }
                    tracing::warn!("a segment landed after the listing; listing again");
                    continue;
                }
            }
            summary.fences = listed.iter().filter(|(_, s)| fencing::is_fence(*s)).count();
            let segments: Vec<(SegmentId, u64)> = listed
                .into_iter()
                .filter(|(_, size)| !fencing::is_fence(*size))
                .collect();
            break (seals, segments, checkpoints);
        };
        let mut chain_epochs: Vec<u64> = seals.keys().copied().collect();

        let chain = if self.fence.epoch().is_some() {
            let seg_ids: Vec<SegmentId> = segments.iter().map(|(s, _)| *s).collect();
            let cp_ids: Vec<SegmentId> = checkpoints.iter().map(|(s, _)| *s).collect();
            chain_epochs.extend(self.fence.epoch());
            // Our seal tops the chain now.
            self.fence.seal(seals, &seg_ids, &cp_ids).await?
        } else {
            SealChain::from_seals(seals)
        };

        let valid_segments: Vec<(SegmentId, u64)> = segments
            .iter()
            .filter(|(id, _)| chain.segment_is_valid(*id))
            .copied()
            .collect();
        summary.segments = valid_segments.len();
        summary.ignored_segments = segments.len() - valid_segments.len();
        summary.segment_bytes = valid_segments.iter().map(|(_, s)| s).sum();
        summary.checkpoints = checkpoints.len();
        summary.checkpoint_bytes = checkpoints.iter().map(|(_, s)| s).sum();
        summary.epoch = match self.fence.epoch() {
            Some(e) => e,
            None => self.fence.latest_epoch().await?,
        };
        if self.fence.epoch().is_none() && summary.epoch > 0 {
            summary.released = self.fence.is_released(summary.epoch).await?;
            summary.owner = self
                .fence
                .read_claim(summary.epoch)
                .await
                .ok()
                .map(|c| c.describe());
        }

        let chunks = self.chunks();
        let newest_cp = checkpoints
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| chain.checkpoint_is_valid(*id))
            .max();
        // Key the objects recovery reads to their writers: the checkpoint,
        // the segments replayed, then the segments the index names. Only
        // those: garbage collection deletes the claims of epochs nothing
        // refers to any more, whose leftovers are never read.
        let to_replay: Vec<(SegmentId, u64)> = valid_segments
            .into_iter()
            .filter(|(id, _)| newest_cp.is_none_or(|cp| *id > cp))
            .collect();
        let read_epochs = newest_cp
            .iter()
            .chain(to_replay.iter().map(|(id, _)| id))
            .map(|id| id.epoch)
            .collect::<std::collections::BTreeSet<u64>>();
        self.fence.bind_writers(&chain, read_epochs).await?;
        let (mut index, runs) = match newest_cp {
            Some(cp) => {
                let size = checkpoints
                    .iter()
                    .find(|(id, _)| *id == cp)
                    .map_or(0, |c| c.1);
                self.read_checkpoint(cp, size).await?
            }
            None => (Index::default(), None),
        };
        // The checkpoint's entries were loaded, not recorded as changes;
        // the segments replayed below are (the next delta holds them).
        summary.chain = runs;
        summary.checkpoint_used = newest_cp;
        summary.inventory = Inventory {
            segments: segments.iter().copied().collect(),
            checkpoints: checkpoints.iter().copied().collect(),
            seals: chain_epochs.clone(),
        };

        // A segment the chain names but the bucket lacks would silently
        // roll its chunks back to older versions: refuse, naming it.
        // (Segments at or before the checkpoint are not replayed; a missing
        // one of those is an I/O error when a chunk in it is read.)
        let present: std::collections::HashSet<SegmentId> =
            segments.iter().map(|(id, _)| *id).collect();
        if let Some((sealed_by, missing)) = chain
            .named_segments()
            .filter(|(_, id)| newest_cp.is_none_or(|cp| *id > cp))
            .find(|(_, id)| !present.contains(id))
        {
            return Err(Error::Integrity(format!(
                "object {} is missing from the bucket, but the log names it (seal of epoch {sealed_by}); \
                 refusing to open, as its chunks would read older data",
                paths::segment(missing)
            )));
        }

        summary.replayed_segments = to_replay.len();
        let mut tables = futures::stream::iter(to_replay.iter().copied())
            .map(|(id, size)| self.read_table(id, size))
            .buffered(REPLAY_CONCURRENCY);
        let mut last = newest_cp;
        while let Some(table) = tables.next().await {
            let (id, entries) = table?;
            for e in entries {
                Index::check_chunk(e.chunk, chunks, &format!("segment {id}"))?;
                match e.loc(id) {
                    // Laid over the chunk's frames (docs/rfcs/0007).
                    Some(loc) if e.patch => index
                        .patch(e.chunk, loc)
                        .map_err(|err| Error::Integrity(format!("segment {id}: {err}")))?,
                    loc => index.set_frame(e.chunk, loc),
                }
            }
            last = Some(id);
        }
        let referenced = index
            .live_segments()
            .keys()
            .map(|id| id.epoch)
            .collect::<std::collections::BTreeSet<u64>>();
        self.fence.bind_writers(&chain, referenced).await?;
        Ok((index, last))
    }

    /// A format-2 volume becomes format 3 when a format-3 writer first
    /// claims it (docs/rfcs/0001): the superblock is replaced by one with
    /// the new version, the data key re-wrapped (the public parameters are
    /// its associated data). Readers see the old or the new object whole;
    /// both unwrap to the same key.
    async fn upgrade_format(&mut self, secret: &Secret) -> Result<()> {
        if self.superblock.params.format_version >= super::superblock::FORMAT_VERSION {
            return Ok(());
        }
        let upgraded = self.superblock.upgraded(secret, &self.keys)?;
        self.store
            .put(paths::SUPERBLOCK, Bytes::from(upgraded.encode()))
            .await?;
        tracing::info!(
            "volume format upgraded from {} to {} (older builds now refuse it)",
            self.superblock.params.format_version,
            upgraded.params.format_version
        );
        self.superblock = upgraded;
        Ok(())
    }

    /// Fetch and authenticate one segment's table.
    pub async fn read_table(
        &self,
        id: SegmentId,
        size: u64,
    ) -> Result<(SegmentId, Vec<segment::TableEntry>)> {
        let tail_start = size.saturating_sub(TAIL_READ);
        let tail = self
            .store
            .get_range(&paths::segment(id), tail_start..size)
            .await?;
        let (table_off, table_len) = segment::table_range(id, &tail, size)?;
        let encrypted = if table_off >= tail_start {
            tail.slice(
                (table_off - tail_start) as usize..(table_off - tail_start + table_len) as usize,
            )
        } else {
            self.store
                .get_range(&paths::segment(id), table_off..table_off + table_len)
                .await?
        };
        let (entries, _crc) = segment::decode_table(&self.keys, id, &encrypted, table_off)?;
        Ok((id, entries))
    }

    /// Every request this volume made of the store since it was opened.
    pub fn request_stats(&self) -> RequestStats {
        self.counting.stats()
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn keys(&self) -> &VolumeKeys {
        &self.keys
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn chunk_size(&self) -> u32 {
        self.superblock.params.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.superblock.params.size / self.chunk_size() as u64
    }

    pub fn epoch(&self) -> Option<u64> {
        self.fence.epoch()
    }

    /// Our claim, when writing.
    pub fn claim(&self) -> Option<&Claim> {
        self.fence.claim()
    }

    /// The ownership protocol: claims, seals, the owner check, release.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    fn appender(&self) -> Result<&Appender> {
        self.appender
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume is open read-only".into()))
    }

    /// A fresh segment id. Never reused: a failed upload is put again
    /// with the same bytes, so no two different contents are ever
    /// encrypted under one segment name (docs/rfcs/0003).
    pub fn alloc_segment(&self) -> Result<SegmentId> {
        Ok(self.appender()?.alloc())
    }

    /// Ids allocated that will not be put as planned, with the bytes
    /// encrypted for them if any (put again later) — else an empty
    /// segment fills each (docs/rfcs/0003).
    pub fn give_up_segments(&self, ids: impl IntoIterator<Item = (SegmentId, Option<Bytes>)>) {
        if let Some(a) = &self.appender {
            a.give_up(ids);
        }
    }

    /// Create a segment of ours (conditional create, after the window).
    /// `Err(Fenced)`: a newer owner fenced the name.
    pub async fn put_segment(&self, id: SegmentId, data: Bytes) -> Result<()> {
        self.appender()?
            .put(&self.store, &self.keys, id, data)
            .await
    }

    /// Put again the segments whose upload failed and fill abandoned ids
    /// (no request when there are none), those whose window allows now;
    /// the rest are settled by the PUTs above them (docs/rfcs/0005).
    pub async fn settle_segments(&self) -> Result<()> {
        match &self.appender {
            Some(a) if a.unsettled(None) => {
                let skip = super::append::Blocked::Skip;
                a.settle(&self.store, &self.keys, None, skip).await
            }
            _ => Ok(()),
        }
    }

    /// Read the checkpoint at `position`: a whole index (formats 2 to 4),
    /// or a root and its runs, read in parallel and applied in order.
    /// Returns the index and, for a root, the chain the next checkpoint
    /// builds on.
    async fn read_checkpoint(
        &self,
        position: SegmentId,
        size: u64,
    ) -> Result<(Index, Option<checkpoint::Chain>)> {
        let chunks = self.chunks();
        let data = self
            .store
            .get_sized(&paths::checkpoint(position), size)
            .await?;
        let keys = self.keys.clone();
        let decoded =
            tokio::task::spawn_blocking(move || checkpoint::decode(&keys, position, &data, chunks))
                .await
                .expect("checkpoint decode task")?;
        let root = match decoded {
            checkpoint::Checkpoint::Whole(index) => return Ok((index, None)),
            checkpoint::Checkpoint::Root(root) => root,
        };
        // The root is authenticated under its own epoch's key: the tokens
        // it carries for older epochs are as good as a seal's.
        for (epoch, token) in &root.tokens {
            if self.keys.epoch_token(*epoch).is_none() {
                self.keys.bind_epoch(*epoch, token);
            }
        }
        let reads = futures::stream::iter(root.runs.iter().copied())
            .map(|run| {
                let keys = self.keys.clone();
                async move {
                    let data = self
                        .store
                        .get_sized(&paths::index_run(run.id), run.size)
                        .await?;
                    tokio::task::spawn_blocking(move || {
                        checkpoint::decode_run(&keys, &run, &data, chunks)
                    })
                    .await
                    .expect("index run decode task")
                }
            })
            .buffered(RUN_CONCURRENCY);
        let runs: Vec<Vec<checkpoint::Entry>> = reads
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let mut index = Index::default();
        let mut delta_chunks = Vec::new();
        for (run, entries) in root.runs.iter().zip(&runs) {
            let mut chunks = imbl::OrdSet::new();
            for (chunk, loc) in entries {
                index.load(*chunk, loc.clone());
                if run.id.kind == checkpoint::RunKind::Delta {
                    chunks.insert(*chunk);
                }
            }
            if run.id.kind == checkpoint::RunKind::Delta {
                delta_chunks.push(chunks);
            }
        }
        Ok((
            index,
            Some(checkpoint::Chain::from_root(&root, delta_chunks)),
        ))
    }

    /// Store a planned checkpoint: its new runs in parallel, then its
    /// root (a root is stored only once every run it names is). Returns
    /// the chain it makes and the root's size.
    pub async fn put_checkpoint(&self, plan: checkpoint::Plan) -> Result<(checkpoint::Chain, u64)> {
        let position = plan.position;
        if Some(position.epoch) != self.fence.epoch() {
            return Err(Error::InvalidArgument(
                "checkpoint of a foreign epoch".into(),
            ));
        }
        let keys = self.keys.clone();
        let (plan, encoded) = tokio::task::spawn_blocking(move || {
            let encoded: Vec<(checkpoint::RunRef, Bytes)> = plan
                .runs_to_write()
                .into_iter()
                .map(|(id, entries)| {
                    let data = checkpoint::encode_run(&keys, id, &entries);
                    let run = checkpoint::RunRef {
                        id,
                        entries: entries.len() as u64,
                        size: data.len() as u64,
                    };
                    (run, data)
                })
                .collect();
            (plan, encoded)
        })
        .await
        .expect("checkpoint encode task");
        let mut puts = futures::stream::iter(encoded.iter().cloned())
            .map(|(run, data)| async move { self.store.put(&paths::index_run(run.id), data).await })
            .buffer_unordered(RUN_CONCURRENCY);
        while let Some(put) = puts.next().await {
            put?;
        }
        drop(puts);
        // The tokens of the older epochs whose segments the index names
        // (so an open binds them without reading their claims) ...
        let segment_epochs: std::collections::BTreeSet<u64> = plan
            .snapshot
            .live_segments()
            .keys()
            .map(|id| id.epoch)
            .filter(|e| *e != position.epoch)
            .collect();
        let (mut root, chain) = plan.finish(encoded.into_iter().map(|(r, _)| r).collect());
        for e in segment_epochs {
            if let Some(token) = self.keys.epoch_token(e) {
                root.tokens.insert(e, token);
            }
        }
        // ... and of those whose runs it names: bound when those runs were
        // read at open.
        for run in &root.runs {
            let e = run.id.position.epoch;
            if e != position.epoch && !root.tokens.contains_key(&e) {
                let token = self.keys.epoch_token(e).ok_or_else(|| {
                    Error::Integrity(format!(
                        "no claim token known for epoch {e}, whose index run {} a checkpoint names",
                        run.id.name()
                    ))
                })?;
                root.tokens.insert(e, token);
            }
        }
        let data = checkpoint::encode_root(&self.keys, position, &root);
        let size = data.len() as u64;
        self.store.put(&paths::checkpoint(position), data).await?;
        Ok((chain, size))
    }

    /// Delete one object (garbage collection decides which: docs/rfcs/0002).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.store.delete(key).await?;
        Ok(())
    }

    /// Bytes of one segment, by ranged GET.
    pub async fn read_range(&self, id: SegmentId, range: std::ops::Range<u64>) -> Result<Bytes> {
        Ok(self.store.get_range(&paths::segment(id), range).await?)
    }

    /// One chunk's frame, by ranged GET.
    pub async fn read_frame(&self, loc: Loc) -> Result<Bytes> {
        let start = loc.offset as u64;
        Ok(self
            .store
            .get_range(&paths::segment(loc.segment), start..start + loc.len as u64)
            .await?)
    }
}
