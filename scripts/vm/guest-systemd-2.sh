# systemd test, second boot (guest-systemd-common.sh first): nothing is
# started by hand. The unit attached the volume at boot before the mount
# and PostgreSQL; the ledger of the first boot is there. `systemctl stop`
# of the unit while the file system is mounted flushes but keeps the
# device (removing it would fail the file system's writes); `start`
# recovers it. Stopped in order (PostgreSQL, the mount, the unit), the
# device is removed, and what it left in the bucket is a clean file system.
for u in $UNIT srv-db.mount postgresql@15-main.service; do
  wait_for "[ \"\$(prop $u ActiveState)\" = active ]" 120 || {
    echo "-- the first boot's shutdown:"
    journalctl --no-pager -b -1 -u $UNIT -u srv-db.mount -u postgresql@15-main.service | tail -n 30
    journalctl --no-pager -b -u $UNIT | grep -a -v "^-- " | head -n 12; fail "$u is not active after boot"; }
done
t_unit=$(prop $UNIT ActiveEnterTimestampMonotonic)
t_mount=$(prop srv-db.mount ActiveEnterTimestampMonotonic)
t_pg=$(prop postgresql@15-main.service ActiveEnterTimestampMonotonic)
echo "at boot: $UNIT active at $((t_unit / 1000)) ms, /srv/db at $((t_mount / 1000)) ms, PostgreSQL at $((t_pg / 1000)) ms"
[ "$t_unit" -lt "$t_mount" ] && [ "$t_mount" -lt "$t_pg" ] || fail "wrong order at boot"
[ -L /dev/disk/by-zerofs/db ] || fail "no /dev/disk/by-zerofs/db at boot"
[ "$(sql -c 'SELECT count(*) FROM ledger')" = 400 ] || fail "the ledger of the first boot is not all there"
echo "the first boot's 400 commits are there"
sql -c "INSERT INTO ledger VALUES (401)" || fail "insert"
DEV=$(readlink -f /dev/disk/by-zerofs/db)
echo "== systemctl stop $UNIT while PostgreSQL runs on it"
systemctl stop $UNIT || true
echo "  $UNIT: $(prop $UNIT ActiveState) ($(prop $UNIT Result)); $DEV: $([ -b $DEV ] && echo kept); srv-db.mount: $(prop srv-db.mount ActiveState)"
journalctl --no-pager -b -u $UNIT | grep -a "is in use" | tail -n 1 | sed 's/^.*ERROR/  ERROR/' || true
[ -b "$DEV" ] && [ "$(prop srv-db.mount ActiveState)" = active ] || fail "stopping the unit removed a mounted device"
journalctl --no-pager -b -u $UNIT | grep -q "is in use" || fail "the stop did not say why it kept the device"
systemctl start $UNIT || fail "start after the refused stop"
sql -c "INSERT INTO ledger VALUES (402)" || fail "PostgreSQL after the unit's restart"
echo "  started again: recovered $(readlink -f /dev/disk/by-zerofs/db); PostgreSQL commits"
echo "== systemctl stop: PostgreSQL, the mount, then the unit"
systemctl stop postgresql@15-main srv-db.mount || fail "stop PostgreSQL and the mount"
systemctl stop $UNIT || fail "systemctl stop $UNIT"
wait_for "[ ! -b $DEV ]" 30 || fail "$DEV is still there after stop"
[ -z "$($Z list 2>/dev/null | tail -n +2)" ] || { $Z list; fail "a device is left"; }
echo "  $DEV removed ($UNIT $(prop $UNIT ActiveState))"
# The stop flushed: the bucket alone holds a clean file system.
dev=$(ZEROFS_UBLK_RUN_DIR=/run/zfu-check $Z add --bucket file:///var/lib/zerofs-ublk/db \
  --key-file /etc/zerofs-ublk/db.key --name check) || fail "add from the bucket"
e2fsck -fn "$dev" > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after stop"; }
echo "the bucket after stop: e2fsck -fn clean"
ZEROFS_UBLK_RUN_DIR=/run/zfu-check $Z del -n "${dev#/dev/ublkb}" || fail "del"
