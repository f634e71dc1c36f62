# systemd test, first boot (issue 13, step 3): install the units and the
# udev rule exactly as README says, `systemctl enable --now` two volumes;
# the stable names appear; the hardening is in effect; ext4 on "db" in
# /etc/fstab; a ZFS pool on "pool" imported by zerofs-ublk-zpool@tank and
# a PostgreSQL cluster on it; then `systemctl kill -s KILL` of the pool's
# server under a commit load: systemd restarts the unit, `add` recovers
# the device by name, no commit fails, no error in the pool or the kernel
# log. The boot ends with a clean `systemctl poweroff`; the second boot
# checks that everything comes up by itself.
# (guest-systemd-common.sh comes first.) The buckets are file:// on the
# root file system, which outlives every unit.
mkdir -p /var/lib/zerofs-ublk
# A persistent journal: the second boot reports this boot's shutdown.
mkdir -p /var/log/journal && systemctl restart systemd-journald
echo "== install (README, 'systemd and udev')"
install -m 644 /tests/zerofs-ublk@.service /tests/zerofs-ublk-zpool@.service /etc/systemd/system/
install -m 644 /tests/99-zerofs-ublk.rules /etc/udev/rules.d/
mkdir -p /etc/zerofs-ublk
for v in db pool; do
  cat > /etc/zerofs-ublk/$v.toml <<TOML
bucket = "file:///var/lib/zerofs-ublk/$v"
key-file = "\${CREDENTIALS_DIRECTORY}/key"
create = true
size = "1G"
cache-memory = "128M"
TOML
  head -c 32 /dev/urandom > /etc/zerofs-ublk/$v.key && chmod 600 /etc/zerofs-ublk/$v.key
done
systemctl daemon-reload && udevadm control --reload
systemctl enable --now zerofs-ublk@db zerofs-ublk@pool || fail "systemctl enable --now"
for v in db pool; do
  wait_for "[ -L /dev/disk/by-zerofs/$v ]" 60 || {
    set +e; ls -la /run/ublksrvd; udevadm info /dev/ublkb0
    fail "no /dev/disk/by-zerofs/$v"; }
  echo "/dev/disk/by-zerofs/$v -> $(readlink -f /dev/disk/by-zerofs/$v)"
done
for p in PrivateMounts ProtectSystem ProtectHome NRestarts; do echo "  $p=$(prop $DB $p)"; done
[ "$(prop $DB PrivateMounts)" = yes ] && [ "$(prop $DB ProtectSystem)" = full ] &&
  [ "$(prop $DB ProtectHome)" = read-only ] || fail "the unit's hardening is not in effect"
# ProtectSystem=full: the server's view of /usr and /etc is read-only.
pid=$(prop $DB MainPID)
nsenter -t "$pid" -m sh -c 'touch /usr/zfu-probe' 2>/dev/null && fail "the server can write /usr"
echo "  the server's /usr is read-only; it runs in its own mount namespace: $(readlink /proc/$pid/ns/mnt) vs $(readlink /proc/1/ns/mnt)"
[ "$(readlink /proc/$pid/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || fail "PrivateMounts: same mount namespace"

echo "== ext4 on db in /etc/fstab"
mkfs.ext4 -q /dev/disk/by-zerofs/db || fail mkfs
mkdir -p /srv/db
# As README says: _netdev (a network device: after the network, before
# remote-fs.target) and x-systemd.after= the unit (the mount comes up
# after it and, at shutdown, goes down before it stops), never
# x-systemd.requires= (Requires=): on the server's automatic restart,
# systemd 252 restarts the mount with it, and its stop waits for I/O only
# the restarted server can serve (seen here: a deadlock). nofail only so
# that a failure at boot reaches this test instead of an emergency shell.
echo "/dev/disk/by-zerofs/db /srv/db ext4 _netdev,x-systemd.after=$DB,nofail 0 2" >> /etc/fstab
systemctl daemon-reload
systemctl start srv-db.mount || fail "mount /srv/db"
head -c 1M /dev/urandom > /srv/db/marker && sha256sum /srv/db/marker > /var/lib/marker.sha

echo "== a ZFS pool on pool, imported by $POOL; PostgreSQL on it"
# A small ARC: two servers and PostgreSQL share the guest's 3 GiB.
echo "options zfs zfs_arc_max=$((256 << 20))" > /etc/modprobe.d/zfs.conf
modprobe zfs || fail "modprobe zfs"
zpool create -o ashift=12 -o cachefile=none -O mountpoint=/srv/pg tank /dev/disk/by-zerofs/pool ||
  fail "zpool create"
mkdir -p /etc/systemd/system/$POOL.d
printf '[Unit]\nWants=%s\nAfter=%s\n' $VOL $VOL > /etc/systemd/system/$POOL.d/volumes.conf
systemctl daemon-reload
systemctl enable --now $POOL || fail "systemctl enable --now $POOL"
pg_createcluster 15 main -d /srv/pg/pgdata > /dev/null || fail pg_createcluster
mkdir -p /etc/systemd/system/$PGU.d
printf '[Unit]\nRequires=%s\nAfter=%s\n' $POOL $POOL > /etc/systemd/system/$PGU.d/zerofs.conf
systemctl daemon-reload
systemctl enable postgresql@15-main 2>/dev/null || ln -sf /lib/systemd/system/postgresql@.service \
  /etc/systemd/system/multi-user.target.wants/$PGU
systemctl start postgresql@15-main || fail "start PostgreSQL"
sql -c "CREATE TABLE ledger (n int PRIMARY KEY)" || fail "create table"
zpool status tank | sed -n '/config:/,/errors:/p' | grep -E "tank|pool|errors" | sed 's/^/  /'

echo "== systemctl kill -s KILL of the pool's server under a commit load"
DEV=$(readlink -f /dev/disk/by-zerofs/pool)
( n=1; while [ $n -le 400 ]; do sql -c "INSERT INTO ledger VALUES ($n)" || exit 1; n=$((n + 1)); done ) &
load=$!
sleep 3
old=$(prop $VOL MainPID)
systemctl kill -s KILL $VOL
wait_for '[ "$(prop $VOL NRestarts)" = 1 ] && [ "$(prop $VOL ActiveState)" = active ]' 120 ||
  fail "the unit did not restart after SIGKILL"
echo "server $old killed; the unit restarted (NRestarts=1), new server $(prop $VOL MainPID), $(readlink -f /dev/disk/by-zerofs/pool)"
[ "$(readlink -f /dev/disk/by-zerofs/pool)" = "$DEV" ] || fail "the restart made a new device instead of recovering $DEV"
wait "$load" || fail "a commit failed across the kill and restart"
[ "$(sql -c 'SELECT count(*) FROM ledger')" = 400 ] || fail "the ledger is short"
journalctl --no-pager -b -u $VOL | grep -i "recover" | tail -n 2 || true
if dmesg | grep -i "ublkb.*error\|I/O error"; then fail "I/O errors in the kernel log"; fi
pool_clean || fail "errors in the pool after the kill"
echo "400 commits across the kill, no I/O error, the pool has no error"
no_cycles
sync
