# Guest side of `scripts/bench-vm.sh pgbench` (runs on the Debian root):
# PostgreSQL 15 on ext4 (or ZFS: BENCH_PG_FS=zfs) over four block devices, one after another in one
# boot — `rublk add loop` on a tmpfs file and on a file on a virtio disk
# (local disks), zerofs-ublk in the default mode and zerofs-ublk with
# --journal-dir on that virtio disk — the
# zerofs-ublk buckets on an S3 server (s3s-fs on tmpfs) behind a proxy
# that holds every request BENCH_STORE_DELAY_MS (a distant store's round
# trip). For each: pgbench -i, then read-write with synchronous_commit on
# and off, and select-only. Prints "PGBENCH <target> <job> <tps>
# <latency ms>" and "PGBENCH-MEM <target> <peak RSS kB>".
set -eu
SCALE=${BENCH_PG_SCALE:-10}
CLIENTS=${BENCH_PG_CLIENTS:-8}
RUNTIME=${BENCH_RUNTIME:-30}
DELAY=${BENCH_STORE_DELAY_MS:-20}
FS=${BENCH_PG_FS:-ext4}
Z=/usr/local/bin/zerofs-ublk
PG=/usr/lib/postgresql/15/bin
export ZEROFS_UBLK_RUN_DIR=/run/zerofs-ublk ZEROFS_UBLK_LOG=warn
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testsecret AWS_REGION=us-east-1
fail() { echo "FAIL: $*"; for f in "$ZEROFS_UBLK_RUN_DIR"/*.log /tmp/pg.log /tmp/pgbench.log; do [ -f "$f" ] && tail -n 20 "$f"; done; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkfs.ext4 -q -F /dev/vdb && mkdir -p /ssd && mount /dev/vdb /ssd || fail "the journal disk /dev/vdb"
mkdir -p /tmp/s3/vols /run/postgresql && chown postgres /run/postgresql
s3s-fs --host 127.0.0.1 --port 9000 --access-key test --secret-key testsecret /tmp/s3 > /tmp/s3s.log 2>&1 &
fault_proxy --listen 127.0.0.1:9001 --upstream 127.0.0.1:9000 --delay-ms "$DELAY" 2> /tmp/proxy.log &
sleep 2
head -c 32 /dev/urandom > /tmp/key
echo "pgbench scale $SCALE, $CLIENTS clients, $RUNTIME s per job, on $FS; store round trip +$DELAY ms"

# BENCH_PG_FS=zfs (FS, above): a pool on the device instead of ext4
# (recordsize 8k, PostgreSQL's page; lz4; the ARC bounded so the page
# cache and the servers' caches are comparable across runs).
if [ "$FS" = zfs ]; then
  modprobe zfs zfs_arc_max=$((512 << 20)) || fail "modprobe zfs"
fi
make_fs() { # device
  if [ "$FS" = zfs ]; then
    zpool create -f -o ashift=12 -O recordsize=8k -O compression=lz4 -O atime=off -m /pg pgb "$1"
  else
    mkfs.ext4 -q "$1" && mkdir -p /pg && mount "$1" /pg
  fi
}
drop_fs() { if [ "$FS" = zfs ]; then zpool destroy pgb; else umount /pg; fi; }
bench() { # target device server-pid
  local target=$1 dev=$2 pid=$3 sync job out
  make_fs "$dev" && chown postgres /pg || fail "$FS on $dev"
  as_pg $PG/initdb -D /pg/data -U postgres --auth=trust > /dev/null || fail "initdb ($target)"
  as_pg $PG/pg_ctl -D /pg/data -l /tmp/pg.log -w -t 600 -o "-k /run/postgresql" start > /dev/null || fail "start ($target)"
  as_pg $PG/pgbench -h /run/postgresql -i -s "$SCALE" -q postgres > /tmp/pgbench.log 2>&1 || fail "pgbench -i ($target)"
  for job in rw-sync-on rw-sync-off select-only; do
    sync=on; [ $job = rw-sync-off ] && sync=off
    flags=; [ $job = select-only ] && flags=-S
    out=$(PGOPTIONS="-c synchronous_commit=$sync" as_pg $PG/pgbench -h /run/postgresql -n $flags \
      -c "$CLIENTS" -j 2 -T "$RUNTIME" postgres 2>&1) || { echo "$out"; fail "pgbench $job ($target)"; }
    echo "PGBENCH $target $job $(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p') $(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')"
  done
  as_pg $PG/pg_ctl -D /pg/data -w -t 600 stop > /dev/null || fail "stop ($target)"
  drop_fs || fail "drop $FS ($target)"
  echo "PGBENCH-MEM $target $(awk '/VmHWM/ {print $2}' /proc/$pid/status)"
}

# rublk loop twice: on tmpfs (no cost to fsync at all) and on a file on
# the same virtio disk as the journal (the local disk proper).
for target in rublk-loop rublk-loop-disk; do
  echo "---- $target"
  img=/tmp/loop.img; [ $target = rublk-loop-disk ] && img=/ssd/loop.img
  truncate -s 2G $img
  rublk add loop -f $img --quiet && sleep 1
  bench $target "$(ls /dev/ublkb* | head -n1)" "$(pidof rublk | awk '{print $NF}')"
  rublk del -a
  rm -f $img
done

for target in zerofs-default zerofs-journal; do
  echo "---- $target"
  extra=; [ $target = zerofs-journal ] && extra="--journal-dir /ssd/journal"
  dev=$($Z add --bucket s3://vols/$target --endpoint http://127.0.0.1:9001 --key-file /tmp/key \
    --create --size 2G --name $target $extra) || fail "add $target"
  bench $target "$dev" "$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$ZEROFS_UBLK_RUN_DIR/${dev#/dev/ublkb}.json")"
  $Z status -n "${dev#/dev/ublkb}"
  $Z del -n "${dev#/dev/ublkb}"
done
