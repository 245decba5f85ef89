#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test of the
# workspace (formatting, lints, unit, integration and CLI tests).
#
# Runs on any Linux machine with a Rust toolchain; no GPU needed. As root it installs the
# Debian packages the tests use; otherwise it checks they are there.
#
# Its last line sums up every suite, so that the outcome needs no scrolling back:
#   summary: console filter ok, fmt ok, clippy ok, rust 612 passed 0 failed 3 ignored, ...
# The first suite to fail ends the run, with that suite's exit status, and the summary
# says which one it was and what did not run:
#   summary: console filter ok, fmt ok, clippy FAILED (exit 101); not run: rust, python, ...
set -euo pipefail
cd "$(dirname "$0")/.."

# ---------------------------------------------------------------------------- summary
# The suites, in the order they run and with the names the summary gives them.
suites=("console filter" links fmt clippy rust python "C example" nvme-vm)
results=()  # "<suite> <result>" for each suite that passed, in order
suite=setup # the suite running now; "setup" while installing what the tests need
nvme_boots=0
# The outputs the counts are read from (cargo test's and pytest's, through tee, so that
# they still stream to the terminal); removed on exit.
logs="$(mktemp -d)"

# begin SUITE TITLE: SUITE starts; TITLE is its heading in the output.
begin() {
  suite=$1
  echo "== $2"
}
# passed RESULT: the running suite passed; RESULT ("ok", or counts) goes in the summary.
passed() {
  results+=("$suite $1")
  suite=
}
# cargo test's counts: the sum of the "test result:" lines of every test binary and of
# the doctests, e.g. "612 passed 0 failed 3 ignored"; nothing when there is no such line.
rust_counts() {
  [[ -f $logs/rust.log ]] || return 0
  awk '/^test result:/ {
         lines++
         for (i = 2; i <= NF; i++) {
           word = $i
           sub(/;$/, "", word)
           if (word == "passed" || word == "failed" || word == "ignored") n[word] += $(i - 1)
         }
       }
       END { if (lines) printf "%d passed %d failed %d ignored", n["passed"], n["failed"], n["ignored"] }' \
    "$logs/rust.log"
}
# pytest's counts: its last line ("97 passed, 2 skipped in 12.34s") without the time and
# the commas, e.g. "97 passed 2 skipped"; nothing when pytest did not get that far.
python_counts() {
  [[ -f $logs/python.log ]] || return 0
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran' \
    "$logs/python.log" | tail -n1 | sed -E 's/ in [0-9.]+s.*$//; s/[=,]//g; s/^ +| +$//g' || true
}
# join ITEM...: the items, separated by ", ".
join() {
  local out=$1 item
  shift
  for item in "$@"; do out+=", $item"; done
  printf '%s\n' "$out"
}
# Runs on every exit: success, a failing command under set -e, an explicit exit. Prints
# the summary, then exits with the status the script had.
summary() {
  local rc=$? parts=("${results[@]}") counts="" outcome=FAILED not_run
  if ((rc != 0)); then
    ((rc == 130 || rc == 143)) && outcome=interrupted
    case $suite in
      rust) counts=$(rust_counts) ;;
      python) counts=$(python_counts) ;;
      nvme-vm) counts="after $nvme_boots of 2 boots" ;;
    esac
    parts+=("${suite:-setup} $outcome (exit $rc${counts:+; $counts})")
    # The suites after the failing one did not run (after setup: none of them did).
    not_run=("${suites[@]:${#results[@]}}")
    [[ ${suite:-setup} == setup ]] || not_run=("${not_run[@]:1}")
    if ((${#not_run[@]})); then
      parts[-1]+="; not run: $(join "${not_run[@]}")"
    fi
  fi
  echo "summary: $(join "${parts[@]}")"
  rm -rf "$logs"
  exit "$rc"
}
trap summary EXIT
# Ctrl-C or a kill: exit with the usual status, so that the summary says where it stopped
# (without these, the EXIT trap sees the status of the last command that completed).
trap 'exit 130' INT
trap 'exit 143' TERM

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

# First as it takes well under a second: the filter that keeps the NVMe VM's firmware
# from resetting and clearing the terminal (the last suite boots that VM).
begin "console filter" "VM console filter (tests/nvme-vm/console-filter-test.sh)"
bash tests/nvme-vm/console-filter-test.sh
passed ok

# The documentation's links: every relative link and anchor resolves inside the repository.
begin links "documentation links (scripts/check-links.py)"
python3 scripts/check-links.py
passed ok

begin fmt "cargo fmt --check"
cargo fmt --all -- --check
passed ok
begin clippy "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
passed ok
begin rust "cargo test"
# A test that hangs fails the run after 30 minutes instead of holding it until CI gives up.
# Only stdout goes through tee (the "test result:" lines are there); with pipefail the
# status is timeout's (cargo's), not tee's.
timeout --foreground 1800 cargo test --workspace --locked | tee "$logs/rust.log" || {
  rc=$?
  [[ $rc -eq 124 ]] && echo "error: the tests took over 30 minutes; one of them hangs" >&2
  exit "$rc"
}
passed "$(rust_counts)"

begin python "python package (crates/python)"
# A virtual environment of its own, with the build tool and the test dependencies from PyPI;
# the extension is built in debug mode (the workspace build above already compiled it) and
# installed in editable mode. Torch tests run where torch is importable (the GPU suite).
venv=target/python-test-venv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
# matplotlib: the benchmark scripts' plots (benches/tests).
"$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.5,<2" pytest numpy matplotlib
# torch for the offloader's tests (on CPU tensors through the host engine): the CPU build
# from PyTorch's own index (a fraction of the size of the CUDA one), PyPI's otherwise.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check --index-url https://download.pytorch.org/whl/cpu torch ||
    "$venv/bin/pip" install -q --disable-pip-version-check torch
fi
# The integrations' tests (test_integrations.py): transformers (with accelerate, which its
# Trainer needs), lightning and pytorch-lightning, installed after torch and held to the
# torch there (they depend on it: left free, pip could fetch PyPI's CUDA build). --no-compile:
# the tests import a small part of transformers, and byte-compiling all of it would take
# longer than that.
torch_version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))")
"$venv/bin/pip" install -q --disable-pip-version-check --no-compile -c <(echo "torch==$torch_version") \
  "transformers>=4.40" accelerate "lightning>=2.2" "pytorch-lightning>=2.2"
(cd crates/python && VIRTUAL_ENV="$PWD/../../$venv" "../../$venv/bin/maturin" develop --locked -q)
# Every Python test runs: a test module that cannot import torch (or matplotlib) fails
# instead of skipping, and every skip prints its reason. benches/tests checks the benchmark
# scripts (plots, the KvikIO comparison's harness) against the debug binary built above.
# Its last line has the counts; pipefail makes a failure pytest's status, not tee's.
SPILLWAY_REQUIRE_TORCH=1 "$venv/bin/python" -m pytest -q -rs crates/python/tests benches/tests |
  tee "$logs/python.log"
passed "$(python_counts)"

begin "C example" "C ABI: the example program offloads and fetches through libspillway (crates/capi)"
bash crates/capi/run-example.sh
passed ok

begin nvme-vm "userspace NVMe driver against QEMU's NVMe controller (tests/nvme-vm)"
# A small VM (TCG; Debian's kernel and busybox, fetched with apt) with an emulated IOMMU
# and NVMe controller; the check programs run inside it and the exit status is this step's.
# run.sh strips the firmware's terminal control codes from the console it shows.
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
nvme_boots=1
NVMEVM_BIND=nvme bash tests/nvme-vm/run.sh target/nvme-vm nvme_crosscheck
nvme_boots=2
passed "$nvme_boots boots ok"
