# systemd test, first boot (issue 13, step 3): install the unit and the
# udev rule exactly as README says, `systemctl enable --now`; the stable
# name appears; ext4 on it in /etc/fstab;
# a PostgreSQL cluster on it, enabled; then `systemctl kill -s KILL` of the
# server under a commit load: systemd restarts the unit, `add` recovers
# the device by name, no commit fails and no I/O error reaches the
# kernel log. The boot ends with a clean `systemctl poweroff`; the second
# boot checks that everything comes up by itself.
# (guest-systemd-common.sh comes first.) The bucket is file:// on the
# root file system, which outlives every unit.
mkdir -p /var/lib/zerofs-ublk
# A persistent journal: the second boot reports this boot's shutdown.
mkdir -p /var/log/journal && systemctl restart systemd-journald
echo "== install (README, 'systemd and udev')"
install -m 644 /tests/zerofs-ublk@.service /etc/systemd/system/
install -m 644 /tests/99-zerofs-ublk.rules /etc/udev/rules.d/
mkdir -p /etc/zerofs-ublk
cat > /etc/zerofs-ublk/db.toml <<'TOML'
bucket = "file:///var/lib/zerofs-ublk/db"
key-file = "${CREDENTIALS_DIRECTORY}/key"
create = true
size = "1G"
TOML
head -c 32 /dev/urandom > /etc/zerofs-ublk/db.key && chmod 600 /etc/zerofs-ublk/db.key
systemctl daemon-reload && udevadm control --reload
systemctl enable --now zerofs-ublk@db || fail "systemctl enable --now zerofs-ublk@db"
wait_for '[ -L /dev/disk/by-zerofs/db ]' 60 || {
  set +e; ls -la /run/ublksrvd; udevadm info /dev/ublkb0
  fail "no /dev/disk/by-zerofs/db"; }
DEV=$(readlink -f /dev/disk/by-zerofs/db)
echo "/dev/disk/by-zerofs/db -> $DEV"
for p in PrivateMounts ProtectSystem ProtectHome NRestarts; do echo "  $p=$(prop $UNIT $p)"; done
[ "$(prop $UNIT PrivateMounts)" = yes ] && [ "$(prop $UNIT ProtectSystem)" = full ] &&
  [ "$(prop $UNIT ProtectHome)" = read-only ] || fail "the unit's hardening is not in effect"
# ProtectSystem=full: the server's view of /usr and /etc is read-only.
pid=$(prop $UNIT MainPID)
nsenter -t "$pid" -m sh -c 'touch /usr/zfu-probe' 2>/dev/null && fail "the server can write /usr"
echo "  the server's /usr is read-only; it runs in its own mount namespace: $(readlink /proc/$pid/ns/mnt) vs $(readlink /proc/1/ns/mnt)"
[ "$(readlink /proc/$pid/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || fail "PrivateMounts: same mount namespace"

echo "== ext4 in /etc/fstab, PostgreSQL on it"
mkfs.ext4 -q /dev/disk/by-zerofs/db || fail mkfs
mkdir -p /srv/db
# As README says: x-systemd.after= the unit (the mount comes up after it
# and, at shutdown, goes down before it stops), never x-systemd.requires=
# (Requires=): on the server's automatic restart, systemd 252 restarts
# the mount and PostgreSQL with it, and their stop waits for I/O only the
# restarted server can serve (seen here: a deadlock). nofail only so
# that a failure at boot reaches this test instead of an emergency shell.
echo "/dev/disk/by-zerofs/db /srv/db ext4 x-systemd.after=$UNIT,nofail 0 2" >> /etc/fstab
systemctl daemon-reload
systemctl start srv-db.mount || fail "mount /srv/db"
pg_createcluster 15 main -d /srv/db/pgdata > /dev/null || fail pg_createcluster
mkdir -p /etc/systemd/system/postgresql@15-main.service.d
printf '[Unit]\nRequiresMountsFor=/srv/db\n' > /etc/systemd/system/postgresql@15-main.service.d/zerofs.conf
systemctl daemon-reload
systemctl enable postgresql@15-main 2>/dev/null || ln -sf /lib/systemd/system/postgresql@.service \
  /etc/systemd/system/multi-user.target.wants/postgresql@15-main.service
systemctl start postgresql@15-main || fail "start PostgreSQL"
sql -c "CREATE TABLE ledger (n int PRIMARY KEY)" || fail "create table"

echo "== systemctl kill -s KILL under a commit load"
( n=1; while [ $n -le 400 ]; do sql -c "INSERT INTO ledger VALUES ($n)" || exit 1; n=$((n + 1)); done ) &
load=$!
sleep 3
old=$(prop $UNIT MainPID)
systemctl kill -s KILL $UNIT
wait_for '[ "$(prop $UNIT NRestarts)" = 1 ] && [ "$(prop $UNIT ActiveState)" = active ]' 120 ||
  fail "the unit did not restart after SIGKILL"
echo "server $old killed; the unit restarted (NRestarts=1), new server $(prop $UNIT MainPID), $(readlink -f /dev/disk/by-zerofs/db)"
[ "$(readlink -f /dev/disk/by-zerofs/db)" = "$DEV" ] || fail "the restart made a new device instead of recovering $DEV"
wait "$load" || fail "a commit failed across the kill and restart"
[ "$(sql -c 'SELECT count(*) FROM ledger')" = 400 ] || fail "the ledger is short"
journalctl --no-pager -b -u $UNIT | grep -i "recover" | tail -n 2 || true
if dmesg | grep -i "ublkb.*error\|I/O error"; then fail "I/O errors in the kernel log"; fi
echo "400 commits across the kill, no I/O error"
sync
