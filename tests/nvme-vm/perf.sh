#!/usr/bin/env bash
# Compare spillway's userspace NVMe driver with Linux's nvme driver + io_uring, in the
# nvme-vm test VM on the same emulated controller (see README.md, "perf.sh").
#
# Usage: tests/nvme-vm/perf.sh [OUT_JSON]
#
#   OUT_JSON  where the results go (default: benches/results/nvme-vm-perf.json)
#
# Steps: build the nvme_perf example (release), build the VM into NVMEPERF_DIR with it,
# then boot once on a fresh 1 GiB sparse disk with the kernel nvme driver bound and run
# `nvme_perf --driver both`: each workload with the kernel driver (io_uring), then with
# spillway's after handing the controller to vfio-pci, and back. The NVMEPERF lines of the
# console log go into OUT_JSON, with the ratio spillway/kernel of IOPS and GB/s per
# workload.
#
# Environment:
#   NVMEPERF_ONLY   kernel | spillway: boot for that driver alone (ratios are then null)
#   NVMEPERF_ARGS   extra nvme_perf arguments, e.g. "--seconds 5 --seq-qd 8" (split
#                   by the guest's sh)
#   NVMEPERF_DIR    VM build directory (default: target/nvme-vm-perf); the console logs
#                   are kept there as both.log (or kernel.log / spillway.log)
#   NVMEPERF_DISK_MB  size of the disk behind the controller (default 1024)
#   NVMEVM_*        passed on to build.sh and run.sh (NVMEVM_ACCEL, NVMEVM_SMP, ...)
#
# Exit status: 0 when every requested boot printed one NVMEPERF line per workload, else 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT_JSON="${1:-benches/results/nvme-vm-perf.json}"
DIR="${NVMEPERF_DIR:-target/nvme-vm-perf}"
ONLY="${NVMEPERF_ONLY:-}"
ARGS="${NVMEPERF_ARGS:-}"
DISK_MB="${NVMEPERF_DISK_MB:-1024}"
# The command line as run, with the settings that shape the results in front.
COMMAND="$0${*:+ $*}"
for var in $(compgen -v | grep -E '^(NVMEPERF|NVMEVM)_' | sort -r); do
  COMMAND="$var=$(printf %q "${!var}") $COMMAND"
done

log() { printf 'nvme-vm perf: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case $ONLY in
  "" | kernel | spillway) ;;
  *) die "NVMEPERF_ONLY must be kernel or spillway (or unset for both), not '$ONLY'" ;;
esac
command -v python3 >/dev/null || die "python3 is needed to assemble the JSON results"

cd "$ROOT"
mkdir -p "$DIR" "$(dirname "$OUT_JSON")"
DIR="$(cd "$DIR" && pwd)"

# ------------------------------------------------------------------- build
log "building nvme_perf (release)"
cargo build --release --locked -p spillway-spdk --example nvme_perf >&2 ||
  die "cargo build of the nvme_perf example failed"
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
BIN="$TARGET_DIR/release/examples/nvme_perf"
[[ -x $BIN ]] || die "$BIN missing after cargo build"

bash "$HERE/build.sh" "$DIR" "$BIN" || die "tests/nvme-vm/build.sh $DIR failed"

# -------------------------------------------------------------------- boots
# Boots the VM for driver $1 (kernel, spillway or both) with guest command $2 (a sh -c
# script), on a fresh sparse disk, keeping the console in DIR/$1.log and run.sh's
# messages in DIR/$1.run.log.
boot() {
  local driver=$1 script=$2 bind rc
  bind=$([[ $driver == spillway ]] && echo vfio || echo nvme)
  rm -f "$DIR/nvme.img"
  truncate -s "${DISK_MB}M" "$DIR/nvme.img"
  log "booting for the $driver driver (NVMEVM_BIND=$bind): $script"
  # run.sh's stderr goes through tee (fd 3 carries the console past the pipe).
  set +e
  {
    NVMEVM_BIND=$bind NVMEVM_LOG="$DIR/$driver.log" NVMEVM_DISK="$DIR/nvme.img" \
      bash "$HERE/run.sh" "$DIR" sh -c "$script" 2>&1 1>&3 | tee "$DIR/$driver.run.log" >&2
    rc=${PIPESTATUS[0]}
  } 3>&1
  set -e
  case $rc in
    0) ;;
    124) die "$driver boot timed out (NVMEVM_TIMEOUT); console log: $DIR/$driver.log" ;;
    125) die "$driver boot failed before the command ran; see $DIR/$driver.log and $DIR/$driver.run.log" ;;
    *) die "nvme_perf --driver $driver exited with status $rc in the guest; its error is in $DIR/$driver.log" ;;
  esac
}

rm -f "$DIR"/{kernel,spillway,both}{,.run}.log
BOOT=${ONLY:-both}
case $BOOT in
  # The single quotes keep $NVMEVM_BLOCK for the guest's sh, which run.sh's /init sets.
  # shellcheck disable=SC2016
  kernel) boot kernel '/opt/nvme_perf --driver kernel --block "$NVMEVM_BLOCK" '"$ARGS" ;;
  spillway) boot spillway "/opt/nvme_perf --driver spillway $ARGS" ;;
  both) boot both "/opt/nvme_perf --driver both $ARGS" ;;
esac

# ------------------------------------------------------------------ results
export PERF_COMMAND="$COMMAND" PERF_DIR="$DIR" PERF_ONLY="$ONLY" PERF_BOOT="$BOOT" PERF_ARGS="$ARGS" \
  PERF_DISK_MB="$DISK_MB" PERF_OUT="$OUT_JSON"
python3 - <<'PY' || die "could not assemble $OUT_JSON"
import datetime, json, os, re, subprocess, sys

d = os.environ["PERF_DIR"]
only = os.environ["PERF_ONLY"]
drivers = [x for x in ("kernel", "spillway") if only in ("", x)]


def fail(msg):
    sys.exit(f"nvme-vm perf: error: {msg}")


boot = os.environ["PERF_BOOT"]


def measurements(driver):
    """The NVMEPERF objects of driver `driver` in the boot's console log, by workload."""
    path = os.path.join(d, f"{boot}.log")
    found = {}
    with open(path, errors="replace") as f:
        for line in f:
            at = line.find("NVMEPERF ")
            if at < 0:
                continue
            text = line[at + len("NVMEPERF "):].strip()
            try:
                m = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{path}: unparsable NVMEPERF line ({e}): {text!r}")
            if m.get("driver") != driver:
                continue
            found[m["workload"]] = m
    if not found:
        fail(f"{path}: no NVMEPERF lines of driver {driver}: did nvme_perf run?")
    return found


def run_log_value(pattern):
    with open(os.path.join(d, f"{boot}.run.log"), errors="replace") as f:
        m = re.search(pattern, f.read())
    return m.group(1) if m else None


def host_cpu():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def qemu_version():
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else None


def versions():
    try:
        with open(os.path.join(d, "versions.txt")) as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return {}


def ratio(s, k, key):
    if s is None or k is None or not k.get(key):
        return None
    return s[key] / k[key]


by_driver = {drv: measurements(drv) for drv in drivers}
names = []
for drv in drivers:
    for name in by_driver[drv]:
        if name not in names:
            names.append(name)
for drv in drivers:
    missing = [n for n in names if n not in by_driver[drv]]
    if missing:
        fail(f"{drv}.log has no NVMEPERF line for {', '.join(missing)}")

workloads = {}
for name in names:
    k = by_driver.get("kernel", {}).get(name)
    s = by_driver.get("spillway", {}).get(name)
    workloads[name] = {
        "kernel": k,
        "spillway": s,
        "ratio_spillway_over_kernel": {"iops": ratio(s, k, "iops"), "gbps": ratio(s, k, "gbps")},
    }

result = {
    "command": os.environ["PERF_COMMAND"],
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host_cpu": host_cpu(),
    "host_cpus": os.cpu_count(),
    "qemu_version": qemu_version(),
    "accel": run_log_value(r"booting \((\w+),"),
    "vm": {
        "smp": int(os.environ.get("NVMEVM_SMP", "1")),
        "mem_mib": int(os.environ.get("NVMEVM_MEM", "1024")),
        "disk_bytes": int(os.environ["PERF_DISK_MB"]) << 20,
        "disk": "raw sparse image, new for the boot",
        "kernel": versions().get("kernel_release"),
    },
    "nvme_perf_args": os.environ["PERF_ARGS"],
    "drivers": drivers,
    "procedure": (
        "one boot, kernel nvme driver bound; per workload: the kernel driver through "
        "io_uring (O_DIRECT, registered buffers), then the controller handed to vfio-pci "
        "and spillway's driver, then handed back"
        if boot == "both" else f"one boot, {boot} driver only"
    ),
    "console_log": os.path.join(d, f"{boot}.log"),
    "workloads": workloads,
}
with open(os.environ["PERF_OUT"], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

for name, w in workloads.items():
    cells = []
    for drv in drivers:
        m = w[drv]
        cells.append(f"{drv} {m['iops']:.0f} IOPS {m['gbps']:.3f} GB/s")
    r = w["ratio_spillway_over_kernel"]["iops"]
    if r is not None:
        cells.append(f"spillway/kernel {r:.2f}")
    print(f"nvme-vm perf: {name}: " + ", ".join(cells), file=sys.stderr)
PY
log "wrote $OUT_JSON"
