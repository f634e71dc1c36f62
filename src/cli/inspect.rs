//! `inspect`: a volume's parameters, usage and owner, read-only.

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::args::{BucketArgs, KeyArgs};
use super::format_bytes;
use crate::volume::VolumeConfig;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    bucket: String,
    volume_id: String,
    format_version: u32,
    codec: String,
    kdf: String,
    size: u64,
    chunk_size: u32,
    written_chunks: u64,
    logical_written_bytes: u64,
    live_stored_bytes: u64,
    segments: usize,
    segment_bytes: u64,
    ignored_segments: usize,
    checkpoints: usize,
    checkpoint_bytes: u64,
    /// Index runs (format 5: what checkpoints name) and their bytes.
    index_runs: usize,
    index_run_bytes: u64,
    replayed_segments: usize,
    /// Segment bytes no chunk points at (garbage collection's to reclaim).
    dead_bytes: u64,
    /// Segment bytes per live byte.
    amplification: f64,
    /// Objects in the bucket by kind.
    objects: Objects,
    epoch: u64,
    owner: String,
}

#[derive(Serialize)]
struct Objects {
    segments: usize,
    checkpoints: usize,
    index_runs: usize,
    claims: usize,
    seals: usize,
    releases: usize,
    probes: usize,
    /// Fence markers new owners left at fenced writers' names (kept).
    fences: usize,
}

pub async fn run(a: InspectArgs) -> Result<()> {
    let vol = super::open_read_only(&a.bucket, &a.key, VolumeConfig::default()).await?;
    let p = &vol.superblock().params;
    let stats = vol.stats();
    let s = vol.summary();
    let kdf = match &p.kdf {
        crate::store::keys::KdfParams::Argon2id { cost, .. } => format!(
            "argon2id (m={} MiB, t={}, p={})",
            cost.m_cost_kib / 1024,
            cost.t_cost,
            cost.p_cost
        ),
        crate::store::keys::KdfParams::KeyFile { .. } => "key file (hkdf-sha256)".into(),
    };
    let owner = match (&s.owner, s.released, s.epoch) {
        (_, _, 0) => "never opened for writing".to_string(),
        (_, true, _) => "none (released cleanly)".to_string(),
        (Some(o), false, _) => format!("{o} (or crashed: next writer needs --force)"),
        (None, false, _) => "unknown".to_string(),
    };
    let store = super::open_store(&a.bucket)?;
    let listed = |prefix: &'static str| {
        let store = store.clone();
        async move { anyhow::Ok(store.list(prefix).await?.len()) }
    };
    use crate::store::paths;
    let runs = store.list(paths::INDEX_RUNS).await?;
    let index_run_bytes = runs.iter().map(|o| o.size).sum();
    let objects = Objects {
        segments: s.inventory.segments.len(),
        checkpoints: s.inventory.checkpoints.len(),
        index_runs: runs.len(),
        claims: listed(paths::CLAIMS).await?,
        seals: listed(paths::SEALS).await?,
        releases: listed(paths::RELEASES).await?,
        probes: listed(paths::PROBES).await?,
        fences: s.fences,
    };
    let all_segment_bytes: u64 = s.inventory.segments.values().sum();
    let r = Report {
        bucket: a.bucket.bucket.clone(),
        volume_id: p.volume_id.clone(),
        format_version: p.format_version,
        codec: format!(
            "{} level {} + {}",
            p.codec.compression, p.codec.zstd_level, p.codec.cipher
        ),
        kdf,
        size: p.size,
        chunk_size: p.chunk_size,
        written_chunks: stats.mapped_chunks,
        logical_written_bytes: stats.mapped_chunks * p.chunk_size as u64,
        live_stored_bytes: stats.live_bytes,
        segments: s.segments,
        segment_bytes: s.segment_bytes,
        ignored_segments: s.ignored_segments,
        checkpoints: s.checkpoints,
        checkpoint_bytes: s.checkpoint_bytes,
        index_runs: runs.len(),
        index_run_bytes,
        replayed_segments: s.replayed_segments,
        dead_bytes: all_segment_bytes.saturating_sub(stats.live_bytes),
        amplification: if stats.live_bytes > 0 {
            all_segment_bytes as f64 / stats.live_bytes as f64
        } else {
            0.0
        },
        objects,
        epoch: s.epoch,
        owner,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let ratio = if r.logical_written_bytes > 0 {
        format!(
            " ({:.2}x of logical)",
            r.segment_bytes as f64 / r.logical_written_bytes as f64
        )
    } else {
        String::new()
    };
    println!("bucket          {}", r.bucket);
    println!("volume id       {}", r.volume_id);
    println!("format          version {}, {}", r.format_version, r.codec);
    println!("key             {}", r.kdf);
    println!(
        "size            {} ({} bytes)",
        format_bytes(r.size),
        r.size
    );
    println!("chunk size      {}", format_bytes(r.chunk_size as u64));
    println!(
        "written         {} chunks, {} logical",
        r.written_chunks,
        format_bytes(r.logical_written_bytes)
    );
    println!(
        "stored          {} in {} segments{ratio}, {} live; {} checkpoints ({}), {} index runs ({})",
        format_bytes(r.segment_bytes),
        r.segments,
        format_bytes(r.live_stored_bytes),
        r.checkpoints,
        format_bytes(r.checkpoint_bytes),
        r.index_runs,
        format_bytes(r.index_run_bytes)
    );
    if r.ignored_segments > 0 {
        println!(
            "ignored         {} segments of fenced writers",
            r.ignored_segments
        );
    }
    println!(
        "garbage         {} dead ({:.2}x stored per live byte)",
        format_bytes(r.dead_bytes),
        r.amplification
    );
    let o = &r.objects;
    println!(
        "objects         {} segments, {} checkpoints, {} index runs, {} claims, {} seals, {} release markers, {} probes, {} fence markers",
        o.segments, o.checkpoints, o.index_runs, o.claims, o.seals, o.releases, o.probes, o.fences
    );
    println!("epoch           {}", r.epoch);
    println!("owner           {}", r.owner);
    Ok(())
}
