#!/bin/busybox sh
# /init of a guest that runs on the Debian root (VM_ROOT, scripts/vm/lib.sh):
# find the root disk (/dev/vda, a throwaway overlay of the cached image),
# put this run's binaries and scripts into it, and switch to it;
# /tests/root-pid1.sh goes on from there.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
die() { echo "guest: $*"; echo "ZEROFS-VM-RESULT: FAIL rc=root"; poweroff -f; }
insmod /lib/modules/virtio_blk.ko || die "insmod virtio_blk failed"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || die "cannot mount the root disk /dev/vda"
[ "$(cat /newroot/etc/hostname 2>/dev/null)" = guest ] || die "/dev/vda is not the guest's Debian root"
mkdir -p /newroot/tests /newroot/usr/local/bin
cp -a /tests/. /newroot/tests/
cp -a /payload/bin/. /newroot/usr/local/bin/
umount /proc /sys
mount --move /dev /newroot/dev
if [ -f /tests/systemd ]; then
  # systemd as PID 1; the test runs as a unit once the system is up.
  cp /tests/guest-systemd-test.service /newroot/etc/systemd/system/zerofs-ublk-guest-test.service
  mkdir -p /newroot/etc/systemd/system/multi-user.target.wants
  ln -sf ../zerofs-ublk-guest-test.service /newroot/etc/systemd/system/multi-user.target.wants/
  cp /tests/guest-systemd-run.sh /newroot/tests/systemd-pid1-test.sh
  # The test writes to the serial console: a getty there would hang it up.
  ln -sf /dev/null /newroot/etc/systemd/system/serial-getty@ttyS0.service
  exec switch_root /newroot /lib/systemd/systemd
fi
exec switch_root /newroot /bin/bash /tests/root-pid1.sh
