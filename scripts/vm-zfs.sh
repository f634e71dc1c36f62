#!/usr/bin/env bash
# ZFS on zerofs-ublk in a QEMU TCG guest (issue 13, step 1): the Debian
# root (scripts/vm/lib.sh vm_debian_root) carries OpenZFS 2.3 from
# bookworm-backports, its modules built once for the guest kernel
# (vm_zfs_modules). One boot (scripts/vm/guest-zfs.sh): a pool on one
# device; a pool striped over three volumes in one S3 bucket (s3s-fs in the
# guest) with an L2ARC on a local disk, a file tree and PostgreSQL on it;
# kill -9 of one server under load and `recover`; scrub; `zpool trim`
# reaching the volumes; export, del, add, import with everything intact.
# Exits non-zero unless the guest passes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh
vm_prepare_root zfs
vm_s3s
qemu-img create -q -f raw "$work/s3.img" 8G
qemu-img create -q -f raw "$work/ssd.img" 1G
export VM_DISKS="$work/s3.img $work/ssd.img" VM_MEM=${VM_MEM:-3G}
export VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-1200}
start=$(date +%s)
echo "== ZFS on zerofs-ublk: one device; three volumes striped with an L2ARC; kill -9, scrub, trim, export/del/add/import"
if vm_run scripts/vm/guest-zfs.sh target/release/zerofs-ublk "$S3S" > "$work/zfs.log"; then
  grep -a -E "^(== |zfs:|single|tank|file tree|initdb|killed|recovered|pgbench|balances|pg_|trim|/dev/ublkb)|ublkb|cache|vdc" "$work/zfs.log" |
    sed "s/\x1b\[[0-9;]*m//g" | tr -d '\r' || true
  echo "== ZFS test passed in $(( $(date +%s) - start )) s"
else
  tail -n 80 "$work/zfs.log"
  grep -a "^FAIL" "$work/zfs.log" | tr -d '\r' || true
  echo "== ZFS test FAILED (console: $VM_LOG)"; exit 1
fi
