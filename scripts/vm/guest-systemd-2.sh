# systemd test, second boot (guest-systemd-common.sh first): nothing is
# started by hand. The units attached both volumes at boot, the ext4 mount
# came after "db", the pool's import after "pool" and PostgreSQL after the
# import, with no ordering cycle; the first boot's shutdown exported the
# pool before its volume stopped (both servers flushed and removed their
# devices); the ledger and the file are there. `systemctl stop` of the
# pool's volume while the pool is imported flushes but keeps the device
# (removing it would fail ZFS's writes); `start` recovers it. Stopped in
# order, both devices are removed, and what they left in their buckets is
# a clean file system and a pool that imports and scrubs clean.
for u in $DB srv-db.mount $VOL $POOL $PGU; do
  wait_for "[ \"\$(prop $u ActiveState)\" = active ]" 120 || {
    echo "-- the first boot's shutdown:"
    journalctl --no-pager -b -1 -u $DB -u $VOL -u $POOL -u srv-db.mount -u $PGU | tail -n 30
    journalctl --no-pager -b | grep -a -i "cycle\|zerofs" | head -n 20; fail "$u is not active after boot"; }
done
no_cycles
t() { echo $(( $(prop "$1" ActiveEnterTimestampMonotonic) / 1000 )); }
echo "at boot (ms): $DB $(t $DB), srv-db.mount $(t srv-db.mount); $VOL $(t $VOL), $POOL $(t $POOL), PostgreSQL $(t $PGU)"
[ "$(t $DB)" -lt "$(t srv-db.mount)" ] && [ "$(t $VOL)" -lt "$(t $POOL)" ] && [ "$(t $POOL)" -lt "$(t $PGU)" ] ||
  fail "wrong order at boot"
for u in $DB $VOL; do
  journalctl --no-pager -b -1 -u $u | grep -q "flushed and removed" ||
    { journalctl --no-pager -b -1 -u $u | tail -n 15; fail "$u did not flush and remove its device at the first boot's shutdown"; }
done
echo "the first boot's shutdown: the pool exported, both servers flushed and removed their devices"
[ -L /dev/disk/by-zerofs/db ] && [ -L /dev/disk/by-zerofs/pool ] || fail "no /dev/disk/by-zerofs names at boot"
sha256sum -c --quiet /var/lib/marker.sha || fail "the file on ext4 changed"
[ "$(sql -c 'SELECT count(*) FROM ledger')" = 400 ] || fail "the ledger of the first boot is not all there"
echo "the first boot's 400 commits and the ext4 file are there"
sql -c "INSERT INTO ledger VALUES (401)" || fail "insert"
DEV=$(readlink -f /dev/disk/by-zerofs/pool)
echo "== systemctl stop $VOL while the pool is imported"
systemctl stop $VOL || true
echo "  $VOL: $(prop $VOL ActiveState) ($(prop $VOL Result)); $DEV: $([ -b $DEV ] && echo kept); $POOL: $(prop $POOL ActiveState)"
journalctl --no-pager -b -u $VOL | grep -a "is in use" | tail -n 1 | sed 's/^.*ERROR/  ERROR/' || true
[ -b "$DEV" ] && [ "$(prop $POOL ActiveState)" = active ] || fail "stopping the unit removed a device ZFS holds"
journalctl --no-pager -b -u $VOL | grep -q "is in use" || fail "the stop did not say why it kept the device"
systemctl start $VOL || fail "start after the refused stop"
sql -c "INSERT INTO ledger VALUES (402)" || fail "PostgreSQL after the unit's restart"
pool_clean || fail "errors in the pool after the refused stop"
echo "  started again: recovered $(readlink -f /dev/disk/by-zerofs/pool); PostgreSQL commits; no error in the pool"
echo "== systemctl stop: PostgreSQL, the pool's export, the mount, then the volumes"
systemctl stop $PGU $POOL srv-db.mount || fail "stop PostgreSQL, the pool and the mount"
systemctl stop $DB $VOL || fail "systemctl stop the volumes"
wait_for "[ -z \"\$(ls /dev/ublkb* 2>/dev/null)\" ]" 30 || fail "a device is still there after stop: $(ls /dev/ublkb*)"
[ -z "$($Z list 2>/dev/null | tail -n +2)" ] || { $Z list; fail "a device is left"; }
echo "  both devices removed"
echo "== another writer holds db: the unit fails once (exit 77), no restart loop; README's takeover by hand"
# README's command, with another device name: a live writer on this host.
held=$($Z add --config /etc/zerofs-ublk/db.toml --key-file /etc/zerofs-ublk/db.key --name db-byhand --force) ||
  fail "README's takeover by hand"
systemctl start $DB && fail "the unit started on a volume another writer holds"
sleep 6 # RestartSec=2s: a restart loop would have gone round
echo "  $DB: $(prop $DB ActiveState) ($(prop $DB Result)), exit status $(prop $DB ExecMainStatus), NRestarts=$(prop $DB NRestarts)"
journalctl --no-pager -b -u $DB | grep -a "in use by" | tail -n 1 | sed 's/^.*error:/  error:/' || true
[ "$(prop $DB ExecMainStatus)" = 77 ] || fail "the unit's server did not exit 77 on a held volume"
[ "$(prop $DB ActiveState)" = failed ] || fail "the unit is $(prop $DB ActiveState), not failed, on a held volume"
$Z del -n "${held#/dev/ublkb}" || fail "del of the writer by hand"
systemctl reset-failed $DB
systemctl start $DB || fail "the unit after the writer by hand let go"
wait_for "[ -L /dev/disk/by-zerofs/db ]" 60 || fail "no /dev/disk/by-zerofs/db after the unit started again"
echo "  the writer by hand removed: $DB $(prop $DB ActiveState) ($(readlink -f /dev/disk/by-zerofs/db))"
systemctl stop $DB || fail "stop $DB"
wait_for "[ -z \"\$(ls /dev/ublkb* 2>/dev/null)\" ]" 30 || fail "a device is still there after stop: $(ls /dev/ublkb*)"
# The stops flushed: the buckets alone hold a clean file system and pool.
export ZEROFS_UBLK_RUN_DIR=/run/zfu-check
dev=$($Z add --bucket file:///var/lib/zerofs-ublk/db --key-file /etc/zerofs-ublk/db.key --name check-db) ||
  fail "add db from the bucket"
e2fsck -fn "$dev" > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after stop"; }
dev=$($Z add --bucket file:///var/lib/zerofs-ublk/pool --key-file /etc/zerofs-ublk/pool.key --name check-pool) ||
  fail "add pool from the bucket"
zpool import -o cachefile=none -N -d "$dev" tank || fail "zpool import from the bucket after stop"
zpool scrub -w tank && pool_clean || fail "scrub after stop"
zpool export tank || fail "export"
$Z del --all || fail "del"
echo "the buckets after stop: e2fsck -fn clean; the pool imports and scrubs clean"
