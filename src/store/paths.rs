//! Every object name in a bucket, in one place: how each is made and how a
//! listing is read back (the layout: ARCHITECTURE.md, "In-bucket format").
//! Names are hex, fixed width, so lexicographic order is numeric order.

use super::backend::ObjectInfo;
use super::checkpoint::RunId;
use super::segment::SegmentId;

/// The volume's public parameters and wrapped key.
pub const SUPERBLOCK: &str = "superblock";
/// `epochs/<epoch>`: writer claims.
pub const CLAIMS: &str = "epochs/";
/// `seals/<epoch>`: the log as each new owner found it.
pub const SEALS: &str = "seals/";
/// `released/<epoch>`: clean-shutdown markers.
pub const RELEASES: &str = "released/";
/// `segments/<epoch>-<seq>`: frames and their table.
pub const SEGMENTS: &str = "segments/";
/// `checkpoints/<epoch>-<seq>`: the index as of that segment (format 5: a
/// root naming index runs; before: the whole index).
pub const CHECKPOINTS: &str = "checkpoints/";
/// `index/<epoch>-<seq>.<b|d><part>`: an index run (a base part or a
/// delta) first written by the checkpoint at that position.
pub const INDEX_RUNS: &str = "index/";
/// `probe/<random>`: the conditional-create probe, deleted at once.
pub const PROBES: &str = "probe/";

/// An epoch as names carry it: 16 hex digits.
pub fn epoch_name(epoch: u64) -> String {
    format!("{epoch:016x}")
}

pub fn parse_epoch(name: &str) -> Option<u64> {
    (name.len() == 16)
        .then(|| u64::from_str_radix(name, 16).ok())
        .flatten()
}

pub fn claim(epoch: u64) -> String {
    format!("{CLAIMS}{}", epoch_name(epoch))
}

pub fn seal(epoch: u64) -> String {
    format!("{SEALS}{}", epoch_name(epoch))
}

pub fn release(epoch: u64) -> String {
    format!("{RELEASES}{}", epoch_name(epoch))
}

pub fn segment(id: SegmentId) -> String {
    format!("{SEGMENTS}{}", id.name())
}

pub fn checkpoint(position: SegmentId) -> String {
    format!("{CHECKPOINTS}{}", position.name())
}

pub fn index_run(run: RunId) -> String {
    format!("{INDEX_RUNS}{}", run.name())
}

/// A fresh probe name.
pub fn probe() -> String {
    format!("{PROBES}{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// The epochs named in a listing of `prefix` (claims, seals, releases).
pub fn listed_epochs(objects: &[ObjectInfo], prefix: &str) -> Vec<u64> {
    objects
        .iter()
        .filter_map(|o| o.key.strip_prefix(prefix).and_then(parse_epoch))
        .collect()
}

/// The segment ids, with sizes, named in a listing of `prefix` (segments,
/// checkpoints).
pub fn listed_ids(objects: &[ObjectInfo], prefix: &str) -> Vec<(SegmentId, u64)> {
    objects
        .iter()
        .filter_map(|o| {
            let id = SegmentId::parse(o.key.strip_prefix(prefix)?)?;
            Some((id, o.size))
        })
        .collect()
}

/// The index runs, with sizes, named in a listing of `INDEX_RUNS`.
pub fn listed_runs(objects: &[ObjectInfo]) -> Vec<(RunId, u64)> {
    objects
        .iter()
        .filter_map(|o| {
            let run = RunId::parse(o.key.strip_prefix(INDEX_RUNS)?)?;
            Some((run, o.size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_listings() {
        let id = SegmentId { epoch: 3, seq: 17 };
        let listed = |key: String| ObjectInfo { key, size: 9 };
        assert_eq!(segment(id), "segments/0000000000000003-0000000000000011");
        assert_eq!(listed_ids(&[listed(segment(id))], SEGMENTS), vec![(id, 9)]);
        assert_eq!(
            listed_ids(&[listed(checkpoint(id))], CHECKPOINTS),
            vec![(id, 9)]
        );
        assert_eq!(listed_epochs(&[listed(claim(42))], CLAIMS), vec![42]);
        assert_eq!(
            listed_epochs(&[listed(seal(7)), listed(release(8))], SEALS),
            vec![7]
        );
        assert!(listed_epochs(&[listed("epochs/zz".into())], CLAIMS).is_empty());
        assert!(probe().starts_with(PROBES));
        use super::super::checkpoint::RunKind;
        for kind in [RunKind::Base, RunKind::Delta] {
            let run = RunId {
                position: id,
                kind,
                part: 258,
            };
            assert_eq!(listed_runs(&[listed(index_run(run))]), vec![(run, 9)]);
        }
        assert_eq!(
            index_run(RunId {
                position: id,
                kind: RunKind::Base,
                part: 2
            }),
            "index/0000000000000003-0000000000000011.b00000002"
        );
        assert!(listed_runs(&[listed("index/zz.b1".into())]).is_empty());
    }
}
