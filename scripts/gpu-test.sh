#!/usr/bin/env bash
# The GPU suite. Runs on any Linux machine with an NVIDIA GPU, with no Rust toolchain:
# it uses the programs scripts/build-dist.sh put in dist/.
#
#   scripts/gpu-test.sh            # tests, --verify benches, then the performance runs
#                                  # (pack and crc32c kernel bandwidth, GPU vs host)
#   SKIP_PERF=1 scripts/gpu-test.sh
#   PERF_ONLY=engine|train|rok|ranks|kvikio|integrations scripts/gpu-test.sh   # one group
#                                  # of runs (rok: SSDTrain's grid and the largest micro-batch;
#                                  # ranks: two GPUs; kvikio: spillway beside KvikIO,
#                                  # benches/vs_kvikio.py; integrations: Hugging Face and
#                                  # Lightning, benches/integrations.py, their wheels from
#                                  # scripts/fetch-integration-wheels.sh in dist-integrations/)
#   SPILLWAY_SANITIZE=1 scripts/gpu-test.sh   # also the pack and crc32c kernels under
#                                             # compute-sanitizer (memcheck and racecheck)
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

# Runs a command that must fail with a message containing $1.
expect_error() {
  local want=$1 out
  shift
  echo "== (must fail with \"$want\") $*"
  if out=$("$@" 2>&1); then
    failures+=("succeeded but must fail: $*")
  elif ! grep -qF -- "$want" <<<"$out"; then
    failures+=("failed without \"$want\": $*")
  fi
  echo "$out"
}

# The filesystem type and block device (MAJ:MIN) of the top-most mount holding a path.
fstype() { findmnt -rno FSTYPE -T "$1" | tail -n1; }
majmin() { findmnt -rno MAJ:MIN -T "$1" | tail -n1; }

# cuFile looks up the udev properties of the block device under a file (ID_FS_USAGE,
# ID_FS_TYPE) and refuses the file when there are none. A machine without udevd (a bare
# VM, a container without /run/udev) has no such database: as root, write the two
# properties cuFile reads for each block device tested, and say so.
provide_udev_properties() {
  [[ -e /run/udev/control || $(id -u) -ne 0 ]] && return 0 # udevd runs, or not root
  mkdir -p /run/udev/data
  for dir in "$@"; do
    local majmin fs
    majmin=$(majmin "$dir") fs=$(fstype "$dir")
    [[ $majmin == 0:* || -e /run/udev/data/b$majmin ]] && continue # tmpfs, or known
    printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=%s\n' "$fs" >"/run/udev/data/b$majmin"
    echo "note: no udev database here; wrote /run/udev/data/b$majmin (ID_FS_TYPE=$fs) for cuFile"
  done
}

# A fast block device for cuFile, which cannot use tmpfs: ext4 on a loop device whose
# backing file lives in /dev/shm (direct I/O through to tmpfs).
loop_ext4_on_shm() {
  local img=/dev/shm/spillway-loop.img mnt=/mnt/spillway-shm-ext4
  command -v mkfs.ext4 >/dev/null && command -v losetup >/dev/null || return 1
  mountpoint -q "$mnt" && { echo "$mnt"; return 0; }
  truncate -s "${SPILLWAY_LOOP_SIZE:-12G}" "$img" && mkfs.ext4 -q -F "$img" || return 1
  local dev
  dev=$(losetup --direct-io=on -f --show "$img") || return 1
  mkdir -p "$mnt" && mount "$dev" "$mnt" || return 1
  echo "$mnt"
}

# The offload engine's performance runs (also callable alone: PERF_ONLY=engine).
engine_perf() {
  # 20k tensors of 4-256 KiB from GPU memory against large sequential I/O and --no-pack.
  for pair in "disk=$disk" "shm=$shm"; do
    step python3 benches/engine_vs_seq.py --spillway "$dist/spillway" --path "${pair#*=}" \
      --rounds 3 --save --out "$results" --name "engine-vs-seq-h200-${pair%%=*}" --mem gpu --backend uring
  done
  # The same through cuFile (compat mode here: no nvidia-fs), which cannot use tmpfs.
  for pair in "disk=$disk" ${shm_ext4:+"shm-ext4=$shm_ext4"}; do
    step python3 benches/engine_vs_seq.py --spillway "$dist/spillway" --path "${pair#*=}" \
      --rounds 3 --save --out "$results" --name "engine-vs-seq-h200-${pair%%=*}-cufile" --mem gpu --backend cufile
  done
  # Staging stays within its budget when offloading far more than it: 64 MiB of staging
  # and 32 MiB of pinned memory against 2.5 GB of tensors.
  step sh -c "'$dist/spillway' bench --workload tensors --mem gpu --backend uring --dup 0.1 \
    --staging 64MiB --prefetch 32MiB --pack-extent 8MiB --pinned 32MiB --qd 8 \
    --path '$shm/budget.dat' --json > '$results/engine-staging-budget-h200.json'"
  # What the checksums cost: the tensors workload with and without --verify, interleaved.
  step python3 benches/checksum_cost.py --spillway "$dist/spillway" --path "$shm" --mem gpu \
    --backend uring --rounds 3 --save --out "$results" --name checksum-cost-h200-shm
  # A timeline of a smaller run, to open in Perfetto (over 100 KB: kept out of git, as
  # benches/results/*.trace.json is ignored; this command makes it again).
  step "$dist/spillway" bench --workload tensors --mem gpu --backend uring --tensors 2000 \
    --path "$shm/trace.dat" --trace "$results/engine-h200.trace.json"
  rm -f "$shm/budget.dat" "$shm/trace.dat"
}

# The Python package from dist/wheels, installed into a directory of its own put on
# PYTHONPATH, so that the machine's python3 (with its torch) imports it; nothing is
# downloaded, nothing of the machine's Python is changed.
py=python3
python_env() {
  local site=/tmp/spillway-python
  rm -rf "$site"
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" \
    "$dist"/wheels/spillway-*.whl || return 1
  "$py" -c "import pytest" 2>/dev/null ||
    "$py" -m pip install -q --disable-pip-version-check --no-index --find-links "$dist/wheels" \
      --target "$site" pytest || return 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

# The GPT training benchmark: baseline, spillway on disk and on /dev/shm, full
# recomputation and save_on_cpu, each in a process of its own.
train_perf() {
  step "$py" benches/train_gpt.py --disk-dir "$disk" --shm-dir "$shm" \
    --out "$results/train-gpt-h200.json" ${TRAIN_ARGS:-}
}

# SSDTrain's grid (benches/rok_grid.py): per shape, baseline, checkpointing (plain and
# with inputs offloaded), save_on_cpu and spillway on each storage and goal, JSON and one
# plot per shape in $results; then the largest micro-batch with and without spillway.
# ROK_ARGS narrows it (e.g. "--shapes 16384x2 --seqs 1024 --arch gpt").
rok_grid() {
  step "$py" benches/rok_grid.py --out-dir "$results" ${ROK_ARGS:-}
  step "$py" benches/max_batch.py --out "$results/rok-max-batch.json" ${MAX_BATCH_ARGS:-}
  "$py" benches/rok_grid.py --summary --out-dir "$results"
}

# spillway beside KvikIO on the disk and on /dev/shm (benches/vs_kvikio.py), KvikIO from
# the wheels scripts/build-dist.sh downloaded into dist/wheels (no network here).
# KVIKIO_ARGS narrows or widens the grid (e.g. "--sizes 1GiB,8GiB").
vs_kvikio() {
  local site=/tmp/spillway-kvikio
  rm -rf "$site"
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" \
    "$dist"/wheels/kvikio_cu13-*.whl "$dist"/wheels/libkvikio_cu13-*.whl \
    "$dist"/wheels/rapids_logger-*.whl "$dist"/wheels/cuda_pathfinder-*.whl || return 1
  step env PYTHONPATH="$site:$PYTHONPATH" "$py" benches/vs_kvikio.py --dir "$disk" --dir "$shm" \
    --spillway "$dist/spillway" --out-dir "$results" --name "vs-kvikio-$(gpu_name)" ${KVIKIO_ARGS:-}
}

# Hugging Face's Trainer and Lightning with and without spillway (benches/integrations.py),
# their packages from the wheels scripts/fetch-integration-wheels.sh downloaded into
# $INTEGRATION_WHEELS (default dist-integrations; no network here), put after the machine's
# own packages so that its torch is the one used. INTEGRATION_ARGS narrows or widens it.
integrations() {
  local site=/tmp/spillway-integrations wheels=${INTEGRATION_WHEELS:-dist-integrations}
  rm -rf "$site"
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" \
    "$wheels"/*.whl || return 1
  step env PYTHONPATH="$PYTHONPATH:$site" "$py" benches/integrations.py --path "$shm" \
    --out "$results/integrations-$(gpu_name).json" ${INTEGRATION_ARGS:-}
}

# "h100" or "h200": the GPU in the results' names.
gpu_name() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
    grep -oiE 'h100|h200|a100|b200|l40s' | tr 'A-Z' 'a-z' || echo gpu
}

# Two GPUs or more: DDP training under torchrun with spillway on every rank (gradients
# bitwise equal to the same training without it; each rank's storage from rank_paths, then
# a file name every rank shares), and each rank's bandwidth alone and with both at once.
multi_gpu() {
  local gpus paths="" i
  gpus=$("$py" -c "import torch; print(torch.cuda.device_count())") || return 1
  if ((gpus < 2)); then
    echo "note: $gpus GPU: the multi-GPU checks need two"
    return 0
  fi
  for i in 0 1; do
    mkdir -p "$shm/rank$i"
    paths+="${paths:+;}$i=$shm/rank$i"
  done
  local run=("$py" -m torch.distributed.run --standalone --nproc-per-node 2)
  step env SPILLWAY_RANK_PATHS="$paths" "${run[@]}" crates/python/tests/ddp_offload.py \
    --json "$results/ddp-2gpu-h200.json"
  step "${run[@]}" crates/python/tests/ddp_offload.py --path "$disk/ddp.bin" --capacity 2GiB
  rm -f "$disk"/ddp.rank*.bin
  # FSDP2, tensor and sequence parallelism, each composed with checkpointing or compile:
  # bitwise against the same trainings without spillway, no parameter memory offloaded.
  step "${run[@]}" crates/python/tests/fsdp_offload.py --path "$shm/fsdp.bin" \
    --json "$results/fsdp-2gpu-$(gpu_name).json"
  if [[ -z ${SKIP_PERF:-} ]]; then
    step env SPILLWAY_RANK_PATHS="$paths" "${run[@]}" benches/ranks.py --out "$results" \
      --name ranks-2gpu-h200-shm
  fi
}

storages=("$disk" "$shm")
shm_ext4=""
if [[ $(id -u) -eq 0 ]] && shm_ext4=$(loop_ext4_on_shm); then
  storages+=("$shm_ext4")
else
  echo "note: no loop ext4 on /dev/shm (needs root, losetup and mkfs.ext4)"
fi
provide_udev_properties "${storages[@]}"

python_env || failures+=("installing the Python package from $dist/wheels")
if [[ -n ${PERF_ONLY:-} ]]; then
  case $PERF_ONLY in
    engine) engine_perf ;;
    train) train_perf ;;
    rok) rok_grid ;;
    ranks) multi_gpu ;;
    kvikio) vs_kvikio || failures+=("installing KvikIO from $dist/wheels") ;;
    integrations) integrations || failures+=("installing the integrations' wheels from ${INTEGRATION_WHEELS:-dist-integrations}") ;;
    *) failures+=("PERF_ONLY=$PERF_ONLY: expected engine, train, rok, ranks, kvikio or integrations") ;;
  esac
  if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}"
    exit 1
  fi
  exit 0
fi

for dir in "${storages[@]}"; do
  step "$dist/spillway" info --path "$dir"
done
step "$dist/gpu_cuda" --include-ignored --test-threads=1
step "$dist/gpu_pack" --include-ignored --test-threads=1 --skip pack_bandwidth
step "$dist/gpu_crc" --include-ignored --test-threads=1 --skip crc32c_bandwidth
# SPILLWAY_SANITIZE=1: the pack and crc32c kernels under compute-sanitizer too (it needs a
# machine where the sanitizer supports the GPU): memcheck on the tests with exact-size
# buffers, and racecheck (shared-memory hazards) on the smaller of them, since it
# instruments every shared-memory access and the crc32c kernel makes one per byte.
if [[ -n ${SPILLWAY_SANITIZE:-} ]]; then
  [[ -d /usr/local/cuda/bin ]] && export PATH="$PATH:/usr/local/cuda/bin"
  memcheck=(compute-sanitizer --tool memcheck --leak-check no --report-api-errors no --error-exitcode 9)
  racecheck=(compute-sanitizer --tool racecheck --racecheck-report all --report-api-errors no --error-exitcode 9)
  pack_tests=(many_launches_in_flight_stay_correct bad_layouts_are_errors_and_launch_nothing
    empty_layouts_zero_the_extent_or_do_nothing)
  crc_tests=(pieces_at_allocation_edges empty_and_zero_length_pieces bad_streams_and_pointers_are_refused)
  step "${memcheck[@]}" "$dist/gpu_pack" --ignored --test-threads=1 --exact "${pack_tests[@]}"
  step "${memcheck[@]}" "$dist/gpu_crc" --ignored --test-threads=1 --exact "${crc_tests[@]}" \
    many_calls_in_flight_stay_correct every_segment_size_gives_the_same_checksums
  step "${racecheck[@]}" "$dist/gpu_pack" --ignored --test-threads=1 --exact "${pack_tests[@]}"
  step "${racecheck[@]}" "$dist/gpu_crc" --ignored --test-threads=1 --exact "${crc_tests[@]}"
fi
# The Python package: engine on host memory, and spillway.torch on CPU and GPU tensors.
step env SPILLWAY_TEST_DIR="$shm" "$py" -m pytest -q -p no:cacheprovider crates/python/tests
multi_gpu
expect_error "GPU 7 requested" "$dist/spillway" bench --gpu 7 --size 1M --path "$disk/never.dat"
expect_error "--gpu 7" "$dist/spillway" bench --mem host --gpu 7 --size 1M --path "$disk/never.dat"
for dir in "${storages[@]}"; do
  backends=(uring cufile)
  if [[ $(fstype "$dir") == tmpfs ]]; then
    echo "note: $dir is tmpfs, which cuFile cannot register files on: cuFile runs on the other storages"
    backends=(uring)
    step env SPILLWAY_TEST_DIR="$dir" "$dist/gpu_backends" --include-ignored --test-threads=1 uring
    step env SPILLWAY_TEST_DIR="$dir" "$dist/gpu_engine" --include-ignored --test-threads=1 --skip cufile
  else
    step env SPILLWAY_TEST_DIR="$dir" "$dist/gpu_backends" --include-ignored --test-threads=1
    step env SPILLWAY_TEST_DIR="$dir" "$dist/cufile_gpu" --include-ignored --test-threads=1
    step env SPILLWAY_TEST_DIR="$dir" "$dist/gpu_engine" --include-ignored --test-threads=1
  fi
  for backend in "${backends[@]}"; do
    step "$dist/spillway" bench --mem gpu --backend "$backend" --op write,read,randwrite,randread \
      --size 256M --block 1M --qd 16 --verify --path "$dir/verify-$backend.dat"
    step "$dist/spillway" bench --mem gpu --backend "$backend" --op write,read \
      --size 10000019 --block 65537 --qd 8 --threads 2 --verify --path "$dir/odd-$backend.dat"
    # The directory itself: an anonymous file (O_TMPFILE where the filesystem has it).
    # cuFile's compatibility mode opens files again by name, so it must refuse one, saying so.
    anon=("$dist/spillway" bench --mem gpu --backend "$backend" --op write,read --size 64M --verify --path "$dir")
    if [[ $backend == cufile ]] && "$dist/spillway" info --json | grep -q '"gds_mode": *"compat"'; then
      expect_error "anonymous file" "${anon[@]}"
    else
      step "${anon[@]}"
    fi
    # --verify: the engine's checksums on too (the CRC-32C kernel on every write and read).
    step "$dist/spillway" bench --workload tensors --mem gpu --backend "$backend" --tensors 3000 \
      --min-size 1 --max-size 1500KiB --dup 0.2 --verify --path "$dir/tensors-$backend.dat"
    rm -f "$dir/tensors-$backend.dat"
  done
  rm -f "$dir"/verify-*.dat "$dir"/odd-*.dat "$dir"/tensors-*.dat
done

if [[ -z ${SKIP_PERF:-} ]]; then
  # Pack/unpack kernels against one large cuMemcpyDtoD: pack-kernel-h200.json.
  step env RESULTS_DIR="$results" "$dist/gpu_pack" --ignored --exact pack_bandwidth --nocapture
  # The crc32c kernel against a cuMemcpyDtoD of the same size: crc32c-kernel-h200.json.
  step env RESULTS_DIR="$results" "$dist/gpu_crc" --ignored --exact crc32c_bandwidth --nocapture
  step python3 benches/gpu_vs_host.py --spillway "$dist/spillway" --out "$results" \
    --storage "disk=$disk" --storage "shm=$shm" ${shm_ext4:+--storage "shm-ext4=$shm_ext4"}
  engine_perf
  train_perf
fi

if ((${#failures[@]})); then
  echo "GPU suite: ${#failures[@]} step(s) failed:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "GPU suite: all steps passed"
