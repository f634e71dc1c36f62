#!/usr/bin/env bash
# ublk frontend benchmark: fio 4k random read/write, 1M sequential
# read/write, 4k random writes one at a time, and 4k/8k writes each
# followed by fsync, in one QEMU TCG guest run, against zerofs-ublk (file:// bucket
# on tmpfs, warm cache) and `rublk add loop` on a tmpfs file of the same
# size. TCG numbers only mean something as ratios within one run.
# Usage: scripts/bench-vm.sh   (BENCH_SIZE_MB, BENCH_RUNTIME, BENCH_QUEUES)
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
