#!/usr/bin/env bash
# Run the frontend for real: boot Debian's 6.12 kernel (ublk_drv) in a
# QEMU TCG guest and run scripts/vm/guest-tests.sh there, against a file://
# bucket on tmpfs and an S3-compatible server (s3s-fs) on the guest's
# 127.0.0.1, directly and through a fault proxy (examples/fault_proxy.rs).
# Bounded by timeouts; exits non-zero unless the guest passes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh

S3S_VERSION=0.14.1
S3S="$VM_CACHE/s3s-$S3S_VERSION/bin/s3s-fs"
if [ ! -x "$S3S" ]; then
  echo "== building s3s-fs $S3S_VERSION (S3-compatible server for the guest)"
  cargo install --locked --quiet "s3s-fs@$S3S_VERSION" --features binary --root "$VM_CACHE/s3s-$S3S_VERSION"
fi
echo "== building zerofs-ublk (release) and the fault proxy"
cargo build --release --locked --quiet
cargo build --release --locked --quiet --example fault_proxy
vm_kernel
vm_base_initramfs
echo "== booting $(basename "$KERNEL") under TCG (timeout ${VM_TIMEOUT}s)"
start=$(date +%s)
if vm_run scripts/vm/guest-tests.sh target/release/zerofs-ublk "$S3S" \
  target/release/examples/fault_proxy; then
  echo "== VM suite passed in $(( $(date +%s) - start )) s"
else
  echo "== VM suite FAILED (console: $VM_LOG)"; exit 1
fi
