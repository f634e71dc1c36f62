#!/bin/sh
# Guest side of scripts/bench-vm.sh: the same fio jobs against zerofs-ublk
# (file:// bucket on tmpfs, warm memory cache) and against `rublk add loop`
# on a tmpfs file of the same size, in one boot. Prints one
# "BENCH <target> <job> <fio terse line>" per job.
set -eu
T=/usr/local/bin
export ZEROFS_UBLK_RUN_DIR=/run/zerofs-ublk
SIZE_MB=${BENCH_SIZE_MB:-512}
RUNTIME=${BENCH_RUNTIME:-10}
QUEUES=${BENCH_QUEUES:-1}
head -c 32 /dev/urandom > /tmp/key

jobs() {
  target=$1 dev=$2
  common="--filename=$dev --ioengine=io_uring --direct=1 --iodepth=32 --refill_buffers --output-format=terse --terse-version=3"
  # Fill the whole device first so reads read data, not holes.
  echo "BENCH $target fill $($T/fio --name=fill $common --rw=write --bs=1M --size=${SIZE_MB}M)"
  for job in "randread 4k" "randwrite 4k" "write 1M" "read 1M"; do
    set -- $job
    echo "BENCH $target $1-$2 $($T/fio --name=$1 $common --rw=$1 --bs=$2 --size=${SIZE_MB}M --time_based --runtime=$RUNTIME)"
  done
  # One writer at a time: the write path's own latency (512 writes of
  # 4 KiB dirty 64 MiB of chunks, under the flush threshold), then a
  # database's pattern, every write followed by fsync (a FLUSH), at 4 KiB
  # and 8 KiB. Each starts with nothing dirty (one write + fsync).
  settle() { $T/fio --name=settle --filename=$dev --direct=1 --rw=write --bs=4k --io_size=4k --fsync=1 --output-format=terse > /dev/null; }
  settle
  echo "BENCH $target randwrite-4k-qd1 $($T/fio --name=qd1 $common --iodepth=1 --rw=randwrite --bs=4k --size=${SIZE_MB}M --io_size=2M)"
  for bs in 4k 8k; do
    settle
    echo "BENCH $target fsync-$bs $($T/fio --name=fsync $common --iodepth=1 --rw=randwrite --bs=$bs --fsync=1 --size=${SIZE_MB}M --time_based --runtime=$RUNTIME)"
  done
}

echo "---- engine alone (import of 128 MiB random data, no ublk)"
dd if=/dev/urandom of=/tmp/rand.img bs=1M count=128 2>/dev/null
$T/zerofs-ublk create --bucket file:///tmp/engine --key-file /tmp/key --size 128M
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
s=$(ms)
$T/zerofs-ublk import --no-progress --bucket file:///tmp/engine --key-file /tmp/key /tmp/rand.img
e=$(ms)
echo "BENCH-ENGINE import-128M-random $((e - s)) ms"
s=$(ms); cp /tmp/rand.img /tmp/copy.img; e=$(ms)
echo "BENCH-ENGINE cp-128M-tmpfs $((e - s)) ms"
rm -rf /tmp/engine /tmp/copy.img /tmp/rand.img

echo "---- zerofs-ublk"
DEV=$($T/zerofs-ublk add --bucket file:///tmp/bucket --key-file /tmp/key --create --size ${SIZE_MB}M \
  --queues $QUEUES --cache-memory $((SIZE_MB * 2))M --name bench)
jobs zerofs-ublk "$DEV"
$T/zerofs-ublk status -n "${DEV#/dev/ublkb}"
MEM=$(grep VmHWM /proc/$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' $ZEROFS_UBLK_RUN_DIR/*.json)/status)
echo "BENCH-MEM zerofs-ublk $MEM"
$T/zerofs-ublk del --all
df -k /tmp | tail -n1 | awk '{print "BENCH-DF after zerofs-ublk: " $3 " KiB used of " $2}'
rm -rf /tmp/bucket
echo "---- rublk loop"
truncate -s ${SIZE_MB}M /tmp/loop.img
$T/rublk add loop -f /tmp/loop.img -q $QUEUES --quiet
sleep 1
DEV=$(ls /dev/ublkb* | head -n1)
jobs rublk-loop "$DEV"
$T/rublk del -a
