#!/usr/bin/env bash
# The GPU suite. Runs on any Linux machine with an NVIDIA GPU, with no Rust toolchain:
# it uses the programs scripts/build-dist.sh put in dist/.
#
#   scripts/gpu-test.sh            # tests, --verify benches, then the performance runs
#   SKIP_PERF=1 scripts/gpu-test.sh
#
# Storage tested: $SPILLWAY_DISK_DIR (default /var/tmp/spillway, a disk) and
# $SPILLWAY_SHM_DIR (default /dev/shm/spillway, tmpfs as a fast-storage stand-in).
# Performance results are written as JSON to $RESULTS_DIR (default benches/results).
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${DIST:-dist}
disk=${SPILLWAY_DISK_DIR:-/var/tmp/spillway}
shm=${SPILLWAY_SHM_DIR:-/dev/shm/spillway}
results=${RESULTS_DIR:-benches/results}
mkdir -p "$disk" "$shm" "$results"

# libcuda comes with the driver; libcufile and libnvrtc with the CUDA toolkit.
for d in /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib; do
  [[ -d $d ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

failures=()
step() {
  echo "== $*"
  "$@" || failures+=("$*")
}

step "$dist/spillway" info --path "$disk"
step "$dist/spillway" info --path "$shm"
step "$dist/gpu_cuda" --include-ignored --test-threads=1
for dir in "$disk" "$shm"; do
  step env SPILLWAY_TEST_DIR="$dir" "$dist/gpu_backends" --include-ignored --test-threads=1
  step env SPILLWAY_TEST_DIR="$dir" "$dist/cufile_gpu" --include-ignored --test-threads=1
  for backend in uring cufile; do
    step "$dist/spillway" bench --mem gpu --backend "$backend" --op write,read,randwrite,randread \
      --size 256M --block 1M --qd 16 --verify --path "$dir/verify-$backend.dat"
    step "$dist/spillway" bench --mem gpu --backend "$backend" --op write,read \
      --size 10000019 --block 65537 --qd 8 --threads 2 --verify --path "$dir/odd-$backend.dat"
  done
  rm -f "$dir"/verify-*.dat "$dir"/odd-*.dat
done

if [[ -z ${SKIP_PERF:-} ]]; then
  step python3 benches/gpu_vs_host.py --spillway "$dist/spillway" --out "$results" \
    --storage "disk=$disk" --storage "shm=$shm"
fi

if ((${#failures[@]})); then
  echo "GPU suite: ${#failures[@]} step(s) failed:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "GPU suite: all steps passed"
