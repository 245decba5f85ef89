#!/usr/bin/env bash
# Builds what scripts/gpu-test.sh runs on a GPU machine that has no Rust toolchain (nor a
# network): the release `spillway` binary and the GPU test programs, copied (stripped) into
# dist/, and in dist/wheels the Python package's wheel with pytest's wheels beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
rm -rf "$out" && mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --bin spillway
cp "$target/release/spillway" "$out/"
# Test programs: cargo prints their paths as JSON; keep the GPU ones under stable names.
cargo test --release --locked --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
wanted = {"gpu_cuda": "gpu_cuda", "gpu_pack": "gpu_pack", "gpu_crc": "gpu_crc", "gpu_backends": "gpu_backends",
          "gpu_engine": "gpu_engine", "gpu": "cufile_gpu"}
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    t = msg["target"]
    if "test" in t["kind"] and t["name"] in wanted:
        shutil.copy(msg["executable"], sys.argv[1] + "/" + wanted[t["name"]])
        print("test program:", wanted[t["name"]])
' "$out"
strip --strip-debug "$out"/* 2>/dev/null || true

# The Python package (abi3: one wheel for every CPython >= 3.9), built with maturin from the
# same virtual environment scripts/test.sh uses.
venv=target/python-test-venv
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.5,<2"
"$venv/bin/maturin" build --release --locked -q -m crates/python/Cargo.toml -o "$out/wheels"
"$venv/bin/pip" download -q --disable-pip-version-check --only-binary :all: -d "$out/wheels" pytest
# KvikIO, for benches/vs_kvikio.py on the GPU machine (Python 3.12 there; no network).
"$venv/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary :all: \
  --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$out/wheels" \
  kvikio-cu13 libkvikio-cu13 rapids-logger cuda-pathfinder ||
  echo "note: KvikIO's wheels could not be downloaded: PERF_ONLY=kvikio will not run" >&2
ls -la "$out" "$out/wheels"
