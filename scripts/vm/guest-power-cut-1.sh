#!/bin/sh
# Power-cut test, first boot (runs as /tests/main.sh; scripts/vm-power-cut.sh).
# Two disks outlive this VM: /dev/vda holds the buckets — a file:// one for
# the default-mode volume, and an S3 server's (s3s-fs) for the other —
# and /dev/vdb, on its own ("the local SSD"), the second volume's
# --journal-dir. Writes 4 KiB blocks, each to a block never written
# before, and prints "FSYNCED <dev> <block> <md5>" once its fsync
# returned, with unsynced writes between. After ten rounds the S3 server
# is frozen (SIGSTOP; what it stored so far synced to disk, as S3 would
# keep it): the journal volume's uploads hang, its FLUSHes are
# acknowledged from the journal alone. The host kills QEMU (no shutdown,
# no sync) after enough lines; the second boot checks every one of them.
# (scripts/vm/guest-power-cut-common.sh comes first: environment, fail,
# the virtio disks.)
$T/mkfs.ext4 -q -F /dev/vda && $T/mkfs.ext4 -q -F /dev/vdb || fail "mkfs.ext4"
mkdir -p /disk /ssd
# No periodic commit on either disk: only the servers' syncs put their
# objects and records there.
mount -t ext4 -o commit=600 /dev/vda /disk || fail "mount /dev/vda"
mount -t ext4 -o commit=600 /dev/vdb /ssd || fail "mount /dev/vdb"
head -c 32 /dev/urandom > /disk/key
mkdir -p /disk/s3/vols
$T/s3s-fs --host 127.0.0.1 --port 9000 --access-key test --secret-key testsecret /disk/s3 \
  > /tmp/s3s.log 2>&1 &
sleep 2
S3="--bucket s3://vols/journal --endpoint http://127.0.0.1:9000"
$Z create --bucket file:///disk/bucket-default --key-file /disk/key --size 64M || fail "create"
$Z create $S3 --key-file /disk/key --size 64M || fail "create (S3)"
sync # the setup is durable; everything after it is under test
D0=$($Z add --bucket file:///disk/bucket-default --key-file /disk/key --name default) ||
  fail "add default"
D1=$($Z add $S3 --key-file /disk/key --name journal --journal-dir /ssd/journal \
  --max-upload-lag 64M,120s) || fail "add --journal-dir"
echo "POWERCUT-READY $D0 $D1"
i=0
while [ $i -lt 5000 ]; do
  if [ $i = 10 ]; then
    kill -STOP "$(pidof s3s-fs)"
    sync
    echo "BUCKET-FROZEN (the journal volume's uploads hang from here on)"
  fi
  for d in 0 1; do
    dev=$D0; [ $d = 1 ] && dev=$D1
    head -c 4096 /dev/urandom > /tmp/blk
    dd if=/tmp/blk of="$dev" bs=4096 seek=$i count=1 conv=fsync,notrunc 2>/dev/null || fail "write $d $i"
    echo "FSYNCED $d $i $(md5sum < /tmp/blk | cut -c1-32)"
    # A write nobody waits for, far from the checked blocks.
    head -c 4096 /dev/urandom | dd of="$dev" bs=4096 seek=$((8192 + i)) count=1 conv=notrunc 2>/dev/null
  done
  i=$((i + 1))
done
echo "FAIL: the host never cut the power"
