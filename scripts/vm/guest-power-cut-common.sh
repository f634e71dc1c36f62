# The start of both boots of the power-cut test (scripts/vm-power-cut.sh
# puts it before each): environment, `fail`, the two virtio disks.
set -eu
T=/usr/local/bin
Z=$T/zerofs-ublk
export ZEROFS_UBLK_RUN_DIR=/run/zerofs-ublk
export ZEROFS_UBLK_LOG=info
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testsecret AWS_REGION=us-east-1
fail() {
  echo "FAIL: $*"
  for f in "$ZEROFS_UBLK_RUN_DIR"/*.log /tmp/s3s.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }; done
  exit 1
}
insmod /lib/modules/virtio_blk.ko || fail "insmod virtio_blk"
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
