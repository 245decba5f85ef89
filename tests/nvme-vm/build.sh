#!/usr/bin/env bash
# Prepare everything needed to boot the NVMe/VFIO test VM (see README.md).
#
# Usage: tests/nvme-vm/build.sh [OUT_DIR] [EXTRA_FILES...]
#
#   OUT_DIR      output directory (default: target/nvme-vm). Downloads are
#                cached in OUT_DIR/debs, the unpacked kernel in OUT_DIR/kernel,
#                so a second run only rebuilds the initramfs.
#   EXTRA_FILES  host files copied into the guest's /opt/ (by basename). For
#                dynamically linked ones, the shared libraries `ldd` reports
#                (and the dynamic loader) are copied to the same paths.
#
# Environment:
#   NVMEVM_KERNEL_PKG  Debian kernel image package to use (default: whatever
#                      the `linux-image-amd64` meta-package depends on).
#   NVMEVM_DISK_MB     size of OUT_DIR/nvme.img when it is created (default 64).
#                      An existing nvme.img is kept (delete it to reset).
#
# Outputs: OUT_DIR/vmlinuz, OUT_DIR/initramfs.cpio.gz, OUT_DIR/nvme.img,
#          OUT_DIR/versions.txt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-target/nvme-vm}"
if [[ $# -gt 0 ]]; then shift; fi
EXTRA_FILES=("$@")

# Modules the guest loads, in any order: dependencies are resolved below.
WANT_MODULES=(irqbypass vfio vfio_iommu_type1 vfio_pci_core vfio_pci)
# Shipped but only loaded when the guest is asked to bind the kernel driver
# (NVMEVM_BIND=nvme, see run.sh); ext4 (which mounts ext2 too; crc32c_generic
# is its soft dependency) lets a check program mount a namespace.
OPTIONAL_MODULES=(nvme crc32c_generic ext4)

log() { printf 'nvme-vm build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# Scratch space (unpacked .debs, initramfs root), removed on exit.
WORK="$(mktemp -d "$OUT_DIR/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- host tools
APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED == 0 ]]; then
    log "apt-get update"
    apt-get update -qq >&2
    APT_UPDATED=1
  fi
}

ensure_tools() {
  local -a missing=()
  command -v cpio >/dev/null || missing+=(cpio)
  command -v gzip >/dev/null || missing+=(gzip)
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v xz >/dev/null || missing+=(xz-utils)
  command -v zstd >/dev/null || missing+=(zstd)
  [[ ${#missing[@]} == 0 ]] && return 0
  if [[ $(id -u) != 0 ]]; then
    die "missing host packages: ${missing[*]} (run as root or install them)"
  fi
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get"
  apt_update_once
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
}

# Print the candidate version of a package, empty when apt does not know it.
apt_candidate() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# Download package $1 into OUT_DIR/debs unless a .deb of it is cached there.
# Prints the path of the .deb.
fetch_deb() {
  local pkg=$1 ver deb
  mkdir -p "$OUT_DIR/debs"
  ver="$(apt_candidate "$pkg")"
  if [[ -z $ver ]]; then
    apt_update_once
    ver="$(apt_candidate "$pkg")"
  fi
  if [[ -n $ver ]]; then
    # apt-get download names files pkg_<version with : escaped as %3a>_arch.deb
    deb="$(compgen -G "$OUT_DIR/debs/${pkg}_${ver/:/%3a}_*.deb" | head -n1 || true)"
  else
    # Unknown to apt (offline, no lists): use any cached version.
    deb="$(compgen -G "$OUT_DIR/debs/${pkg}_*.deb" | sort -V | tail -n1 || true)"
  fi
  if [[ -z $deb ]]; then
    [[ -n $ver ]] || die "apt does not know package $pkg"
    log "downloading $pkg $ver"
    # -o APT::Sandbox::User=root: the _apt user cannot write into OUT_DIR.
    (cd "$OUT_DIR/debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2)
    deb="$(compgen -G "$OUT_DIR/debs/${pkg}_*.deb" | sort -V | tail -n1 || true)"
    [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
  fi
  printf '%s\n' "$deb"
}

kernel_package() {
  if [[ -n ${NVMEVM_KERNEL_PKG:-} ]]; then
    printf '%s\n' "$NVMEVM_KERNEL_PKG"; return
  fi
  local pkg
  [[ -n $(apt_candidate linux-image-amd64) ]] || apt_update_once
  pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
  if [[ -z $pkg ]]; then
    # Fall back to the newest versioned generic image apt offers.
    pkg="$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' 2>/dev/null |
      awk '{ print $1 }' | sort -V | tail -n1)"
  fi
  if [[ -z $pkg ]]; then
    # Offline: reuse whatever kernel is cached.
    pkg="$(compgen -G "$OUT_DIR/debs/linux-image-*.deb" | sort -V | tail -n1 || true)"
    pkg="$(basename "${pkg%%_*}")"
  fi
  [[ -n $pkg ]] || die "cannot find a linux-image-*-amd64 package"
  printf '%s\n' "$pkg"
}

# ------------------------------------------------------------------- kernel
# Unpack vmlinuz and the modules we need (with their dependencies) into
# OUT_DIR/kernel; skipped when OUT_DIR/kernel/source names the same .deb.
prepare_kernel() {
  local deb=$1 kdir="$OUT_DIR/kernel"
  # The cache is keyed by the package and the module lists.
  local key
  key="$(basename "$deb") ${WANT_MODULES[*]} / ${OPTIONAL_MODULES[*]}"
  if [[ -f $kdir/source && $(cat "$kdir/source") == "$key" ]]; then
    log "kernel cached: $(basename "$deb")"
    return
  fi
  log "unpacking $(basename "$deb")"
  local tmp="$WORK/kernel-deb"
  dpkg-deb -x "$deb" "$tmp"
  local mroot
  mroot="$(compgen -G "$tmp/lib/modules/*" | head -n1 || true)"
  [[ -n $mroot ]] || mroot="$(compgen -G "$tmp/usr/lib/modules/*" | head -n1 || true)"
  [[ -n $mroot ]] || die "no lib/modules in $deb"

  rm -rf "$kdir"
  mkdir -p "$kdir/modules"
  cp "$(compgen -G "$tmp/boot/vmlinuz-*" | head -n1)" "$kdir/vmlinuz"
  cp "$(compgen -G "$tmp/boot/config-*" | head -n1)" "$kdir/config"
  basename "$mroot" >"$kdir/release"

  # name (with '-' folded to '_') -> path of the module file
  declare -A path=()
  local f n
  while IFS= read -r -d '' f; do
    n="$(basename "$f")"; n="${n%%.ko*}"; n="${n//-/_}"
    path[$n]=$f
  done < <(find "$mroot/kernel" -name '*.ko*' -print0)

  # Depth-first dependency resolution; appends to ORDER deps-first.
  declare -A seen=()
  ORDER=()
  resolve() {
    local m="${1//-/_}" src ko deps d
    [[ -n ${seen[$m]:-} ]] && return 0
    seen[$m]=1
    src="${path[$m]:-}"
    if [[ -z $src ]]; then
      # Built into the kernel: nothing to load.
      if grep -Eq "/${m//_/[-_]}\.ko\$" "$mroot/modules.builtin"; then return 0; fi
      die "module $m not found in $(basename "$deb")"
    fi
    ko="$kdir/modules/$m.ko"
    case $src in
      *.ko) cp "$src" "$ko" ;;
      *.ko.xz) xz -dc "$src" >"$ko" ;;
      *.ko.zst) zstd -qdc "$src" >"$ko" ;;
      *.ko.gz) gzip -dc "$src" >"$ko" ;;
      *) die "unknown module compression: $src" ;;
    esac
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1)"
    local IFS=,
    for d in $deps; do resolve "$d"; done
    ORDER+=("$m")
  }
  for n in "${WANT_MODULES[@]}"; do resolve "$n"; done
  printf '%s\n' "${ORDER[@]}" >"$kdir/modules.load"
  ORDER=()
  for n in "${OPTIONAL_MODULES[@]}"; do resolve "$n"; done
  printf '%s\n' "${ORDER[@]}" >"$kdir/modules.nvme"
  rm -rf "$tmp"
  printf '%s\n' "$key" >"$kdir/source"
}

# ---------------------------------------------------------------- initramfs
# Copy host file $1 to the same path under rootfs $2 (following symlinks).
copy_same_path() {
  mkdir -p "$2$(dirname "$1")"
  cp -L "$1" "$2$1"
}

add_extra_file() {
  local f=$1 root=$2 lib
  [[ -f $f ]] || die "EXTRA_FILE $f is not a regular file"
  cp -L "$f" "$root/opt/$(basename "$f")"
  # Debug information only makes the initramfs slower to pack and to unpack.
  if command -v strip >/dev/null; then
    strip --strip-debug "$root/opt/$(basename "$f")" 2>/dev/null || true
  fi
  # ldd fails ("not a dynamic executable") for static binaries and non-ELF
  # files: nothing to add then.
  local out
  out="$(ldd "$f" 2>/dev/null)" || return 0
  if grep -q 'not found' <<<"$out"; then
    die "ldd $f: missing libraries:"$'\n'"$out"
  fi
  while IFS= read -r lib; do
    [[ -n $lib ]] && copy_same_path "$lib" "$root"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
}

build_initramfs() {
  local bb_deb=$1 kdir="$OUT_DIR/kernel" root="$WORK/rootfs"
  mkdir -p "$root" "$root"/{bin,sbin,usr/bin,usr/sbin,etc/nvmevm,lib/modules/nvmevm,opt,proc,sys,dev,tmp,run,root}
  local bbtmp="$WORK/busybox-deb" bb
  dpkg-deb -x "$bb_deb" "$bbtmp"
  bb="$(compgen -G "$bbtmp/bin/busybox" || compgen -G "$bbtmp/usr/bin/busybox" || true)"
  [[ -n $bb ]] || die "no busybox binary in $bb_deb"
  install -m 755 "$bb" "$root/bin/busybox"
  rm -rf "$bbtmp"
  ln -s busybox "$root/bin/sh"   # for /init's shebang; the rest at boot
  cp "$kdir"/modules/*.ko "$root/lib/modules/nvmevm/"
  cp "$kdir/modules.load" "$kdir/modules.nvme" "$root/etc/nvmevm/"
  install -m 755 "$HERE/init" "$root/init"
  local f
  for f in "${EXTRA_FILES[@]}"; do add_extra_file "$f" "$root"; done
  (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --reproducible --quiet) |
    gzip -6n >"$OUT_DIR/initramfs.cpio.gz.tmp"
  mv "$OUT_DIR/initramfs.cpio.gz.tmp" "$OUT_DIR/initramfs.cpio.gz"
}

# --------------------------------------------------------------------- main
ensure_tools
KPKG="$(kernel_package)"
KDEB="$(fetch_deb "$KPKG")"
BBDEB="$(fetch_deb busybox-static)"
prepare_kernel "$KDEB"
cp "$OUT_DIR/kernel/vmlinuz" "$OUT_DIR/vmlinuz"
build_initramfs "$BBDEB"

if [[ ! -f $OUT_DIR/nvme.img ]]; then
  truncate -s "${NVMEVM_DISK_MB:-64}M" "$OUT_DIR/nvme.img"
fi

{
  echo "kernel_deb=$(basename "$KDEB")"
  echo "kernel_release=$(cat "$OUT_DIR/kernel/release")"
  echo "busybox_deb=$(basename "$BBDEB")"
  echo "modules=$(paste -sd, "$OUT_DIR/kernel/modules.load")"
  echo "extra_files=${EXTRA_FILES[*]}"
} >"$OUT_DIR/versions.txt"
log "done: $OUT_DIR ($(du -h "$OUT_DIR/initramfs.cpio.gz" | cut -f1) initramfs)"
sed 's/^/  /' "$OUT_DIR/versions.txt" >&2
