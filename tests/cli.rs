//! The command line end to end: the built binary against file:// buckets
//! (and an unreachable S3 endpoint). Every failure is one line on stderr
//! and a non-zero exit, and writes nothing.

mod common;

use zerofs_ublk::store::superblock::FORMAT_VERSION;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::pattern;

const BIN: &str = env!("CARGO_BIN_EXE_zerofs-ublk");

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(env.path("key"), [7u8; 32]).unwrap();
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bucket(&self) -> String {
        format!("file://{}", self.path("bucket").display())
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env_remove("ZEROFS_UBLK_PASSPHRASE")
            .env_remove("ZEROFS_UBLK_BUCKET")
            .output()
            .unwrap()
    }

    /// Run with `--bucket` and `--key-file` appended.
    fn vol(&self, args: &[&str]) -> Output {
        let bucket = self.bucket();
        let key = self.path("key");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--bucket", &bucket, "--key-file", key.to_str().unwrap()]);
        self.run(&all)
    }

    fn create(&self, size: &str) {
        ok(&self.vol(&["create", "--size", size, "--chunk-size", "64K"]));
    }

    fn bucket_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        walk(&self.path("bucket"), &mut out);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failure: non-zero exit and exactly one line on stderr containing `needle`.
fn fails(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "error {:?} should mention {needle:?}",
        lines[0]
    );
}

#[test]
fn create_import_export_inspect_roundtrip() {
    let env = Env::new();
    env.create("8M");
    let mut image = pattern(1, 3 << 20);
    image.extend(vec![0u8; 1 << 20]);
    image.extend(b"compressible ".repeat(80_000));
    image.resize(5 << 20, 0);
    std::fs::write(env.path("in.img"), &image).unwrap();
    ok(&env.vol(&["import", env.path("in.img").to_str().unwrap()]));
    ok(&env.vol(&["export", env.path("out.img").to_str().unwrap()]));
    let out = std::fs::read(env.path("out.img")).unwrap();
    assert_eq!(out.len(), 8 << 20);
    assert_eq!(&out[..image.len()], &image[..]);
    assert!(out[image.len()..].iter().all(|b| *b == 0));
    // export to stdout gives the same bytes
    let raw = env.vol(&["export", "-"]);
    assert_eq!(raw.stdout, out);
    // inspect reports what is there
    let text = ok(&env.vol(&["inspect"]));
    assert!(
        text.contains(&format!("format          version {FORMAT_VERSION}")),
        "{text}"
    );
    assert!(text.contains("chunk size      64 KiB"), "{text}");
    assert!(text.contains("released cleanly"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&env.vol(&["inspect", "--json"]))).unwrap();
    // 3 MiB random + ~1 MiB of text = 64 non-zero 64 KiB chunks.
    assert_eq!(json["written_chunks"], 64, "{json}");
    assert!(
        json["segment_bytes"].as_u64().unwrap() < 4 << 20,
        "text compressed: {json}"
    );
    assert_eq!(
        json["epoch"], 1,
        "import claimed epoch 1; inspect is read-only"
    );
}

#[test]
fn import_from_stdin() {
    let env = Env::new();
    env.create("1M");
    let data = pattern(5, 256 << 10);
    std::fs::write(env.path("in.img"), &data).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat {} | {BIN} import - --bucket {} --key-file {}",
            env.path("in.img").display(),
            env.bucket(),
            env.path("key").display()
        ))
        .output()
        .unwrap();
    ok(&out);
    let exported = env.vol(&["export", "-"]).stdout;
    assert_eq!(&exported[..data.len()], &data[..]);
}

/// `create` of a 1 MiB volume with the cheapest KDF (tests, not security).
const CREATE_WITH_PASSPHRASE: [&str; 7] = [
    "create",
    "--size",
    "1M",
    "--kdf-memory-mib",
    "1",
    "--kdf-passes",
    "1",
];

#[test]
fn passphrase_from_environment() {
    let env = Env::new();
    let bucket = env.bucket();
    let with_pass = |args: &[&str], pass: &str| {
        Command::new(BIN)
            .args(args)
            .args(["--bucket", &bucket])
            .env("ZEROFS_UBLK_PASSPHRASE", pass)
            .output()
            .unwrap()
    };
    ok(&with_pass(&CREATE_WITH_PASSPHRASE, "s3cret"));
    ok(&with_pass(&["inspect"], "s3cret"));
    fails(
        &with_pass(&["inspect"], "wrong"),
        "wrong passphrase or key file",
    );
}

#[test]
fn the_passphrase_leaves_the_environment_of_a_running_process() {
    let env = Env::new();
    let bucket = env.bucket();
    let pass = "correct horse battery staple";
    let cmd = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .args(["--bucket", &bucket])
            .env("ZEROFS_UBLK_PASSPHRASE", pass);
        c
    };
    ok(&cmd(&CREATE_WITH_PASSPHRASE).output().unwrap());
    // An import from a FIFO nobody writes to yet: the process stays alive.
    let fifo = env.path("in.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let mut child = cmd(&["import", fifo.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let environ = format!("/proc/{}/environ", child.id());
    let shows_it = || {
        let bytes = std::fs::read(&environ).unwrap();
        bytes.windows(pass.len()).any(|w| w == pass.as_bytes())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while shows_it() {
        assert!(
            std::time::Instant::now() < deadline,
            "{environ} still shows the passphrase"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before the check"
    );
    let data = pattern(3, 64 << 10);
    std::fs::write(&fifo, &data).unwrap(); // opens, writes, closes: EOF
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let exported = cmd(&["export", "-"]).output().unwrap();
    assert!(exported.status.success());
    assert_eq!(
        &exported.stdout[..data.len()],
        &data[..],
        "the passphrase still worked"
    );
}

#[test]
fn clear_errors_and_nothing_written() {
    let env = Env::new();
    // missing volume
    fails(&env.vol(&["inspect"]), "no volume at");
    // bad sizes: nothing created
    fails(&env.vol(&["create", "--size", "12X"]), "invalid size");
    fails(
        &env.vol(&["create", "--size", "100K"]),
        "multiple of the chunk size",
    );
    fails(
        &env.vol(&["create", "--size", "1M", "--chunk-size", "3K"]),
        "power of two",
    );
    assert!(
        env.bucket_files()
            .iter()
            .all(|(p, _)| !p.ends_with("superblock"))
    );
    // no key
    fails(
        &env.run(&["create", "--bucket", &env.bucket(), "--size", "1M"]),
        "no key given",
    );
    // existing volume
    env.create("1M");
    fails(&env.vol(&["create", "--size", "1M"]), "already exists");
    // wrong key: refused, nothing written
    let before = env.bucket_files();
    std::fs::write(env.path("other"), [8u8; 32]).unwrap();
    std::fs::write(env.path("small.img"), vec![1u8; 4096]).unwrap();
    let out = env.run(&[
        "import",
        env.path("small.img").to_str().unwrap(),
        "--bucket",
        &env.bucket(),
        "--key-file",
        env.path("other").to_str().unwrap(),
    ]);
    fails(&out, "wrong passphrase or key file");
    assert!(before == env.bucket_files(), "wrong key wrote nothing");
    // image larger than the volume: refused before writing
    std::fs::write(env.path("big.img"), vec![1u8; 2 << 20]).unwrap();
    fails(
        &env.vol(&["import", env.path("big.img").to_str().unwrap()]),
        "larger than the volume",
    );
    assert!(
        before == env.bucket_files(),
        "oversized import wrote nothing"
    );
    // image not a whole number of sectors
    std::fs::write(env.path("odd.img"), vec![1u8; 1000]).unwrap();
    fails(
        &env.vol(&["import", env.path("odd.img").to_str().unwrap()]),
        "multiple of 512",
    );
    // bad bucket URL
    fails(
        &env.run(&["inspect", "--bucket", "ftp://x", "--key-file", "/dev/null"]),
        "at least 32 random bytes",
    );
    fails(
        &env.run(&[
            "inspect",
            "--bucket",
            "ftp://x",
            "--key-file",
            env.path("key").to_str().unwrap(),
        ]),
        "invalid bucket URL",
    );
    // export refuses to clobber
    std::fs::write(env.path("exists.img"), b"keep").unwrap();
    fails(
        &env.vol(&["export", env.path("exists.img").to_str().unwrap()]),
        "--overwrite",
    );
    assert_eq!(std::fs::read(env.path("exists.img")).unwrap(), b"keep");
}

#[test]
fn unreachable_endpoint_is_one_line() {
    let env = Env::new();
    // Port 1 on loopback: connection refused, retried for 3 s, then one line.
    let out = Command::new(BIN)
        .args([
            "inspect",
            "--bucket",
            "s3://nothing/here",
            "--endpoint",
            "http://127.0.0.1:1",
            "--request-timeout",
            "2",
            "--retry-for",
            "3",
            "--key-file",
            env.path("key").to_str().unwrap(),
        ])
        .envs(common::s3_env())
        .output()
        .unwrap();
    fails(&out, "127.0.0.1:1");
}

#[test]
fn integrity_failure_names_the_chunk() {
    let env = Env::new();
    env.create("1M");
    std::fs::write(env.path("in.img"), pattern(3, 1 << 20)).unwrap();
    ok(&env.vol(&["import", env.path("in.img").to_str().unwrap()]));
    // Flip a byte inside the first frame of every segment (flushes encode
    // in parallel, so there may be one segment per core).
    let segs: Vec<_> = env
        .bucket_files()
        .into_iter()
        .filter(|(p, _)| p.parent().unwrap().ends_with("segments"))
        .collect();
    assert!(!segs.is_empty());
    for (path, mut data) in segs {
        data[100] ^= 0x80;
        std::fs::write(&path, data).unwrap();
    }
    fails(
        &env.vol(&["export", env.path("out.img").to_str().unwrap()]),
        "integrity error: chunk ",
    );
}

#[test]
fn add_without_ublk_driver_says_so_and_claims_nothing() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        // With ublk, `add --foreground` would serve until stopped: this
        // test is about machines without it; scripts/vm-test.sh covers
        // the other case.
        return;
    }
    let env = Env::new();
    env.create("1M");
    let before = env.bucket_files();
    let out = env.vol(&["add", "--foreground"]);
    fails(
        &out,
        "ublk_drv is not loaded (/dev/ublk-control is missing; run: modprobe ublk_drv)",
    );
    assert!(before == env.bucket_files(), "no epoch was claimed");
}

/// Import an image ten times, collect with no grace period, export: the
/// last image comes back, and the bucket holds about one copy of it.
#[test]
fn gc_after_repeated_imports_keeps_one_copy() {
    let env = Env::new();
    env.create("8M");
    let mut last = Vec::new();
    for round in 0..10u64 {
        last = pattern(100 + round, 6 << 20);
        std::fs::write(env.path("in.img"), &last).unwrap();
        ok(&env.vol(&["import", env.path("in.img").to_str().unwrap()]));
    }
    let before: serde_json::Value =
        serde_json::from_str(&ok(&env.vol(&["inspect", "--json"]))).unwrap();
    let text = ok(&env.vol(&["gc", "--grace", "0"]));
    assert!(text.starts_with("collected in"), "{text}");
    ok(&env.vol(&["export", env.path("out.img").to_str().unwrap()]));
    let out = std::fs::read(env.path("out.img")).unwrap();
    assert_eq!(&out[..last.len()], &last[..], "the last image");
    let after: serde_json::Value =
        serde_json::from_str(&ok(&env.vol(&["inspect", "--json"]))).unwrap();
    let stored: u64 = env
        .bucket_files()
        .iter()
        .filter(|(p, _)| p.to_string_lossy().contains("/segments/"))
        .map(|(_, d)| d.len() as u64)
        .sum();
    let live = after["live_stored_bytes"].as_u64().unwrap();
    eprintln!("before gc: {before}\nafter gc: {after}");
    assert!(
        before["amplification"].as_f64().unwrap() > 5.0,
        "ten imports kept: {before}"
    );
    assert!(
        (stored as f64) <= 1.3 * live as f64,
        "{stored} segment bytes for {live} live"
    );
    assert!(after["amplification"].as_f64().unwrap() <= 1.3, "{after}");
    assert_eq!(after["objects"]["seals"], 1, "{after}");
    assert!(after["objects"]["claims"].as_u64().unwrap() <= 2, "{after}");
    // Ten attaches left ten bases; one checkpoint's runs are left.
    assert!(
        before["objects"]["index_runs"].as_u64().unwrap() >= 10,
        "{before}"
    );
    assert_eq!(after["objects"]["checkpoints"], 1, "{after}");
    assert_eq!(after["objects"]["index_runs"], 1, "{after}");
    let text = ok(&env.vol(&["inspect"]));
    assert!(text.contains("index runs"), "{text}");
    assert!(text.contains("garbage "), "{text}");
    assert!(text.contains("objects "), "{text}");
    // Bad values are one-line errors.
    fails(&env.vol(&["gc", "--grace", "10x"]), "invalid duration");
    fails(
        &env.vol(&["gc", "--gc-live-below", "2"]),
        "--gc-live-below must be between 0 and 1",
    );
}

/// `upgrade` brings a volume of the previous release (format 3, the
/// fixture tests/writer_keys.rs reads too) to this build's format; a
/// second run says there is nothing to do; the data reads the same.
#[test]
fn upgrade_brings_an_older_volume_to_this_format() {
    let env = Env::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3");
    common::copy_tree(&fixture.join("bucket"), &env.path("bucket"));
    std::fs::copy(fixture.join("key"), env.path("key")).unwrap();
    assert!(ok(&env.vol(&["inspect"])).contains("format          version 3"));
    ok(&env.vol(&["export", env.path("before.img").to_str().unwrap()]));
    let said = ok(&env.vol(&["upgrade"]));
    assert!(
        said.contains(&format!("upgraded from format 3 to {FORMAT_VERSION}")),
        "{said}"
    );
    assert!(
        ok(&env.vol(&["inspect"])).contains(&format!("format          version {FORMAT_VERSION}"))
    );
    let again = ok(&env.vol(&["upgrade"]));
    assert!(
        again.contains(&format!("at format {FORMAT_VERSION} already")),
        "{again}"
    );
    ok(&env.vol(&["export", env.path("after.img").to_str().unwrap()]));
    assert_eq!(
        std::fs::read(env.path("before.img")).unwrap(),
        std::fs::read(env.path("after.img")).unwrap()
    );
}

/// `--journal-dir` and `--max-upload-lag` (docs/rfcs/0006): refused with
/// one line before anything is created or claimed.
#[test]
fn journal_dir_arguments_are_checked_first() {
    let env = Env::new();
    env.create("1M");
    let before = env.bucket_files();
    let dir = env.path("journal");
    let dir = dir.to_str().unwrap();
    fails(
        &env.vol(&["add", "--journal-dir", dir, "--max-upload-lag", "64M"]),
        "expected SIZE,DURATION",
    );
    fails(
        &env.vol(&["add", "--journal-dir", dir, "--max-upload-lag", "0,10s"]),
        "more than 0",
    );
    fails(
        &env.vol(&["add", "--journal-dir", dir, "--max-upload-lag", "64M,soon"]),
        "invalid duration",
    );
    let out = env.vol(&["add", "--max-upload-lag", "64M,10s"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--journal-dir"));
    let shm_is_tmpfs = Command::new("stat")
        .args(["-f", "-c", "%T", "/dev/shm"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs");
    if shm_is_tmpfs {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let on_tmpfs = shm.path().join("journal");
        fails(
            &env.vol(&["add", "--journal-dir", on_tmpfs.to_str().unwrap()]),
            "does not survive the host",
        );
        assert!(!on_tmpfs.exists(), "nothing created");
    }
    assert!(!Path::new(dir).exists(), "nothing created");
    assert!(before == env.bucket_files(), "nothing claimed");
}

/// A volume another live writer holds: a writing command fails with one
/// line naming it and exit status 77 (`EXIT_IN_USE`; the systemd unit does
/// not restart on it); other failures keep status 1. The holder is a real
/// second process: an `import` from a pipe that has not ended.
#[test]
fn a_volume_held_by_another_writer_exits_77() {
    use std::io::Write;
    let env = Env::new();
    env.create("1M");
    let mut holder = Command::new(BIN)
        .args(["import", "-", "--bucket", &env.bucket(), "--key-file"])
        .arg(env.path("key"))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It claims the volume before it reads its input: wait for its claim
    // (epochs/…), or a gc started earlier would take the volume first.
    let claimed = || {
        std::fs::read_dir(env.path("bucket").join("epochs"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !claimed() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(claimed(), "the import made no claim within 30 s");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = env.vol(&["gc", "--grace", "0"]);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    fails(&out, "in use by");
    let mut stdin = holder.stdin.take().unwrap();
    stdin.write_all(&[1u8; 4096]).unwrap();
    drop(stdin);
    let status = holder.wait().unwrap();
    assert!(status.success(), "the holding import failed");
    // Other failures keep exit status 1.
    let out = env.vol(&["import", "/nonexistent/image"]);
    assert_eq!(out.status.code(), Some(1));
}
