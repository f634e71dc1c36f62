//! The dirty journal: acknowledged-but-unflushed writes, kept where they
//! outlive the server process.
//!
//! Why: a WRITE completes once it is in the (volatile) dirty table. If the
//! server is killed, the kernel keeps the device (user recovery) and
//! re-issues the FLUSH that was in flight to the next server — which, with
//! an empty dirty table, would acknowledge it although the writes it
//! covers are gone. So before a write is acknowledged it is appended here,
//! in a directory on tmpfs (`/run`): it survives the process, not the host
//! (when the host dies, nobody is left who was promised anything). The
//! next writer of the volume — the very next epoch — replays it before it
//! serves I/O, so the re-issued FLUSH really covers those writes.
//!
//! Files: `<volume id>-<epoch>-<segment>.journal`, a new segment at each
//! flush capture; a successful flush deletes the segments it covered.
//! Segment = header (magic, volume id, epoch, segment, crc) then records
//! `kind u8 | offset u64 | len u64 | crc32c u32 | data`. A torn record at
//! the end of the newest segment (the process died mid-append, before the
//! write was acknowledged) ends the replay.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"ZUBLKJNL";
const HEADER_LEN: usize = 8 + 16 + 8 + 8 + 4;
const RECORD_HEADER: usize = 1 + 8 + 8 + 4;
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// Borrowed when appending (no copy), owned when read back.
    Data {
        offset: u64,
        data: Cow<'a, [u8]>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
}

pub struct Journal {
    dir: PathBuf,
    volume: String,
    epoch: u64,
    segment: u64,
    file: File,
    /// Bytes in each segment not yet released (the journal's footprint in
    /// tmpfs, which is memory).
    sizes: std::collections::BTreeMap<u64, u64>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Store(crate::store::backend::StoreError::Backend(format!(
        "journal {}: {e}",
        path.display()
    )))
}

fn file_name(volume: &str, epoch: u64, segment: u64) -> String {
    format!("{volume}-{epoch:016x}-{segment:08x}.journal")
}

fn parse_name(name: &str, volume: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(volume)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".journal")?;
    let (e, s) = rest.split_once('-')?;
    Some((
        u64::from_str_radix(e, 16).ok()?,
        u64::from_str_radix(s, 16).ok()?,
    ))
}

fn header(volume_id: &[u8; 16], epoch: u64, segment: u64) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(volume_id);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

fn record_crc(kind: u8, offset: u64, len: u64, data: &[u8]) -> u32 {
    let mut h = [0u8; 17];
    h[0] = kind;
    h[1..9].copy_from_slice(&offset.to_le_bytes());
    h[9..17].copy_from_slice(&len.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&h), data)
}

impl Journal {
    /// Start this writer's journal (segment 0).
    pub fn create(dir: &Path, volume_id: &[u8; 16], epoch: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let volume = hex::encode(volume_id);
        let file = Self::open_segment(dir, &volume, volume_id, epoch, 0)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            volume,
            epoch,
            segment: 0,
            file,
            sizes: [(0, HEADER_LEN as u64)].into(),
        })
    }

    fn open_segment(
        dir: &Path,
        volume: &str,
        id: &[u8; 16],
        epoch: u64,
        segment: u64,
    ) -> Result<File> {
        let path = dir.join(file_name(volume, epoch, segment));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        file.write_all(&header(id, epoch, segment))
            .map_err(|e| io(&path, e))?;
        Ok(file)
    }

    /// Append one record with a single write; returns once it is in the
    /// file (page cache of tmpfs: enough to outlive the process).
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let (kind, offset, len, data): (u8, u64, u64, &[u8]) = match record {
            Record::Data { offset, data } => (KIND_DATA, *offset, data.len() as u64, data),
            Record::Zeroes { offset, len } => (KIND_ZEROES, *offset, *len, &[]),
        };
        let mut buf = Vec::with_capacity(RECORD_HEADER + data.len());
        buf.push(kind);
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&record_crc(kind, offset, len, data).to_le_bytes());
        buf.extend_from_slice(data);
        self.file.write_all(&buf).map_err(|e| {
            io(
                &self
                    .dir
                    .join(file_name(&self.volume, self.epoch, self.segment)),
                e,
            )
        })?;
        *self.sizes.entry(self.segment).or_default() += buf.len() as u64;
        Ok(())
    }

    /// Bytes the journal holds now (segments not yet released).
    pub fn live_bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    /// Start a new segment; records before this point are in segments
    /// below the returned number.
    pub fn rotate(&mut self, volume_id: &[u8; 16]) -> Result<u64> {
        let next = self.segment + 1;
        self.file = Self::open_segment(&self.dir, &self.volume, volume_id, self.epoch, next)?;
        self.segment = next;
        self.sizes.insert(next, HEADER_LEN as u64);
        Ok(next)
    }

    /// A flush made everything in segments below `segment` durable.
    pub fn release_before(&mut self, segment: u64) {
        let released: Vec<u64> = self.sizes.range(..segment).map(|(s, _)| *s).collect();
        for s in released {
            let _ = std::fs::remove_file(self.dir.join(file_name(&self.volume, self.epoch, s)));
            self.sizes.remove(&s);
        }
    }

    /// Clean shutdown: everything is durable.
    pub fn remove(mut self) {
        self.release_before(self.segment + 1);
    }
}

/// Journal files of `volume_id` in `dir`, as (epoch, segment, path), sorted.
pub fn find(dir: &Path, volume_id: &[u8; 16]) -> Vec<(u64, u64, PathBuf)> {
    let volume = hex::encode(volume_id);
    let mut out: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (epoch, seg) = parse_name(&name, &volume)?;
            Some((epoch, seg, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Read one segment's records. `last` allows a torn final record.
pub fn read_segment(
    path: &Path,
    volume_id: &[u8; 16],
    epoch: u64,
    last: bool,
) -> Result<Vec<Record<'static>>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io(path, e))?;
    let bad = |why: &str| Error::Integrity(format!("journal {}: {why}", path.display()));
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(bad("bad header"));
    }
    let stored = u32::from_le_bytes(bytes[HEADER_LEN - 4..HEADER_LEN].try_into().expect("4"));
    if crc32c::crc32c(&bytes[..HEADER_LEN - 4]) != stored || bytes[8..24] != volume_id[..] {
        return Err(bad("header checksum or volume mismatch"));
    }
    if u64::from_le_bytes(bytes[24..32].try_into().expect("8")) != epoch {
        return Err(bad("epoch mismatch"));
    }
    let mut records = Vec::new();
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        let torn = |records: Vec<Record<'static>>| {
            if last {
                Ok(records)
            } else {
                Err(bad("torn record before the newest segment"))
            }
        };
        if bytes.len() - pos < RECORD_HEADER {
            return torn(records);
        }
        let kind = bytes[pos];
        let offset = u64::from_le_bytes(bytes[pos + 1..pos + 9].try_into().expect("8"));
        let len = u64::from_le_bytes(bytes[pos + 9..pos + 17].try_into().expect("8"));
        let crc = u32::from_le_bytes(bytes[pos + 17..pos + 21].try_into().expect("4"));
        let data_len = if kind == KIND_DATA { len as usize } else { 0 };
        let start = pos + RECORD_HEADER;
        if bytes.len() - start < data_len {
            return torn(records);
        }
        let data = &bytes[start..start + data_len];
        if record_crc(kind, offset, len, data) != crc {
            return torn(records);
        }
        records.push(match kind {
            KIND_DATA => Record::Data {
                offset,
                data: Cow::Owned(data.to_vec()),
            },
            KIND_ZEROES => Record::Zeroes { offset, len },
            _ => return Err(bad("unknown record kind")),
        });
        pos = start + data_len;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let id = [3u8; 16];
        let mut j = Journal::create(dir.path(), &id, 7).unwrap();
        let a = Record::Data {
            offset: 4096,
            data: vec![9; 1000].into(),
        };
        let z = Record::Zeroes {
            offset: 0,
            len: 512,
        };
        j.append(&a).unwrap();
        j.append(&z).unwrap();
        let files = find(dir.path(), &id);
        assert_eq!(files.len(), 1);
        let path = &files[0].2;
        assert_eq!(
            read_segment(path, &id, 7, true).unwrap(),
            vec![a.clone(), z.clone()]
        );
        // A torn append (process killed mid-write) is dropped, not misread.
        let full = std::fs::read(path).unwrap();
        std::fs::write(path, &full[..full.len() - 10]).unwrap();
        assert_eq!(read_segment(path, &id, 7, true).unwrap(), vec![a]);
        assert!(read_segment(path, &id, 7, false).is_err());
        assert!(
            read_segment(path, &[4u8; 16], 7, true).is_err(),
            "other volume"
        );
        assert!(read_segment(path, &id, 8, true).is_err(), "other epoch");
    }

    #[test]
    fn rotation_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let id = [5u8; 16];
        let mut j = Journal::create(dir.path(), &id, 1).unwrap();
        j.append(&Record::Zeroes {
            offset: 0,
            len: 512,
        })
        .unwrap();
        let covered = j.rotate(&id).unwrap();
        j.append(&Record::Zeroes {
            offset: 512,
            len: 512,
        })
        .unwrap();
        assert_eq!(find(dir.path(), &id).len(), 2);
        j.release_before(covered);
        let left = find(dir.path(), &id);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, 1);
        j.remove();
        assert!(find(dir.path(), &id).is_empty());
    }
}
