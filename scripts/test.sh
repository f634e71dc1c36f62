#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs
# (Debian packages, the S3 test server from PyPI, Rust crates), then runs
# lint, unit, conformance (memory, local dir, real S3 server), model
# checker, tamper, key, fencing and CLI tests, then the ublk VM suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if [ -f scripts/apt-packages.txt ]; then
  while read -r pkg; do
    [ -n "$pkg" ] && ! dpkg -s "$pkg" >/dev/null 2>&1 && need_apt+=("$pkg")
  done < scripts/apt-packages.txt
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v moto_server >/dev/null; then
  echo "== installing the S3-compatible test server (moto)"
  python3 -m pip install --quiet 'moto[server]==5.*'
fi
# pyenv shims may not be on PATH for non-interactive shells
if ! command -v moto_server >/dev/null; then
  export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi

echo "== format and lint"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

echo "== tests"
cargo test --locked -- --skip random_crashes_preserve_the_durability_contract
echo "== model checker (crash points)"
cargo test --locked --test model -- --nocapture

echo "== engine benchmark smoke (not a measurement; see BENCHMARKS.md)"
cargo run --release --locked --quiet -- bench --quick

if [ -x scripts/vm-test.sh ]; then
  echo "== ublk frontend in a QEMU guest"
  scripts/vm-test.sh
fi
echo "== all tests passed"
