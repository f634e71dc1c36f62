//! Wall-clock time as the bucket records it (claims, superblock, status):
//! whole seconds since the Unix epoch. The lowest layer; anything may use
//! it. Durations inside the engine use `Instant`, never this.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
