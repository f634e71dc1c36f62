//! `bench`: the engine benchmarks P1–P5 (issue 5), P8–P10 and P12 (issue 11),
//! P11 (issue 12),
//! each a ratio against a baseline measured in the same run. Prints a
//! markdown table; nothing here asserts a time (the test suite runs it with `--quick` as a smoke).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use crate::codec::Codec;
use crate::store::backend::{DynStore, LatencyPlan, LatencyStore, LocalDirStore, MemoryStore};
use crate::store::keys::{DataKey, Secret, VolumeKeys};
use crate::store::superblock::CreateParams;
use crate::store::{OpenMode, SegmentId, WriterOptions};
use crate::volume::{OpenOptions, Volume, VolumeConfig};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Data per throughput test (P1), e.g. 1G.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Small sizes and short runs: a smoke test, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Run only these benchmarks (comma-separated, e.g. `p1,p4`).
    #[arg(long, value_delimiter = ',', value_parser = ["p1", "p2", "p3", "p4", "p5", "p8", "p9", "p10", "p11", "p12"])]
    pub only: Vec<String>,
}

const CHUNK: usize = 128 << 10;

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// Compressible (text-like: words from a small vocabulary with numbers,
/// about 3–4× under zstd level 1, like logs or database pages) or random
/// data of `len` bytes.
fn data(len: usize, compressible: bool) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if !compressible {
        return (0..len).map(|_| (next() >> 32) as u8).collect();
    }
    const WORDS: [&str; 32] = [
        "block", "chunk", "segment", "flush", "write", "read", "cache", "index", "volume",
        "bucket", "epoch", "frame", "table", "the", "of", "and", "a", "to", "in", "is", "zero",
        "queue", "tag", "io", "kernel", "device", "error", "ok", "key", "value", "row", "page",
    ];
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let r = next();
        out.extend_from_slice(WORDS[(r & 31) as usize].as_bytes());
        if r & 0x300 == 0 {
            out.extend_from_slice(format!(" {}", (r >> 16) % 100_000).as_bytes());
        }
        out.push(if r & 0x3c00 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// `store` behind 25 ms per request (an S3 round trip), and a bandwidth
/// cap in bytes per second if given.
fn behind_25ms(store: DynStore, bandwidth: Option<u64>) -> DynStore {
    Arc::new(LatencyStore::new(
        store,
        LatencyPlan {
            latency: Duration::from_millis(25),
            bandwidth,
            error_rate: 0.0,
        },
    ))
}

fn secret() -> Secret {
    Secret::key_file(vec![7u8; 32]).expect("32 bytes")
}

fn writer() -> OpenOptions {
    OpenOptions {
        mode: OpenMode::Writer(WriterOptions::default()),
    }
}

async fn new_volume(store: &DynStore, size: u64, cfg: VolumeConfig) -> Result<Volume> {
    let mut params = CreateParams::new(size);
    params.chunk_size = CHUNK as u32;
    Volume::create(store, &params, &secret(), false).await?;
    Ok(Volume::open(store.clone(), &secret(), writer(), cfg).await?)
}

/// Codec alone over `buf`, on all cores like the engine's flush.
fn codec_baseline(buf: &[u8]) -> (Duration, Duration) {
    let codec = Codec::new(VolumeKeys::new([1; 16], DataKey::random()), 1, CHUNK as u32);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = buf.len().div_ceil(threads * CHUNK) * CHUNK;
    let t = Instant::now();
    let frames: Vec<Vec<(crate::store::Loc, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks(per.max(CHUNK))
            .enumerate()
            .map(|(i, part)| {
                let codec = codec.clone();
                s.spawn(move || {
                    let seg = SegmentId {
                        epoch: 1,
                        seq: i as u64,
                    };
                    let key = codec.frame_key(seg);
                    let mut off = 0u64;
                    part.chunks(CHUNK)
                        .enumerate()
                        .map(|(c, chunk)| {
                            let f = codec.encode(&key, off, c as u64, chunk);
                            let loc = crate::store::Loc {
                                segment: seg,
                                offset: off as u32,
                                len: f.len() as u32,
                            };
                            off += f.len() as u64;
                            (loc, f)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("encode"))
            .collect()
    });
    let encode = t.elapsed();
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in &frames {
            let codec = codec.clone();
            s.spawn(move || {
                for (c, (loc, f)) in part.iter().enumerate() {
                    codec.decode(*loc, c as u64, f).expect("decode");
                }
            });
        }
    });
    (encode, t.elapsed())
}

/// The one copy a write-back cache cannot avoid: each written chunk into
/// a buffer of its own, held until a dirty limit's worth is reached (as the
/// dirty table does), on one core like a writer.
fn copy_floor(buf: &[u8]) -> Duration {
    let limit = VolumeConfig::default().dirty_limit / CHUNK;
    let t = Instant::now();
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(limit);
    for chunk in buf.chunks(CHUNK) {
        if held.len() == limit {
            held.clear();
        }
        held.push(std::hint::black_box(chunk.to_vec()));
    }
    drop(held);
    t.elapsed()
}

async fn p1(size: u64) -> Result<Vec<String>> {
    let mut rows = Vec::new();
    for compressible in [true, false] {
        let buf = data(size as usize, compressible);
        let (enc, dec) = tokio::task::spawn_blocking({
            let b = buf.clone();
            move || codec_baseline(&b)
        })
        .await?;
        let copy = copy_floor(&buf);
        let store: DynStore = Arc::new(MemoryStore::new());
        // The default engine: background flusher, 256 MiB cache (1 GiB
        // read cold churns through it), sequential readahead.
        let cfg = VolumeConfig::default();
        let vol = new_volume(&store, size, cfg.clone()).await?;
        let write = timed_write(&vol, &buf).await?;
        vol.close().await?;
        let vol = Volume::open(store.clone(), &secret(), writer(), cfg).await?;
        // One reused request buffer, as the ublk frontend has per tag.
        let mut out = vec![0u8; 1 << 20];
        let t = Instant::now();
        for i in 0..size / (1 << 20) {
            vol.read_into(i * (1 << 20), &mut out).await?;
        }
        let read = t.elapsed();
        let kind = if compressible {
            "compressible"
        } else {
            "random"
        };
        rows.push(format!(
            "| P1 seq write, {kind} | {:.0} MiB/s | codec encode {:.0} MiB/s | {:.2} | ≥ 0.85 |",
            mib_s(size, write),
            mib_s(size, enc),
            enc.as_secs_f64() / write.as_secs_f64()
        ));
        let floor = enc + copy;
        rows.push(format!(
            "| P1 seq write, {kind}, vs codec + one copy into fresh buffers | {:.0} MiB/s | {:.0} MiB/s | {:.2} | — |",
            mib_s(size, write),
            mib_s(size, floor),
            floor.as_secs_f64() / write.as_secs_f64()
        ));
        rows.push(format!(
            "| P1 seq read (cold, memory store), {kind} | {:.0} MiB/s | codec decode {:.0} MiB/s | {:.2} | ≥ 0.85 |",
            mib_s(size, read),
            mib_s(size, dec),
            dec.as_secs_f64() / read.as_secs_f64()
        ));
        if !compressible {
            let journaled = journaled_write(&buf, size).await?;
            rows.push(format!(
                "| P1 seq write, random, journaled as the device server does (encrypted, tmpfs) | {:.0} MiB/s | the same without journal {:.0} MiB/s | {:.2} | — |",
                mib_s(size, journaled),
                mib_s(size, write),
                write.as_secs_f64() / journaled.as_secs_f64()
            ));
        }
    }
    Ok(rows)
}

/// P1's write with the host-local journal attached in a tmpfs directory,
/// as the device server writes: every write is encrypted into the journal
/// before it is applied.
async fn journaled_write(buf: &[u8], size: u64) -> Result<Duration> {
    let scratch = ScratchDir::new();
    let dir = scratch.0.join("journal");
    crate::volume::journal::prepare_dir(&dir)?;
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut params = CreateParams::new(size);
    params.chunk_size = CHUNK as u32;
    Volume::create(&store, &params, &secret(), false).await?;
    let opts = OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            journal: Some(crate::volume::journal::dir_identity(&dir)?),
            ..WriterOptions::default()
        }),
    };
    let vol = Volume::open(store, &secret(), opts, VolumeConfig::default()).await?;
    vol.attach_journal(&dir).await?;
    let took = timed_write(&vol, buf).await?;
    vol.close().await?;
    Ok(took)
}

/// Write `buf` from offset 0 in 1 MiB requests, then flush: how long.
async fn timed_write(vol: &Volume, buf: &[u8]) -> Result<Duration> {
    let t = Instant::now();
    for (i, piece) in buf.chunks(1 << 20).enumerate() {
        vol.write(i as u64 * (1 << 20), piece).await?;
    }
    vol.flush().await?;
    Ok(t.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

async fn p2(working_set: u64, reads: usize) -> Result<Vec<String>> {
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = VolumeConfig {
        cache_bytes: (working_set * 2) as usize,
        ..VolumeConfig::default()
    };
    let vol = new_volume(&store, working_set, cfg).await?;
    vol.write(0, &data(working_set as usize, false)).await?;
    vol.flush().await?;
    let blocks = working_set / 4096;
    let mut x = 12345u64;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % blocks
    };
    let mut lat = Vec::with_capacity(reads);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..reads {
        let s = Instant::now();
        vol.read_into(next() * 4096, &mut buf).await?;
        lat.push(s.elapsed());
    }
    let engine = t.elapsed();
    // Baseline: a bare HashMap of chunks, lookup + memcpy of 4 KiB.
    let map: HashMap<u64, Vec<u8>> = (0..working_set / CHUNK as u64)
        .map(|c| (c, data(CHUNK, false)))
        .collect();
    let t = Instant::now();
    for _ in 0..reads {
        let b = next();
        let chunk = &map[&(b * 4096 / CHUNK as u64)];
        let at = (b * 4096 % CHUNK as u64) as usize;
        buf.copy_from_slice(&chunk[at..at + 4096]);
        std::hint::black_box(&buf);
    }
    let base = t.elapsed();
    lat.sort();
    Ok(vec![format!(
        "| P2 hot 4 KiB random read (async API, 1 core) | {:.0} IOPS, p50 {:.1} µs, p99 {:.1} µs | HashMap+memcpy {:.0} IOPS | {:.2} | ≥ 0.5 |",
        reads as f64 / engine.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        reads as f64 / base.as_secs_f64(),
        base.as_secs_f64() / engine.as_secs_f64()
    )])
}

async fn p3(size: u64) -> Result<Vec<String>> {
    let bandwidth = 100u64 << 20;
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = new_volume(&mem, size, VolumeConfig::default()).await?;
    vol.write(0, &data(size as usize, false)).await?;
    vol.close().await?;
    let slow = behind_25ms(mem, Some(bandwidth));
    let ro = OpenOptions {
        mode: OpenMode::ReadOnly,
    };
    let vol = Volume::open(slow.clone(), &secret(), ro.clone(), VolumeConfig::default()).await?;
    let t = Instant::now();
    for i in 0..size / (1 << 20) {
        vol.read(i * (1 << 20), 1 << 20).await?;
    }
    let seq = t.elapsed();
    let vol = Volume::open(slow, &secret(), ro, VolumeConfig::default()).await?;
    let before = vol.request_stats();
    let n = 16u64;
    let t = Instant::now();
    for i in 0..n {
        vol.read((i * 7 % (size / CHUNK as u64)) * CHUNK as u64 + 4096, 4096)
            .await?;
    }
    let per_read = t.elapsed() / n as u32;
    let gets = vol.request_stats().ranged_get - before.ranged_get;
    Ok(vec![
        format!(
            "| P3 cold seq read, 25 ms/request, {} MiB/s cap | {:.1} MiB/s | the cap | {:.2} | ≥ 0.8 |",
            bandwidth >> 20,
            mib_s(size, seq),
            mib_s(size, seq) / (bandwidth >> 20) as f64
        ),
        format!(
            "| P3 cold 4 KiB random read | {:.1} ms each, {:.2} GETs/read | one request: ≈ 25 ms + transfer | {:.2} GETs | 1 GET |",
            per_read.as_secs_f64() * 1e3,
            gets as f64 / n as f64,
            gets as f64 / n as f64
        ),
    ])
}

/// P8: FLUSH latency of a 4 KiB write behind 25 ms per request, in store
/// round trips: the baseline is a bare conditional PUT of 4 KiB on the
/// same store in the same run (one round trip; the ideal a FLUSH that
/// must reach the store can have).
async fn p8(flushes: usize) -> Result<Vec<String>> {
    let behind_latency = || behind_25ms(Arc::new(MemoryStore::new()), None);
    let (bare_store, slow) = (behind_latency(), behind_latency());
    let block = data(4096, false);
    let mut bare = Vec::with_capacity(flushes);
    for i in 0..flushes {
        let t = Instant::now();
        bare_store
            .put_if_absent(&format!("bench/{i}"), bytes::Bytes::from(block.clone()))
            .await?;
        bare.push(t.elapsed());
    }
    bare.sort();
    let size = 256u64 << 20;
    let vol = new_volume(&slow, size, VolumeConfig::default()).await?;
    let lat = write_then_flush(&vol, &block, flushes, &mut 99).await?;
    vol.close().await?;
    let rtt = percentile(&bare, 0.5).as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(vec![format!(
        "| P8 fsync of a 4 KiB write, 25 ms/request ({flushes} flushes) | p50 {:.1} ms, p99 {:.1} ms | bare 4 KiB conditional PUT p50 {:.1} ms | p50 {:.2} RTT, p99 {:.2} RTT | p50 ≤ 1.2 RTT |",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&bare, 0.5)),
        percentile(&lat, 0.5).as_secs_f64() / rtt,
        percentile(&lat, 0.99).as_secs_f64() / rtt,
    )])
}

/// A random `block`-aligned offset below `size` (an LCG in `x`).
fn random_offset(x: &mut u64, size: u64, block: u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    (*x >> 33) % (size / block) * block
}

/// `n` times: `block` written at a random offset, then a timed FLUSH;
/// the FLUSH latencies, sorted.
async fn write_then_flush(
    vol: &Volume,
    block: &[u8],
    n: usize,
    x: &mut u64,
) -> Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        vol.write(random_offset(x, vol.size(), block.len() as u64), block)
            .await?;
        let t = Instant::now();
        vol.flush().await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// P8 with `--journal-dir` (docs/rfcs/0006): the fsync of a 4 KiB write
/// against a bare `pwrite` + `fdatasync` of 4 KiB in the same directory,
/// same run; then a sustained load of 8 KiB random writes with an fsync
/// every 16 (a small commit) for `secs`, behind the same 25 ms store:
/// fsync latency, and the upload lag it keeps (the most the bucket was
/// behind, sampled at each fsync).
async fn p8_journal(flushes: usize, secs: u64) -> Result<Vec<String>> {
    use crate::volume::journal::{self, Durability, UploadLag};
    use std::os::unix::fs::FileExt;
    let dir =
        std::env::temp_dir().join(format!("zerofs-ublk-bench-journal-{}", std::process::id()));
    if journal::refuse_memory_filesystem(&dir).is_err() {
        return Ok(vec![format!(
            "| P8 fsync with --journal-dir | skipped: {} is on tmpfs (set TMPDIR to a disk) | — | — | ≤ 2× |",
            std::env::temp_dir().display()
        )]);
    }
    let _cleanup = ScratchDir(dir.clone());
    std::fs::create_dir_all(&dir)?;
    // The baseline: the same size, synced the same way, same directory.
    let block = data(4096, false);
    let file = std::fs::File::create(dir.join("baseline"))?;
    let mut bare = Vec::with_capacity(flushes);
    let mut x = 7u64;
    for _ in 0..flushes {
        let t = Instant::now();
        file.write_all_at(&block, random_offset(&mut x, 16 << 20, 4096))?;
        file.sync_data()?;
        bare.push(t.elapsed());
    }
    bare.sort();
    let store = behind_25ms(Arc::new(MemoryStore::new()), None);
    let size = 1u64 << 30;
    let mut params = CreateParams::new(size);
    params.chunk_size = CHUNK as u32;
    Volume::create(&store, &params, &secret(), false).await?;
    let jdir = dir.join("journal");
    let opts = OpenOptions {
        mode: OpenMode::Writer(WriterOptions {
            journal: Some(journal::host_dir_identity(&jdir)?),
            ..WriterOptions::default()
        }),
    };
    let vol = Volume::open(store, &secret(), opts, VolumeConfig::default()).await?;
    let lag = UploadLag::default();
    vol.attach_journal_as(&jdir, Durability::Host(lag)).await?;
    let lat = write_then_flush(&vol, &block, flushes, &mut x).await?;
    let local = vol.stats().local_flushes;
    // Sustained: 8 KiB pages, an fsync every 16.
    let page = data(8192, true);
    let (mut sustained, mut max_bytes, mut max_age) = (Vec::new(), 0u64, Duration::ZERO);
    let start = Instant::now();
    let mut pages = 0u64;
    let before = vol.stats().flushes;
    while start.elapsed() < Duration::from_secs(secs) {
        for _ in 0..16 {
            vol.write(random_offset(&mut x, size, 8192), &page).await?;
            pages += 1;
        }
        let t = Instant::now();
        vol.flush().await?;
        sustained.push(t.elapsed());
        if let Some(l) = vol.stats().upload_lag {
            max_bytes = max_bytes.max(l.bytes);
            max_age = max_age.max(l.age);
        }
    }
    let elapsed = start.elapsed();
    let uploads = vol.stats().flushes - before;
    vol.close().await?;
    sustained.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = percentile(&lat, 0.5).as_secs_f64();
    let bare50 = percentile(&bare, 0.5).as_secs_f64();
    Ok(vec![
        format!(
            "| P8 fsync of a 4 KiB write, --journal-dir on {} ({flushes} flushes, {local} acknowledged from the journal) | p50 {:.2} ms, p99 {:.2} ms | bare 4 KiB pwrite + fdatasync there p50 {:.2} ms | p50 {:.2}× | p50 ≤ 2× |",
            std::env::temp_dir().display(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            bare50 * 1e3,
            p50 / bare50.max(1e-9),
        ),
        format!(
            "| P8 sustained 8 KiB random writes + fsync/16, --journal-dir, 25 ms/request ({:.0} s, {} fsyncs, {uploads} bucket flushes) | fsync p50 {:.2} ms, p99 {:.2} ms; {:.1} MiB/s written | upload lag at most {:.1} MiB, {} ms (bound {} MiB, {} s) | — | within the bound |",
            elapsed.as_secs_f64(),
            sustained.len(),
            ms(percentile(&sustained, 0.5)),
            ms(percentile(&sustained, 0.99)),
            (pages * 8192) as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
            max_bytes as f64 / (1 << 20) as f64,
            max_age.as_millis(),
            lag.bytes >> 20,
            lag.age.as_secs(),
        ),
    ])
}

/// P11: a database page write (8 KiB) into a chunk that is stored but
/// neither dirty nor cached, behind 25 ms per request. Baselines in the
/// same run: an 8 KiB read of such a chunk (one GET: what the write used
/// to wait for, read-modify-write), and the same write into a cached
/// chunk. Also the FLUSH after the cold writes (their chunks' stored
/// versions are read in the background meanwhile) against one PUT.
async fn p11(chunks: u64) -> Result<Vec<String>> {
    let store = behind_25ms(Arc::new(MemoryStore::new()), None);
    let size = 2 * chunks * CHUNK as u64;
    let vol = new_volume(&store, size, VolumeConfig::default()).await?;
    let fill = data(CHUNK, true);
    for c in 0..2 * chunks {
        vol.write(c * CHUNK as u64, &fill).await?;
    }
    vol.close().await?;
    // Reads in chunk order must not prefetch the next chunk.
    let cfg = VolumeConfig {
        readahead_chunks: 0,
        ..VolumeConfig::default()
    };
    let vol = Volume::open(store.clone(), &secret(), writer(), cfg).await?;
    let page = data(8192, true);
    // The page's place inside its chunk varies (sector-aligned, 8 KiB).
    let at = |c: u64| c * CHUNK as u64 + (c * 7919 % (CHUNK as u64 / 8192)) * 8192;
    let timed = |lat: &mut Vec<Duration>, t: Instant| lat.push(t.elapsed());
    let (mut cold, mut read, mut hot) = (Vec::new(), Vec::new(), Vec::new());
    let before = vol.request_stats();
    for c in 0..chunks {
        let t = Instant::now();
        vol.write(at(c), &page).await?;
        timed(&mut cold, t);
    }
    let gets_waited = vol.request_stats().get - before.get;
    let t = Instant::now();
    vol.flush().await?;
    let flush = t.elapsed();
    for c in chunks..2 * chunks {
        let t = Instant::now();
        vol.read(at(c), 8192).await?;
        timed(&mut read, t);
    }
    // Read whole (the flush published patches: the chunks are not in
    // memory until read), so the same writes again land in cached chunks.
    for c in 0..chunks {
        vol.read(c * CHUNK as u64, CHUNK).await?;
    }
    for c in 0..chunks {
        let t = Instant::now();
        vol.write(at(c), &page).await?;
        timed(&mut hot, t);
    }
    let t = Instant::now();
    vol.flush().await?;
    let hot_flush = t.elapsed();
    let partial = vol.stats().partial_writes;
    vol.close().await?;
    for l in [&mut cold, &mut read, &mut hot] {
        l.sort();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(vec![
        format!(
            "| P11 8 KiB write into an uncached stored chunk, 25 ms/request ({chunks} writes, {partial} answered without a read) | p50 {:.3} ms, p99 {:.3} ms | 8 KiB read of such a chunk p50 {:.1} ms; same write into a cached chunk p50 {:.3} ms | {:.4}× the read, {:.2}× the cached write | no store round trip; ≤ 1 ms |",
            ms(percentile(&cold, 0.5)),
            ms(percentile(&cold, 0.99)),
            ms(percentile(&read, 0.5)),
            ms(percentile(&hot, 0.5)),
            percentile(&cold, 0.5).as_secs_f64() / percentile(&read, 0.5).as_secs_f64(),
            percentile(&cold, 0.5).as_secs_f64() / percentile(&hot, 0.5).as_secs_f64(),
        ),
        format!(
            "| P11 FLUSH after those writes ({gets_waited} GETs completed while they ran) | {:.1} ms | FLUSH after the cached writes {:.1} ms | {:.2}× | — |",
            ms(flush),
            ms(hot_flush),
            flush.as_secs_f64() / hot_flush.as_secs_f64(),
        ),
    ])
}

/// P12: overlapping flushes (docs/rfcs/0005), behind 25 ms per request
/// and a 200 MiB/s upload cap. Two loads, each run with one flush in
/// flight at a time (`flush_depth` 1, the baseline) and with the default
/// (2), in the same run:
/// - a database's WAL fsync (4 KiB write + FLUSH, in a loop) beside a bulk
///   writer that writes 8 MiB and flushes, in a loop (a ZFS transaction
///   group, a checkpoint): the fsync's latency;
/// - 8 clients each writing 4 KiB + FLUSH in a loop: fsyncs per second,
///   and segment PUTs per fsync (what overlapping costs in requests).
async fn p12(fsyncs: usize) -> Result<Vec<String>> {
    let store = || behind_25ms(Arc::new(MemoryStore::new()), Some(200 << 20));
    let size = 1u64 << 30;
    let cfg = |depth| VolumeConfig {
        flush_depth: depth,
        background_flush: false,
        ..VolumeConfig::default()
    };
    let small = data(4096, false);
    let bulk = data(8 << 20, false);
    let spot = |x: &mut u64| {
        *x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        (*x >> 33) % (size / 2 / 4096) * 4096
    };
    // The fsync beside a bulk writer.
    let mut beside = Vec::new();
    for depth in [1, 2] {
        let vol = new_volume(&store(), size, cfg(depth)).await?;
        let done = std::sync::atomic::AtomicBool::new(false);
        let wal = async {
            let mut lat = Vec::with_capacity(fsyncs);
            let mut x = 7u64;
            for _ in 0..fsyncs {
                vol.write(spot(&mut x), &small).await?;
                let t = Instant::now();
                vol.flush().await?;
                lat.push(t.elapsed());
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            lat.sort();
            anyhow::Ok(lat)
        };
        let bulk_writer = async {
            let mut at = size / 2;
            let mut bytes = 0u64;
            let t = Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                vol.write(at, &bulk).await?;
                vol.flush().await?;
                bytes += bulk.len() as u64;
                at = size / 2 + (at + bulk.len() as u64) % (size / 2);
            }
            anyhow::Ok(mib_s(bytes, t.elapsed()))
        };
        let (lat, mibs) = futures::future::join(wal, bulk_writer).await;
        let (lat, mibs) = (lat?, mibs?);
        vol.close().await?;
        beside.push((percentile(&lat, 0.5), percentile(&lat, 0.99), mibs));
    }
    // Eight clients fsyncing.
    let clients = 8;
    let mut many = Vec::new();
    for depth in [1, 2] {
        let vol = new_volume(&store(), size, cfg(depth)).await?;
        let before = vol.request_stats();
        let t = Instant::now();
        let client = |seed: u64| {
            let vol = &vol;
            let small = &small;
            async move {
                let mut x = seed;
                for _ in 0..fsyncs / clients {
                    vol.write(spot(&mut x), small).await?;
                    vol.flush().await?;
                }
                anyhow::Ok(())
            }
        };
        for r in futures::future::join_all((0..clients as u64).map(|c| client(c + 1))).await {
            r?;
        }
        let elapsed = t.elapsed();
        let puts = vol.request_stats().conditional_put - before.conditional_put;
        let n = (fsyncs / clients * clients) as f64;
        vol.close().await?;
        many.push((n / elapsed.as_secs_f64(), puts as f64 / n));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ((p50_1, p99_1, mibs_1), (p50_2, p99_2, mibs_2)) = (beside[0], beside[1]);
    let ((rate_1, puts_1), (rate_2, puts_2)) = (many[0], many[1]);
    Ok(vec![
        format!(
            "| P12 fsync of a 4 KiB write beside 8 MiB write+flush loops, 25 ms/request, 200 MiB/s ({fsyncs} fsyncs) | two flushes in flight: p50 {:.0} ms, p99 {:.0} ms; bulk {:.0} MiB/s | one at a time: p50 {:.0} ms, p99 {:.0} ms; bulk {:.0} MiB/s | p50 {:.2}×, p99 {:.2}×, bulk {:.2}× | p50 < 1× |",
            ms(p50_2),
            ms(p99_2),
            mibs_2,
            ms(p50_1),
            ms(p99_1),
            mibs_1,
            p50_2.as_secs_f64() / p50_1.as_secs_f64(),
            p99_2.as_secs_f64() / p99_1.as_secs_f64(),
            mibs_2 / mibs_1,
        ),
        format!(
            "| P12 {clients} clients each 4 KiB write + fsync, 25 ms/request | two in flight: {rate_2:.0} fsyncs/s, {puts_2:.2} segment PUTs/fsync | one at a time: {rate_1:.0} fsyncs/s, {puts_1:.2} PUTs/fsync | {:.2}× fsyncs/s, {:.2}× PUTs | > 1× fsyncs/s |",
            rate_2 / rate_1,
            puts_2 / puts_1,
        ),
    ])
}

/// P10: incremental checkpoints at scale. An index of `chunks` mapped
/// 128 KiB chunks (synthetic locations: the index, not the data, is what a
/// checkpoint writes) is checkpointed as a base; then `changed` chunks
/// move and the next checkpoint is written: its bytes against the whole
/// index encoded the format-4 way (same run). Then an open behind 25 ms
/// per request: time, requests and bytes read to load the checkpoint.
async fn p10(chunks: u64, changed: u64) -> Result<Vec<String>> {
    use crate::store::checkpoint::{self, Chain};
    use crate::store::{Index, Loc, LogStore, OpenMode, SegmentId};
    let mem: DynStore = Arc::new(MemoryStore::new());
    let mut params = CreateParams::new(chunks * (128 << 10));
    params.chunk_size = 128 << 10;
    LogStore::create(&mem, &params, &secret(), false).await?;
    let (log, _, _) = LogStore::open(
        mem.clone(),
        &secret(),
        OpenMode::Writer(WriterOptions::default()),
    )
    .await?;
    let epoch = log.epoch().expect("a writer");
    // 256 frames per 32 MiB segment, of the varied lengths compression
    // leaves (as much entropy per entry as a real index has).
    let loc = |chunk: u64, version: u64| {
        let h = (chunk ^ version << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Loc {
            segment: SegmentId {
                epoch,
                seq: version * chunks / 256 + chunk / 256,
            },
            offset: (h >> 40) as u32 % (32 << 20),
            len: 30_000 + (h >> 16) as u32 % 101_000,
        }
    };
    let mut index = Index::default();
    for c in 0..chunks {
        index.set_frame(c, Some(loc(c, 0)));
    }
    index.take_changed();
    let whole =
        checkpoint::encode_whole(log.keys(), SegmentId { epoch, seq: 0 }, &index).len() as u64;
    let stored = |log: &LogStore| {
        let s = log.request_stats();
        (s.put, s.bytes_out)
    };
    let base_at = SegmentId {
        epoch,
        seq: chunks / 256,
    };
    let before = stored(&log);
    let t = Instant::now();
    let (chain, _) = log
        .put_checkpoint(Chain::plan(
            None,
            base_at,
            index.clone(),
            &Default::default(),
        ))
        .await?;
    let base_time = t.elapsed();
    let (puts0, bytes0) = stored(&log);
    let mut x = 7u64;
    for _ in 0..changed {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let c = (x >> 33) % chunks;
        index.set_frame(c, Some(loc(c, 1)));
    }
    let delta_at = SegmentId {
        epoch,
        seq: 2 * chunks / 256 + 1,
    };
    let changed_set = index.take_changed();
    let t = Instant::now();
    log.put_checkpoint(Chain::plan(Some(&chain), delta_at, index, &changed_set))
        .await?;
    let delta_time = t.elapsed();
    let (puts1, bytes1) = stored(&log);
    drop(log);
    let slow = behind_25ms(mem, None);
    let t = Instant::now();
    let (reader, loaded, summary) = LogStore::open(slow, &secret(), OpenMode::ReadOnly).await?;
    let open_time = t.elapsed();
    anyhow::ensure!(
        summary.checkpoint_used == Some(delta_at) && loaded.len() as u64 == chunks,
        "the open did not load the checkpoint"
    );
    let r = reader.request_stats();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mb = |b: u64| b as f64 / 1e6;
    Ok(vec![
        format!(
            "| P10 checkpoint after {changed} of {chunks} chunks changed | {} B in {} PUTs, {:.0} ms (the base: {:.1} MB, {:.0} ms) | whole index {:.1} MB | {:.5}x | ≤ 1 MiB |",
            bytes1 - bytes0,
            puts1 - puts0,
            ms(delta_time),
            mb(bytes0 - before.1),
            ms(base_time),
            mb(whole),
            (bytes1 - bytes0) as f64 / whole as f64,
        ),
        format!(
            "| P10 open of that volume, 25 ms/request | {:.2} s, {} requests ({} GETs, {:.1} MB) | 25 ms round trip | {:.0} RTT | — |",
            open_time.as_secs_f64(),
            r.total(),
            r.get + r.ranged_get,
            mb(r.bytes_in),
            open_time.as_secs_f64() / 0.025,
        ),
    ])
}

/// The P4 workloads, (write size, random, writes per fsync): random 4 KiB
/// writes with an fsync every 1,000 writes (a busy database) or every
/// 4,096 (16 MiB, the rate at which ≤ 64 PUTs per GiB is possible at one
/// PUT per fsync); random 8 KiB writes (PostgreSQL's page) with an fsync
/// every 1,000 or every 2,048 (16 MiB); 1 MiB sequential writes with an
/// fsync every 64 MiB.
const P4_WORKLOADS: [(usize, bool, u64); 5] = [
    (4096, true, 1000),
    (4096, true, 4096),
    (8192, true, 1000),
    (8192, true, 2048),
    (1 << 20, false, 64),
];

async fn p4(size: u64) -> Result<Vec<String>> {
    let mut rows = Vec::new();
    for (bs, random, per_fsync) in P4_WORKLOADS {
        let store: DynStore = Arc::new(MemoryStore::new());
        let vol = new_volume(&store, size, VolumeConfig::default()).await?;
        let base = vol.request_stats();
        let block = data(bs, false);
        let writes = size / block.len() as u64;
        let mut x = 777u64;
        for i in 0..writes {
            let off = if random {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) % (size / bs as u64) * bs as u64
            } else {
                i * block.len() as u64
            };
            vol.write(off, &block).await?;
            if i % per_fsync == per_fsync - 1 {
                vol.flush().await?;
            }
        }
        vol.flush().await?;
        let s = vol.request_stats();
        let gib = (writes * block.len() as u64) as f64 / (1u64 << 30) as f64;
        let puts = (s.put + s.conditional_put - base.put - base.conditional_put) as f64;
        let fsyncs = writes.div_ceil(per_fsync);
        let uploaded = (s.bytes_out - base.bytes_out) as f64 / (1u64 << 30) as f64;
        let kind = if random {
            format!("{} KiB random + fsync/{per_fsync}", bs >> 10)
        } else {
            format!("{} MiB sequential + fsync/{per_fsync}", bs >> 20)
        };
        rows.push(format!(
            "| P4 PUTs per GiB written, {kind} | {:.1} ({:.2} per fsync; {:.1} GiB uploaded per GiB written) | floor: {:.0} fsyncs per GiB | — | ≤ 64 |",
            puts / gib,
            puts / fsyncs as f64,
            uploaded / gib,
            fsyncs as f64 / gib
        ));
        if !random {
            let idle = vol.request_stats();
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = vol.request_stats();
            rows.push(format!(
                "| P4 store requests while idle (3 s, background flusher on) | {} | — | — | 0 |",
                after.total() - idle.total()
            ));
        }
    }
    Ok(rows)
}

/// P9: the bucket under overwrites with garbage collection running, and
/// what collecting costs. The same workload — 1 MiB writes of random data
/// at random chunk-aligned offsets until the volume was written `rounds`
/// times over, a flush every 64 MiB — without collection (the baseline)
/// and with the background collector on (unpaced: its worst case for the
/// foreground; no grace period), in one run: three pairs, the medians of
/// their times; the space figures are the same in every pair (the
/// workload is seeded).
async fn p9(size: u64, live_below: f64) -> Result<Vec<String>> {
    use crate::volume::gc::{GcConfig, GcPolicy};
    const ROUNDS: u64 = 10;
    let block = Arc::new(data(1 << 20, false));
    let run = |policy: GcPolicy| {
        let block = Arc::clone(&block);
        async move {
            let store: DynStore = Arc::new(MemoryStore::new());
            let cfg = VolumeConfig {
                gc: GcConfig {
                    policy,
                    grace: Duration::ZERO,
                    live_below,
                    bytes_per_sec: u64::MAX,
                    requests_per_sec: u32::MAX,
                    interval: Duration::from_millis(100),
                },
                ..VolumeConfig::default()
            };
            let vol = new_volume(&store, size, cfg).await?;
            let blocks = size >> 20;
            let mut x = 99u64;
            let started = Instant::now();
            for i in 0..blocks * ROUNDS {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                vol.write(((x >> 33) % blocks) << 20, &block).await?;
                if i % 64 == 63 {
                    vol.flush().await?;
                }
            }
            vol.flush().await?;
            let elapsed = started.elapsed();
            let segments = |store: &DynStore| {
                let store = store.clone();
                async move {
                    anyhow::Ok(
                        store
                            .list(crate::store::paths::SEGMENTS)
                            .await?
                            .iter()
                            .map(|o| o.size)
                            .sum::<u64>(),
                    )
                }
            };
            let at_end = segments(&store).await?;
            if policy == GcPolicy::Background {
                // Let it finish what the writes left.
                for _ in 0..10_000 {
                    let pass = vol.collect(Duration::ZERO).await?;
                    if pass.is_idle() && pass.pending == 0 {
                        break;
                    }
                }
            }
            let settled = segments(&store).await?;
            let live = vol.stats().live_bytes;
            let copied = vol.gc_stats().bytes_copied;
            vol.close().await?;
            anyhow::Ok((elapsed, at_end, settled, live, copied))
        }
    };
    // Three pairs, alternating which goes first (the first run of a
    // process pays for the allocator's growth): medians of the times.
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for pair in 0..3 {
        if pair % 2 == 0 {
            offs.push(run(GcPolicy::Manual).await?);
            ons.push(run(GcPolicy::Background).await?);
        } else {
            ons.push(run(GcPolicy::Background).await?);
            offs.push(run(GcPolicy::Manual).await?);
        }
    }
    let median = |runs: &[(Duration, u64, u64, u64, u64)]| {
        let mut t: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        t.sort();
        t[t.len() / 2]
    };
    let (t_off, t_on) = (median(&offs), median(&ons));
    let (_, off_end, _, live_off, _) = offs[0];
    let (_, on_end, on_settled, live, copied) = ons[0];
    let written = size * ROUNDS;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(vec![
        format!(
            "| P9 segment bytes / live bytes after {ROUNDS}x overwrite (1 MiB random, GC below {live_below} live) | {:.2} ({:.0} of {:.0} MiB; {:.2} when the writes stopped) | without GC {:.2} | — | ≤ 1.3 |",
            on_settled as f64 / live as f64,
            mib(on_settled),
            mib(live),
            on_end as f64 / live as f64,
            off_end as f64 / live_off as f64,
        ),
        format!(
            "| P9 bytes GC uploaded per byte written | {:.2} ({:.0} MiB for {:.0} MiB) | — | — | ≤ 1.0 |",
            copied as f64 / written as f64,
            mib(copied),
            mib(written),
        ),
        format!(
            "| P9 foreground write throughput with GC running (median of 3 pairs) | {:.0} MiB/s | without GC {:.0} MiB/s | {:.2} | ≥ 0.8 |",
            mib(written) / t_on.as_secs_f64(),
            mib(written) / t_off.as_secs_f64(),
            t_off.as_secs_f64() / t_on.as_secs_f64(),
        ),
    ])
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A scratch directory, removed when dropped; `new`: on tmpfs when there
/// is one (a bucket's pages are then not in this process's RSS, unlike a
/// memory store's objects).
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        ScratchDir(base.join(format!("zerofs-ublk-bench-{}", std::process::id())))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn p5(size: u64) -> Result<Vec<String>> {
    let cache = 256u64 << 20;
    let scratch = ScratchDir::new();
    let store: DynStore = Arc::new(LocalDirStore::open(&scratch.0)?);
    let cfg = VolumeConfig {
        cache_bytes: cache as usize,
        ..VolumeConfig::default()
    };
    let dirty_limit = cfg.dirty_limit as u64;
    let vol = new_volume(&store, size, cfg).await?;
    let piece = data(1 << 20, false);
    let mut out = vec![0u8; 1 << 20];
    // Reset the peak-RSS mark (VmHWM) so earlier benchmarks do not count.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_kib("VmRSS:");
    for i in 0..size / (1 << 20) {
        vol.write(i << 20, &piece).await?;
    }
    vol.flush().await?;
    for i in 0..size / (1 << 20) {
        vol.read_into(i << 20, &mut out).await?;
    }
    let after = rss_kib("VmRSS:").saturating_sub(before);
    let peak = rss_kib("VmHWM:").saturating_sub(before);
    // jemalloc hands freed pages back after a 1 s decay: the settled
    // figure is what a long-running server keeps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = rss_kib("VmRSS:").saturating_sub(before);
    let index = vol.stats().mapped_chunks * 48;
    vol.close().await?;
    let budget = (cache + (64 << 20) + index) / 1024;
    // While writing, the dirty table (up to its limit) and one flush's
    // segment objects (up to as much again) come on top of the cache.
    let peak_budget = budget + 2 * dirty_limit / 1024;
    Ok(vec![
        format!(
            "| P5 engine memory after {} written+read, cache {} MiB | {} MiB | budget {} MiB + 64 MiB + index {} KiB | {:.2} | ≤ 1.00 |",
            super::format_bytes(size),
            cache >> 20,
            after / 1024,
            cache >> 20,
            index / 1024,
            after as f64 / budget as f64
        ),
        format!(
            "| P5 the same, 2 s later (freed pages returned) | {} MiB | that budget | {:.2} | ≤ 1.00 |",
            settled / 1024,
            settled as f64 / budget as f64
        ),
        format!(
            "| P5 peak engine memory during the run | {} MiB | that budget + 2 × dirty limit ({} MiB) | {:.2} | ≤ 1.00 |",
            peak / 1024,
            (2 * dirty_limit) >> 20,
            peak as f64 / peak_budget as f64
        ),
    ])
}

/// P5 in a process of its own: memory the earlier benchmarks freed but
/// the allocator still holds would otherwise be reused and hide P5's.
fn p5_in_child(quick: bool) -> Result<Vec<String>> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "--only", "p5"]);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "P5 process failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("| P5"))
        .map(str::to_string)
        .collect())
}

pub async fn run(a: BenchArgs) -> Result<()> {
    let size = if a.quick {
        16 << 20
    } else {
        super::parse_size(&a.size)?
    };
    let size = size.max(8 << 20) / (1 << 20) * (1 << 20);
    println!("| benchmark | engine | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    let reads = if a.quick { 20_000 } else { 1_000_000 };
    let run = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
    let small = if a.quick { 8 << 20 } else { 256 << 20 };
    let mut rows = Vec::new();
    if run("p1") {
        rows.extend(p1(size).await?);
    }
    if run("p2") {
        rows.extend(p2(small, reads).await?);
    }
    if run("p3") {
        rows.extend(p3(small).await?);
    }
    if run("p4") {
        rows.extend(p4(if a.quick { 16 << 20 } else { 1 << 30 }).await?);
    }
    if run("p8") {
        rows.extend(p8(if a.quick { 20 } else { 200 }).await?);
        rows.extend(
            p8_journal(if a.quick { 20 } else { 200 }, if a.quick { 1 } else { 10 }).await?,
        );
    }
    if run("p9") {
        let size = if a.quick { 16 << 20 } else { 256 << 20 };
        rows.extend(p9(size, 0.5).await?);
        if !a.quick {
            rows.extend(p9(size, 0.8).await?);
        }
    }
    if run("p11") {
        rows.extend(p11(if a.quick { 16 } else { 200 }).await?);
    }
    if run("p12") {
        rows.extend(p12(if a.quick { 16 } else { 200 }).await?);
    }
    if run("p10") {
        let chunks = if a.quick { 1 << 16 } else { 8 << 20 };
        rows.extend(p10(chunks, 1000).await?);
    }
    if run("p5") {
        if a.only == ["p5"] {
            rows.extend(p5(if a.quick { 64 << 20 } else { 4 << 30 }).await?);
        } else {
            rows.extend(p5_in_child(a.quick)?);
        }
    }
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
