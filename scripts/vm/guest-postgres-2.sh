# PostgreSQL test, second boot (after the first boot's COMMITTED lines, as
# LEDGER, and guest-postgres-common.sh): the same disks; `add` every volume
# again (the journal one replays its journal without --force; the default
# ones take over another boot's claim with --force); PostgreSQL's crash
# recovery; every committed ledger row is there; pg_amcheck, pgbench's
# balance invariant, and after a clean stop pg_checksums --check and
# e2fsck. Every check runs on every volume; the boot fails at the end if
# any failed.
mkdir -p /disk /ssd
mount -t ext4 /dev/vdb /disk || fail "mount /dev/vdb after the power cut"
mount -t ext4 /dev/vdc /ssd || fail "mount /dev/vdc after the power cut"
bad=""
check() { # description, command...
  local what=$1; shift
  if ! "$@"; then echo "CHECK FAILED: $what"; bad="$bad; $what"; fi
}
for m in $MODES; do
  force=--force; [ $m = journal ] && force=
  dev=$(attach $m $force) || fail "add ($m) after the power cut"
  fs_mount $m "$dev" || fail "the $m volume's file system on $dev after the power cut"
  pg_start $m
  grep -h "was interrupted\|redo done\|redo starts" /pg/$m/log | sed "s/^/$m: /" || true
done
grep -h "replayed\|journal of epoch" "$ZEROFS_UBLK_RUN_DIR"/*.log || true
grep -q "replayed [1-9]" "$ZEROFS_UBLK_RUN_DIR/pg-journal.log" ||
  fail "the journal volume replayed nothing: its bucket was not behind, nothing tested"
ledger_complete() {
  local m=$1 want count values missing rows
  want=$(echo "$LEDGER" | awk -v m=$m '$1 == "COMMITTED" && $2 == m { print $3 }' | sort -n)
  count=$(echo "$want" | grep -c . || true)
  [ "$count" -gt 0 ] || { echo "$m: no ledger line: nothing tested"; return 1; }
  values=$(echo "$want" | sed 's/.*/(&)/' | paste -sd,)
  missing=$(sql $m -c "SELECT count(*) FROM (VALUES $values) v(n) WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.n = v.n)") ||
    return 1
  rows=$(sql $m -c "SELECT count(*) FROM ledger") || return 1
  echo "$m: $((count - missing)) of $count committed ledger rows present ($rows rows in the table)"
  [ "$missing" = 0 ]
}
amcheck() {
  as_pg $PG/pg_amcheck -h /run/postgresql -p "$(port $1)" --all --install-missing --heapallindexed >/tmp/amcheck-$1.log 2>&1 &&
    echo "$1: pg_amcheck --all --heapallindexed clean" || { tail -n 20 /tmp/amcheck-$1.log; return 1; }
}
checksums() {
  as_pg $PG/pg_checksums --check -D /pg/$1/data >/tmp/checksums-$1.log 2>&1 &&
    echo "$1: pg_checksums: $(grep -i 'blocks scanned' /tmp/checksums-$1.log | tr -s ' ')" ||
    { tail -n 20 /tmp/checksums-$1.log; return 1; }
}
for m in $MODES; do
  check "$m: every committed transaction is there" ledger_complete $m
  check "$m: pg_amcheck" amcheck $m
  check "$m: pgbench's balance invariant" balanced $m
  as_pg $PG/pg_ctl -D /pg/$m/data -w -t 600 stop >/dev/null || fail "pg_ctl stop ($m)"
  check "$m: pg_checksums --check" checksums $m
  check "$m: the file system (e2fsck -fn, or a ZFS scrub)" fs_check_and_drop $m
done
for m in $MODES; do
  $Z del -n "$(dev_id $m)" || fail "del ($m)"
done
umount /ssd /disk || { fuser -vm /ssd /disk; fail "the disks are still in use after del"; }
[ -z "$bad" ] || fail "after the power cut${bad}"
