//! A patch's body: some sectors of one chunk (docs/rfcs/0007).
//!
//! `bitmap || sectors`: one bit per 512-byte sector of the chunk (LSB
//! first within each byte), then the sectors the bits mark, in order. At
//! least one bit is set, no bit past the chunk's last sector, and the body
//! is exactly as long as the bits say. The codec compresses and encrypts
//! it as it does a chunk, under a flag of its own.

use bit_set::BitSet;

/// Bytes per sector a patch tracks.
pub const SECTOR: usize = 512;

fn bitmap_len(chunk_size: usize) -> usize {
    (chunk_size / SECTOR).div_ceil(8)
}

/// The body of a patch holding `sectors` of a chunk of `count` sectors,
/// each read through `sector`.
pub fn encode<'a>(sectors: &BitSet, count: usize, sector: impl Fn(usize) -> &'a [u8]) -> Vec<u8> {
    let n = bitmap_len(count * SECTOR);
    let mut body = vec![0u8; n];
    body.reserve(sectors.count() * SECTOR);
    for s in sectors.iter() {
        body[s / 8] |= 1 << (s % 8);
        body.extend_from_slice(sector(s));
    }
    body
}

/// `encode` from a whole chunk's buffer (only `sectors` are read).
pub fn encode_chunk(chunk: &[u8], sectors: &BitSet) -> Vec<u8> {
    encode(sectors, chunk.len() / SECTOR, |s| {
        &chunk[s * SECTOR..(s + 1) * SECTOR]
    })
}

/// Bytes of the body of a patch of `count` sectors.
pub fn body_len(chunk_size: usize, count: usize) -> usize {
    bitmap_len(chunk_size) + count * SECTOR
}

/// Check a decoded body against a chunk of `chunk_size` bytes: why it is
/// malformed, if it is.
pub fn check(body: &[u8], chunk_size: usize) -> Result<(), String> {
    let n = bitmap_len(chunk_size);
    if body.len() < n {
        return Err("patch shorter than its bitmap".into());
    }
    let sectors = chunk_size / SECTOR;
    let mut count = 0;
    for (i, byte) in body[..n].iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                if i * 8 + bit >= sectors {
                    return Err("patch marks a sector past the chunk".into());
                }
                count += 1;
            }
        }
    }
    if count == 0 {
        return Err("patch marks no sector".into());
    }
    if body.len() != n + count * SECTOR {
        return Err(format!(
            "patch of {count} sectors is {} bytes, not {}",
            body.len(),
            n + count * SECTOR
        ));
    }
    Ok(())
}

/// Lay a checked body's sectors over `chunk`.
pub fn apply(body: &[u8], chunk: &mut [u8]) {
    let n = bitmap_len(chunk.len());
    let mut at = n;
    for (i, byte) in body[..n].iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                let s = i * 8 + bit;
                chunk[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(&body[at..at + SECTOR]);
                at += SECTOR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / SECTOR) as u8 ^ (i as u8)).collect()
    }

    #[test]
    fn a_patch_carries_exactly_its_sectors() {
        let src = chunk(8 * SECTOR);
        let sectors: BitSet = [1usize, 2, 7].into_iter().collect();
        let body = encode_chunk(&src, &sectors);
        assert_eq!(body.len(), body_len(src.len(), 3));
        check(&body, src.len()).unwrap();
        let mut out = vec![0xEEu8; src.len()];
        apply(&body, &mut out);
        for s in 0..8 {
            let want: &[u8] = if sectors.contains(s) {
                &src[s * SECTOR..(s + 1) * SECTOR]
            } else {
                &[0xEE; SECTOR]
            };
            assert_eq!(&out[s * SECTOR..(s + 1) * SECTOR], want, "sector {s}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let cs = 16 * SECTOR; // 2 bitmap bytes
        let src = chunk(cs);
        let body = encode_chunk(&src, &[3usize].into_iter().collect());
        assert!(check(&body[..body.len() - 1], cs).is_err(), "short");
        let mut long = body.clone();
        long.push(0);
        assert!(check(&long, cs).is_err(), "long");
        assert!(check(&[0u8; 2], cs).is_err(), "no sector");
        assert!(check(&[1u8], cs).is_err(), "shorter than the bitmap");
        // 12 sectors: bit 12 of a 2-byte bitmap is past the chunk.
        let mut past = encode_chunk(&chunk(12 * SECTOR), &[0usize].into_iter().collect());
        past[1] |= 1 << 4;
        past.extend_from_slice(&[0u8; SECTOR]);
        assert!(check(&past, 12 * SECTOR).is_err(), "past the chunk");
    }
}
