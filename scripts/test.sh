#!/usr/bin/env bash
# The whole test suite on a fresh machine: checks and installs what it
# needs (scripts/deps.sh: Debian packages, the S3 test server from PyPI
# into a venv, Rust crates), then runs
# lint, unit, conformance (memory, local dir, real S3 server), model
# checker, tamper, key, fencing and CLI tests, a fuzzing smoke (when a
# nightly toolchain is there), then the ublk VM suite, the power-cut
# test (two VMs on one disk image) and PostgreSQL on zerofs-ublk (a Debian
# root in the guest; kill -9 under pgbench, a power cut with a commit
# ledger), the systemd unit under systemd across a reboot, and ZFS (OpenZFS
# 2.3 from bookworm-backports, built once for the guest kernel) on a pool
# striped over three volumes; and the file:// device suite again on the
# newest Debian cloud kernel (the kernel matrix).
set -euo pipefail
cd "$(dirname "$0")/.."

# A full run builds debug, release and fuzz targets (~15 GiB on a fresh
# machine, less over a warm target/) and stages a guest (~0.5 GiB): below
# the floor, stop at once, saying so, rather than half an hour later with
# ENOSPC.
need_gib=${ZEROFS_UBLK_TEST_DISK_GIB:-4}
avail_gib=$(( $(df --output=avail -k . | tail -1) / 1048576 ))
if [ "$avail_gib" -lt "$need_gib" ]; then
  echo "error: $avail_gib GiB free on $(df --output=target . | tail -1); the test suite needs ~$need_gib GiB (builds and guest images; override: ZEROFS_UBLK_TEST_DISK_GIB)" >&2
  exit 1
fi

. scripts/deps.sh
deps_ensure test

echo "== format and lint"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

echo "== tests"
cargo test --locked -- --skip random_lives_keep_the_durability_contract
echo "== model checker (crash points)"
cargo test --locked --test model -- --nocapture

echo "== fuzzing smoke (every decoder of bucket and disk bytes, 20 s each)"
if rustup run nightly rustc --version >/dev/null 2>&1; then
  scripts/fuzz.sh smoke
else
  echo "skipped: no nightly toolchain here (cargo-fuzz needs one: rustup toolchain install nightly)"
fi

echo "== engine benchmark smoke (not a measurement; see BENCHMARKS.md)"
cargo run --release --locked --quiet -- bench --quick

if [ -x scripts/vm-test.sh ]; then
  echo "== ublk frontend in a QEMU guest"
  scripts/vm-test.sh
  echo "== power cut: QEMU killed under write+fsync, a new VM checks every fsynced block"
  scripts/vm-power-cut.sh
  echo "== PostgreSQL on zerofs-ublk (Debian root in the guest): kill -9 + recover under pgbench, then a power cut with a commit ledger"
  scripts/vm-postgres.sh
  echo "== systemd as PID 1: the unit and the udev rule as README installs them, across a reboot"
  scripts/vm-systemd.sh
  echo "== ZFS on zerofs-ublk: a pool over three volumes with an L2ARC, PostgreSQL on it; kill -9, scrub, trim, export/del/add/import"
  scripts/vm-zfs.sh
  echo "== the kernel matrix: the file:// device suite on the newest Debian cloud kernel (trixie-backports)"
  ZEROFS_UBLK_VM_KERNEL=newest ZEROFS_UBLK_VM_SUITES=file scripts/vm-test.sh
fi
echo "== all tests passed"
