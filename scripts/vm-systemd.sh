#!/usr/bin/env bash
# systemd for real (issue 13, step 3): a guest whose PID 1 is systemd (the
# Debian root of scripts/vm/lib.sh with Debian's ifupdown networking,
# written across two boots, the buckets on it), the units and the udev
# rule installed as README says. First boot: `enable --now` two volumes,
# /dev/disk/by-zerofs/NAME, the hardening in effect, ext4 in fstab on one,
# a ZFS pool on the other (zerofs-ublk-zpool@tank) with PostgreSQL on it,
# `systemctl kill -s KILL` of the pool's server under a commit load (the
# unit restarts and recovers; no commit fails, no pool error), a clean
# poweroff. Second boot: everything comes up by itself in order with no
# ordering cycle, the shutdown exported the pool before its volume
# stopped, the commits are there, a stop of a held volume keeps it, and
# an ordered stop removes both devices, leaving clean buckets.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh
vm_prepare_root systemd
# The root is written across both boots; the bucket (file://) lives on it,
# as the embedded default does: a bucket on a file system of its own would
# be unmounted at shutdown while the server still flushes to it (seen
# here), and a mount cannot be ordered before the unit (README).
cp --sparse=always "$VM_ROOT" "$work/root.img"
export VM_ROOT="$work/root.img" VM_ROOT_SNAPSHOT=0 VM_INIT=systemd VM_MEM=${VM_MEM:-3G}
export ZEROFS_UBLK_VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-600} VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-600}
start=$(date +%s)
# The unit file and the udev rule go in as the repository has them.
{ cat scripts/vm/guest-systemd-common.sh
  for f in systemd/zerofs-ublk@.service systemd/zerofs-ublk-zpool@.service udev/99-zerofs-ublk.rules; do
    printf "cat > /tests/%s <<'ZFU_EOF'\n" "$(basename "$f")"; cat "$f"; echo ZFU_EOF
  done
  cat scripts/vm/guest-systemd-1.sh; } > "$work/boot1.sh"
cat scripts/vm/guest-systemd-common.sh scripts/vm/guest-systemd-2.sh > "$work/boot2.sh"
for boot in 1 2; do
  echo "== boot $boot"
  if ! vm_run "$work/boot$boot.sh" target/release/zerofs-ublk > "$work/boot$boot.log"; then
    tail -n 100 "$work/boot$boot.log"
    echo "== systemd test FAILED in boot $boot (console: $VM_LOG)"; exit 1
  fi
  grep -a -E "^(guest|==|  |/dev|server|400|at boot|the |ZEROFS|FAIL)" "$work/boot$boot.log" | tr -d '\r' || true
done
echo "== systemd test passed in $(( $(date +%s) - start )) s"
