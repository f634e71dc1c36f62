//! Reading a segment file back: its header checked against the claim that
//! must have written it, then its records one at a time.

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::{Error, Result};
use crate::store::keys::{SubKey, TAG_LEN, counter_nonce, domain};
use crate::store::wire::Decoder;

/// The claim tag in a segment's header, if the header is intact.
pub fn read_tag(path: &Path) -> Result<ClaimTag> {
    let mut h = [0u8; HEADER_LEN];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .map_err(|e| io(path, e))?;
    Ok(Header::decode(&h, path)?.tag)
}

/// How a segment may end: the recovery policy for a torn final record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The newest segment of an epoch: the process may have died in the
    /// middle of an append (a write never acknowledged), so a torn final
    /// record ends the replay.
    MayBeTorn,
    /// An older segment: its writer went on to the next one, so every
    /// record in it is whole; a torn one is an error.
    Whole,
}

/// The records of one segment file, read one at a time: replay holds one
/// record in memory, not the segment (which can be hundreds of MiB), let
/// alone the segment twice.
pub struct Records<R> {
    path: PathBuf,
    reader: R,
    key: SubKey,
    /// Format 2: plaintext records with a CRC.
    plaintext: bool,
    /// Counter of the last record read (they rise strictly).
    counter: Option<u64>,
    tail: Tail,
    done: bool,
    /// The records ended at a torn one (tolerated: `Tail::MayBeTorn`).
    torn: bool,
}

/// Open one segment file and check its header.
pub fn read_segment(
    path: &Path,
    owner: &Owner,
    tail: Tail,
) -> Result<Records<std::io::BufReader<File>>> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    Records::new(
        path,
        std::io::BufReader::with_capacity(1 << 20, file),
        owner,
        tail,
    )
}

/// The records of one segment file's bytes (`path` names it in errors).
pub fn parse_segment(
    path: &Path,
    bytes: &[u8],
    owner: &Owner,
    tail: Tail,
) -> Result<Vec<Record<'static>>> {
    Records::new(path, bytes, owner, tail)?.collect()
}

/// Fill `buf` from `r`; how many bytes there were (fewer only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> Records<R> {
    fn new(path: &Path, mut reader: R, owner: &Owner, tail: Tail) -> Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut reader, &mut h).map_err(|e| io(path, e))?;
        let header = Header::decode(&h[..n], path)?;
        let mut records = Records {
            path: path.to_path_buf(),
            reader,
            key: owner.key.clone(),
            plaintext: &header.magic == MAGIC_V2,
            counter: None,
            tail,
            done: false,
            torn: false,
        };
        if header.volume_id != *owner.volume_id {
            return Err(records.bad("volume mismatch"));
        }
        if header.epoch != owner.epoch {
            return Err(records.bad("epoch mismatch"));
        }
        if header.tag != *owner.tag {
            return Err(records.bad("claim mismatch"));
        }
        if records.plaintext && !owner.plaintext_allowed {
            return Err(records.bad("plaintext records under a claim whose journal is encrypted"));
        }
        if !records.plaintext {
            let mut check = [0u8; TAG_LEN];
            let n = read_full(&mut records.reader, &mut check).map_err(|e| io(path, e))?;
            let segment = header.segment;
            if n < TAG_LEN
                || !owner
                    .key
                    .decrypt_in_place(&header_nonce(segment), &h, &mut [], &check)
            {
                return Err(records.bad("not written under this claim's journal key"));
            }
        }
        Ok(records)
    }

    /// Whether the records ended at a torn record rather than at the end
    /// of the file.
    pub fn ended_torn(&self) -> bool {
        self.torn
    }

    fn bad(&self, why: &str) -> Error {
        Error::Integrity(format!("journal {}: {why}", self.path.display()))
    }

    /// A torn record: the end of the newest segment, an error elsewhere.
    fn torn(&mut self) -> Option<Result<Record<'static>>> {
        self.done = true;
        self.torn = true;
        if self.tail == Tail::MayBeTorn {
            None
        } else {
            Some(Err(self.bad("torn record before the newest segment")))
        }
    }

    fn next_record(&mut self) -> Option<Result<Record<'static>>> {
        let header_len = if self.plaintext {
            RECORD_HEADER_V2
        } else {
            RECORD_HEADER
        };
        let mut h = [0u8; RECORD_HEADER];
        let h = &mut h[..header_len];
        match read_full(&mut self.reader, h) {
            Err(e) => return Some(Err(io(&self.path, e))),
            Ok(0) => {
                self.done = true;
                return None;
            }
            Ok(n) if n < header_len => return self.torn(),
            Ok(_) => {}
        }
        let mut fields = Decoder::new(h, "journal record header");
        let (kind, offset, len) = (
            fields.u8().expect("read whole"),
            fields.u64().expect("read whole"),
            fields.u64().expect("read whole"),
        );
        let data_len = if kind == KIND_DATA { len } else { 0 };
        // A record is one chunk's write at most; a larger length is a torn
        // or corrupt header, and must not size an allocation.
        if data_len > MAX_RECORD_DATA {
            return self.torn();
        }
        let mut data = vec![0u8; data_len as usize];
        match read_full(&mut self.reader, &mut data) {
            Err(e) => return Some(Err(io(&self.path, e))),
            Ok(n) if n < data.len() => return self.torn(),
            Ok(_) => {}
        }
        let authentic = if self.plaintext {
            let crc = fields.u32().expect("read whole");
            record_crc(kind, offset, len, &data) == crc
        } else {
            let counter = fields.u64().expect("read whole");
            let tag: [u8; TAG_LEN] = fields.array().expect("read whole");
            let nonce = counter_nonce(domain::JOURNAL, counter);
            if !self
                .key
                .decrypt_in_place(&nonce, &h[..RECORD_AAD], &mut data, &tag)
            {
                false
            } else if self.counter.is_some_and(|c| counter <= c) {
                self.done = true;
                return Some(Err(self.bad("records out of order")));
            } else {
                self.counter = Some(counter);
                true
            }
        };
        if !authentic {
            return self.torn();
        }
        Some(match kind {
            KIND_DATA => Ok(Record::Data {
                offset,
                data: Cow::Owned(data),
            }),
            KIND_ZEROES => Ok(Record::Zeroes { offset, len }),
            _ => {
                self.done = true;
                Err(self.bad("unknown record kind"))
            }
        })
    }
}

impl<R: Read> Iterator for Records<R> {
    type Item = Result<Record<'static>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_record()
    }
}
