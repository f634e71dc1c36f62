#!/usr/bin/env bash
# ublk frontend benchmark: fio 4k random read/write, 1M sequential
# read/write, 4k random writes one at a time, and 4k/8k writes each
# followed by fsync, in one QEMU TCG guest run, against zerofs-ublk (file:// bucket
# on tmpfs, warm cache) and `rublk add loop` on a tmpfs file of the same
# size. TCG numbers only mean something as ratios within one run.
# Usage: scripts/bench-vm.sh   (BENCH_SIZE_MB, BENCH_RUNTIME, BENCH_QUEUES)
#
# `scripts/bench-vm.sh pgbench`: PostgreSQL 15 (Debian root in the guest)
# on ext4 over rublk loop (tmpfs), zerofs-ublk (default mode) and
# zerofs-ublk --journal-dir (a virtio disk), the buckets on an S3 server
# behind BENCH_STORE_DELAY_MS (default 20) per request: pgbench read-write
# with synchronous_commit on and off, and select-only; TPS, latency and
# the servers' peak RSS (BENCH_PG_SCALE, BENCH_PG_CLIENTS, BENCH_RUNTIME;
# BENCH_PG_FS=zfs for a ZFS pool on each device instead of ext4).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh
RUBLK="$VM_CACHE/rublk/bin/rublk"
if [ ! -x "$RUBLK" ]; then
  echo "== building rublk (the peer, from crates.io)"
  cargo install --locked --quiet rublk --no-default-features --root "$VM_CACHE/rublk"
fi
cargo build --release --locked --quiet
vm_kernel
vm_base_initramfs
if [ "${1:-}" = pgbench ]; then
  vm_s3s
  cargo build --release --locked --quiet --example fault_proxy
  vm_debian_root
  work=$(mktemp -d "${TMPDIR:-/tmp}/zerofs-ublk-pgbench.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  qemu-img create -q -f raw "$work/ssd.img" 2G
  { for v in BENCH_PG_SCALE BENCH_PG_CLIENTS BENCH_RUNTIME BENCH_STORE_DELAY_MS BENCH_PG_FS; do
      [ -n "${!v:-}" ] && echo "export $v=${!v}"
    done
    cat scripts/vm/guest-bench-pgbench.sh; } > "$work/guest.sh"
  VM_DISKS="$work/ssd.img" VM_MEM=6G vm_run "$work/guest.sh" target/release/zerofs-ublk \
    "$RUBLK" "$S3S" target/release/examples/fault_proxy > "$work/console.log" || true
  grep -a -E "^(pgbench scale|FAIL|/dev/ublkb|  )" "$work/console.log" | tr -d '\r' || true
  python3 - "$VM_LOG" <<'PY'
import sys
tps, mem = {}, {}
for line in open(sys.argv[1], errors="replace"):
    f = line.split()
    if len(f) == 5 and f[0] == "PGBENCH":
        tps[(f[1], f[2])] = (float(f[3]), float(f[4]))
    elif len(f) == 3 and f[0] == "PGBENCH-MEM":
        mem[f[1]] = int(f[2])
if not tps:
    sys.exit("no pgbench results in the console log " + sys.argv[1])
targets = ["rublk-loop", "rublk-loop-disk", "zerofs-default", "zerofs-journal"]
# Ratios against the local disk the journal shares (rublk loop on a file
# on the same virtio disk).
print("| job | " + " | ".join(targets) + " | default / loop-disk | journal / loop-disk |")
print("|---|" + "---|" * (len(targets) + 2))
for job in ["rw-sync-on", "rw-sync-off", "select-only"]:
    cells = [f"{tps[(t, job)][0]:,.0f} TPS ({tps[(t, job)][1]:.1f} ms)" if (t, job) in tps else "n/a" for t in targets]
    base = tps.get(("rublk-loop-disk", job), (0,))[0]
    ratios = [f"{tps[(t, job)][0] / base:.2f}" if base and (t, job) in tps else "n/a" for t in targets[2:]]
    print(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
print("| server peak RSS | " + " | ".join(f"{mem[t] / 1024:.0f} MiB" if t in mem else "n/a" for t in targets) + " | | |")
PY
  exit 0
fi
guest=$(mktemp)
{ echo "BENCH_SIZE_MB=${BENCH_SIZE_MB:-512} BENCH_RUNTIME=${BENCH_RUNTIME:-10} BENCH_QUEUES=${BENCH_QUEUES:-1}"
  echo "export BENCH_SIZE_MB BENCH_RUNTIME BENCH_QUEUES"
  cat scripts/vm/guest-bench.sh; } > "$guest"
VM_MEM=6G vm_run "$guest" target/release/zerofs-ublk "$RUBLK" > /dev/null || true
python3 - "$VM_LOG" <<'PY'
import sys
rows = {}
mem = ""
for line in open(sys.argv[1], errors="replace"):
    line = line.strip()
    if line.startswith("BENCH-MEM"):
        mem = line.split(None, 2)[2]
    if not line.startswith("BENCH "):
        continue
    _, target, job, terse = line.split(" ", 3)
    f = terse.split(";")
    # terse v3: read bw KiB/s = f[6], read iops = f[7]; write bw = f[47], iops = f[48]
    rbw, riops, wbw, wiops = float(f[6]), float(f[7]), float(f[47]), float(f[48])
    if "read" in job and "write" not in job:
        rows.setdefault(job, {})[target] = (riops, rbw / 1024)
    else:
        rows.setdefault(job, {})[target] = (wiops, wbw / 1024)
if not rows:
    sys.exit("no benchmark results in the console log " + sys.argv[1])
print("| job | zerofs-ublk | rublk loop | ratio |")
print("|---|---|---|---|")
for job in ["fill", "randread-4k", "randwrite-4k", "write-1M", "read-1M", "randwrite-4k-qd1", "fsync-4k", "fsync-8k"]:
    r = rows.get(job, {})
    z, l = r.get("zerofs-ublk"), r.get("rublk-loop")
    per_io = "4k" in job or "8k" in job
    unit = (lambda v: f"{v[0]:,.0f} IOPS") if per_io else (lambda v: f"{v[1]:,.1f} MiB/s")
    key = 0 if per_io else 1
    ratio = f"{z[key] / l[key]:.2f}" if z and l and l[key] else "n/a"
    print(f"| {job} | {unit(z) if z else 'n/a'} | {unit(l) if l else 'n/a'} | {ratio} |")
if mem:
    print(f"\nzerofs-ublk server peak RSS: {mem}")
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("BENCH-ENGINE"):
        _, what, ms, _ = line.split()
        print(f"engine: {what}: {ms} ms ({128 * 1000 / max(int(ms), 1):.1f} MiB/s)")
PY
