#!/usr/bin/env bash
# PostgreSQL on zerofs-ublk in a QEMU TCG guest (issue 13, step 2): a
# Debian root (scripts/vm/lib.sh vm_debian_root) with PostgreSQL 15 from
# Debian; three volumes — the default mode and --journal-dir with ext4, and
# the default mode with a ZFS pool — each with its own cluster
# (`initdb --data-checksums`). The first boot runs
# pgbench, kills every server with -9 in the middle of it and recovers
# them, then keeps a commit ledger under pgbench load until the host kills
# QEMU (a power cut: no shutdown, no sync; the buckets and the journal sit
# on disk images that outlive the VM). Halfway through the ledger the
# bucket disk freezes, so the journal volume's last commits exist only in
# its journal. A second boot adds the volumes again (and imports the
# pool), lets PostgreSQL recover, and checks every transaction whose
# COMMIT returned, pg_amcheck, pgbench's balance invariant, pg_checksums,
# and e2fsck or a scrub.
# Exits non-zero unless the second boot passes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh
vm_prepare_root postgres
qemu-img create -q -f raw "$work/buckets.img" 4G
qemu-img create -q -f raw "$work/ssd.img" 512M
export VM_DISKS="$work/buckets.img $work/ssd.img" VM_MEM=${VM_MEM:-3G}
COMMITS=${ZEROFS_UBLK_POSTGRES_COMMITS:-70}
export ZEROFS_UBLK_VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-900} VM_TIMEOUT=${ZEROFS_UBLK_VM_TIMEOUT:-900}
start=$(date +%s)
echo "== first boot: initdb, pgbench with kill -9 + recover, then a commit ledger until the power cut ($COMMITS commits)"
cat scripts/vm/guest-postgres-common.sh scripts/vm/guest-postgres-1.sh > "$work/boot1.sh"
VM_KILL_AT="COMMITTED $COMMITS" vm_run "$work/boot1.sh" target/release/zerofs-ublk > "$work/boot1.log" || true
grep -q "^== power cut" "$work/boot1.log" ||
  { tail -n 60 "$work/boot1.log"; grep -a "^FAIL" "$work/boot1.log" || true
    echo "== PostgreSQL test FAILED: the first boot ended without a power cut"; exit 1; }
grep -E "^(default|journal|zfs|all|killed|initdb|BUCKET|== )" "$work/boot1.log" | tr -d '\r' || true
# Whole lines only (the kill may cut the last one short).
tr -d '\r' < "$work/boot1.log" | grep -E '^COMMITTED (default|journal|zfs) [0-9]+$' > "$work/ledger" || true
for m in default journal zfs; do
  grep -q "^COMMITTED $m " "$work/ledger" ||
    { echo "== PostgreSQL test FAILED: no commit of the $m volume before the power cut"; exit 1; }
done
# The journal volume committed after the bucket froze.
tr -d '\r' < "$work/boot1.log" | sed -n '/^BUCKET-FROZEN/,$p' | grep -q '^COMMITTED journal ' ||
  { echo "== PostgreSQL test FAILED: no commit of the journal volume after its bucket froze"; exit 1; }
echo "== $(wc -l < "$work/ledger") commits returned before the power cut ($(( $(date +%s) - start )) s)"
{ printf 'LEDGER=%s\n' "'$(cat "$work/ledger")'"
  cat scripts/vm/guest-postgres-common.sh scripts/vm/guest-postgres-2.sh; } > "$work/boot2.sh"
echo "== second boot: add again, PostgreSQL's crash recovery, every committed row"
if vm_run "$work/boot2.sh" target/release/zerofs-ublk > "$work/boot2.log"; then
  grep -a -E "^(default|journal|zfs|guest)|replayed" "$work/boot2.log" | sed "s/\x1b\[[0-9;]*m//g" | tr -d '\r' || true
  echo "== PostgreSQL test passed in $(( $(date +%s) - start )) s"
else
  tail -n 80 "$work/boot2.log"
  echo "== PostgreSQL test FAILED (console: $VM_LOG)"; exit 1
fi
