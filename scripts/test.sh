#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test of the
# workspace (formatting, lints, unit, integration and CLI tests).
#
# Runs on any Linux machine with a Rust toolchain; no GPU needed. As root it installs the
# Debian packages the tests use; otherwise it checks they are there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: setpriv (util-linux) runs a CLI test as an unprivileged user; mount
# (also util-linux) gives the full-filesystem test its small tmpfs; fio is the reference
# the host benchmark is compared with (benches/uring_vs_fio.py).
packages=(util-linux mount fio)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# A test that hangs fails the run after 30 minutes instead of holding it until CI gives up.
timeout --foreground 1800 cargo test --workspace --locked || {
  rc=$?
  [[ $rc -eq 124 ]] && echo "error: the tests took over 30 minutes; one of them hangs" >&2
  exit "$rc"
}

echo "== python package (crates/python)"
# A virtual environment of its own, with the build tool and the test dependencies from PyPI;
# the extension is built in debug mode (the workspace build above already compiled it) and
# installed in editable mode. Torch tests run where torch is importable (the GPU suite).
venv=target/python-test-venv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.5,<2" pytest numpy
# torch for the offloader's tests (on CPU tensors through the host engine): the CPU build
# from PyTorch's own index (a fraction of the size of the CUDA one), PyPI's otherwise.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check --index-url https://download.pytorch.org/whl/cpu torch ||
    "$venv/bin/pip" install -q --disable-pip-version-check torch
fi
(cd crates/python && VIRTUAL_ENV="$PWD/../../$venv" "../../$venv/bin/maturin" develop --locked -q)
# Every Python test runs: a test module that cannot import torch fails instead of skipping,
# and every skip prints its reason.
SPILLWAY_REQUIRE_TORCH=1 "$venv/bin/python" -m pytest -q -rs crates/python/tests

echo "== C ABI: the example program offloads and fetches through libspillway (crates/capi)"
bash crates/capi/run-example.sh

echo "== userspace NVMe driver against QEMU's NVMe controller (tests/nvme-vm)"
# A small VM (TCG; Debian's kernel and busybox, fetched with apt) with an emulated IOMMU
# and NVMe controller; the check programs run inside it and the exit status is this step's.
# First boot, controller on vfio-pci:
#   nvme_identify  bring-up, Identify, round trips up to 2x MDTS, a typed NVMe status
#   nvme_qd        random verified writes and reads at queue depths 1, 8, 32 and 128
#   nvme_threads   four queue pairs from four threads at once, verified
#   nvme_backend   the Backend trait: any offsets, host and device memory, verified
#   spillway bench --backend spdk, both workloads, verified
#   nvme_errors    refusals, a controller that stops answering (last: it breaks it)
# Second boot, controller on the kernel's nvme driver:
#   nvme_crosscheck  bind refused while mounted, swap or open; kernel writes / we read,
#                    we write / kernel reads, across bind and unbind (unbind refused
#                    while another process holds the VFIO group)
examples=(nvme_identify nvme_qd nvme_threads nvme_backend nvme_errors nvme_crosscheck)
cargo build --locked -q -p spillway-spdk "${examples[@]/#/--example=}"
cargo build --locked -q --bin spillway
bash tests/nvme-vm/build.sh target/nvme-vm "${examples[@]/#/target/debug/examples/}" target/debug/spillway
bench='spillway bench --backend spdk --pci "$NVMEVM_PCI" --mem host'
NVMEVM_SMP=2 bash tests/nvme-vm/run.sh target/nvme-vm sh -c "set -e
  nvme_identify; nvme_qd; nvme_threads; nvme_backend
  $bench --size 8M --verify --threads 2
  $bench --workload tensors --tensors 300 --max-size 64K --staging 64M
  nvme_errors"
NVMEVM_BIND=nvme bash tests/nvme-vm/run.sh target/nvme-vm nvme_crosscheck
