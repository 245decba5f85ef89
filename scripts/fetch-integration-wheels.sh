#!/usr/bin/env bash
# Downloads, on a machine with a network, the wheels benches/integrations.py needs on a GPU
# machine without one: Hugging Face transformers and accelerate, Lightning, and what they
# import, for that machine's Python (3.12 by default), into dist-integrations/ (carry it
# there beside dist/). torch and its own dependencies are left out: the GPU machine's torch
# is used. Then, there: PERF_ONLY=integrations scripts/gpu-test.sh
#
#   scripts/fetch-integration-wheels.sh [OUT_DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist-integrations}
pyver=${2:-3.12}
rm -rf "$out" && mkdir -p "$out"
# The packages and the closure of their dependencies outside torch's (as pip resolves them
# for transformers 5, accelerate 1 and lightning 2 on CPython 3.12): each without its
# dependencies, so that pip does not fetch torch.
packages=(
  transformers accelerate lightning pytorch-lightning torchmetrics lightning-utilities
  huggingface-hub hf-xet tokenizers safetensors regex pyyaml tqdm psutil kernels
  httpx2 httpcore2 h11 anyio idna click typer rich shellingham markdown-it-py mdurl
  annotated-doc pydantic pydantic-core annotated-types typing-inspection tomlkit truststore
  aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl packaging
)
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
  --python-version "$pyver" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out" "${packages[@]}"
du -sh "$out"
