# Power-cut test, second boot (appended to the ledger of the first boot's
# FSYNCED lines by scripts/vm-power-cut.sh): the same disks, `add` again —
# the journal volume without --force (its claim names this disk's journal
# directory and an earlier boot), the default one with --force (another
# boot's claim) — then every block whose fsync returned must read back.
# (scripts/vm/guest-power-cut-common.sh comes first: environment, fail,
# the virtio disks.)
mkdir -p /disk /ssd
mount -t ext4 /dev/vda /disk || fail "mount /dev/vda after the power cut"
mount -t ext4 /dev/vdb /ssd || fail "mount /dev/vdb after the power cut"
$T/s3s-fs --host 127.0.0.1 --port 9000 --access-key test --secret-key testsecret /disk/s3 \
  > /tmp/s3s.log 2>&1 &
sleep 2
D1=$($Z add --bucket s3://vols/journal --endpoint http://127.0.0.1:9000 --key-file /disk/key \
  --name journal --journal-dir /ssd/journal) || fail "add --journal-dir after the power cut (no --force)"
D0=$($Z add --bucket file:///disk/bucket-default --key-file /disk/key --name default --force) ||
  fail "add default after the power cut"
grep -h "replayed\|journal of epoch\|taking over" "$ZEROFS_UBLK_RUN_DIR"/*.log || true
grep -q "replayed [1-9]" "$ZEROFS_UBLK_RUN_DIR/journal.log" ||
  fail "the journal volume replayed nothing: its bucket was not behind, nothing tested"
echo "$LEDGER" > /tmp/ledger
n=0
while read -r tag d block sum; do # (not in a pipeline: fail must end the script)
  [ "$tag" = FSYNCED ] || continue
  dev=$D0; [ "$d" = 1 ] && dev=$D1
  got=$(dd if="$dev" bs=4096 skip="$block" count=1 2>/dev/null | md5sum | cut -c1-32)
  [ "$got" = "$sum" ] || fail "volume $d block $block: fsynced before the power cut, now differs"
  n=$((n + 1))
done < /tmp/ledger
[ "$n" -gt 0 ] || fail "an empty ledger"
echo "all $n fsynced blocks intact (default mode and --journal-dir)"
$Z del -n "${D0#/dev/ublkb}" || fail "del default"
$Z del -n "${D1#/dev/ublkb}" || fail "del journal"
