#!/usr/bin/env bash
# Build zerofs-ublk and run it on the embedded default: a volume in a local
# directory (file://), no S3 needed. Makes a key, creates a 1 GiB volume,
# imports a disk image into it, exports it back and checks the bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${ZEROFS_UBLK_DEMO_DIR:-/var/tmp/zerofs-ublk-demo}"
BIN=target/release/zerofs-ublk

cargo build --release --locked
mkdir -p "$DIR"
[ -f "$DIR/volume.key" ] || head -c 32 /dev/urandom > "$DIR/volume.key"
export ZEROFS_UBLK_BUCKET="file://$DIR/bucket"
KEY=(--key-file "$DIR/volume.key")

if ! "$BIN" inspect "${KEY[@]}" >/dev/null 2>&1; then
  "$BIN" create --size 1G "${KEY[@]}"
fi
# A small "disk": 16 MiB random + 16 MiB text + zeros.
head -c 16M /dev/urandom > "$DIR/disk.img"
{ yes "zerofs-ublk keeps your blocks in object storage" || true; } | head -c 16M >> "$DIR/disk.img"
truncate -s 64M "$DIR/disk.img"
"$BIN" import "${KEY[@]}" "$DIR/disk.img"
"$BIN" export "${KEY[@]}" --overwrite "$DIR/roundtrip.img"
cmp -n $((64 << 20)) "$DIR/disk.img" "$DIR/roundtrip.img"
echo "round trip OK: $DIR/disk.img came back identical from $ZEROFS_UBLK_BUCKET"
"$BIN" inspect "${KEY[@]}"
