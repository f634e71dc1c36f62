//! The log store: creating a volume, opening it (claim, seal, recover),
//! appending segments, checkpoints, and the ownership check before a FLUSH
//! is acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;

use super::backend::{CountingStore, DynStore, ObjectInfo, RequestStats, StoreError};
use super::checkpoint;
use super::fencing::{Claim, Seal, SealChain, decrypt_record, encrypt_record};
use super::index::{Index, Loc};
use super::keys::{Secret, VolumeKeys};
use super::paths;
use super::segment::SegmentId;
use super::segment::{self, TAIL_READ};
use super::superblock::{CreateParams, Superblock};
use crate::error::{Error, Result};

/// How many segment tables recovery fetches at once.
const REPLAY_CONCURRENCY: usize = 8;

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
    pub replayed_segments: usize,
    /// Segments present but not part of the log (fenced writers' leftovers).
    pub ignored_segments: usize,
}

pub struct LogStore {
    store: DynStore,
    counting: CountingStore,
    superblock: Superblock,
    keys: VolumeKeys,
    /// Our epoch when writing; None when read-only.
    epoch: Option<u64>,
    /// Our claim of that epoch.
    claim: Option<Claim>,
    next_seq: AtomicU64,
}

/// Conditional create that survives a lost response: a create whose
/// first attempt landed but reported an error (or was retried by the
/// transport and then found the object) is recognized by reading the
/// object back. `Ok(false)`: someone else's object is there.
async fn create_or_confirm(
    store: &DynStore,
    key: &str,
    data: Bytes,
    ours: impl Fn(&Bytes) -> bool,
) -> Result<bool> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.put_if_absent(key, data.clone()).await {
            Ok(true) => return Ok(true),
            Ok(false) => {
                let existing = store.get(key).await?;
                return Ok(ours(&existing));
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!("creating {key} failed (attempt {attempt}, retrying): {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Check that the backend really refuses a second create of one key.
async fn probe_conditional_create(store: &DynStore) -> Result<bool> {
    let key = paths::probe();
    let first =
        create_or_confirm(store, &key, Bytes::from_static(b"1"), |d| &d[..] == b"1").await?;
    let second =
        create_or_confirm(store, &key, Bytes::from_static(b"2"), |d| &d[..] == b"2").await?;
    let kept = store.get(&key).await?;
    // A probe object left behind is harmless (`create` ignores them).
    if let Err(e) = store.delete(&key).await {
        tracing::warn!("could not remove the probe object {key}: {e}");
    }
    Ok(first && !second && kept.as_ref() == b"1")
}

async fn require_conditional_create(store: &DynStore, allow_unconditional: bool) -> Result<()> {
    if allow_unconditional {
        tracing::warn!("conditional create not verified: single-writer safety is on you");
        return Ok(());
    }
    if !store.supports_conditional_create() || !probe_conditional_create(store).await? {
        return Err(Error::Unsupported(format!(
            "{} does not enforce conditional create (If-None-Match: *), so two writers could \
             corrupt the volume; pass --allow-unsafe-no-conditional-create to accept that risk",
            store.describe()
        )));
    }
    Ok(())
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
        require_conditional_create(store, allow_unconditional).await?;
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
        if !create_or_confirm(store, paths::SUPERBLOCK, encoded.clone(), ours).await? {
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
            store,
            counting,
            superblock,
            keys,
            epoch: None,
            claim: None,
            next_seq: AtomicU64::new(0),
        };
        let mut summary = LogSummary::default();
        if let OpenMode::Writer(opts) = mode {
            require_conditional_create(&log.store, opts.allow_unconditional).await?;
            let (epoch, claim) = log.claim_epoch(opts.force, opts.journal.clone()).await?;
            log.keys.bind_epoch(epoch, &claim.token);
            log.epoch = Some(epoch);
            log.claim = Some(claim);
            // Before any object of ours exists: an older build must refuse
            // the volume rather than fail on every object keyed to us.
            log.upgrade_format(secret).await?;
        }
        // Listing strictly after the claim: see ARCHITECTURE.md, fencing.
        let (index, _) = log.recover(&mut summary).await?;
        Ok((log, index, summary))
    }

    /// Who claimed `epoch` (authenticated).
    pub async fn read_claim(&self, epoch: u64) -> Result<Claim> {
        let data = self.store.get(&paths::claim(epoch)).await?;
        decrypt_record(&self.keys, "claim", epoch, &data)
    }

    /// The claim of `epoch`, or None if the bucket has none.
    pub async fn claim_if_present(&self, epoch: u64) -> Result<Option<Claim>> {
        match self.read_claim(epoch).await {
            Ok(c) => Ok(Some(c)),
            Err(Error::Store(StoreError::NotFound(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn latest_epoch(&self) -> Result<u64> {
        let listed = self.store.list(paths::CLAIMS).await?;
        Ok(paths::listed_epochs(&listed, paths::CLAIMS)
            .into_iter()
            .max()
            .unwrap_or(0))
    }

    async fn is_released(&self, epoch: u64) -> Result<bool> {
        Ok(self.store.exists(&paths::release(epoch)).await?)
    }

    /// Claim the next epoch by conditional create.
    async fn claim_epoch(&self, force: bool, journal: Option<String>) -> Result<(u64, Claim)> {
        let current = self.latest_epoch().await?;
        if current > 0 && !self.is_released(current).await? {
            let owner = self.read_claim(current).await?;
            if owner.is_provably_dead() {
                tracing::warn!("previous writer {} is gone; taking over", owner.describe());
            } else if force {
                tracing::warn!("--force: fencing writer {}", owner.describe());
            } else {
                return Err(Error::InUse(owner.describe()));
            }
        }
        let epoch = current + 1;
        let mine = Claim::mine(journal);
        let key = paths::claim(epoch);
        let record = encrypt_record(&self.keys, "claim", epoch, &mine);
        let ours = |data: &Bytes| {
            decrypt_record::<Claim>(&self.keys, "claim", epoch, data)
                .is_ok_and(|c| c.token == mine.token)
        };
        // A create whose first attempt landed reads back as ours.
        if !create_or_confirm(&self.store, &key, record, ours).await? {
            let winner = self.read_claim(epoch).await?;
            return Err(Error::InUse(winner.describe()));
        }
        tracing::info!("claimed writer epoch {epoch}");
        Ok((epoch, mine))
    }

    /// Every seal, fetched several at a time (one per takeover: a volume
    /// restarted daily has hundreds, and open waited for each in turn).
    async fn read_seals(&self, listed: &[ObjectInfo]) -> Result<BTreeMap<u64, Seal>> {
        let wanted = paths::listed_epochs(listed, paths::SEALS);
        let mut fetches = futures::stream::iter(wanted)
            .map(|epoch| async move {
                let data = self.store.get(&paths::seal(epoch)).await?;
                Ok::<_, Error>((epoch, data))
            })
            .buffer_unordered(REPLAY_CONCURRENCY);
        let mut seals = BTreeMap::new();
        while let Some(fetched) = fetches.next().await {
            let (epoch, data) = fetched?;
            seals.insert(
                epoch,
                decrypt_record::<Seal>(&self.keys, "seal", epoch, &data)?,
            );
        }
        Ok(seals)
    }

    /// List the log, seal it (writer), load the newest valid checkpoint and
    /// replay the valid segments after it.
    async fn recover(&self, summary: &mut LogSummary) -> Result<(Index, Option<SegmentId>)> {
        let seals_listed = self.store.list(paths::SEALS).await?;
        let seg_listed = self.store.list(paths::SEGMENTS).await?;
        let cp_listed = self.store.list(paths::CHECKPOINTS).await?;
        let mut seals = self.read_seals(&seals_listed).await?;
        let mut chain = SealChain::from_seals(seals.clone());

        let segments = paths::listed_ids(&seg_listed, paths::SEGMENTS);
        let checkpoints = paths::listed_ids(&cp_listed, paths::CHECKPOINTS);

        if let Some(epoch) = self.epoch {
            let seg_ids: Vec<SegmentId> = segments.iter().map(|(s, _)| *s).collect();
            let cp_ids: Vec<SegmentId> = checkpoints.iter().map(|(s, _)| *s).collect();
            let mut seal = Seal::from_listing(chain.latest(), epoch, &seg_ids, &cp_ids);
            // Whose token each sealed epoch's objects are keyed to: that
            // epoch's claim says (usually the one epoch before ours, whose
            // claim the takeover read already).
            for e in seal.epochs() {
                if let Some(token) = self.writer_of(e).await? {
                    seal.writers.insert(e, token);
                }
            }
            seal.writers_recorded = true;
            let key = paths::seal(epoch);
            let record = encrypt_record(&self.keys, "seal", epoch, &seal);
            let ours = |data: &Bytes| {
                decrypt_record::<Seal>(&self.keys, "seal", epoch, data).is_ok_and(|s| s == seal)
            };
            if !create_or_confirm(&self.store, &key, record, ours).await? {
                return Err(Error::InUse(format!("another writer sealed epoch {epoch}")));
            }
            // Our seal tops the chain now.
            seals.insert(epoch, seal);
            chain = SealChain::from_seals(seals);
        }

        self.bind_writers(&chain, &segments, &checkpoints).await?;
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
        summary.epoch = match self.epoch {
            Some(e) => e,
            None => self.latest_epoch().await?,
        };
        if self.epoch.is_none() && summary.epoch > 0 {
            summary.released = self.is_released(summary.epoch).await?;
            summary.owner = self
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
        let mut index = match newest_cp {
            Some(cp) => {
                let size = checkpoints
                    .iter()
                    .find(|(id, _)| *id == cp)
                    .map_or(0, |c| c.1);
                let data = self.store.get_sized(&paths::checkpoint(cp), size).await?;
                let keys = self.keys.clone();
                tokio::task::spawn_blocking(move || checkpoint::decode(&keys, cp, &data, chunks))
                    .await
                    .expect("checkpoint decode task")?
            }
            None => Index::default(),
        };
        summary.checkpoint_used = newest_cp;

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

        let to_replay: Vec<(SegmentId, u64)> = valid_segments
            .into_iter()
            .filter(|(id, _)| newest_cp.is_none_or(|cp| *id > cp))
            .collect();
        summary.replayed_segments = to_replay.len();
        let mut tables = futures::stream::iter(to_replay.iter().copied())
            .map(|(id, size)| self.read_table(id, size))
            .buffered(REPLAY_CONCURRENCY);
        let mut last = newest_cp;
        while let Some(table) = tables.next().await {
            let (id, entries) = table?;
            for e in entries {
                Index::check_chunk(e.chunk, chunks, &format!("segment {id}"))?;
                index.set(e.chunk, e.loc(id));
            }
            last = Some(id);
        }
        Ok((index, last))
    }

    /// The token objects of `epoch` are keyed to, by its claim (None:
    /// unbound, a format-2 writer). An epoch with objects always had a
    /// claim; a missing one is refused rather than guessed, since a seal
    /// records the answer for good.
    async fn writer_of(&self, epoch: u64) -> Result<Option<String>> {
        match self.claim_if_present(epoch).await? {
            Some(c) => Ok(c.keys_bound.then_some(c.token)),
            None => Err(Error::Integrity(format!(
                "epoch {epoch} has objects in the bucket but no claim ({}): \
                 whose keys they are under is unknown",
                paths::claim(epoch)
            ))),
        }
    }

    /// Key every epoch's objects to its writer: as the seal deciding the
    /// epoch records it, else (the unsealed tail, a format-2 build's seal)
    /// as its claim says.
    async fn bind_writers(
        &self,
        chain: &SealChain,
        segments: &[(SegmentId, u64)],
        checkpoints: &[(SegmentId, u64)],
    ) -> Result<()> {
        let epochs: std::collections::BTreeSet<u64> = segments
            .iter()
            .chain(checkpoints)
            .map(|(id, _)| id.epoch)
            .filter(|e| self.keys.epoch_token(*e).is_none())
            .collect();
        let mut ask = Vec::new();
        for e in epochs {
            match chain.writer(e) {
                Some(Some(token)) => self.keys.bind_epoch(e, &token),
                Some(None) => {}
                None => ask.push(e),
            }
        }
        let mut claims = futures::stream::iter(ask)
            .map(|e| async move { Ok::<_, Error>((e, self.writer_of(e).await?)) })
            .buffer_unordered(REPLAY_CONCURRENCY);
        while let Some(answer) = claims.next().await {
            if let (e, Some(token)) = answer? {
                self.keys.bind_epoch(e, &token);
            }
        }
        Ok(())
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
        self.epoch
    }

    /// Our claim, when writing.
    pub fn claim(&self) -> Option<&Claim> {
        self.claim.as_ref()
    }

    fn writer_epoch(&self) -> Result<u64> {
        self.epoch
            .ok_or_else(|| Error::InvalidArgument("volume is open read-only".into()))
    }

    /// A fresh segment id. Never reused, even if its upload fails, so no
    /// two different contents are ever encrypted under one segment name.
    pub fn alloc_segment(&self) -> Result<SegmentId> {
        Ok(SegmentId {
            epoch: self.writer_epoch()?,
            seq: self.next_seq.fetch_add(1, Ordering::SeqCst),
        })
    }

    pub async fn put_segment(&self, id: SegmentId, data: Bytes) -> Result<()> {
        self.store.put(&paths::segment(id), data).await?;
        Ok(())
    }

    /// Confirm no newer writer has claimed the volume. Called after a
    /// FLUSH's segments are acknowledged and before the FLUSH is.
    pub async fn check_owner(&self) -> Result<()> {
        let epoch = self.writer_epoch()?;
        let next = paths::claim(epoch + 1);
        if self.store.exists(&next).await? {
            return Err(Error::Fenced(epoch));
        }
        Ok(())
    }

    /// Write the index as of `position` (one of our own segments).
    pub async fn put_checkpoint(&self, position: SegmentId, index: Index) -> Result<()> {
        if Some(position.epoch) != self.epoch {
            return Err(Error::InvalidArgument(
                "checkpoint of a foreign epoch".into(),
            ));
        }
        let keys = self.keys.clone();
        let data = tokio::task::spawn_blocking(move || checkpoint::encode(&keys, position, &index))
            .await
            .expect("checkpoint encode task");
        self.store.put(&paths::checkpoint(position), data).await?;
        Ok(())
    }

    /// One chunk's frame, by ranged GET.
    pub async fn read_frame(&self, loc: Loc) -> Result<Bytes> {
        let start = loc.offset as u64;
        Ok(self
            .store
            .get_range(&paths::segment(loc.segment), start..start + loc.len as u64)
            .await?)
    }

    /// Mark a clean shutdown: the next opener needs no --force.
    pub async fn release(&self) -> Result<()> {
        let epoch = self.writer_epoch()?;
        self.check_owner().await?;
        self.store
            .put(
                &paths::release(epoch),
                encrypt_record(&self.keys, "release", epoch, &epoch),
            )
            .await?;
        Ok(())
    }
}
