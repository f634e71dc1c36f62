#!/usr/bin/env bash
# Prove the two README commands on a machine where nothing was installed by
# hand: build a clean Debian bookworm root with debootstrap (minbase: no
# python3, gcc, make, git or CA certificates), give it what the project's
# cloud image has and the scripts must cope with (qemu-utils 10.0 from
# bookworm-backports, no backports source; libclang-cpp14, which is not the
# libclang bindgen needs), bind-mount the Rust toolchain,
# copy the repository (its committed state, HEAD: no target/), and run
# scripts/quickstart.sh, then scripts/test.sh, inside it with chroot.
# Prints each command's wall time; exits non-zero if either fails.
#
#   scripts/fresh-check.sh [quickstart|test|both]    (default: both)
#
# Needs root and debootstrap (installed here if missing). The pristine base
# root is cached (ZEROFS_UBLK_FRESH_DIR, default /var/tmp/zerofs-ublk-fresh)
# and copied for every run, so each run starts from the same clean state.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-both}
DIR=${ZEROFS_UBLK_FRESH_DIR:-/var/tmp/zerofs-ublk-fresh}
MIRROR=http://deb.debian.org/debian
[ "$(id -u)" = 0 ] || { echo "error: fresh-check needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_DIR=${CARGO_HOME:-$HOME/.cargo}
[ -x "$CARGO_DIR/bin/cargo" ] || { echo "error: no Rust toolchain at $CARGO_DIR (rustup)" >&2; exit 1; }

if ! command -v debootstrap >/dev/null; then
  echo "== installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

BASE="$DIR/base"
if [ ! -f "$BASE/.complete" ]; then
  rm -rf "$BASE"; mkdir -p "$BASE"
  echo "== debootstrap bookworm (minbase) into $BASE"
  debootstrap --variant=minbase bookworm "$BASE" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 ||
    { echo "error: debootstrap failed (log: $DIR/debootstrap.log)" >&2; exit 1; }
  cat > "$BASE/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # What the image ships: qemu-utils from bookworm-backports, with the
  # backports source itself gone, and libclang-cpp14 (not libclang).
  cp /etc/resolv.conf "$BASE/etc/resolv.conf"
  echo "deb $MIRROR bookworm-backports main" > "$BASE/etc/apt/sources.list.d/image-bpo.list"
  chroot "$BASE" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils libclang-cpp14' \
    > "$DIR/image-qemu.log" 2>&1 || { echo "error: could not install qemu-utils in the base root (log: $DIR/image-qemu.log)" >&2; exit 1; }
  rm "$BASE/etc/apt/sources.list.d/image-bpo.list"
  # The machine's network reaches the registries through a TLS proxy whose
  # CA the image trusts: give the root the same trust (as a local CA, so
  # the ca-certificates package the scripts install keeps it).
  mkdir -p "$BASE/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$BASE/usr/local/share/ca-certificates/image-trust.crt"
  chroot "$BASE" sh -c 'apt-get update -qq && apt-get clean' >/dev/null 2>&1
  touch "$BASE/.complete"
fi

ROOT="$DIR/run"
MOUNTS=()
cleanup() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { mkdir -p "$2"; mount --rbind "$1" "$2"; mount --make-rslave "$2"; MOUNTS+=("$2"); }

echo "== fresh root: copying the base to $ROOT"
# A run that was killed may have left its mounts (the host's /dev and
# toolchain among them): never delete through them.
{ grep -o " $ROOT/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
if grep -q " $ROOT/" /proc/mounts; then
  echo "error: $ROOT still has mounts; unmount them first" >&2; exit 1
fi
rm -rf --one-file-system "$ROOT"
cp -a "$BASE" "$ROOT"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"; MOUNTS+=("$ROOT/proc")
bind /sys "$ROOT/sys"
bind /dev "$ROOT/dev"
bind "$RUSTUP_DIR" "$ROOT/root/.rustup"
bind "$CARGO_DIR" "$ROOT/root/.cargo"
mkdir -p "$ROOT/src/zerofs-ublk"
git archive HEAD | tar -xf - -C "$ROOT/src/zerofs-ublk"

# The image's environment names its CA bundle for tools with their own.
CA_ENV=()
for v in SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE PIP_CERT REQUESTS_CA_BUNDLE GIT_SSL_CAINFO; do
  [ -n "${!v:-}" ] && CA_ENV+=("$v=${!v}")
done
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 "${CA_ENV[@]}" \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -c "cd /src/zerofs-ublk && $1"
}
run_timed() {
  local name=$1 cmd=$2 start rc=0
  echo "== [$name] $cmd (in the fresh root)"
  start=$(date +%s)
  in_root "$cmd" 2>&1 | tee "$DIR/$name.log" || rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - start ))
  echo "== [$name] exit $rc after $((secs / 60)) min $((secs % 60)) s (log: $DIR/$name.log)"
  echo "$name rc=$rc seconds=$secs" >> "$DIR/times"
  return $rc
}

: > "$DIR/times"
case "$WHAT" in
  quickstart) run_timed quickstart scripts/quickstart.sh || exit 1 ;;
  test) run_timed test scripts/test.sh || exit 1 ;;
  both) { run_timed quickstart scripts/quickstart.sh && run_timed test scripts/test.sh; } || exit 1 ;;
  *) echo "usage: $0 [quickstart|test|both]" >&2; exit 2 ;;
esac
echo "== fresh check passed: $(tr '\n' ' ' < "$DIR/times")"
