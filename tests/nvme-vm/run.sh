#!/usr/bin/env bash
# Boot the NVMe/VFIO test VM built by build.sh and run one command in it
# (see README.md).
#
# Usage: tests/nvme-vm/run.sh [OUT_DIR] [GUEST_COMMAND...]
#
#   OUT_DIR        what build.sh produced (default: target/nvme-vm)
#   GUEST_COMMAND  argv run in the guest (cwd /opt, PATH starts with /opt),
#                  after the NVMe function is bound to vfio-pci. Without it
#                  the VM only boots, binds and powers off. Use `sh -c '...'`
#                  for shell syntax.
#
# Exit status: the guest command's, or
#   124  timeout (NVMEVM_TIMEOUT)
#   125  the guest never printed the NVMEVM marker / exit lines (setup failed,
#        QEMU failed, kernel panic, ...)
#
# Environment:
#   NVMEVM_TIMEOUT    seconds for the whole VM run (default 300)
#   NVMEVM_ACCEL      tcg (default) | kvm | auto (kvm if /dev/kvm works for
#                     a short probe boot, else tcg)
#   NVMEVM_MEM        guest memory in MiB (default 1024)
#   NVMEVM_SMP        guest CPUs (default 1)
#   NVMEVM_DISK       raw image behind the NVMe controller
#                     (default OUT_DIR/nvme.img; its contents persist)
#   NVMEVM_BIND       vfio (default) | nvme (load the kernel nvme driver
#                     instead, NVMEVM_BLOCK=/dev/nvme0n1) | none
#   NVMEVM_APPEND     extra kernel command line arguments
#   NVMEVM_QEMU_ARGS  extra QEMU arguments (split on whitespace)
#   NVMEVM_LOG        also keep the console log in this file
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-target/nvme-vm}"
if [[ $# -gt 0 ]]; then shift; fi

TIMEOUT="${NVMEVM_TIMEOUT:-300}"
ACCEL="${NVMEVM_ACCEL:-tcg}"
MEM="${NVMEVM_MEM:-1024}"
SMP="${NVMEVM_SMP:-1}"
DISK="${NVMEVM_DISK:-$OUT_DIR/nvme.img}"
BIND="${NVMEVM_BIND:-vfio}"

log() { printf 'nvme-vm run: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }

for f in vmlinuz initramfs.cpio.gz; do
  [[ -f $OUT_DIR/$f ]] || die "$OUT_DIR/$f missing: run tests/nvme-vm/build.sh $OUT_DIR"
done
[[ -f $DISK ]] || die "NVMe disk image $DISK missing"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not installed"
case $BIND in vfio | nvme | none) ;; *) die "NVMEVM_BIND must be vfio, nvme or none" ;; esac

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Single-quote $1 for the guest's sh.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

# The guest command and config travel as a small uncompressed cpio archive
# placed before the initramfs (the kernel unpacks concatenated archives in
# order, like early microcode; an uncompressed archive *after* the gzip one
# is rejected by this kernel's unpacker).
mkdir -p "$TMP/cfg/etc/nvmevm"
# What the guest's check programs compare Identify against: the controller's serial
# number and the size of the disk behind namespace 1.
SERIAL=deadbeef
{
  printf 'NVMEVM_BIND=%s\n' "$BIND"
  printf 'export NVMEVM_SERIAL=%s\n' "$SERIAL"
  printf 'export NVMEVM_DISK_BYTES=%s\n' "$(stat -c %s "$DISK")"
} >"$TMP/cfg/etc/nvmevm/config"
if [[ $# -gt 0 ]]; then
  {
    printf '#!/bin/sh\n'
    for a in "$@"; do printf '%s ' "$(shq "$a")"; done
    printf '\n'
  } >"$TMP/cfg/etc/nvmevm/cmd"
fi
(cd "$TMP/cfg" && find . -mindepth 1 | LC_ALL=C sort |
  cpio -o -H newc --owner=0:0 --quiet) >"$TMP/initrd"
cat "$OUT_DIR/initramfs.cpio.gz" >>"$TMP/initrd"

# ------------------------------------------------------------- accelerator
kvm_works() {
  [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
  # A kernel without initramfs panics at once; panic=-1 + -no-reboot make
  # QEMU exit 0. A hang (seen on some hosts) fails the probe.
  # Seen here (nested virtualization): QEMU aborts on "failed to set MSR"
  # with -cpu host, or spins forever without output with other CPU models.
  # The subshell keeps bash's "Aborted" job message off the terminal.
  (timeout -k 5 15 qemu-system-x86_64 -accel kvm -cpu host -M q35 -m 256 \
    -display none -serial none -monitor none -no-reboot \
    -kernel "$OUT_DIR/vmlinuz" -append "panic=-1 quiet" \
    </dev/null >/dev/null 2>&1) >/dev/null 2>&1
}
case $ACCEL in
  tcg) CPU=max ;;
  kvm) CPU=host ;;
  auto)
    if kvm_works; then ACCEL=kvm CPU=host; else ACCEL=tcg CPU=max; fi
    log "accelerator: $ACCEL"
    ;;
  *) die "NVMEVM_ACCEL must be tcg, kvm or auto" ;;
esac

APPEND="console=ttyS0 intel_iommu=on iommu=pt panic=-1 quiet ${NVMEVM_APPEND:-}"
QEMU=(qemu-system-x86_64
  -accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM"
  -M "q35,kernel-irqchip=split"
  -device "intel-iommu,intremap=on,caching-mode=on"
  -nographic -vga none -no-reboot
  -kernel "$OUT_DIR/vmlinuz" -initrd "$TMP/initrd" -append "$APPEND"
  -drive "file=$DISK,if=none,id=nvm,format=raw"
  -device "nvme,serial=$SERIAL,drive=nvm"
  -nic none)
if [[ -n ${NVMEVM_QEMU_ARGS:-} ]]; then
  read -r -a extra <<<"$NVMEVM_QEMU_ARGS"
  QEMU+=("${extra[@]}")
fi

# Echo the console, note when the markers show up, keep a copy for parsing. The
# console has been through console-filter.sh: no escape sequences, no carriage returns.
START=$EPOCHREALTIME
elapsed() { awk -v a="$START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
watch_console() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s\n' "$line"
    printf '%s\n' "$line" >>"$TMP/console.log"
    case $line in
      *"NVMEVM: pci="*) log "marker after $(elapsed)s" ;;
      *"NVMEVM: exit="*) log "guest command done after $(elapsed)s" ;;
    esac
  done
}

log "booting ($ACCEL, timeout ${TIMEOUT}s): ${QEMU[*]}"
# --foreground: Ctrl-C on a terminal reaches QEMU too.
# The firmware's terminal control (reset, clear screen, no line wrap, titles) would wipe
# the terminal of whoever runs this, mid-run: console-filter.sh strips it, from what is
# shown and from the log alike. QEMU_RC is QEMU's (timeout's) status, the first of the
# pipeline, whatever the filter does.
set +e
timeout --foreground -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 |
  bash "$HERE/console-filter.sh" | watch_console
QEMU_RC=${PIPESTATUS[0]}
set -e
touch "$TMP/console.log"
if [[ -n ${NVMEVM_LOG:-} ]]; then cp "$TMP/console.log" "$NVMEVM_LOG"; fi

if [[ $QEMU_RC == 124 || $QEMU_RC == 137 ]]; then
  log "timeout after ${TIMEOUT}s"
  exit 124
fi
# Not anchored at line start: firmware/kernel output without a trailing
# newline may precede a marker.
if ! grep -q 'NVMEVM: pci=' "$TMP/console.log"; then
  log "no NVMEVM marker line (qemu exit $QEMU_RC):"
  grep -o 'NVMEVM: .*' "$TMP/console.log" >&2 || true
  exit 125
fi
RC="$(sed -n 's/^.*NVMEVM: exit=\([0-9][0-9]*\)$/\1/p' "$TMP/console.log" | tail -n1)"
if [[ -z $RC ]]; then
  log "guest command did not report an exit status (qemu exit $QEMU_RC)"
  exit 125
fi
log "guest exit=$RC after $(elapsed)s"
exit "$RC"
