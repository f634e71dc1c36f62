//! Sizes as people write them (`100G`, `128K`, `1.5T`, `4096`), and
//! durations (`10m`, `30s`, `0`).

use anyhow::{Result, bail};

const UNITS: [(&str, u64); 6] = [
    ("", 1),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
    ("P", 1 << 50),
];

/// Parse a size with an optional binary suffix (K, M, G, T, P; `KiB`,
/// `KB` and lowercase accepted, all powers of 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let unit = suffix
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
        .to_string();
    let Some((_, mult)) = UNITS.iter().find(|(u, _)| *u == unit) else {
        bail!("invalid size {text:?}: unknown unit (use K, M, G, T or P)");
    };
    if num.is_empty() {
        bail!("invalid size {text:?}: no number");
    }
    let bytes = if num.contains('.') {
        let v: f64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size {text:?}"))?;
        let b = v * *mult as f64;
        if !b.is_finite() || b >= u64::MAX as f64 || b.fract() != 0.0 {
            bail!("invalid size {text:?}: not a whole number of bytes");
        }
        b as u64
    } else {
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(*mult))
            .ok_or_else(|| anyhow::anyhow!("invalid size {text:?}: too large"))?
    };
    Ok(bytes)
}

/// A chunk size (`--chunk-size`): a size that fits the format's 32 bits.
/// (Whether it is a valid chunk size — a power of two in range — is
/// `CreateParams::validate`'s to say.)
pub fn parse_chunk_size(text: &str) -> Result<u32> {
    let n = parse_size(text)?;
    u32::try_from(n).map_err(|_| anyhow::anyhow!("chunk size {text:?} is too large"))
}

/// `1.5 GiB`-style rendering for messages.
pub fn format_bytes(n: u64) -> String {
    let (name, mult) = [
        ("PiB", 1u64 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ]
    .into_iter()
    .find(|(_, m)| n >= *m)
    .unwrap_or(("B", 1));
    if mult == 1 {
        format!("{n} B")
    } else if n.is_multiple_of(mult) {
        format!("{} {name}", n / mult)
    } else {
        format!("{:.1} {name}", n as f64 / mult as f64)
    }
}

/// Parse a duration: a whole number with an optional unit (`ms`, `s`,
/// `m`, `h`, `d`; seconds without one).
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let Ok(n) = number.parse::<u64>() else {
        bail!("invalid duration {text:?}: expected e.g. 10m, 30s, 1h or 0");
    };
    let secs = |k: u64| n.checked_mul(k).map(std::time::Duration::from_secs);
    let d = match unit.trim() {
        "ms" => Some(std::time::Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        other => bail!("invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"),
    };
    d.ok_or_else(|| anyhow::anyhow!("duration {text:?} is too long"))
}

/// A duration the way `parse_duration` reads it back.
pub fn format_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 if d.subsec_millis() > 0 => format!("{}ms", d.as_millis()),
        _ if s > 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s > 0 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn durations_parse_and_print() {
        use std::time::Duration;
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration(" 30s ").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        for bad in ["", "m", "-1s", "1.5m", "10x", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for d in ["10m", "30s", "2h", "250ms", "0s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("128K").unwrap(), 128 << 10);
        assert_eq!(parse_size("100G").unwrap(), 100 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5t").unwrap(), 3 << 39);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999P").is_err());
        // Truncating 4 GiB + 128 KiB to u32 would yield a valid 128 KiB.
        assert!(parse_chunk_size("4194432K").is_err());
        assert_eq!(parse_chunk_size("128K").unwrap(), 128 << 10);
        assert_eq!(format_bytes(128 << 10), "128 KiB");
        assert_eq!(format_bytes(1536 << 20), "1.5 GiB");
    }
}
