# Host dependencies of the two README commands: a preflight that names
# every missing tool or library on a line of its own, and an idempotent
# installer (Debian: apt; the S3 test server: a private Python venv).
# Sourced by scripts/quickstart.sh (profile "build") and scripts/test.sh
# (profile "test").
#
#   deps_ensure build|test   check; install what is missing (as root);
#                            stop with the exact command to run otherwise
#
# Each check is "what | Debian package | test command". The package list
# printed and installed is derived from the failed checks, so nothing is
# installed that is already there.

DEPS_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/zerofs-ublk"
MOTO_VENV="$DEPS_CACHE/venv"
MOTO_SPEC='moto[server]==5.*'

deps__have_libclang() {
  # bindgen loads libclang.so / libclang-N.so; libclang-cpp (pulled in by other
  # packages) matches a loose glob but is not it.
  local f
  for f in ${LIBCLANG_PATH:+"$LIBCLANG_PATH"/libclang*.so*} /usr/lib/llvm-*/lib/libclang.so \
           /usr/lib/llvm-*/lib/libclang-*.so* /usr/lib/*/libclang.so /usr/lib64/libclang.so; do
    case "${f##*/}" in libclang-cpp*) continue ;; esac
    [ -e "$f" ] && return 0
  done
  return 1
}
deps__static_busybox() {
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}
deps__python_venv() {
  command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1
}

# what|package|check
deps__checks() {
  cat <<'EOF'
cargo (Rust toolchain; install with rustup, https://rustup.rs)||command -v cargo
C compiler cc (zstd, jemalloc, aws-lc build from C source)|gcc|command -v cc
make (jemalloc's build)|make|command -v make
libclang (bindgen, for libublk-rs-sys)|libclang-dev|deps__have_libclang
CA certificates (crates.io, PyPI over HTTPS)|ca-certificates|test -s /etc/ssl/certs/ca-certificates.crt
EOF
  [ "$1" = test ] || return 0
  cat <<'EOF'
python3 with venv (runs the S3 test server, moto)|python3-venv|deps__python_venv
qemu-system-x86_64 (boots the guest kernel for the ublk suite)|qemu-system-x86|command -v qemu-system-x86_64
a static busybox (the guest's userland)|busybox-static|deps__static_busybox
fio (the guest's I/O verifier)|fio|command -v fio
cpio (packs the guest's initramfs)|cpio|command -v cpio
xz (unpacks the kernel's modules)|xz-utils|command -v xz
mke2fs/e2fsck (ext4 in the guest)|e2fsprogs|test -x /sbin/mke2fs -a -x /sbin/e2fsck
blkdiscard (discard tests in the guest)|util-linux|command -v blkdiscard
qemu-img (the power-cut test's disk images)|qemu-utils|command -v qemu-img
pgrep (the power-cut test stops QEMU)|procps|command -v pgrep
apt-get download (fetches Debian's guest kernel)|apt|command -v apt-get
debootstrap (builds the Debian root of the PostgreSQL guest)|debootstrap|command -v debootstrap
EOF
}

# Prints the missing checks, one per line, and sets DEPS_MISSING_PKGS.
deps_preflight() {
  local profile=$1 what pkg check missing=0
  DEPS_MISSING_PKGS=()
  DEPS_MISSING_OTHER=()
  while IFS='|' read -r what pkg check; do
    [ -n "$what" ] || continue
    if ! eval "$check" >/dev/null 2>&1; then
      echo "missing: $what${pkg:+ [Debian: $pkg]}"
      missing=1
      if [ -n "$pkg" ]; then DEPS_MISSING_PKGS+=("$pkg"); else DEPS_MISSING_OTHER+=("$what"); fi
    fi
  done < <(deps__checks "$profile")
  return $missing
}

# Where bookworm's qemu-system-x86 (7.2) would conflict with a newer
# qemu-utils already installed (the cloud image ships 10.0 from
# bookworm-backports: "qemu-utils : Breaks: qemu-system-common (< 1:8.0)"),
# take QEMU from the same suite as the installed qemu-utils.
deps__qemu_suite() {
  local v codename
  v=$(dpkg-query -W -f='${Status} ${Version}' qemu-utils 2>/dev/null | awk '/install ok installed/{print $4}')
  [ -n "$v" ] || return 0
  dpkg --compare-versions "$v" ge 1:8 || return 0
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  case "$v" in *bpo*) echo "$codename-backports" ;; esac
}

deps__backports_source() {
  local suite=$1
  grep -rqsE "^[^#]*[[:space:]]$suite([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  echo "== adding the Debian suite $suite (QEMU to match the installed qemu-utils)"
  cat > /etc/apt/sources.list.d/zerofs-ublk-backports.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  DEPS_APT_UPDATED=
}

# apt-get with its output in a log; on failure one line: the first error.
deps__apt() {
  local log="$DEPS_CACHE/apt.log" rc=0
  mkdir -p "$DEPS_CACHE"
  DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    local why
    why=$(grep -m1 -E '^(E:| [^ ].*: (Depends|Breaks|Conflicts))' "$log" || tail -n1 "$log")
    echo "error: apt-get $* failed: ${why# } (full output: $log)" >&2
    return 1
  fi
}

deps__install_apt() {
  local plain=() qemu=0 suite
  suite=$(deps__qemu_suite)
  for p in "$@"; do
    if [ "$p" = qemu-system-x86 ] && [ -n "$suite" ]; then qemu=1; else plain+=("$p"); fi
  done
  [ $qemu = 0 ] || deps__backports_source "$suite"
  if [ -z "${DEPS_APT_UPDATED:-}" ]; then
    echo "== apt-get update"
    deps__apt update || return 1
    DEPS_APT_UPDATED=1
  fi
  if [ ${#plain[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${plain[*]}"
    deps__apt install -y --no-install-recommends "${plain[@]}" || return 1
  fi
  if [ $qemu = 1 ]; then
    # -t: QEMU's own dependencies (qemu-system-common, -data, seabios) must
    # come from that suite too; a separate transaction keeps it to them.
    echo "== installing Debian packages from $suite: qemu-system-x86"
    deps__apt install -y --no-install-recommends -t "$suite" qemu-system-x86 || return 1
  fi
}

deps_ensure() {
  local profile=$1
  echo "== preflight ($profile): checking host tools and libraries"
  if deps_preflight "$profile"; then
    echo "== preflight: everything is there"
  else
    if [ ${#DEPS_MISSING_OTHER[@]} -gt 0 ]; then
      echo "error: cannot install ${DEPS_MISSING_OTHER[*]} from here; install it, then rerun" >&2
      return 1
    fi
    if [ "$(id -u)" != 0 ]; then
      echo "error: missing Debian packages and not root; run: sudo apt-get install -y --no-install-recommends ${DEPS_MISSING_PKGS[*]}" >&2
      return 1
    fi
    if ! command -v apt-get >/dev/null; then
      echo "error: no apt-get: install the equivalents of ${DEPS_MISSING_PKGS[*]} with your distribution's tools (README, 'Other distributions')" >&2
      return 1
    fi
    deps__install_apt "${DEPS_MISSING_PKGS[@]}" || return 1
    if ! deps_preflight "$profile" >/dev/null; then
      deps_preflight "$profile" >&2 || true
      echo "error: still missing after installing: ${DEPS_MISSING_PKGS[*]}" >&2
      return 1
    fi
  fi
  [ "$profile" = test ] || return 0
  deps__moto
}

# The S3-compatible test server, in a venv of its own (Debian's python3 is
# "externally managed": pip refuses to install into it).
deps__moto() {
  if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    echo "== installing the S3-compatible test server ($MOTO_SPEC, PyPI) into $MOTO_VENV"
    mkdir -p "$DEPS_CACHE"
    python3 -m venv "$MOTO_VENV" || { echo "error: python3 -m venv $MOTO_VENV failed" >&2; return 1; }
    "$MOTO_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$MOTO_SPEC" ||
      { echo "error: pip could not install $MOTO_SPEC from PyPI" >&2; return 1; }
  fi
  export PATH="$MOTO_VENV/bin:$PATH"
}
