//! Single-writer fencing: the records (epoch claims, seals, release
//! markers) and the `Fence` that runs the protocol over them.
//!
//! - `epochs/<epoch>`: a writer's claim, made by conditional create. Holds
//!   (encrypted) who claimed it: host, pid, boot id, time, random token.
//! - `seals/<epoch>`: written by the owner of `<epoch>` right after its
//!   claim and its listing of the log: the exact set of segments and
//!   checkpoints of earlier, not-yet-sealed epochs that form the log. A
//!   fenced writer's segment that lands later is in no seal, so everyone
//!   ignores it forever.
//! - `released/<epoch>`: written on clean shutdown; the next opener needs
//!   no `--force`.
//!
//! Seals form a chain: each names the seal it continues (`covers_from`).
//! Only the chain from the newest seal counts, so a seal written late by a
//! writer that was already superseded is ignored. See ARCHITECTURE.md for
//! the full argument.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use futures::StreamExt;

use super::backend::{DynStore, ObjectInfo, StoreError};
use super::keys::VolumeKeys;
use super::paths;
use super::segment::SegmentId;
use crate::error::{Error, Result};

use super::paths::epoch_name;
use crate::clock::unix_now;

fn aad(keys: &VolumeKeys, kind: &str, epoch: u64) -> Vec<u8> {
    let mut aad = kind.as_bytes().to_vec();
    aad.extend_from_slice(&keys.volume_id);
    aad.extend_from_slice(epoch_name(epoch).as_bytes());
    aad
}

/// Encrypt a small record bound to (kind, epoch). Random nonce: several
/// writers may race to create the same claim name with different content.
pub fn encrypt_record<T: Serialize>(keys: &VolumeKeys, kind: &str, epoch: u64, value: &T) -> Bytes {
    let plain = serde_json::to_vec(value).expect("record serializes");
    Bytes::from(
        keys.subkey(kind, &epoch_name(epoch))
            .encrypt_random(&aad(keys, kind, epoch), &plain),
    )
}

/// Seal raw bytes as a record (for the fuzz targets).
#[doc(hidden)]
pub fn encrypt_record_bytes(keys: &VolumeKeys, kind: &str, epoch: u64, plain: &[u8]) -> Bytes {
    Bytes::from(
        keys.subkey(kind, &epoch_name(epoch))
            .encrypt_random(&aad(keys, kind, epoch), plain),
    )
}

pub fn decrypt_record<T: for<'de> Deserialize<'de>>(
    keys: &VolumeKeys,
    kind: &str,
    epoch: u64,
    data: &[u8],
) -> Result<T> {
    let plain = keys
        .subkey(kind, &epoch_name(epoch))
        .decrypt_random(&aad(keys, kind, epoch), data)
        .ok_or_else(|| {
            Error::Integrity(format!(
                "{kind} record {} failed authentication",
                epoch_name(epoch)
            ))
        })?;
    serde_json::from_slice(&plain)
        .map_err(|e| Error::Integrity(format!("{kind} record {epoch}: malformed ({e})")))
}

/// How a claim's `journal` begins when it names a directory on a local
/// disk whose identity (a random id kept in it) outlives reboots
/// (`volume::journal::host_dir_identity`).
pub const DURABLE_JOURNAL: &str = "host-durable ";

/// Who holds an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub host: String,
    pub pid: u32,
    pub boot_id: String,
    pub started_unix: u64,
    pub token: String,
    /// The journal directory the claimant keeps a host-local journal of
    /// acknowledged writes in (its identity: path, device, inode), empty
    /// when it keeps none. A journaled claimant replays every pending
    /// journal of that directory before it serves I/O (the device server);
    /// a claim without it (import, bench) may have written over what an
    /// older journal holds, and so may one that used another directory.
    #[serde(default)]
    pub journal: String,
    /// The claimant's PID namespace (`pid:[inode]`): its pid means
    /// something only there. Empty in claims of older builds.
    #[serde(default)]
    pub pid_ns: String,
    /// The claimant keys its epoch's objects to `token` (format 3,
    /// docs/rfcs/0001); false in claims of format-2 builds.
    #[serde(default)]
    pub keys_bound: bool,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    let name = read_trimmed("/proc/sys/kernel/hostname");
    if name.is_empty() {
        "unknown-host".into()
    } else {
        name
    }
}

fn boot_id() -> String {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

/// When this host booted (unix seconds), from /proc/stat.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Claim {
    pub fn mine(journal: Option<String>) -> Self {
        Claim {
            host: hostname(),
            pid: std::process::id(),
            boot_id: boot_id(),
            started_unix: unix_now(),
            token: hex::encode(rand::random::<[u8; 16]>()),
            journal: journal.unwrap_or_default(),
            pid_ns: pid_namespace(),
            keys_bound: true,
        }
    }

    /// Made on this host since its last boot (so its tmpfs journal, if it
    /// kept one, is here).
    pub fn is_this_boot(&self) -> bool {
        !self.boot_id.is_empty() && self.host == hostname() && self.boot_id == boot_id()
    }

    pub fn describe(&self) -> String {
        let age = unix_now().saturating_sub(self.started_unix);
        let ns = if self.pid_ns.is_empty() || self.pid_ns == pid_namespace() {
            String::new()
        } else {
            format!(" in PID namespace {}", self.pid_ns)
        };
        format!(
            "host {} pid {}{ns} (since unix time {}, {} s ago)",
            self.host, self.pid, self.started_unix, age
        )
    }

    /// True when the claimant ran on this host in an earlier boot — so it
    /// no longer runs — as proved by the journal directory on a local
    /// disk it named, which is ours (`ours`: our claim's journal; only a
    /// directory whose identity outlives reboots proves it:
    /// `DURABLE_JOURNAL`). What `add` after a power cut relies on to take
    /// over without `--force` (docs/rfcs/0006, 9).
    pub fn ran_here_before_reboot(&self, ours: Option<&str>) -> bool {
        let mine = boot_id();
        !self.boot_id.is_empty()
            && !mine.is_empty()
            && self.boot_id != mine
            && boot_time().is_some_and(|boot| self.started_unix < boot)
            && self.host == hostname()
            && self.journal.starts_with(DURABLE_JOURNAL)
            && ours == Some(self.journal.as_str())
    }

    /// True only when the claimant certainly no longer runs: same host,
    /// boot and PID namespace, and its pid is gone. Anything else (other
    /// host, reboot, another container sharing the hostname, a claim that
    /// does not say its namespace, live pid) is treated as a possibly live
    /// writer.
    pub fn is_provably_dead(&self) -> bool {
        self.is_this_boot()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_namespace()
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The log as one new owner found it, for the epochs since the last seal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Epoch of the seal this one continues (0 when it is the first).
    pub covers_from: u64,
    /// epoch → inclusive ranges of segment seqs present.
    pub segments: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Checkpoints present, as (epoch, seq) positions.
    pub checkpoints: Vec<(u64, u64)>,
    /// epoch → claim token of its writer, for the covered epochs whose
    /// objects are keyed to it (docs/rfcs/0001). Authenticated with the
    /// seal: nobody without the data key can substitute a token.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub writers: BTreeMap<u64, String>,
    /// `writers` is complete: a covered epoch missing from it is unbound.
    /// False in seals of format-2 builds, which know nothing of tokens —
    /// for their epochs the claims say.
    #[serde(default)]
    pub writers_recorded: bool,
}

fn to_ranges(mut seqs: Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

impl Seal {
    /// Seal what was listed of epochs in `[covers_from, upto)`.
    pub fn from_listing(
        covers_from: u64,
        upto: u64,
        segments: &[SegmentId],
        checkpoints: &[SegmentId],
    ) -> Self {
        let in_scope = |s: &&SegmentId| s.epoch >= covers_from && s.epoch < upto;
        let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for s in segments.iter().filter(in_scope) {
            by_epoch.entry(s.epoch).or_default().push(s.seq);
        }
        Seal {
            covers_from,
            segments: by_epoch
                .into_iter()
                .map(|(e, seqs)| (e, to_ranges(seqs)))
                .collect(),
            checkpoints: checkpoints
                .iter()
                .filter(in_scope)
                .map(|s| (s.epoch, s.seq))
                .collect(),
            writers: BTreeMap::new(),
            writers_recorded: false,
        }
    }

    /// Epochs this seal names objects of.
    pub fn epochs(&self) -> std::collections::BTreeSet<u64> {
        self.segments
            .keys()
            .copied()
            .chain(self.checkpoints.iter().map(|(e, _)| *e))
            .collect()
    }

    fn has_segment(&self, id: SegmentId) -> bool {
        self.segments
            .get(&id.epoch)
            .is_some_and(|r| r.iter().any(|(lo, hi)| (*lo..=*hi).contains(&id.seq)))
    }

    fn has_checkpoint(&self, id: SegmentId) -> bool {
        self.checkpoints.contains(&(id.epoch, id.seq))
    }
}

/// The authoritative seals: the chain back from the newest one.
#[derive(Debug, Clone, Default)]
pub struct SealChain(BTreeMap<u64, Seal>);

impl SealChain {
    pub fn from_seals(mut all: BTreeMap<u64, Seal>) -> Self {
        let mut chain = BTreeMap::new();
        let mut next = all.keys().next_back().copied();
        while let Some(epoch) = next {
            let Some(seal) = all.remove(&epoch) else {
                break;
            };
            next = (seal.covers_from > 0 && seal.covers_from < epoch).then_some(seal.covers_from);
            chain.insert(epoch, seal);
        }
        SealChain(chain)
    }

    /// Epoch of the newest seal in the chain (0 when none).
    pub fn latest(&self) -> u64 {
        self.0.keys().next_back().copied().unwrap_or(0)
    }

    /// The seal that decides objects of `epoch`, if one does: the first
    /// seal of the chain above it, when it covers the epoch. Once garbage
    /// collection has removed the seal that decided an old epoch, nothing
    /// decides it; its objects are then all older than a checkpoint every
    /// recovery uses, and never replayed (docs/rfcs/0002).
    fn deciding(&self, epoch: u64) -> Option<&Seal> {
        self.0
            .range(epoch + 1..)
            .next()
            .map(|(_, s)| s)
            .filter(|s| s.covers_from <= epoch)
    }

    /// Every segment a seal of the chain names, with that seal's epoch.
    pub fn named_segments(&self) -> impl Iterator<Item = (u64, SegmentId)> + '_ {
        self.0.iter().flat_map(|(sealed_by, seal)| {
            seal.segments.iter().flat_map(move |(epoch, ranges)| {
                ranges.iter().flat_map(move |(lo, hi)| {
                    (*lo..=*hi).map(move |seq| (*sealed_by, SegmentId { epoch: *epoch, seq }))
                })
            })
        })
    }

    pub fn segment_is_valid(&self, id: SegmentId) -> bool {
        self.deciding(id.epoch).is_none_or(|s| s.has_segment(id))
    }

    pub fn checkpoint_is_valid(&self, id: SegmentId) -> bool {
        self.deciding(id.epoch).is_none_or(|s| s.has_checkpoint(id))
    }

    /// Whose token the objects of `epoch` are keyed to, as the seal that
    /// decides the epoch records it: `Some(Some(token))`, `Some(None)` for
    /// unbound, `None` when no seal that records writers decides it (the
    /// unsealed tail, or a format-2 build's seal) — then its claim says.
    pub fn writer(&self, epoch: u64) -> Option<Option<String>> {
        self.deciding(epoch)
            .filter(|s| s.writers_recorded)
            .map(|s| s.writers.get(&epoch).cloned())
    }
}

/// The ownership protocol of one volume, as one process sees it: who
/// holds which epoch (claims), what each new owner found (seals), the
/// check a writer makes before it acknowledges a FLUSH, and the release
/// at a clean shutdown. Readers use it to read the records; a writer
/// holds its claim here. The argument: ARCHITECTURE.md, "Fencing".
pub struct Fence {
    store: DynStore,
    keys: VolumeKeys,
    /// Our epoch and its claim, once claimed.
    owned: Option<(u64, Claim)>,
    /// The epoch we took over from, as our claim found it: released, or
    /// its claim (for fencing it: docs/rfcs/0003).
    predecessor: Option<(u64, Taken)>,
}

/// How a predecessor left the volume, as our claim found it — before our
/// listing, which is what makes "dead" usable: a writer dead before the
/// listing cannot have a segment land after it and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Released,
    /// Same host, boot and PID namespace, pid gone.
    Dead,
    /// May still run.
    Live,
}

/// Fence markers: what a new owner creates at the names where a
/// predecessor's next segments would go (docs/rfcs/0003). Shorter than
/// any segment (an empty one is 56 bytes), so a listing tells them apart
/// by size.
pub const FENCE_LEN: u64 = 32;
const FENCE_MAGIC: &[u8; 8] = b"ZUBLKFNC";

/// A listed object under `segments/` of this size is a fence marker.
pub fn is_fence(size: u64) -> bool {
    size == FENCE_LEN
}

fn fence_marker(by: u64) -> Bytes {
    let mut m = Vec::with_capacity(FENCE_LEN as usize);
    m.extend_from_slice(FENCE_MAGIC);
    m.extend_from_slice(&by.to_be_bytes());
    m.extend_from_slice(&rand::random::<[u8; 16]>());
    Bytes::from(m)
}

/// The names of epoch `epoch` a new owner fences, given what its listing
/// holds of that epoch: real segments, fence markers, checkpoint
/// positions. Every missing id in `(max(cp, m - WINDOW), m]` (a PUT that
/// may be in flight) and `hi + 1 ..= hi + WINDOW` with `hi = max(m, cp)`
/// (the next ones), except names that already hold a fence.
pub fn fence_targets(
    epoch: u64,
    segments: &std::collections::BTreeSet<u64>,
    fences: &std::collections::BTreeSet<u64>,
    checkpoint: Option<u64>,
) -> Vec<SegmentId> {
    use super::append::WINDOW;
    let m = segments.last().copied();
    let hi = m.max(checkpoint);
    let mut seqs = Vec::new();
    if let Some(m) = m {
        let floor = checkpoint
            .map_or(0, |c| c + 1)
            .max((m + 1).saturating_sub(WINDOW));
        seqs.extend((floor..=m).filter(|s| !segments.contains(s)));
    }
    let next = hi.map_or(0, |h| h + 1);
    seqs.extend(next..next + WINDOW);
    seqs.into_iter()
        .filter(|s| !fences.contains(s))
        .map(|seq| SegmentId { epoch, seq })
        .collect()
}

/// Conditional create that survives a lost response: a create whose
/// first attempt landed but reported an error (or was retried by the
/// transport and then found the object) is recognized by reading the
/// object back. `Ok(false)`: someone else's object is there.
pub(super) async fn create_or_confirm(
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
            // The retry layer already spent the outage bound on it.
            Err(e @ StoreError::GaveUp(_)) => return Err(e.into()),
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
    // A probe object left behind is harmless (`create` ignores them, and
    // garbage collection removes them).
    if let Err(e) = store.delete(&key).await {
        tracing::warn!("could not remove the probe object {key}: {e}");
    }
    Ok(first && !second && kept.as_ref() == b"1")
}

/// Fencing rests on conditional create: refuse a backend that does not
/// enforce it, unless the user accepted the risk.
pub(super) async fn require_conditional_create(
    store: &DynStore,
    allow_unconditional: bool,
) -> Result<()> {
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

/// How many records are fetched at once.
const READ_CONCURRENCY: usize = 8;

impl Fence {
    pub fn new(store: DynStore, keys: VolumeKeys) -> Self {
        Fence {
            store,
            keys,
            owned: None,
            predecessor: None,
        }
    }

    /// Our epoch, when we hold one.
    pub fn epoch(&self) -> Option<u64> {
        self.owned.as_ref().map(|(e, _)| *e)
    }

    /// Our claim, when we hold one.
    pub fn claim(&self) -> Option<&Claim> {
        self.owned.as_ref().map(|(_, c)| c)
    }

    /// Our epoch, or an error when read-only.
    pub fn owned_epoch(&self) -> Result<u64> {
        self.epoch()
            .ok_or_else(|| Error::InvalidArgument("volume is open read-only".into()))
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

    /// The highest claimed epoch (0: never claimed).
    pub async fn latest_epoch(&self) -> Result<u64> {
        let listed = self.store.list(paths::CLAIMS).await?;
        Ok(paths::listed_epochs(&listed, paths::CLAIMS)
            .into_iter()
            .max()
            .unwrap_or(0))
    }

    pub async fn is_released(&self, epoch: u64) -> Result<bool> {
        Ok(self.store.exists(&paths::release(epoch)).await?)
    }

    /// Claim the next epoch by conditional create, taking over from a
    /// released, provably dead or (with `force`) live writer, and key our
    /// objects to the claim's token.
    pub async fn claim_next(&mut self, force: bool, journal: Option<String>) -> Result<u64> {
        assert!(self.owned.is_none(), "one claim per fence");
        let current = self.latest_epoch().await?;
        let mut taken = Taken::Released;
        if current > 0 && !self.is_released(current).await? {
            let owner = self.read_claim(current).await?;
            // Its acknowledged FLUSHes may be only in a journal on this
            // host's disk (docs/rfcs/0006): a writer that would not replay
            // it must not take over by default.
            if !force
                && owner.journal.starts_with(DURABLE_JOURNAL)
                && journal.as_deref() != Some(owner.journal.as_str())
            {
                return Err(Error::InUse(format!(
                    "{}, whose acknowledged writes may be only in its journal ({}): add with \
                     --journal-dir naming that directory to replay it, or --force to do without",
                    owner.describe(),
                    owner.journal
                )));
            }
            let dead = owner.is_provably_dead();
            // Certainly gone too, but fenced all the same (a wrong guess —
            // a clone of this machine — must not leave two unfenced writers).
            let rebooted = !dead && owner.ran_here_before_reboot(journal.as_deref());
            taken = if dead { Taken::Dead } else { Taken::Live };
            if dead {
                tracing::warn!("previous writer {} is gone; taking over", owner.describe());
            } else if rebooted {
                tracing::warn!(
                    "previous writer {} ran on this host before it rebooted; taking over",
                    owner.describe()
                );
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
        // Garbage collection retires old claims (docs/rfcs/0002), so a
        // name can be free again: an opener that stalled between its
        // listing and its create may have made a claim below the newest.
        // The newest claim is never deleted, so one listing tells.
        let latest = self.latest_epoch().await?;
        if latest > epoch {
            let owner = self.read_claim(latest).await?;
            return Err(Error::InUse(format!(
                "{} (epoch {latest}; this opener's claim of epoch {epoch} came too late)",
                owner.describe()
            )));
        }
        tracing::info!("claimed writer epoch {epoch}");
        self.keys.bind_epoch(epoch, &mine.token);
        self.owned = Some((epoch, mine));
        self.predecessor = (current > 0).then_some((current, taken));
        Ok(epoch)
    }

    /// Every listed seal, fetched several at a time (one per takeover
    /// until garbage collection removes the old ones).
    pub async fn read_seals(&self, listed: &[ObjectInfo]) -> Result<BTreeMap<u64, Seal>> {
        let wanted = paths::listed_epochs(listed, paths::SEALS);
        let mut fetches = futures::stream::iter(wanted)
            .map(|epoch| async move {
                let data = self.store.get(&paths::seal(epoch)).await?;
                Ok::<_, Error>((epoch, data))
            })
            .buffer_unordered(READ_CONCURRENCY);
        let mut seals = BTreeMap::new();
        while let Some(fetched) = fetches.next().await {
            let (epoch, data) = match fetched {
                Ok(fetched) => fetched,
                // Collected since the listing: its owner had a newer
                // checkpoint confirmed, which this listing holds and every
                // recovery now starts from; nothing it decided is read.
                Err(Error::Store(StoreError::NotFound(_))) => continue,
                Err(e) => return Err(e),
            };
            seals.insert(
                epoch,
                decrypt_record::<Seal>(&self.keys, "seal", epoch, &data)?,
            );
        }
        Ok(seals)
    }

    /// Write our seal: the segments and checkpoints of the epochs since
    /// the chain's last seal, as listed strictly after our claim, with
    /// the tokens their objects are keyed to. Returns the chain topped by
    /// it.
    pub async fn seal(
        &self,
        mut seals: BTreeMap<u64, Seal>,
        segments: &[SegmentId],
        checkpoints: &[SegmentId],
    ) -> Result<SealChain> {
        let epoch = self.owned_epoch()?;
        let chain = SealChain::from_seals(seals.clone());
        let mut seal = Seal::from_listing(chain.latest(), epoch, segments, checkpoints);
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
        seals.insert(epoch, seal);
        Ok(SealChain::from_seals(seals))
    }

    /// The token objects of `epoch` are keyed to, by its claim (None:
    /// unbound, a format-2 writer). An epoch whose objects are read always
    /// had a claim; a missing one is refused rather than guessed, since a
    /// seal records the answer for good.
    pub async fn writer_of(&self, epoch: u64) -> Result<Option<String>> {
        match self.claim_if_present(epoch).await? {
            Some(c) => Ok(c.keys_bound.then_some(c.token)),
            None => Err(Error::Integrity(format!(
                "epoch {epoch} has objects in the bucket but no claim ({}): \
                 whose keys they are under is unknown",
                paths::claim(epoch)
            ))),
        }
    }

    /// Key the objects of `epochs` to their writers: as the seal deciding
    /// the epoch records it, else (the unsealed tail, a format-2 build's
    /// seal, an epoch whose seal was collected) as its claim says.
    pub async fn bind_writers(
        &self,
        chain: &SealChain,
        epochs: impl IntoIterator<Item = u64>,
    ) -> Result<()> {
        let mut ask = Vec::new();
        for e in epochs {
            if self.keys.epoch_token(e).is_some() {
                continue;
            }
            match chain.writer(e) {
                Some(Some(token)) => self.keys.bind_epoch(e, &token),
                Some(None) => {}
                None => ask.push(e),
            }
        }
        let mut claims = futures::stream::iter(ask)
            .map(|e| async move { Ok::<_, Error>((e, self.writer_of(e).await?)) })
            .buffer_unordered(READ_CONCURRENCY);
        while let Some(answer) = claims.next().await {
            if let (e, Some(token)) = answer? {
                self.keys.bind_epoch(e, &token);
            }
        }
        Ok(())
    }

    /// Confirm no newer writer has claimed the volume. A writer calls it
    /// after a checkpoint before it deletes anything the checkpoint made
    /// unneeded (docs/rfcs/0002), and before it writes its release marker.
    /// A FLUSH needs none: its segments are fenced by name (docs/rfcs/0003).
    pub async fn check_owner(&self) -> Result<()> {
        let epoch = self.owned_epoch()?;
        if self.store.exists(&paths::claim(epoch + 1)).await? {
            return Err(Error::Fenced(epoch));
        }
        Ok(())
    }

    /// Whether a writer of `epoch` may still be running: for the epoch
    /// before ours, what our claim found (released, provably dead, or
    /// neither); for an older one, whether it released. Deadness is not
    /// judged after the listing: a writer alive at the listing could have
    /// landed a segment after it, and died since (docs/rfcs/0003). A
    /// release is safe to judge at any time: a writer releases only after
    /// an owner check that finds no newer claim, so before our listing.
    async fn may_run(&self, epoch: u64) -> Result<bool> {
        match &self.predecessor {
            Some((e, taken)) if *e == epoch => Ok(*taken == Taken::Live),
            _ => Ok(!self.is_released(epoch).await?),
        }
    }

    /// Fence the writers of epochs `[from, ours)` that may still run: a
    /// fence marker at every name where a segment of theirs could still
    /// land unlisted and count (docs/rfcs/0003). `listing` is what our
    /// listing after the claim holds: segments and fences (id, is a
    /// fence) and checkpoint positions. Returns the markers created, or
    /// None when a name turned out to hold a segment the listing missed
    /// (its writer is running): list again.
    pub async fn fence_predecessors(
        &self,
        from: u64,
        listing: &[(SegmentId, bool)],
        checkpoints: &[SegmentId],
    ) -> Result<Option<usize>> {
        use std::collections::BTreeSet;
        let ours = self.owned_epoch()?;
        let mut targets = Vec::new();
        for e in from.max(1)..ours {
            if !self.may_run(e).await? {
                continue;
            }
            let of = |fence: bool| -> BTreeSet<u64> {
                listing
                    .iter()
                    .filter(|(id, f)| id.epoch == e && *f == fence)
                    .map(|(id, _)| id.seq)
                    .collect()
            };
            let cp = checkpoints
                .iter()
                .filter(|c| c.epoch == e)
                .map(|c| c.seq)
                .max();
            targets.extend(fence_targets(e, &of(false), &of(true), cp));
        }
        let marker = fence_marker(ours);
        let mut creates = futures::stream::iter(targets)
            .map(|id| {
                let marker = marker.clone();
                async move {
                    let fence = |found: &Bytes| is_fence(found.len() as u64);
                    let key = paths::segment(id);
                    create_or_confirm(&self.store, &key, marker, fence).await
                }
            })
            .buffer_unordered(READ_CONCURRENCY);
        let (mut made, mut raced) = (0, false);
        while let Some(created) = creates.next().await {
            if created? {
                made += 1;
            } else {
                raced = true;
            }
        }
        if made > 0 {
            tracing::warn!("fenced the previous writer: {made} fence markers created");
        }
        Ok((!raced).then_some(made))
    }

    /// Mark a clean shutdown: the next opener needs no --force.
    pub async fn release(&self) -> Result<()> {
        let epoch = self.owned_epoch()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> SegmentId {
        SegmentId { epoch, seq }
    }

    #[test]
    fn a_dead_pid_proves_death_only_in_the_claimants_pid_namespace() {
        // A pid no process has here (above the kernel's pid_max).
        let dead = Claim {
            pid: 1 << 23,
            ..Claim::mine(None)
        };
        assert!(!dead.pid_ns.is_empty(), "this host reports its namespace");
        assert!(dead.is_provably_dead());
        let other_container = Claim {
            pid_ns: "pid:[1]".into(),
            ..dead.clone()
        };
        assert!(
            !other_container.is_provably_dead(),
            "pid means nothing here"
        );
        let older_build = Claim {
            pid_ns: String::new(),
            ..dead.clone()
        };
        assert!(!older_build.is_provably_dead());
        assert!(!Claim::mine(None).is_provably_dead(), "ourselves");
    }

    #[test]
    fn a_claim_of_this_hosts_earlier_boot_in_our_durable_journal_is_dead() {
        let ours = format!("{DURABLE_JOURNAL}0123 at /var/lib/j");
        let before_reboot = Claim {
            boot_id: "an earlier boot".into(),
            started_unix: boot_time().unwrap() - 60,
            ..Claim::mine(Some(ours.clone()))
        };
        let clock_says_this_boot = Claim {
            started_unix: boot_time().unwrap() + 1,
            ..before_reboot.clone()
        };
        assert!(!clock_says_this_boot.ran_here_before_reboot(Some(&ours)));
        assert!(before_reboot.ran_here_before_reboot(Some(&ours)));
        assert!(!before_reboot.is_provably_dead(), "no other rule proves it");
        let this_boot = Claim::mine(Some(ours.clone()));
        assert!(
            !this_boot.ran_here_before_reboot(Some(&ours)),
            "a live pid, maybe"
        );
        let elsewhere = Claim {
            host: "another-host".into(),
            ..before_reboot.clone()
        };
        assert!(!elsewhere.ran_here_before_reboot(Some(&ours)));
        let other_dir = format!("{DURABLE_JOURNAL}4567 at /var/lib/j");
        assert!(!before_reboot.ran_here_before_reboot(Some(&other_dir)));
        assert!(!before_reboot.ran_here_before_reboot(None));
        // A tmpfs directory's identity (path, device, inode) can repeat
        // after a reboot on another machine with the same hostname.
        let tmpfs = "/run/zerofs-ublk/journal (device 25, inode 7)".to_string();
        let tmpfs_claim = Claim {
            journal: tmpfs.clone(),
            ..before_reboot.clone()
        };
        assert!(!tmpfs_claim.ran_here_before_reboot(Some(&tmpfs)));
    }

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(to_ranges(vec![5, 1, 2, 3, 7]), vec![(1, 3), (5, 5), (7, 7)]);
    }

    #[test]
    fn late_segment_of_sealed_epoch_is_invalid() {
        let seal = Seal::from_listing(0, 2, &[id(1, 0), id(1, 1)], &[]);
        let chain = SealChain::from_seals([(2, seal)].into());
        assert!(chain.segment_is_valid(id(1, 1)));
        assert!(!chain.segment_is_valid(id(1, 2)), "zombie's late segment");
        assert!(chain.segment_is_valid(id(2, 9)), "current tail is unsealed");
    }

    #[test]
    fn off_chain_seal_is_ignored() {
        // Owner 3 never saw seal 2 (written late by superseded owner 2).
        let seal2 = Seal::from_listing(0, 2, &[id(1, 0)], &[]);
        let seal3 = Seal::from_listing(0, 3, &[id(1, 0), id(1, 1)], &[]);
        let chain = SealChain::from_seals([(2, seal2), (3, seal3)].into());
        assert!(chain.segment_is_valid(id(1, 1)), "decided by seal 3, not 2");
    }
}
