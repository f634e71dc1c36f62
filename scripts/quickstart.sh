#!/usr/bin/env bash
# Build zerofs-ublk and serve a 1 GiB volume kept in a local directory
# (file://, the embedded default; no S3 needed) as /dev/ublkbN.
# Without ublk_drv (no /dev/ublk-control, modprobe impossible), it runs the
# engine end to end instead: import a disk image, export it, compare — and
# tells you how to see the device for real in a VM (scripts/vm-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${ZEROFS_UBLK_DEMO_DIR:-/var/tmp/zerofs-ublk-demo}"
BIN=target/release/zerofs-ublk

. scripts/deps.sh
deps_ensure build
cargo build --release --locked
mkdir -p "$DIR"
[ -f "$DIR/volume.key" ] || { head -c 32 /dev/urandom > "$DIR/volume.key"; chmod 600 "$DIR/volume.key"; }
export ZEROFS_UBLK_BUCKET="file://$DIR/bucket"
KEY=(--key-file "$DIR/volume.key")

[ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null || true
if [ -e /dev/ublk-control ]; then
  DEV=$("$BIN" add "${KEY[@]}" --create --size 1G --name demo)
  echo "serving $ZEROFS_UBLK_BUCKET as $DEV (also /dev/disk/by-zerofs/demo with the udev rule)"
  echo "try: mkfs.ext4 $DEV && mount $DEV /mnt"
  echo "stop: $BIN del -n ${DEV#/dev/ublkb}   (flushes to the bucket, removes the device)"
  "$BIN" list
  exit 0
fi

echo "ublk_drv is not available here: running the engine end to end instead"
echo "(scripts/vm-test.sh shows the device working in a QEMU guest)"
if ! "$BIN" inspect "${KEY[@]}" >/dev/null 2>&1; then
  "$BIN" create --size 1G "${KEY[@]}"
fi
head -c 16M /dev/urandom > "$DIR/disk.img"
{ yes "zerofs-ublk keeps your blocks in object storage" || true; } | head -c 16M >> "$DIR/disk.img"
truncate -s 64M "$DIR/disk.img"
"$BIN" import "${KEY[@]}" "$DIR/disk.img"
"$BIN" export "${KEY[@]}" --overwrite "$DIR/roundtrip.img"
cmp -n $((64 << 20)) "$DIR/disk.img" "$DIR/roundtrip.img"
echo "round trip OK: $DIR/disk.img came back identical from $ZEROFS_UBLK_BUCKET"
"$BIN" inspect "${KEY[@]}"
