# ZFS on zerofs-ublk (issue 13, step 1; runs as /tests/main.sh on the
# Debian root, bash; scripts/vm-zfs.sh). /dev/vda is the root; /dev/vdb
# holds the S3 server's data (s3s-fs in the guest, on 127.0.0.1); /dev/vdc
# is "the local SSD" for the L2ARC.
#  1. a pool on one zerofs-ublk device: create, write, scrub, export;
#  2. the layout ZeroFS's author published: a pool striped over three
#     zerofs-ublk volumes in one bucket under different prefixes, with an
#     L2ARC cache device on the local disk; datasets, a file tree and
#     PostgreSQL (initdb --data-checksums, pgbench);
#  3. kill -9 of one device's server under pgbench and a file write load,
#     `recover`: no failed transaction, no pool error, scrub clean, every
#     file's checksum intact;
#  4. `zpool trim` reaches the volumes (DISCARDs) and unmaps their chunks;
#  5. export, `del` all three, `add` them again from the bucket, import:
#     the files, pg_amcheck, pgbench's balance invariant, pg_checksums and
#     a last scrub are clean.
set -eu
Z=/usr/local/bin/zerofs-ublk
PG=/usr/lib/postgresql/15/bin
export ZEROFS_UBLK_RUN_DIR=/run/zerofs-ublk ZEROFS_UBLK_LOG=info
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testsecret AWS_REGION=us-east-1
S3="--endpoint http://127.0.0.1:9000 --key-file /run/key"
fail() {
  echo "FAIL: $*"
  zpool status -v 2>&1 | tail -n 40 || true
  for f in "$ZEROFS_UBLK_RUN_DIR"/*.log /pg/log /tmp/pgbench*.log /tmp/s3s.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 20 "$f"; }
  done
  dmesg | grep -i -E "ublk|zfs|error|blocked" | tail -n 20 || true
  exit 1
}
now() { date +%s; }
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg psql -X -q -A -t -v ON_ERROR_STOP=1 -h /run/postgresql -d postgres "$@"; }
pg_start() {
  mkdir -p /run/postgresql && chown postgres /run/postgresql
  as_pg $PG/pg_ctl -D /tank/pg/data -l /pg/log -w -t 600 \
    -o "-k /run/postgresql -c synchronous_commit=on -c fsync=on -c full_page_writes=off" start >/dev/null ||
    fail "PostgreSQL did not start"
}
pg_stop() { as_pg $PG/pg_ctl -D /tank/pg/data -w -t 600 stop >/dev/null || fail "pg_ctl stop"; }
# pgbench's invariant (as in the PostgreSQL test): accounts, tellers,
# branches and history sum to the same total.
balanced() {
  local sums
  sums=$(sql -F ' ' -c "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), (SELECT count(*) FROM pgbench_history)") ||
    return 1
  echo "balances accounts/tellers/branches/history $sums (transactions)"
  set -- $sums
  [ "$1" = "$2" ] && [ "$2" = "$3" ] && [ "$3" = "$4" ]
}
# A scrub to the end; fails unless it found and repaired nothing.
scrub() {
  local t0; t0=$(now)
  zpool scrub -w "$1" || fail "zpool scrub $1"
  local st; st=$(zpool status "$1")
  echo "$st" | grep -q "scan: scrub repaired 0B .* with 0 errors" &&
    echo "$st" | grep -q "errors: No known data errors" ||
    { echo "$st"; fail "scrub of $1 found errors"; }
  echo "$1: scrub clean in $(( $(now) - t0 )) s ($(echo "$st" | grep -o 'scrub repaired.*errors'))"
}
# Every device of the pool has zero read, write and checksum errors.
no_device_errors() {
  zpool status -p "$1" | awk 'NF >= 5 && $2 ~ /^(ONLINE|DEGRADED|FAULTED|OFFLINE|UNAVAIL|REMOVED)$/ && ($3 != 0 || $4 != 0 || $5 != 0) { bad = 1; print } END { exit bad }' ||
    fail "$1 has device errors"
}
id_of() { local d=$1; echo "${d#/dev/ublkb}"; }
server_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$ZEROFS_UBLK_RUN_DIR/$1.json"; }
status_of() { $Z status -n "$1" --json; }
json_n() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" | head -1; }

i=0; while { [ ! -b /dev/vdb ] || [ ! -b /dev/vdc ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vdc ] || fail "the S3 and L2ARC disks (/dev/vdb, /dev/vdc) are missing"
# udev, as on any system ZFS runs on: zpool create waits for the
# partitions it makes on a whole disk (the L2ARC's) to appear.
/lib/systemd/systemd-udevd --daemon && udevadm trigger && udevadm settle || fail "udevd"
modprobe zfs zfs_arc_max=$((192 << 20)) || fail "modprobe zfs"
echo "zfs: module $(cat /sys/module/zfs/version), $(zfs version | head -1)"
mkfs.ext4 -q -F /dev/vdb && mkdir -p /s3 && mount /dev/vdb /s3 || fail "the S3 disk"
mkdir -p /s3/tank
s3s-fs --host 127.0.0.1 --port 9000 --access-key test --secret-key testsecret /s3 > /tmp/s3s.log 2>&1 &
i=0; until (exec 3<>/dev/tcp/127.0.0.1/9000) 2>/dev/null; do
  sleep 0.2; i=$((i + 1)); [ $i -lt 100 ] || fail "s3s-fs did not start"
done
head -c 32 /dev/urandom > /run/key
# Each server keeps a small memory cache: four of them share the guest
# with the ARC and PostgreSQL.
add() { $Z add --bucket "s3://tank/$1" $S3 --name "$1" --cache-memory 96M "${@:2}"; }

echo "== a pool on one device"
$Z create --bucket s3://tank/single $S3 --size 1G >/dev/null || fail "create single"
dev=$(add single) || fail "add single"
zpool create -f -o ashift=12 -O compression=lz4 -m /single single "$dev" || fail "zpool create on $dev"
head -c 32M /dev/urandom > /single/f && sha256sum /single/f > /run/single.sha
zpool sync single
scrub single
zpool export single || fail "zpool export single"
$Z del -n "$(id_of "$dev")" || fail "del single"
dev=$(add single) || fail "add single again"
zpool import -d "$dev" single || fail "zpool import single after del + add"
sha256sum -c --quiet /run/single.sha || fail "the single-device pool's file changed"
zpool export single && $Z del -n "$(id_of "$dev")" || fail "export + del single"
echo "single: create, scrub, export, del, add, import, checksum intact"

echo "== a pool striped over three volumes in one bucket, L2ARC on the local disk"
DEVS=""
for v in vol0 vol1 vol2; do
  $Z create --bucket "s3://tank/$v" $S3 --size 2G >/dev/null || fail "create $v"
  d=$(add "$v") || fail "add $v"
  DEVS="$DEVS $d"
done
zpool create -f -o ashift=12 -O compression=lz4 -O atime=off -m /tank tank $DEVS cache /dev/vdc ||
  fail "zpool create tank"
zfs create tank/tree && zfs create -o recordsize=8k tank/pg || fail "zfs create"
zpool status tank | sed -n '/config:/,/errors:/p' | grep -E "tank|ublkb|vdc|cache"
t0=$(now)
cp -a /usr/lib/postgresql /usr/share/perl /tank/tree/ || fail "cp the file tree"
(cd /tank/tree && find . -type f -print0 | xargs -0 sha256sum) > /run/tree.sha
echo "file tree: $(wc -l < /run/tree.sha) files, $(du -sh /tank/tree | cut -f1) in $(( $(now) - t0 )) s"
mkdir -p /pg /tank/pg/data && chown postgres /pg /tank/pg/data
as_pg $PG/initdb -D /tank/pg/data --data-checksums -U postgres --auth=trust > /tmp/initdb.log 2>&1 ||
  { cat /tmp/initdb.log; fail "initdb on ZFS"; }
pg_start
t0=$(now)
as_pg $PG/pgbench -h /run/postgresql -i -s 4 -q postgres > /tmp/pgbench-init.log 2>&1 ||
  { cat /tmp/pgbench-init.log; fail "pgbench -i"; }
echo "initdb --data-checksums and pgbench -i -s 4 on ZFS in $(( $(now) - t0 )) s"

echo "== kill -9 of one device's server under pgbench and a file write load, recover"
as_pg $PG/pgbench -h /run/postgresql -n -c 4 -j 2 -T 40 postgres > /tmp/pgbench.log 2>&1 &
bench=$!
( i=0; while [ $i -lt 12 ]; do
    head -c 4M /dev/urandom > /tank/tree/load.$i && sync /tank/tree/load.$i || exit 1
    i=$((i + 1))
  done ) &
writer=$!
sleep 15
victim=$(echo $DEVS | cut -d' ' -f2); vid=$(id_of "$victim")
pid=$(server_pid "$vid"); kill -9 "$pid"; echo "killed the server of $victim ($pid)"
sleep 1
$Z recover -n "$vid" > /dev/null || fail "recover $victim"
echo "recovered $victim"
wait "$writer" || fail "the file writes failed across kill -9 and recover"
wait "$bench" || { cat /tmp/pgbench.log; fail "pgbench failed across kill -9 and recover"; }
grep -q "number of failed transactions: 0 " /tmp/pgbench.log || fail "pgbench had failed transactions"
echo "pgbench across kill -9: $(grep -o 'tps = [0-9.]*' /tmp/pgbench.log | head -1)"
balanced || fail "pgbench's balance invariant broken"
no_device_errors tank
(cd /tank/tree && sha256sum load.* >> /run/tree.sha)
scrub tank
(cd /tank/tree && sha256sum -c --quiet /run/tree.sha) || fail "a file changed"
echo "tank: no device errors; $(wc -l < /run/tree.sha) files intact"

echo "== zpool trim reaches the volumes"
declare -A mapped0 disc0
for d in $DEVS; do
  s=$(status_of "$(id_of "$d")"); mapped0[$d]=$(echo "$s" | json_n mapped_chunks); disc0[$d]=$(echo "$s" | json_n discards)
done
rm -rf /tank/tree/perl /tank/tree/load.*
grep -v -E '^[0-9a-f]+  (\./perl/|load\.)' /run/tree.sha > /run/tree.kept
zpool sync tank
t0=$(now)
zpool trim -w tank || fail "zpool trim"
# A FLUSH of each device (fsync of the block device) publishes the
# unmapped chunks.
for d in $DEVS; do sync "$d" || fail "sync $d"; done
freed=0
for d in $DEVS; do
  s=$(status_of "$(id_of "$d")"); m=$(echo "$s" | json_n mapped_chunks); n=$(echo "$s" | json_n discards)
  echo "$d: $((n - ${disc0[$d]})) discards; mapped chunks ${mapped0[$d]} -> $m"
  [ "$n" -gt "${disc0[$d]}" ] || fail "zpool trim sent no DISCARD to $d"
  [ "$m" -lt "${mapped0[$d]}" ] && freed=$((freed + 1))
done
[ "$freed" = 3 ] || fail "zpool trim unmapped no chunk on some volume"
echo "trim: every volume got DISCARDs and unmapped chunks in $(( $(now) - t0 )) s"

echo "== export, del, add again from the bucket, import"
pg_stop
zpool export tank || fail "zpool export tank"
for d in $DEVS; do $Z del -n "$(id_of "$d")" || fail "del $d"; done
[ -z "$(ls /dev/ublkb* 2>/dev/null)" ] || fail "devices left after del: $(ls /dev/ublkb*)"
for v in vol0 vol1 vol2; do add "$v" > /dev/null || fail "add $v again"; done
zpool import -d /dev tank || fail "zpool import tank after del + add"
zpool status tank | grep -q "vdc.*ONLINE" || { zpool status tank; fail "the L2ARC device did not come back"; }
(cd /tank/tree && sha256sum -c --quiet /run/tree.kept) || fail "a file changed across export, del, add, import"
pg_start
as_pg $PG/pg_amcheck -h /run/postgresql --all --install-missing --heapallindexed > /tmp/amcheck.log 2>&1 ||
  { tail -n 20 /tmp/amcheck.log; fail "pg_amcheck"; }
echo "pg_amcheck --all --heapallindexed clean"
balanced || fail "pgbench's balance invariant broken after import"
pg_stop
as_pg $PG/pg_checksums --check -D /tank/pg/data > /tmp/checksums.log 2>&1 ||
  { tail -n 20 /tmp/checksums.log; fail "pg_checksums --check"; }
echo "pg_checksums: $(grep -i 'blocks scanned' /tmp/checksums.log | tr -s ' ')"
scrub tank
no_device_errors tank
zpool export tank || fail "the last export"
$Z del --all || fail "del --all"
echo "tank: $(wc -l < /run/tree.kept) files intact, PostgreSQL clean, scrub clean after del + add + import"
