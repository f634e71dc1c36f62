# The start of both boots of the systemd test (scripts/vm-systemd.sh puts
# it before each; runs as a unit under systemd, bash).
set -eu
Z=/usr/local/bin/zerofs-ublk
UNIT=zerofs-ublk@db.service
fail() {
  echo "FAIL: $*"
  systemctl --no-pager status "$UNIT" srv-db.mount postgresql@15-main.service 2>&1 | tail -n 40 || true
  journalctl --no-pager -b -n 60 -u "$UNIT" -u srv-db.mount -u postgresql@15-main.service 2>&1 || true
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
