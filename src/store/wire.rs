//! Little-endian fixed-width encoding for the binary tables (segment tables,
//! checkpoints) and the journal's headers. Decoding never panics: short
//! input is a format error.

use crate::error::{Error, Result};

#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn with_capacity(n: usize) -> Self {
        Encoder(Vec::with_capacity(n))
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Bytes of a size both sides know (no length).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// Length (u32) and bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

pub struct Decoder<'a> {
    buf: &'a [u8],
    what: &'a str,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8], what: &'a str) -> Self {
        Decoder { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Integrity(format!("{} is truncated", self.what)));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// `N` bytes, as `Encoder::fixed` wrote them.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// Length (u32) and bytes, as `Encoder::bytes` wrote them.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A count of `item_size`-byte items that must fit in what is left.
    pub fn count(&mut self, item_size: usize) -> Result<usize> {
        let n = self.u64()? as usize;
        if n.checked_mul(item_size).is_none_or(|b| b > self.buf.len()) {
            return Err(Error::Integrity(format!(
                "{} has an impossible count",
                self.what
            )));
        }
        Ok(n)
    }

    pub fn finish(self) -> Result<()> {
        if !self.buf.is_empty() {
            return Err(Error::Integrity(format!(
                "{} has trailing bytes",
                self.what
            )));
        }
        Ok(())
    }
}
