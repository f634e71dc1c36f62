#!/bin/bash
# The test driver of a systemd guest (started by guest-systemd-test.service
# once multi-user.target is up): run /tests/main.sh, report, then a clean
# `systemctl poweroff` (units stop in order: what a real shutdown does).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "guest: systemd $(systemctl --version | head -n1 | cut -d' ' -f2) as PID 1, kernel $(uname -r), state $(systemctl is-system-running)"
bash /tests/main.sh
rc=$?
if [ $rc = 0 ]; then echo "ZEROFS-VM-RESULT: PASS"; else echo "ZEROFS-VM-RESULT: FAIL rc=$rc"; fi
systemctl poweroff --no-block
