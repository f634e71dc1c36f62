#!/usr/bin/env bash
# Power cut (issue 12, step 5): boot Debian's 6.12 kernel in a QEMU TCG
# guest with two virtio disk images, one holding two volumes' buckets
# (file://, and an S3 server's), the other one volume's --journal-dir
# (whose S3 server freezes halfway, so the journal holds acknowledged
# FLUSHes the bucket lacks); under a write+fsync load, kill QEMU itself (no
# shutdown, no sync in the guest: its page cache is lost, what reached the
# disk image stays); boot a new VM on the same image, `add` both volumes
# again, and check every block whose fsync returned. Exits non-zero unless
# the second boot passes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh
vm_s3s
echo "== building zerofs-ublk (release)"
cargo build --release --locked --quiet
vm_kernel
vm_base_initramfs
work=$(mktemp -d "${TMPDIR:-/tmp}/zerofs-ublk-powercut.XXXXXX")
trap 'rm -rf "$work"' EXIT
qemu-img create -q -f raw "$work/buckets.img" 1G
qemu-img create -q -f raw "$work/ssd.img" 256M
export VM_DISKS="$work/buckets.img $work/ssd.img"
FSYNCS=${ZEROFS_UBLK_POWERCUT_FSYNCS:-30}
echo "== first boot: write+fsync load, QEMU killed after $FSYNCS fsyncs"
start=$(date +%s)
# Each boot is short; a hang must not cost CI the default 25 minutes.
export ZEROFS_UBLK_VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-300} VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-300}
cat scripts/vm/guest-power-cut-common.sh scripts/vm/guest-power-cut-1.sh > "$work/boot1.sh"
VM_KILL_AT="FSYNCED $FSYNCS" vm_run "$work/boot1.sh" \
  target/release/zerofs-ublk "$S3S" > "$work/boot1.log" || true
grep -q "^== power cut" "$work/boot1.log" ||
  { tail -n 40 "$work/boot1.log"; echo "== power-cut test FAILED: the first boot ended without a power cut"; exit 1; }
# Whole lines only (the kill may cut the last one short).
tr -d '\r' < "$work/boot1.log" | grep -E '^FSYNCED [01] [0-9]+ [0-9a-f]{32}$' > "$work/ledger" || true
# The journal volume fsynced after its bucket froze (round 10 on).
grep -q "^BUCKET-FROZEN" "$work/boot1.log" && grep -qE '^FSYNCED 1 [1-9][0-9]+ ' "$work/ledger" ||
  { echo "== power-cut test FAILED: no fsync of the journal volume after its bucket froze"; exit 1; }
echo "== $(wc -l < "$work/ledger") fsyncs returned before the power cut ($(( $(date +%s) - start )) s)"
{ printf 'LEDGER=%s\n' "'$(cat "$work/ledger")'"
  cat scripts/vm/guest-power-cut-common.sh scripts/vm/guest-power-cut-2.sh; } > "$work/boot2.sh"
echo "== second boot: add again, check every fsynced block"
if vm_run "$work/boot2.sh" target/release/zerofs-ublk "$S3S"; then
  echo "== power-cut test passed in $(( $(date +%s) - start )) s"
else
  echo "== power-cut test FAILED (console: $VM_LOG)"; exit 1
fi
