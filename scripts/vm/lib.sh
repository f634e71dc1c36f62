# Host-side helpers for running zerofs-ublk inside a QEMU TCG guest booting
# Debian's own 6.12 cloud kernel (which ships ublk_drv as a module).
# Sourced by scripts/vm-test.sh and scripts/bench-vm.sh.
set -euo pipefail

VM_CACHE="${ZEROFS_UBLK_VM_CACHE:-$HOME/.cache/zerofs-ublk-vm}"
VM_TIMEOUT="${ZEROFS_UBLK_VM_TIMEOUT:-1500}"
mkdir -p "$VM_CACHE"

# Fetch the kernel package the meta package points at (security updates
# rename the versioned package) and unpack it; never installed on the host.
vm_kernel() {
  local pkg
  pkg=$(apt-cache depends linux-image-6.12-cloud-amd64 2>/dev/null | awk '/Depends:/{print $2; exit}' || true)
  if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(apt-cache depends linux-image-6.12-cloud-amd64 | awk '/Depends:/{print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "cannot resolve linux-image-6.12-cloud-amd64 (apt-get update?)" >&2; return 1; }
  if [ ! -d "$VM_CACHE/$pkg" ]; then
    local tmp; tmp=$(mktemp -d "$VM_CACHE/dl.XXXX")
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb root)
    mv "$tmp/root" "$VM_CACHE/$pkg" && rm -rf "$tmp"
  fi
  KERNEL=$(ls "$VM_CACHE/$pkg"/boot/vmlinuz-*)
  KMODDIR=$(ls -d "$VM_CACHE/$pkg"/lib/modules/*)
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
  for b in /sbin/mke2fs /sbin/e2fsck /usr/bin/fio /sbin/blkdiscard /usr/bin/blkdiscard "${extra[@]}"; do
    [ -e "$b" ] && add_bin "$root" "$b"
  done
  ln -sf mke2fs "$root/usr/local/bin/mkfs.ext4"
  ln -sf e2fsck "$root/usr/local/bin/fsck.ext4"
  touch "$root/etc/mtab"
  # TLS clients want the system's CA store even for plain-http endpoints.
  mkdir -p "$root/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" 2>/dev/null || true
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$BASE_CPIO.tmp"
  mv "$BASE_CPIO.tmp" "$BASE_CPIO"
  rm -rf "$root"
}

# Boot with the base archive plus a per-run archive holding /init, the
# project binary and the guest script; print the console; succeed only if
# the guest printed its success marker.
vm_run() {
  local guest_script=$1 binary=$2; shift 2
  local run; run=$(mktemp -d)
  mkdir -p "$run/usr/local/bin" "$run/tests"
  add_bin "$run" "$binary"
  for f in "$@"; do add_bin "$run" "$f"; done
  cp "$(dirname "${BASH_SOURCE[0]}")/guest-init.sh" "$run/init"
  cp "$guest_script" "$run/tests/main.sh"
  chmod +x "$run/init"
  (cd "$run" && find . | cpio -o -H newc --quiet) > "$run.cpio"
  cat "$BASE_CPIO" "$run.cpio" > "$run/initrd"
  rm -f "$run.cpio"
  local log="$run/console.log"
  set +e
  timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -m "${VM_MEM:-2G}" -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$KERNEL" -initrd "$run/initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" < /dev/null 2>&1 | tee "$log"
  local qrc=${PIPESTATUS[0]}
  set -e
  VM_LOG="$run/console.log"
  if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "VM timed out after $VM_TIMEOUT s" >&2; return 1
  fi
  grep -q "^ZEROFS-VM-RESULT: PASS" "$log"
}
