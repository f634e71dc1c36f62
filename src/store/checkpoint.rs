//! Checkpoints: the index as of one log position, so recovery replays
//! only the segments written after it (docs/rfcs/0004).
//!
//! Format 5: object `checkpoints/<position>` is a **root** naming index
//! **runs** in the order they apply — the parts of a base (every mapped
//! chunk, cut into parts of at most `BASE_PART_ENTRIES`), then deltas
//! (chunks changed since, a zero entry for a chunk that reads as zeros
//! again), oldest first. A run is object `index/<position>.<b|d><part>`,
//! named after the checkpoint that first wrote it, written once, and
//! shared by later roots until a newer base or a merged delta replaces it:
//! a checkpoint writes what changed, not the whole index. The root carries
//! the claim tokens of the older epochs its runs are keyed to, and of
//! those whose segments its index names, so reading them needs neither
//! those epochs' seals nor their claims.
//!
//! Formats 2 to 4: object `checkpoints/<position>` holds the whole index
//! (version 1 below); still read, never written.
//!
//! Every object = magic "ZUBLKCKP" | ciphertext of zstd(plaintext), under
//! a subkey and associated data bound to its name:
//! - version 1 (whole index): `1 u32 | entries`;
//! - version 2 (root): `2 u32 | runs: count u64, (epoch u64, seq u64,
//!   kind u8, part u32, entries u64, size u64)* | tokens: count u64,
//!   (epoch u64, token bytes)*`;
//! - run: `3 u32 | kind u8 | entries`;
//!
//! where `entries` = `segments: count u64, (epoch u64, seq u64)* |
//! count u64, (chunk u64, segment-ordinal u32, offset u32, len u32)*`
//! (ordinal `u32::MAX`: the chunk reads as zeros; deltas only).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::index::{Index, Loc, MOST_PATCHES_STORED, Mapping};
use super::keys::{VolumeKeys, counter_nonce, domain};
use super::segment::SegmentId;
use super::wire::{Decoder, Encoder};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"ZUBLKCKP";
const WHOLE: u32 = 1;
const ROOT: u32 = 2;
const RUN: u32 = 3;
/// Ordinal of a zero entry (the chunk was discarded or zeroed).
const ZEROS: u32 = u32::MAX;
/// Decompressed objects larger than this are refused as corrupt
/// (≈ 200 M chunk entries: 25 TiB of written 128 KiB chunks).
const MAX_PLAIN: usize = 4 << 30;
/// Entries per base part: about 20 MB before compression. Parts are read
/// in parallel at open.
pub const BASE_PART_ENTRIES: usize = 1 << 20;

/// One entry of a run: a chunk and where its content is (None: it reads
/// as zeros; deltas only). Encoded as one record per frame: a patched
/// chunk's number repeats, its chunk frame first (docs/rfcs/0007).
pub type Entry = (u64, Option<Mapping>);

/// A base part or a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunKind {
    Base,
    Delta,
}

impl RunKind {
    fn letter(self) -> char {
        match self {
            RunKind::Base => 'b',
            RunKind::Delta => 'd',
        }
    }
    fn code(self) -> u8 {
        self.letter() as u8
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            b'b' => Some(RunKind::Base),
            b'd' => Some(RunKind::Delta),
            _ => None,
        }
    }
}

/// One run: the checkpoint position that wrote it, its kind, its part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId {
    pub position: SegmentId,
    pub kind: RunKind,
    pub part: u32,
}

impl RunId {
    pub fn name(&self) -> String {
        format!(
            "{}.{}{:08x}",
            self.position.name(),
            self.kind.letter(),
            self.part
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let (position, rest) = name.split_once('.')?;
        let kind = RunKind::from_code(*rest.as_bytes().first()?)?;
        let part = &rest[1..];
        (part.len() == 8).then_some(())?;
        Some(RunId {
            position: SegmentId::parse(position)?,
            kind,
            part: u32::from_str_radix(part, 16).ok()?,
        })
    }
}

/// A run as a root names it: with its entry count and object size (both
/// checked when it is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRef {
    pub id: RunId,
    pub entries: u64,
    pub size: u64,
}

/// A format-5 checkpoint: its runs in the order they apply, and the claim
/// tokens of the epochs they are keyed to (other than the root's own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Root {
    pub runs: Vec<RunRef>,
    pub tokens: BTreeMap<u64, String>,
}

/// What a checkpoint object holds.
#[derive(Debug)]
pub enum Checkpoint {
    /// Formats 2 to 4: the whole index.
    Whole(Index),
    Root(Root),
}

fn aad(keys: &VolumeKeys, purpose: &str, name: &str) -> Vec<u8> {
    let mut aad = purpose.as_bytes().to_vec();
    aad.extend_from_slice(&keys.volume_id);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Compress and encrypt `plain` for the object `name` of `epoch`.
fn seal_object(keys: &VolumeKeys, purpose: &str, epoch: u64, name: &str, plain: &[u8]) -> Bytes {
    let compressed = zstd::bulk::compress(plain, 3).expect("zstd compress to memory");
    encrypt_object(keys, purpose, epoch, name, &compressed)
}

/// The object for already compressed content.
fn encrypt_object(
    keys: &VolumeKeys,
    purpose: &str,
    epoch: u64,
    name: &str,
    compressed: &[u8],
) -> Bytes {
    let encrypted = keys.segment_key(purpose, epoch, name).encrypt(
        &counter_nonce(domain::TABLE, 0),
        &aad(keys, purpose, name),
        compressed,
    );
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&encrypted);
    Bytes::from(out)
}

/// Authenticate and decompress; `most`: the largest plaintext this object
/// can hold, so a forged size never allocates more.
fn open_object(
    keys: &VolumeKeys,
    purpose: &str,
    epoch: u64,
    name: &str,
    bytes: &[u8],
    most: usize,
    bad: &dyn Fn(&str) -> Error,
) -> Result<Vec<u8>> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("bad magic"));
    }
    let compressed = keys
        .segment_key(purpose, epoch, name)
        .decrypt(
            &counter_nonce(domain::TABLE, 0),
            &aad(keys, purpose, name),
            &bytes[MAGIC.len()..],
        )
        .ok_or_else(|| bad("failed authentication"))?;
    let declared = match zstd::zstd_safe::get_frame_content_size(&compressed) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(bad("its compressed form does not declare its size")),
        Err(_) => return Err(bad("does not decompress (bad zstd frame header)")),
    };
    if declared > most as u64 {
        return Err(bad(&format!(
            "declares {declared} bytes, more than it can hold"
        )));
    }
    zstd::bulk::decompress(&compressed, declared as usize)
        .map_err(|e| bad(&format!("does not decompress ({e})")))
}

/// Bytes one chunk's records take at most: every frame of the most
/// patches a mapping holds in its own segment (a 20-byte record and a
/// 16-byte segment id each).
const MOST_PER_CHUNK: u64 = 36 * (1 + MOST_PATCHES_STORED as u64);

/// The most plaintext an index of `chunks` chunks can take.
fn most_for(chunks: u64, extra: u64) -> usize {
    MAX_PLAIN.min(
        usize::try_from(chunks.saturating_mul(MOST_PER_CHUNK).saturating_add(extra))
            .unwrap_or(usize::MAX),
    )
}

fn encode_entries(e: &mut Encoder, entries: &[Entry]) {
    let mut segments: Vec<SegmentId> = entries
        .iter()
        .flat_map(|(_, m)| m.iter().flat_map(|m| m.frames().iter().map(|l| l.segment)))
        .collect();
    segments.sort();
    segments.dedup();
    e.u64(segments.len() as u64);
    for s in &segments {
        e.u64(s.epoch).u64(s.seq);
    }
    let records: usize = entries
        .iter()
        .map(|(_, m)| m.as_ref().map_or(1, |m| m.frames().len()))
        .sum();
    e.u64(records as u64);
    for (chunk, mapping) in entries {
        match mapping {
            Some(m) => {
                for loc in m.frames() {
                    let ordinal = segments.binary_search(&loc.segment).expect("listed");
                    e.u64(*chunk)
                        .u32(ordinal as u32)
                        .u32(loc.offset)
                        .u32(loc.len);
                }
            }
            None => {
                e.u64(*chunk).u32(ZEROS).u32(0).u32(0);
            }
        }
    }
}

fn decode_entries(
    d: &mut Decoder,
    chunks: u64,
    zeros_allowed: bool,
    origin: &str,
    bad: &dyn Fn(&str) -> Error,
) -> Result<Vec<Entry>> {
    let n_segments = d.count(16)?;
    let mut segments = Vec::with_capacity(n_segments);
    for _ in 0..n_segments {
        segments.push(SegmentId {
            epoch: d.u64()?,
            seq: d.u64()?,
        });
    }
    let n = d.count(20)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    for _ in 0..n {
        let chunk = d.u64()?;
        let ordinal = d.u32()?;
        let (offset, len) = (d.u32()?, d.u32()?);
        Index::check_chunk(chunk, chunks, origin)?;
        let repeated = entries.last().is_some_and(|(c, _)| *c == chunk);
        if ordinal == ZEROS {
            if !zeros_allowed || repeated {
                return Err(bad("a zero entry outside a delta, or repeated"));
            }
            entries.push((chunk, None));
            continue;
        }
        let segment = *segments
            .get(ordinal as usize)
            .ok_or_else(|| bad("entry names a missing segment"))?;
        let loc = Loc {
            segment,
            offset,
            len,
        };
        match entries.last_mut() {
            // The chunk again: a patch over the frames before it.
            Some((_, Some(m))) if repeated => {
                if m.patches() >= MOST_PATCHES_STORED {
                    return Err(bad(&format!("chunk {chunk} holds too many patches")));
                }
                *m = m.with_patch(loc);
            }
            Some(_) if repeated => return Err(bad("a patch of a zero entry")),
            _ => entries.push((chunk, Some(Mapping::Frame(loc)))),
        }
    }
    Ok(entries)
}

pub fn encode_root(keys: &VolumeKeys, position: SegmentId, root: &Root) -> Bytes {
    let mut e = Encoder::with_capacity(32 + root.runs.len() * 40 + root.tokens.len() * 48);
    e.u32(ROOT).u64(root.runs.len() as u64);
    for r in &root.runs {
        e.u64(r.id.position.epoch)
            .u64(r.id.position.seq)
            .u8(r.id.kind.code())
            .u32(r.id.part)
            .u64(r.entries)
            .u64(r.size);
    }
    e.u64(root.tokens.len() as u64);
    for (epoch, token) in &root.tokens {
        e.u64(*epoch).bytes(token.as_bytes());
    }
    seal_object(keys, "checkpoint", position.epoch, &position.name(), &e.0)
}

/// A whole-index checkpoint (formats 2 to 4), for tests and fuzzing: this
/// build reads them and never writes them.
#[doc(hidden)]
pub fn encode_whole(keys: &VolumeKeys, position: SegmentId, index: &Index) -> Bytes {
    let entries: Vec<Entry> = index.iter().map(|(c, m)| (c, Some(m.clone()))).collect();
    let mut e = Encoder::with_capacity(32 + entries.len() * 24);
    e.u32(WHOLE);
    encode_entries(&mut e, &entries);
    seal_object(keys, "checkpoint", position.epoch, &position.name(), &e.0)
}

/// A checkpoint object whose encrypted content is `compressed` (for the fuzz
/// targets: plaintext that passes authentication).
#[doc(hidden)]
pub fn encrypt_for_fuzzing(keys: &VolumeKeys, position: SegmentId, compressed: &[u8]) -> Bytes {
    encrypt_object(
        keys,
        "checkpoint",
        position.epoch,
        &position.name(),
        compressed,
    )
}

/// An index run whose encrypted content is `compressed` (for the fuzz
/// targets, as `encrypt_for_fuzzing`).
#[doc(hidden)]
pub fn encrypt_run_for_fuzzing(keys: &VolumeKeys, run: RunId, compressed: &[u8]) -> Bytes {
    encrypt_object(
        keys,
        "index-run",
        run.position.epoch,
        &run.name(),
        compressed,
    )
}

/// Read a checkpoint object: a whole index (formats 2 to 4) or a root.
pub fn decode(
    keys: &VolumeKeys,
    position: SegmentId,
    bytes: &[u8],
    chunks: u64,
) -> Result<Checkpoint> {
    let bad = |why: &str| Error::Integrity(format!("checkpoint {position}: {why}"));
    let plain = open_object(
        keys,
        "checkpoint",
        position.epoch,
        &position.name(),
        bytes,
        // A whole index (36 B per chunk at most), or a root: a few runs,
        // and at most a token (≤ 44 B) per epoch its index names.
        MAX_PLAIN.min(
            usize::try_from(chunks.saturating_mul(48).saturating_add(64 << 10))
                .unwrap_or(usize::MAX),
        ),
        &bad,
    )?;
    let mut d = Decoder::new(&plain, "checkpoint");
    match d.u32()? {
        WHOLE => {
            let entries = decode_entries(&mut d, chunks, false, "checkpoint", &bad)?;
            d.finish()?;
            let mut index = Index::default();
            for (chunk, loc) in entries {
                index.load(chunk, loc);
            }
            Ok(Checkpoint::Whole(index))
        }
        ROOT => {
            let n = d.count(37)?;
            let mut runs = Vec::with_capacity(n);
            for _ in 0..n {
                let position = SegmentId {
                    epoch: d.u64()?,
                    seq: d.u64()?,
                };
                let kind = RunKind::from_code(d.u8()?).ok_or_else(|| bad("unknown run kind"))?;
                let part = d.u32()?;
                let (entries, size) = (d.u64()?, d.u64()?);
                runs.push(RunRef {
                    id: RunId {
                        position,
                        kind,
                        part,
                    },
                    entries,
                    size,
                });
            }
            let n = d.count(12)?;
            let mut tokens = BTreeMap::new();
            for _ in 0..n {
                let epoch = d.u64()?;
                let token = std::str::from_utf8(d.bytes()?)
                    .map_err(|_| bad("a token is not text"))?
                    .to_string();
                tokens.insert(epoch, token);
            }
            d.finish()?;
            Ok(Checkpoint::Root(Root { runs, tokens }))
        }
        _ => Err(bad("unsupported version")),
    }
}

/// An index run: base entries (every one mapped) or delta entries.
pub fn encode_run(keys: &VolumeKeys, run: RunId, entries: &[Entry]) -> Bytes {
    let mut e = Encoder::with_capacity(32 + entries.len() * 24);
    e.u32(RUN).u8(run.kind.code());
    encode_entries(&mut e, entries);
    seal_object(keys, "index-run", run.position.epoch, &run.name(), &e.0)
}

/// Read a run a root names: authenticated under its own name, of the kind
/// and with the entry count the root says.
pub fn decode_run(
    keys: &VolumeKeys,
    run: &RunRef,
    bytes: &[u8],
    chunks: u64,
) -> Result<Vec<Entry>> {
    let origin = format!("index run {}", run.id.name());
    let bad = |why: &str| Error::Integrity(format!("{origin}: {why}"));
    if bytes.len() as u64 != run.size {
        return Err(bad(&format!(
            "is {} bytes, its checkpoint says {}",
            bytes.len(),
            run.size
        )));
    }
    let most = most_for(run.entries.min(chunks), 32);
    let plain = open_object(
        keys,
        "index-run",
        run.id.position.epoch,
        &run.id.name(),
        bytes,
        most,
        &bad,
    )?;
    let mut d = Decoder::new(&plain, "index run");
    if d.u32()? != RUN {
        return Err(bad("unsupported version"));
    }
    if RunKind::from_code(d.u8()?) != Some(run.id.kind) {
        return Err(bad("not the kind of run its checkpoint names"));
    }
    let entries = decode_entries(&mut d, chunks, run.id.kind == RunKind::Delta, &origin, &bad)?;
    d.finish()?;
    if entries.len() as u64 != run.entries {
        return Err(bad(&format!(
            "holds {} entries, its checkpoint says {}",
            entries.len(),
            run.entries
        )));
    }
    Ok(entries)
}

/// Deltas merge while the newest one kept holds at most this many times
/// the entries of the one being written: their sizes then fall
/// geometrically, so a chain has O(log n) deltas and an entry is rewritten
/// O(log n) times before a new base takes it.
const MERGE_RATIO: usize = 2;

/// The runs of the last checkpoint stored, as its writer keeps them: what
/// the next checkpoint can share, and the chunks each delta holds (what a
/// merge rewrites).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    base: Vec<RunRef>,
    base_entries: u64,
    deltas: Vec<(RunRef, imbl::OrdSet<u64>)>,
}

/// What one checkpoint writes: new runs (a whole base, or one delta) and
/// the runs of the chain it keeps.
pub struct Plan {
    pub position: SegmentId,
    /// The index as of `position`.
    pub snapshot: Index,
    /// A new base, in parts of `BASE_PART_ENTRIES`; else one delta of
    /// these chunks (none: nothing changed, the root names the old runs).
    pub rebase: bool,
    pub delta: imbl::OrdSet<u64>,
    keep: Chain,
}

impl Chain {
    /// The chain a root describes (its deltas' chunks as read back).
    pub fn from_root(root: &Root, delta_chunks: Vec<imbl::OrdSet<u64>>) -> Self {
        let base: Vec<RunRef> = root
            .runs
            .iter()
            .filter(|r| r.id.kind == RunKind::Base)
            .copied()
            .collect();
        let deltas = root
            .runs
            .iter()
            .filter(|r| r.id.kind == RunKind::Delta)
            .copied()
            .zip(delta_chunks)
            .collect();
        Chain {
            base_entries: base.iter().map(|r| r.entries).sum(),
            base,
            deltas,
        }
    }

    /// Every run the chain's root names, in the order they apply.
    pub fn runs(&self) -> impl Iterator<Item = &RunRef> {
        self.base.iter().chain(self.deltas.iter().map(|(r, _)| r))
    }

    /// Decide the checkpoint at `position`: `changed` are the chunks set
    /// since the last checkpoint stored (`chain`; None: no chain to build
    /// on, write a base). Deltas merge geometrically; when the deltas
    /// would hold more entries than half the base, a new base replaces
    /// them all.
    pub fn plan(
        chain: Option<&Chain>,
        position: SegmentId,
        snapshot: Index,
        changed: &imbl::OrdSet<u64>,
    ) -> Plan {
        let Some(chain) = chain else {
            return Plan {
                position,
                snapshot,
                rebase: true,
                delta: imbl::OrdSet::new(),
                keep: Chain::default(),
            };
        };
        let mut keep = chain.clone();
        let mut delta = changed.clone();
        if !delta.is_empty() {
            while let Some((_, last)) = keep.deltas.last() {
                if last.len() > MERGE_RATIO * delta.len() {
                    break;
                }
                let (_, last) = keep.deltas.pop().expect("checked");
                delta = delta.union(last);
            }
        }
        let delta_entries: usize =
            keep.deltas.iter().map(|(_, c)| c.len()).sum::<usize>() + delta.len();
        let rebase = delta_entries as u64 > keep.base_entries / 2;
        Plan {
            position,
            snapshot,
            rebase,
            delta,
            keep,
        }
    }
}

impl Plan {
    /// The names of the runs it writes (cheap: before they are encoded).
    pub fn run_ids(&self) -> Vec<RunId> {
        let run = |kind, part| RunId {
            position: self.position,
            kind,
            part,
        };
        if self.rebase {
            let parts = self.snapshot.len().div_ceil(BASE_PART_ENTRIES).max(1);
            (0..parts as u32).map(|p| run(RunKind::Base, p)).collect()
        } else if self.delta.is_empty() {
            Vec::new()
        } else {
            vec![run(RunKind::Delta, 0)]
        }
    }

    /// The runs to write (named by `run_ids`), with their entries (a
    /// base: every mapped chunk, in parts; a delta: each changed chunk's
    /// location or zeros).
    pub fn runs_to_write(&self) -> Vec<(RunId, Vec<Entry>)> {
        let ids = self.run_ids();
        if self.rebase {
            let mut parts: Vec<Vec<Entry>> = vec![Vec::new(); ids.len()];
            for (i, (chunk, loc)) in self.snapshot.iter().enumerate() {
                parts[i / BASE_PART_ENTRIES].push((chunk, Some(loc.clone())));
            }
            ids.into_iter().zip(parts).collect()
        } else {
            let delta: Vec<Entry> = self
                .delta
                .iter()
                .map(|c| (*c, self.snapshot.get(*c)))
                .collect();
            ids.into_iter().zip(std::iter::once(delta)).collect()
        }
    }

    /// Once the runs are stored (`written`: each with its entries and
    /// size): the root to store, and the chain it makes.
    pub fn finish(self, written: Vec<RunRef>) -> (Root, Chain) {
        let chain = if self.rebase {
            Chain {
                base_entries: written.iter().map(|r| r.entries).sum(),
                base: written,
                deltas: Vec::new(),
            }
        } else {
            let mut chain = self.keep;
            if let Some(run) = written.into_iter().next() {
                chain.deltas.push((run, self.delta));
            }
            chain
        };
        let root = Root {
            runs: chain.runs().copied().collect(),
            tokens: BTreeMap::new(),
        };
        (root, chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::DataKey;

    fn keys() -> VolumeKeys {
        VolumeKeys::new([7; 16], DataKey::random())
    }

    fn pos(seq: u64) -> SegmentId {
        SegmentId { epoch: 1, seq }
    }

    fn loc(seq: u64) -> Loc {
        Loc {
            segment: pos(seq),
            offset: 64,
            len: 100,
        }
    }

    /// Store a plan as a writer would (sizes made up): the next chain.
    fn stored(plan: Plan) -> (bool, Chain) {
        let rebase = plan.rebase;
        let written = plan
            .runs_to_write()
            .into_iter()
            .map(|(id, entries)| RunRef {
                id,
                entries: entries.len() as u64,
                size: 1,
            })
            .collect();
        (rebase, plan.finish(written).1)
    }

    #[test]
    fn equal_deltas_merge_into_a_logarithmic_chain_without_a_new_base() {
        let mut index = Index::default();
        for c in 0..100_000 {
            index.set_frame(c, Some(loc(0)));
        }
        let (rebase, mut chain) = stored(Chain::plan(
            None,
            pos(1),
            index.clone(),
            &Default::default(),
        ));
        assert!(rebase, "no chain: a base");
        assert_eq!(chain.base_entries, 100_000);
        assert_eq!(chain.base.len(), 1);
        let mut most = 0;
        for n in 0..1000u64 {
            // Ten chunks changed each time, never the same ones.
            let changed: imbl::OrdSet<u64> = (0..10).map(|i| (n * 10 + i) % 100_000).collect();
            for c in &changed {
                index.set_frame(*c, Some(loc(n + 2)));
            }
            let (rebase, next) = stored(Chain::plan(
                Some(&chain),
                pos(n + 2),
                index.clone(),
                &changed,
            ));
            assert!(!rebase, "10,000 changed of 100,000: no new base yet");
            chain = next;
            most = most.max(chain.deltas.len());
            // Sizes fall along the chain (what keeps it short).
            for w in chain.deltas.windows(2) {
                assert!(
                    w[0].1.len() > MERGE_RATIO * w[1].1.len(),
                    "{:?}",
                    chain.deltas.iter().map(|d| d.1.len()).collect::<Vec<_>>()
                );
            }
        }
        assert!(most <= 12, "{most} deltas for 1,000 checkpoints");
        // Every changed chunk is in exactly one delta of the chain.
        let held: usize = chain.deltas.iter().map(|(_, c)| c.len()).sum();
        assert_eq!(held, 10_000);
    }

    #[test]
    fn deltas_past_half_the_base_make_a_new_base() {
        let mut index = Index::default();
        for c in 0..100 {
            index.set_frame(c, Some(loc(0)));
        }
        let (_, chain) = stored(Chain::plan(
            None,
            pos(1),
            index.clone(),
            &Default::default(),
        ));
        let changed: imbl::OrdSet<u64> = (0..50u64).collect();
        let (rebase, chain) = stored(Chain::plan(Some(&chain), pos(2), index.clone(), &changed));
        assert!(!rebase, "50 of 100: a delta");
        let one: imbl::OrdSet<u64> = [99u64].into_iter().collect();
        let (rebase, chain) = stored(Chain::plan(Some(&chain), pos(3), index.clone(), &one));
        assert!(rebase, "51 of 100: a new base");
        assert!(chain.deltas.is_empty());
        assert_eq!(chain.base[0].id.position, pos(3));
        // Nothing changed: no run written, the root names the old ones.
        let plan = Chain::plan(Some(&chain), pos(4), index, &Default::default());
        assert!(plan.runs_to_write().is_empty());
        assert_eq!(stored(plan).1.runs().count(), 1);
    }

    #[test]
    fn a_base_is_cut_into_parts() {
        let mut index = Index::default();
        for c in 0..(BASE_PART_ENTRIES as u64 + 5) {
            index.set_frame(c, Some(loc(0)));
        }
        let runs = Chain::plan(None, pos(1), index, &Default::default()).runs_to_write();
        let sizes: Vec<(u32, usize)> = runs.iter().map(|(id, e)| (id.part, e.len())).collect();
        assert_eq!(sizes, vec![(0, BASE_PART_ENTRIES), (1, 5)]);
    }

    #[test]
    fn roots_and_runs_round_trip_and_are_bound_to_their_names() {
        let keys = keys();
        let run = RunId {
            position: pos(9),
            kind: RunKind::Delta,
            part: 0,
        };
        let patched = Mapping::Frame(loc(4)).with_patch(loc(5)).with_patch(loc(6));
        let entries = vec![
            (3, Some(patched)),
            (5, None),
            (8, Some(Mapping::Frame(loc(2)))),
        ];
        let data = encode_run(&keys, run, &entries);
        let named = RunRef {
            id: run,
            entries: 3,
            size: data.len() as u64,
        };
        assert_eq!(decode_run(&keys, &named, &data, 16).unwrap(), entries);
        // Another name (another position, part or kind), another count, a
        // chunk beyond the volume: refused.
        for id in [
            RunId {
                position: pos(10),
                ..run
            },
            RunId { part: 1, ..run },
            RunId {
                kind: RunKind::Base,
                ..run
            },
        ] {
            let other = RunRef { id, ..named };
            assert!(decode_run(&keys, &other, &data, 16).is_err(), "{id:?}");
        }
        assert!(
            decode_run(
                &keys,
                &RunRef {
                    entries: 2,
                    ..named
                },
                &data,
                16
            )
            .is_err()
        );
        assert!(decode_run(&keys, &named, &data, 8).is_err());
        // A base holds no zero entries.
        let base = RunId {
            kind: RunKind::Base,
            ..run
        };
        let data = encode_run(&keys, base, &entries);
        assert!(decode_run(&keys, &RunRef { id: base, ..named }, &data, 16).is_err());

        let root = Root {
            runs: vec![named],
            tokens: [(1, "ab".repeat(16))].into_iter().collect(),
        };
        let data = encode_root(&keys, pos(12), &root);
        match decode(&keys, pos(12), &data, 16).unwrap() {
            Checkpoint::Root(r) => assert_eq!(r, root),
            Checkpoint::Whole(_) => panic!("a root read as a whole index"),
        }
        assert!(decode(&keys, pos(13), &data, 16).is_err());
    }
}
