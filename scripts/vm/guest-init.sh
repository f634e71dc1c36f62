#!/bin/busybox sh
# /init of the test guest: set up the system, run /tests/main.sh, report.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/local/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
insmod /lib/modules/ublk_drv.ko || echo "insmod ublk_drv failed"
echo "guest: kernel $(uname -r), $(nproc) CPUs, ublk-control: $(ls /dev/ublk-control 2>&1)"
sh /tests/main.sh
rc=$?
if [ $rc = 0 ]; then echo "ZEROFS-VM-RESULT: PASS"; else echo "ZEROFS-VM-RESULT: FAIL rc=$rc"; fi
sync
poweroff -f
