# PostgreSQL test, first boot (runs as /tests/main.sh; scripts/vm-postgres.sh;
# guest-postgres-common.sh comes first). For each volume: ext4 (or a ZFS
# pool) on the zerofs-ublk device, `initdb --data-checksums`, `pgbench -i`.
# Then
#  1. kill -9 of every server in the middle of a pgbench run, `recover`:
#     PostgreSQL keeps running, pgbench ends with no failed transaction;
#  2. a commit ledger under pgbench load: one row per transaction
#     (synchronous_commit=on), "COMMITTED <mode> <n>" printed once its
#     COMMIT returned. After 15 commits on each volume the bucket disk
#     freezes, so the journal volume's later commits are in its journal
#     alone. The host kills QEMU after enough lines (a power cut); the
#     second boot checks every one.
mkfs.ext4 -q -F /dev/vdb && mkfs.ext4 -q -F /dev/vdc || fail "mkfs.ext4 on the disks"
mkdir -p /disk /ssd
# No periodic commit on either disk: only the servers' syncs put their
# objects and records there.
mount -t ext4 -o commit=600 /dev/vdb /disk || fail "mount /dev/vdb"
mount -t ext4 -o commit=600 /dev/vdc /ssd || fail "mount /dev/vdc"
head -c 32 /dev/urandom > /disk/key
for m in $MODES; do
  $Z create $(bucket $m) --size 1G >/dev/null || fail "create ($m)"
done
sync # the setup is durable; everything after it is under test
for m in $MODES; do
  dev=$(attach $m) || fail "add ($m)"
  fs_make $m "$dev" || fail "the $m volume's file system on $dev"
  chown postgres /pg/$m
  echo "$m: $dev"
done
t0=$(date +%s)
for m in $MODES; do
  ( as_pg $PG/initdb -D /pg/$m/data --data-checksums -U postgres --auth=trust >/tmp/initdb-$m.log 2>&1 ||
      { cat /tmp/initdb-$m.log; exit 1; }
    pg_start $m
    as_pg $PG/pgbench -h /run/postgresql -p "$(port $m)" -i -s 4 -q postgres >/tmp/pgbench-init-$m.log 2>&1 ||
      { cat /tmp/pgbench-init-$m.log; exit 1; } ) &
done
for m in $MODES; do wait -n || fail "initdb / pgbench -i"; done
echo "initdb --data-checksums and pgbench -i -s 4 on every volume in $(( $(date +%s) - t0 )) s"

echo "== kill -9 of every server under pgbench, recover"
# pgbench -n: no VACUUM and, above all, no TRUNCATE of pgbench_history at
# the start of a run, so the balance invariant holds across runs.
for m in $MODES; do
  as_pg $PG/pgbench -h /run/postgresql -p "$(port $m)" -n -c 4 -j 2 -T 40 postgres >/tmp/pgbench-$m.log 2>&1 &
  eval "bench_$m=$!"
done
sleep 15
for m in $MODES; do
  pid=$(server_pid $m); kill -9 "$pid"; echo "killed the $m volume's server ($pid)"
done
sleep 1
for m in $MODES; do
  $Z recover -n "$(dev_id $m)" >/dev/null || fail "recover ($m)"
done
echo "all recovered"
for m in $MODES; do
  eval "pid=\$bench_$m"
  wait "$pid" || fail "pgbench ($m) failed across kill -9 and recover"
  grep -q "number of failed transactions: 0 " /tmp/pgbench-$m.log || fail "pgbench ($m) had failed transactions"
  echo "$m: pgbench across kill -9: $(grep -o 'tps = [0-9.]*' /tmp/pgbench-$m.log | head -1)"
  balanced $m || fail "pgbench's balance invariant broken on $m"
done
grep -h "recover\|replayed" "$ZEROFS_UBLK_RUN_DIR"/*.log | tail -n 4 || true

echo "== commit ledger under pgbench load; the host cuts the power"
for m in $MODES; do
  sql $m -c "CREATE TABLE ledger (n int PRIMARY KEY, at timestamptz DEFAULT now())" || fail "create ledger ($m)"
  as_pg $PG/pgbench -h /run/postgresql -p "$(port $m)" -n -c 2 -T 3600 postgres >/tmp/pgbench-load-$m.log 2>&1 &
done
for m in $MODES; do
  ( n=1
    while :; do
      sql $m -c "INSERT INTO ledger (n) VALUES ($n)" || { echo "FAIL: ledger insert $m $n"; exit 1; }
      echo "COMMITTED $m $n"
      echo $n > /run/ledger-$m
      n=$((n + 1))
    done ) &
  writers="${writers:-} $!"
done
# After 15 commits on each volume the bucket disk freezes (fsfreeze: what
# the servers stored so far is written out, as S3 would keep it; every
# later write to it hangs). From there the default volume acknowledges no
# FLUSH (its commits stop), and the journal volume acknowledges them from
# its journal alone: the second boot must replay them.
( for m in $MODES; do
    while [ "$(cat /run/ledger-$m 2>/dev/null || echo 0)" -lt 15 ]; do sleep 0.2; done
  done
  fsfreeze -f /disk && echo "BUCKET-FROZEN" ) &
wait -n $writers
fail "a ledger writer stopped before the power cut"
