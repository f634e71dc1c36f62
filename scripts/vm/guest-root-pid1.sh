#!/bin/bash
# PID 1 of a guest on the Debian root, after scripts/vm/guest-init-root.sh:
# set up the system, run /tests/main.sh, report, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
chmod 1777 /tmp /dev/shm
hostname guest
ip link set lo up
modprobe ublk_drv || echo "modprobe ublk_drv failed"
echo "guest: Debian root, kernel $(uname -r), $(nproc) CPUs, ublk-control: $(ls /dev/ublk-control 2>&1)"
bash /tests/main.sh
rc=$?
if [ $rc = 0 ]; then echo "ZEROFS-VM-RESULT: PASS"; else echo "ZEROFS-VM-RESULT: FAIL rc=$rc"; fi
sync
# Straight to the reboot(2) call: nothing to shut down (no systemd here).
poweroff -f -f
