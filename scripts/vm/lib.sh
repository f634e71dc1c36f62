# Host-side helpers for running zerofs-ublk inside a QEMU TCG guest booting
# Debian's own cloud kernel (6.12, or the newest: vm_kernel), which ships
# ublk_drv as a module.
# Sourced by scripts/vm-test.sh and scripts/bench-vm.sh.
set -euo pipefail

VM_CACHE="${ZEROFS_UBLK_VM_CACHE:-$HOME/.cache/zerofs-ublk-vm}"
VM_TIMEOUT="${ZEROFS_UBLK_VM_TIMEOUT:-1500}"
mkdir -p "$VM_CACHE"

# Staging trees of runs that were killed before cleaning up (older than any
# run can last), and those of older versions of these scripts (mktemp's
# default name, recognised by their contents).
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'zerofs-ublk-vm.*' -mmin +120 -exec rm -rf {} + 2>/dev/null || true
for d in "${TMPDIR:-/tmp}"/tmp.*; do
  [ -f "$d/initrd" ] && [ -f "$d/tests/main.sh" ] && [ -f "$d/init" ] && rm -rf "$d"
done

# The guest kernel, from Debian's archive, unpacked (never installed on
# the host). ZEROFS_UBLK_VM_KERNEL picks it:
#   stable  Debian 12's 6.12 (linux-image-6.12-cloud-amd64, through the
#           host's apt): what Debian stable users run; the default.
#   newest  the newest Debian cloud kernel: linux-image-cloud-amd64 from
#           trixie-backports (7.x), through a private apt directory under
#           $VM_CACHE (the host's sources are not touched).
# The meta package is resolved each time (security updates rename the
# versioned package); its kernel and module packages are cached by name.
# Since trixie the image package is split into linux-binary-* (vmlinuz
# under /usr/lib/modules) and linux-modules-*. Sets KERNEL and KMODDIR.
vm_kernel() {
  local apt=() meta=linux-image-6.12-cloud-amd64 ver=
  if [ "${ZEROFS_UBLK_VM_KERNEL:-stable}" = newest ]; then
    local d="$VM_CACHE/apt-newest"
    mkdir -p "$d/lists/partial" "$d/archives/partial"
    printf '%s\n' "deb http://deb.debian.org/debian trixie main" \
      "deb http://deb.debian.org/debian trixie-backports main" > "$d/sources.list"
    apt=(-o "Dir::Etc::sourcelist=$d/sources.list" -o Dir::Etc::sourceparts=/dev/null
         -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d" -o Debug::NoLocking=1)
    # Once a day at most.
    if [ -z "$(find "$d/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
      apt-get -q "${apt[@]}" update > "$d/update.log" 2>&1 ||
        { echo "error: apt-get update for trixie-backports failed (log: $d/update.log)" >&2; return 1; }
    fi
    meta=linux-image-cloud-amd64
    ver=$(apt-cache "${apt[@]}" madison "$meta" | awk '/trixie-backports/ {print $3; exit}')
    [ -n "$ver" ] || { echo "error: no $meta in trixie-backports" >&2; return 1; }
    ver="=$ver"
  fi
  local pkg
  pkg=$(apt-cache "${apt[@]}" depends "$meta$ver" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
  if [ -z "$pkg" ] && [ ${#apt[@]} = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "cannot resolve $meta$ver (apt-get update?)" >&2; return 1; }
  if [ ! -d "$VM_CACHE/$pkg" ]; then
    local tmp; tmp=$(mktemp -d "$VM_CACHE/dl.XXXX")
    local all; all="$pkg $(apt-cache "${apt[@]}" depends "$pkg" | awk '/Depends: linux-(binary|modules)-/ {print $2}')"
    if ! (cd "$tmp" && apt-get -q "${apt[@]}" download $all > download.log 2>&1 &&
          for deb in ./*.deb; do dpkg-deb -x "$deb" root; done); then
      echo "error: downloading $all failed (log: $tmp/download.log)" >&2; return 1
    fi
    mv "$tmp/root" "$VM_CACHE/$pkg" && rm -rf "$tmp"
  fi
  KERNEL=$( (ls "$VM_CACHE/$pkg"/boot/vmlinuz-* "$VM_CACHE/$pkg"/usr/lib/modules/*/vmlinuz 2>/dev/null || true) | head -1)
  KMODDIR=$( (ls -d "$VM_CACHE/$pkg"/lib/modules/* "$VM_CACHE/$pkg"/usr/lib/modules/* 2>/dev/null || true) | head -1)
  [ -n "$KERNEL" ] && [ -n "$KMODDIR" ] || { echo "error: no kernel or modules in $VM_CACHE/$pkg" >&2; return 1; }
}

# The S3-compatible server the guest tests run against (built once).
S3S_VERSION=0.14.1
S3S="$VM_CACHE/s3s-$S3S_VERSION/bin/s3s-fs"
vm_s3s() {
  if [ ! -x "$S3S" ]; then
    echo "== building s3s-fs $S3S_VERSION (S3-compatible server for the guest)"
    cargo install --locked --quiet "s3s-fs@$S3S_VERSION" --features binary --root "$VM_CACHE/s3s-$S3S_VERSION"
  fi
}

# Copy a dynamic executable and the shared libraries it needs into $1.
add_bin() {
  local root=$1 bin=$2 dest=${3:-/usr/local/bin}
  mkdir -p "$root$dest"
  cp -L "$bin" "$root$dest/"
  ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$root$lib" ] || cp -L --parents "$lib" "$root"
  done
}

# The base archive: busybox, the ublk module, filesystem tools, fio.
# Cached by kernel version and the script's own checksum.
vm_base_initramfs() {
  local extra=("$@")
  local key; key=$( (basename "$KMODDIR"; cat "${BASH_SOURCE[0]}"; printf '%s\n' "${extra[@]}") | sha256sum | cut -c1-16)
  BASE_CPIO="$VM_CACHE/base-$key.cpio"
  [ -f "$BASE_CPIO" ] && return 0
  local root; root=$(mktemp -d)
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,mnt,etc,lib/modules,usr/local/bin}
  cp /bin/busybox "$root/bin/busybox"
  xz -dc "$KMODDIR/kernel/drivers/block/ublk_drv.ko.xz" > "$root/lib/modules/ublk_drv.ko"
  # A virtio disk for the tests that need storage outliving the VM.
  xz -dc "$KMODDIR/kernel/drivers/block/virtio_blk.ko.xz" > "$root/lib/modules/virtio_blk.ko"
  for b in /sbin/mke2fs /sbin/e2fsck /usr/bin/fio /sbin/blkdiscard /usr/bin/blkdiscard "${extra[@]}"; do
    [ -e "$b" ] && add_bin "$root" "$b"
  done
  ln -sf mke2fs "$root/usr/local/bin/mkfs.ext4"
  ln -sf e2fsck "$root/usr/local/bin/fsck.ext4"
  touch "$root/etc/mtab"
  # TLS clients want the system's CA store even for plain-http endpoints.
  mkdir -p "$root/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" 2>/dev/null || true
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$BASE_CPIO.tmp" || {
    echo "error: cannot write $BASE_CPIO.tmp (disk full? $(df -h --output=avail "$VM_CACHE" | tail -1) free)" >&2
    rm -rf "$root" "$BASE_CPIO.tmp"; return 1; }
  mv "$BASE_CPIO.tmp" "$BASE_CPIO"
  rm -rf "$root"
}

# Boot with the base archive plus a per-run archive holding /init, the
# project binary and the guest script; print the console; succeed only if
# the guest printed its success marker.
vm_run() {
  local guest_script=$1 binary=$2; shift 2
  # Each run stages ~400 MB (binaries, the initrd); only its console log
  # is kept, under $VM_CACHE/logs (the 20 newest), so repeated runs do not
  # fill the disk (they did: CI failed with ENOSPC writing the initrd).
  local run; run=$(mktemp -d "${TMPDIR:-/tmp}/zerofs-ublk-vm.XXXXXX")
  local here; here=$(dirname "${BASH_SOURCE[0]}")
  mkdir -p "$run/usr/local/bin" "$run/tests"
  # VM_ROOT (vm_debian_root): the guest switches to that Debian root,
  # attached first (/dev/vda) as a throwaway overlay; this run's binaries
  # are copied into its /usr/local/bin (its own libraries serve them).
  local bindir=/usr/local/bin disk=() d
  # VM_ROOT_SNAPSHOT=0: the root image itself is written (a copy the
  # caller keeps across boots). VM_INIT=systemd: systemd is PID 1 and the
  # guest script runs as a unit once the system is up.
  if [ -n "${VM_ROOT:-}" ]; then
    bindir=/payload/bin
    cp "$here/guest-init-root.sh" "$run/init"
    cp "$here/guest-root-pid1.sh" "$run/tests/root-pid1.sh"
    if [ "${VM_INIT:-}" = systemd ]; then
      touch "$run/tests/systemd"
      cp "$here/guest-systemd-test.service" "$here/guest-systemd-run.sh" "$run/tests/"
    fi
    local snap=,snapshot=on
    [ "${VM_ROOT_SNAPSHOT:-1}" = 0 ] && snap=
    disk+=(-drive "file=$VM_ROOT,if=virtio,format=raw$snap")
  else
    cp "$here/guest-init.sh" "$run/init"
  fi
  add_bin "$run" "$binary" "$bindir"
  for f in "$@"; do add_bin "$run" "$f" "$bindir"; done
  cp "$guest_script" "$run/tests/main.sh"
  chmod +x "$run/init"
  if ! { (cd "$run" && find . | cpio -o -H newc --quiet) > "$run.cpio" &&
          cat "$BASE_CPIO" "$run.cpio" > "$run/initrd"; }; then
    echo "error: cannot write the guest's initrd under $run (disk full? $(df -h --output=avail "$run" | tail -1) free)" >&2
    rm -rf "$run" "$run.cpio"; return 1
  fi
  rm -f "$run.cpio"
  mkdir -p "$VM_CACHE/logs"
  local log; log="$VM_CACHE/logs/$(date +%Y%m%d-%H%M%S)-$(basename "$run").log"
  # VM_DISKS: raw images attached as /dev/vda, /dev/vdb, … (virtio; after
  # the root with VM_ROOT), outliving the VM.
  for d in ${VM_DISKS:-}; do disk+=(-drive "file=$d,if=virtio,format=raw"); done
  set +e
  timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -m "${VM_MEM:-2G}" -smp 2 \
    -nographic -no-reboot -nic none "${disk[@]}" \
    -kernel "$KERNEL" -initrd "$run/initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" < /dev/null > "$log" 2>&1 &
  local qpid=$!
  # VM_KILL_AT="PATTERN COUNT": a power cut — QEMU is killed (no shutdown,
  # no sync in the guest) once the console printed COUNT lines starting
  # with PATTERN.
  local killed=0
  while kill -0 "$qpid" 2>/dev/null; do
    sleep 1
    if [ -n "${VM_KILL_AT:-}" ] &&
       [ "$(grep -c "^${VM_KILL_AT% *}" "$log")" -ge "${VM_KILL_AT##* }" ]; then
      local q; q=$(pgrep -P "$qpid" qemu-system-x86 || true)
      [ -n "$q" ] && kill -KILL $q 2>/dev/null
      kill -KILL "$qpid" 2>/dev/null
      # Gone for good before anyone opens its disk images again.
      while [ -n "$q" ] && kill -0 $q 2>/dev/null; do sleep 0.1; done
      killed=1
    fi
  done
  wait "$qpid"
  local qrc=$?
  set -e
  cat "$log"
  rm -rf "$run"
  ls -1t "$VM_CACHE/logs"/*.log 2>/dev/null | tail -n +21 | xargs -r rm -f
  VM_LOG="$log"
  if [ "$killed" = 1 ]; then
    echo "== power cut: QEMU killed after ${VM_KILL_AT##* } \"${VM_KILL_AT% *}\" lines"
    return 0
  fi
  if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "VM timed out after $VM_TIMEOUT s" >&2; return 1
  fi
  grep -q "^ZEROFS-VM-RESULT: PASS" "$log"
}

# What every guest on the Debian root needs first: the release build, the
# kernel, the base archive, the root; and a work directory ($work, named
# after $1) removed when the calling script exits.
vm_prepare_root() {
  echo "== building zerofs-ublk (release)"
  cargo build --release --locked --quiet
  vm_kernel
  vm_base_initramfs
  vm_debian_root
  work=$(mktemp -d "${TMPDIR:-/tmp}/zerofs-ublk-$1.XXXXXX")
  trap 'rm -rf "$work"' EXIT
}

# A Debian bookworm root for the guests that need a real userland
# (PostgreSQL, systemd, ZFS): debootstrap's minbase plus the packages
# below, OpenZFS (vm_zfs_modules), the guest kernel's modules, packed as an
# ext4 image (mkfs.ext4 -d, no loop device). Cached by kernel version and
# these functions' text; built once per machine (~2 min and ~150 MB
# downloaded, plus the OpenZFS build the first time). The guest boots it
# with a throwaway overlay (QEMU snapshot=on): every boot starts from the
# same root. Sets VM_ROOT.
# ifupdown: Debian's network setup (networking.service comes after local
# file systems, network-online.target after it), for the unit's ordering.
VM_ROOT_PACKAGES="systemd systemd-sysv udev dbus kmod iproute2 ifupdown procps psmisc e2fsprogs util-linux postgresql-15 postgresql-client-15"
# The suites the root installs from: bookworm and its updates, and
# bookworm-backports (contrib) for OpenZFS 2.3 — bookworm's own 2.1 does
# not build for 6.12.
vm_debian_sources() {
  local m=http://deb.debian.org/debian
  printf '%s\n' "deb $m bookworm main contrib" "deb $m bookworm-updates main contrib" \
    "deb http://deb.debian.org/debian-security bookworm-security main contrib" \
    "deb $m bookworm-backports main contrib" > "$1/etc/apt/sources.list"
}
# OpenZFS's kernel modules for the guest kernel. Debian ships OpenZFS as
# source only (zfs-dkms), so they are built in a throwaway copy of the
# root ($1, fresh from debootstrap) against the kernel's headers package,
# as DKMS would, for version $2 (bookworm-backports); cached by kernel and
# version in $VM_CACHE/zfs-VERSION-KERNEL (~3 min on 2 idle cores, once).
# Sets ZFS_MODULES.
vm_zfs_modules() {
  local base=$1 ver=$2 kver; kver=$(basename "$KMODDIR")
  ZFS_MODULES="$VM_CACHE/zfs-$ver-$kver"
  [ -f "$ZFS_MODULES/zfs.ko" ] && return 0
  local b="$base.zfs" t0; t0=$(date +%s)
  echo "== building OpenZFS $ver for the guest kernel $kver (once per machine; ~3 min)"
  cp -a "$base" "$b"
  mount -t proc proc "$b/proc"
  # The headers package names its compiler (gcc-12) and kbuild; the
  # source is zfs-dkms's, configured exactly as its dkms.conf does.
  if ! chroot "$b" sh -c "apt-get install -y -q --no-install-recommends linux-headers-$kver gcc make libc6-dev &&
        cd /root && apt-get download -q zfs-dkms=$ver && dpkg-deb -x zfs-dkms_*.deb src &&
        cd src/usr/src/zfs-* &&
        ./configure --disable-dependency-tracking --prefix=/usr --with-config=kernel \
          --with-linux=/usr/src/linux-headers-${kver%-cloud-amd64}-common --with-linux-obj=/usr/src/linux-headers-$kver &&
        make -C module -j$(nproc)" > "$b.log" 2>&1; then
    umount "$b/proc"
    echo "error: building OpenZFS $ver for $kver failed (log: $b.log)" >&2; rm -rf "$b"; return 1
  fi
  umount "$b/proc"
  mkdir -p "$ZFS_MODULES.tmp"
  # Without their debug info: 105 MB -> a few.
  cp "$b"/root/src/usr/src/zfs-*/module/*.ko "$ZFS_MODULES.tmp/"
  strip --strip-debug "$ZFS_MODULES.tmp"/*.ko
  [ -f "$ZFS_MODULES.tmp/zfs.ko" ] && [ -f "$ZFS_MODULES.tmp/spl.ko" ] ||
    { echo "error: the OpenZFS build made no zfs.ko/spl.ko (log: $b.log)" >&2; rm -rf "$b" "$ZFS_MODULES.tmp"; return 1; }
  mv "$ZFS_MODULES.tmp" "$ZFS_MODULES"
  rm -rf "$b" "$b.log"
  echo "== OpenZFS $ver built in $(( $(date +%s) - t0 )) s"
}
vm_debian_root() {
  local key; key=$( (basename "$KMODDIR"; declare -f vm_debian_root vm_debian_sources vm_zfs_modules; echo "$VM_ROOT_PACKAGES") | sha256sum | cut -c1-16)
  VM_ROOT="$VM_CACHE/debian-root-$key.img"
  [ -f "$VM_ROOT" ] && return 0
  [ "$(id -u)" = 0 ] ||
    { echo "error: building the guest's Debian root needs root (debootstrap, chroot); run as root once, then it is cached in $VM_CACHE" >&2; return 1; }
  local mirror=http://deb.debian.org/debian
  local root; root=$(mktemp -d "$VM_CACHE/root.XXXXXX")
  echo "== building the guest's Debian root (debootstrap bookworm; once per machine)"
  if ! debootstrap --variant=minbase bookworm "$root" "$mirror" > "$root.log" 2>&1; then
    echo "error: debootstrap failed (log: $root.log)" >&2; rm -rf "$root"; return 1
  fi
  # Packages install without starting anything and without a default
  # cluster: the tests make their own, on zerofs-ublk devices.
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
  mkdir -p "$root/etc/postgresql-common"
  echo "create_main_cluster = false" > "$root/etc/postgresql-common/createcluster.conf"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  vm_debian_sources "$root"
  local zfs
  if ! { chroot "$root" apt-get update -q >> "$root.log" 2>&1 &&
         zfs=$(chroot "$root" apt-cache madison zfs-dkms | awk '/bookworm-backports/ {print $3; exit}') &&
         [ -n "$zfs" ]; }; then
    echo "error: no OpenZFS (zfs-dkms) in bookworm-backports (log: $root.log)" >&2; rm -rf "$root"; return 1
  fi
  vm_zfs_modules "$root" "$zfs" || { rm -rf "$root"; return 1; }
  # zfsutils-linux of the modules' version, its libraries named: they are
  # in bookworm too, at 2.1.
  local zfs_pkgs="zfsutils-linux=$zfs libzfs6linux=$zfs libzpool6linux=$zfs libnvpair3linux=$zfs libuutil3linux=$zfs"
  mount -t proc proc "$root/proc"
  if ! chroot "$root" sh -c "apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold $VM_ROOT_PACKAGES $zfs_pkgs && apt-get clean" >> "$root.log" 2>&1; then
    umount "$root/proc"
    echo "error: installing the guest's packages failed (log: $root.log)" >&2; rm -rf "$root"; return 1
  fi
  umount "$root/proc"
  rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  mkdir -p "$root/lib/modules"
  cp -a "$KMODDIR" "$root/lib/modules/"
  mkdir -p "$root/lib/modules/$(basename "$KMODDIR")/updates/zfs"
  cp "$ZFS_MODULES"/*.ko "$root/lib/modules/$(basename "$KMODDIR")/updates/zfs/"
  chroot "$root" depmod "$(basename "$KMODDIR")"
  echo guest > "$root/etc/hostname"
  if ! mkfs.ext4 -q -L zfu-root -d "$root" "$VM_ROOT.tmp" 2G; then
    echo "error: cannot write $VM_ROOT.tmp ($(df -h --output=avail "$VM_CACHE" | tail -1) free)" >&2
    rm -rf "$root" "$VM_ROOT.tmp"; return 1
  fi
  mv "$VM_ROOT.tmp" "$VM_ROOT"
  rm -rf "$root" "$root.log"
  find "$VM_CACHE" -maxdepth 1 -name 'debian-root-*.img' ! -name "$(basename "$VM_ROOT")" -delete
}
