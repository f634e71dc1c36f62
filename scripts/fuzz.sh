#!/usr/bin/env bash
# Fuzz every decoder of bytes that come from the bucket or a disk
# (fuzz/fuzz_targets: superblock, segment trailer and table, checkpoint,
# claim/seal records, journal segments, frames — which is also what the
# SSD cache tier stores). Needs a nightly toolchain and cargo-fuzz
# (installed here from crates.io if missing).
#
#   scripts/fuzz.sh smoke          each target for 20 s (CI)
#   scripts/fuzz.sh runs N [T…]    each target (or T…) for N executions
#
# A crash leaves its input under fuzz/artifacts/<target>/ and fails the
# run; turn it into a regression test before fixing it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-smoke}
TARGETS=(superblock segment checkpoint record journal frame)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "error: fuzzing needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (crates.io)"
  cargo install --locked --quiet cargo-fuzz
fi

case "$MODE" in
  smoke) ARGS=(-max_total_time=20) ;;
  runs) ARGS=("-runs=${2:?usage: $0 runs N [target…]}"); shift 2; [ $# -eq 0 ] || TARGETS=("$@") ;;
  *) echo "usage: $0 smoke | runs N [target…]" >&2; exit 2 ;;
esac

echo "== building the fuzz targets (nightly, AddressSanitizer)"
cargo +nightly fuzz build -O --debug-assertions
for t in "${TARGETS[@]}"; do
  echo "== fuzz $t ${ARGS[*]}"
  mkdir -p "fuzz/corpus/$t"
  start=$(date +%s)
  set +e
  cargo +nightly fuzz run -O --debug-assertions "$t" "fuzz/corpus/$t" -- \
    "${ARGS[@]}" -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 > "fuzz/$t.log" 2>&1
  status=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)|==[0-9]+==|SUMMARY|panicked|Test unit written' "fuzz/$t.log" || true
  echo "== $t: exit $status after $(( $(date +%s) - start )) s"
  [ "$status" = 0 ] || { echo "error: fuzz target $t failed (log: fuzz/$t.log; input in fuzz/artifacts/$t/)" >&2; exit 1; }
done
echo "== fuzzing passed"
