//! `import` and `export`: raw disk images in and out of a volume.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{BucketArgs, KeyArgs, WriterArgs};
use super::{format_bytes, open_store};
use crate::store::LogStore;
use crate::volume::{OpenOptions, SECTOR, Volume, VolumeConfig};

/// Chunks read concurrently by `export`.
const EXPORT_CONCURRENCY: usize = 16;
/// Blocks buffered between the file thread and the volume.
const PIPE_DEPTH: usize = 32;

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub writer: WriterArgs,
    /// Raw image file, or `-` for standard input. Written at offset 0; the
    /// rest of the volume is left as it is.
    pub source: String,
    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Output file (written sparse), or `-` for standard output.
    pub dest: String,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn progress(total: Option<u64>, hidden: bool) -> ProgressBar {
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

/// Read `block`-sized pieces on a thread of their own (file reads block).
fn spawn_reader(
    mut input: Box<dyn Read + Send>,
    block: usize,
) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PIPE_DEPTH);
    std::thread::spawn(move || {
        loop {
            let mut buf = vec![0u8; block];
            let mut filled = 0;
            while filled < block {
                match input.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            buf.truncate(filled);
            if tx.blocking_send(Ok(buf)).is_err() {
                return;
            }
        }
    });
    rx
}

pub async fn import(a: ImportArgs) -> Result<()> {
    let secret = a.key.load()?;
    // Validate everything that can be known before touching the volume.
    let (input, known_len): (Box<dyn Read + Send>, Option<u64>) = if a.source == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file =
            File::open(&a.source).with_context(|| format!("cannot open image {}", a.source))?;
        let len = file.metadata()?.len();
        (Box::new(file), Some(len))
    };
    let store = open_store(&a.bucket)?;
    let size = LogStore::read_superblock(&store).await?.params.size;
    if let Some(len) = known_len {
        if len > size {
            bail!(
                "image {} is {} bytes, larger than the volume ({} bytes); nothing was written",
                a.source,
                len,
                size
            );
        }
        if !len.is_multiple_of(SECTOR) {
            bail!(
                "image {} is {len} bytes, not a multiple of {SECTOR}; nothing was written",
                a.source
            );
        }
    }
    let vol = Volume::open(
        store,
        &secret,
        OpenOptions {
            mode: a.writer.mode(None),
        },
        VolumeConfig::default(),
    )
    .await?;
    let cs = vol.chunk_size() as usize;
    let bar = progress(known_len, a.no_progress);
    let started = Instant::now();
    let mut rx = spawn_reader(input, cs);
    let (mut offset, mut nonzero) = (0u64, 0u64);
    while let Some(block) = rx.recv().await {
        let block = block.with_context(|| format!("cannot read image {}", a.source))?;
        let len = block.len() as u64;
        if offset + len > size {
            bail!("input is larger than the volume ({size} bytes); unflushed data was discarded");
        }
        if !len.is_multiple_of(SECTOR) {
            bail!("input ends {len} bytes into a sector; images must be whole 512-byte sectors");
        }
        if block.iter().all(|b| *b == 0) {
            vol.write_zeroes(offset, len).await?;
        } else {
            vol.write(offset, &block).await?;
            nonzero += 1;
        }
        offset += len;
        bar.set_position(offset);
    }
    vol.close().await?;
    bar.finish_and_clear();
    eprintln!(
        "imported {} ({nonzero} non-zero chunks) in {:.1} s",
        format_bytes(offset),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where exported blocks go: a regular file (sparse) or a stream.
enum Sink {
    File(File),
    Stream(Box<dyn Write>),
}

impl Sink {
    fn open(dest: &str, overwrite: bool) -> Result<Sink> {
        if dest == "-" {
            return Ok(Sink::Stream(Box::new(std::io::stdout().lock())));
        }
        let path = PathBuf::from(dest);
        let mut opts = FsOpenOptions::new();
        opts.write(true);
        if overwrite {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let file = opts.open(&path).with_context(|| {
            if path.exists() && !overwrite {
                format!("{dest} exists (pass --overwrite to replace it)")
            } else {
                format!("cannot create {dest}")
            }
        })?;
        // Block devices and pipes are streamed; regular files made sparse.
        if file.metadata()?.is_file() {
            Ok(Sink::File(file))
        } else {
            Ok(Sink::Stream(Box::new(file)))
        }
    }

    fn write_block(&mut self, block: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(f) if block.iter().all(|b| *b == 0) => {
                f.seek(SeekFrom::Current(block.len() as i64)).map(|_| ())
            }
            Sink::File(f) => f.write_all(block),
            Sink::Stream(w) => w.write_all(block),
        }
    }

    fn finish(self, size: u64) -> std::io::Result<()> {
        match self {
            Sink::File(f) => {
                f.set_len(size)?;
                f.sync_all()
            }
            Sink::Stream(mut w) => w.flush(),
        }
    }
}

pub async fn export(a: ExportArgs) -> Result<()> {
    let cfg = VolumeConfig {
        cache_bytes: 0,
        ..VolumeConfig::default()
    };
    let vol = super::open_read_only(&a.bucket, &a.key, cfg).await?;
    let mut sink = Sink::open(&a.dest, a.overwrite)?;
    let (size, cs) = (vol.size(), vol.chunk_size() as u64);
    let bar = progress(Some(size), a.no_progress || a.dest == "-");
    let started = Instant::now();
    let vol = &vol;
    let mut blocks = futures::stream::iter(0..size / cs)
        .map(|c| async move { vol.read(c * cs, cs as usize).await })
        .buffered(EXPORT_CONCURRENCY);
    let mut done = 0u64;
    while let Some(block) = blocks.next().await {
        let block = block?;
        sink.write_block(&block)
            .with_context(|| format!("cannot write {}", a.dest))?;
        done += block.len() as u64;
        bar.set_position(done);
    }
    sink.finish(size)
        .with_context(|| format!("cannot write {}", a.dest))?;
    bar.finish_and_clear();
    eprintln!(
        "exported {} in {:.1} s",
        format_bytes(size),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
