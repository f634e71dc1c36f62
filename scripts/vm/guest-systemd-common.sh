# The start of both boots of the systemd test (scripts/vm-systemd.sh puts
# it before each; runs as a unit under systemd, bash). Two volumes: "db"
# with ext4 in /etc/fstab, and "pool" with a ZFS pool (tank) that
# PostgreSQL runs on, imported by zerofs-ublk-zpool@tank.
set -eu
Z=/usr/local/bin/zerofs-ublk
DB=zerofs-ublk@db.service
VOL=zerofs-ublk@pool.service
POOL=zerofs-ublk-zpool@tank.service
PGU=postgresql@15-main.service
fail() {
  echo "FAIL: $*"
  systemctl --no-pager status $DB $VOL $POOL srv-db.mount $PGU 2>&1 | tail -n 60 || true
  journalctl --no-pager -b -n 80 -u $DB -u $VOL -u $POOL -u srv-db.mount -u $PGU 2>&1 || true
  zpool status 2>&1 | tail -n 20 || true
  exit 1
}
sql() { runuser -u postgres -- psql -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
# Waits up to $2 seconds (TCG) for the condition in $1.
wait_for() {
  local i=0
  until eval "$1"; do
    i=$((i + 1)); [ $i -lt $(($2 * 5)) ] || return 1; sleep 0.2
  done
}
prop() { systemctl show -P "$2" "$1"; }
# systemd breaks an ordering cycle by dropping a job, which can leave the
# volume, a mount or the pool out of the boot: there must be none.
no_cycles() {
  local c; c=$(journalctl --no-pager -b | grep -i "ordering cycle" || true)
  [ -z "$c" ] || { echo "$c" | head -n 20; fail "systemd found an ordering cycle"; }
}
# No read, write or checksum error on any device of the pool.
pool_clean() {
  zpool status -p tank | awk 'NF >= 5 && $2 ~ /^(ONLINE|DEGRADED|FAULTED|OFFLINE|UNAVAIL|REMOVED)$/ && ($3 != 0 || $4 != 0 || $5 != 0) { bad = 1; print } END { exit bad }' &&
    zpool status tank | grep -q "errors: No known data errors"
}
