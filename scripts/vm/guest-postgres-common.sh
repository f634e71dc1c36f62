# The start of both boots of the PostgreSQL test (scripts/vm-postgres.sh
# puts it before each; runs on the Debian root, bash): environment, `fail`,
# helpers, the two virtio disks. /dev/vda is the root; /dev/vdb holds all the
# volumes' buckets (file://) and outlives the VM; /dev/vdc, on its own ("the
# local SSD"), the journal volume's --journal-dir.
set -eu
Z=/usr/local/bin/zerofs-ublk
PG=/usr/lib/postgresql/15/bin
export ZEROFS_UBLK_RUN_DIR=/run/zerofs-ublk
export ZEROFS_UBLK_LOG=info
# Three volumes, each with its own PostgreSQL cluster: "default" (every
# acknowledged FLUSH is in the bucket) and "journal" (--journal-dir), both
# with ext4, and "zfs": the default mode with a ZFS pool on it.
MODES="default journal zfs"
fail() {
  echo "FAIL: $*"
  for f in "$ZEROFS_UBLK_RUN_DIR"/*.log /pg/*/log /tmp/pgbench-*.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }
  done
  exit 1
}
port() { case $1 in default) echo 5432 ;; journal) echo 5433 ;; *) echo 5434 ;; esac; }
# The file system of a mode's volume: ext4, or a pool (pg-zfs) for "zfs".
fs_make() { # mode device
  if [ "$1" = zfs ]; then
    zpool create -f -o ashift=12 -o cachefile=none -O recordsize=8k -O compression=lz4 -m /pg/zfs pg-zfs "$2"
  else
    mkfs.ext4 -q "$2" && mkdir -p /pg/$1 && mount -t ext4 "$2" /pg/$1
  fi
}
fs_mount() { # mode device (after the power cut: the pool was not exported)
  if [ "$1" = zfs ]; then
    zpool import -o cachefile=none -d "$2" pg-zfs
  else
    mkdir -p /pg/$1 && mount -t ext4 "$2" /pg/$1
  fi
}
fs_check_and_drop() { # mode: unmount (export) and check what is on the device
  if [ "$1" = zfs ]; then
    zpool scrub -w pg-zfs && zpool status pg-zfs | grep -q "scan: scrub repaired 0B .* with 0 errors" &&
      zpool status pg-zfs | grep -q "errors: No known data errors" &&
      echo "zfs: scrub clean" && zpool export pg-zfs
  else
    local dev; dev=$(findmnt -n -o SOURCE /pg/$1)
    umount /pg/$1 && e2fsck -fn "$dev" > /tmp/fsck-$1.log 2>&1 && echo "$1: e2fsck -fn clean" ||
      { tail -n 20 /tmp/fsck-$1.log; return 1; }
  fi
}
as_pg() { runuser -u postgres -- "$@"; }
sql() { # mode, then psql arguments
  local m=$1; shift
  as_pg psql -X -q -A -t -v ON_ERROR_STOP=1 -h /run/postgresql -p "$(port "$m")" -d postgres "$@"
}
pg_start() {
  mkdir -p /run/postgresql && chown postgres /run/postgresql
  as_pg $PG/pg_ctl -D "/pg/$1/data" -l "/pg/$1/log" -w -t 600 \
    -o "-p $(port "$1") -k /run/postgresql -c synchronous_commit=on -c fsync=on" start >/dev/null ||
    fail "PostgreSQL ($1) did not start"
}
bucket() { echo "--bucket file:///disk/bucket-$1 --key-file /disk/key"; }
# The bucket freezes during the ledger (guest-postgres-1.sh): a lag bound
# that outlasts the rest of the run keeps the journal's FLUSHes local.
journal_args() { [ "$1" = journal ] && echo "--journal-dir /ssd/journal --max-upload-lag 256M,600s" || true; }
# The device id of a mode's volume (recorded by attach).
dev_id() { cat "/run/dev-id-$1"; }
server_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$ZEROFS_UBLK_RUN_DIR/$(dev_id "$1").json"; }
attach() { # mode, extra add arguments; prints the device
  local m=$1 dev; shift
  dev=$($Z add $(bucket "$m") --name "pg-$m" $(journal_args "$m") "$@") || return 1
  echo "${dev#/dev/ublkb}" > "/run/dev-id-$m"
  echo "$dev"
}
# pgbench's own invariant: every transaction adds the same delta to an
# account, a teller, a branch and the history, atomically. Prints the four
# sums and the history's length; fails unless the sums are equal.
balanced() {
  local sums
  sums=$(sql "$1" -F ' ' -c "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), (SELECT count(*) FROM pgbench_history)") ||
    return 1
  echo "$1: balances accounts/tellers/branches/history $sums (transactions)"
  set -- $sums
  [ "$1" = "$2" ] && [ "$2" = "$3" ] && [ "$3" = "$4" ]
}
# Two servers, three clusters and the ARC share the guest.
modprobe zfs zfs_arc_max=$((192 << 20)) || fail "modprobe zfs"
i=0; while { [ ! -b /dev/vdb ] || [ ! -b /dev/vdc ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vdc ] || fail "the bucket and journal disks (/dev/vdb, /dev/vdc) are missing"
