#!/usr/bin/env bash
# Run the frontend for real: boot Debian's 6.12 kernel (ublk_drv) in a
# QEMU TCG guest and run scripts/vm/guest-tests.sh there, against a file://
# bucket on tmpfs and an S3-compatible server (s3s-fs) on the guest's
# 127.0.0.1, directly and through a fault proxy (examples/fault_proxy.rs).
# Bounded by timeouts; exits non-zero unless the guest passes.
#   ZEROFS_UBLK_VM_KERNEL=newest  boot the newest Debian cloud kernel
#                                 instead (trixie-backports; lib.sh vm_kernel)
#   ZEROFS_UBLK_VM_SUITES=file    the file:// suite only (not S3, faults)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh

vm_s3s
echo "== building zerofs-ublk (release) and the fault proxy"
cargo build --release --locked --quiet
cargo build --release --locked --quiet --example fault_proxy
vm_kernel
vm_base_initramfs
echo "== booting $(basename "$KERNEL") under TCG (timeout ${VM_TIMEOUT}s)"
start=$(date +%s)
guest=scripts/vm/guest-tests.sh
if [ "${ZEROFS_UBLK_VM_SUITES:-all}" = file ]; then
  guest=$(mktemp "${TMPDIR:-/tmp}/zerofs-ublk-guest.XXXXXX")
  trap 'rm -f "$guest"' EXIT
  { echo "SUITES=file"; cat scripts/vm/guest-tests.sh; } > "$guest"
fi
if vm_run "$guest" target/release/zerofs-ublk "$S3S" \
  target/release/examples/fault_proxy; then
  echo "== VM suite passed in $(( $(date +%s) - start )) s"
else
  echo "== VM suite FAILED (console: $VM_LOG)"; exit 1
fi
