#!/usr/bin/env bash
# Builds the C library (libspillway.so), compiles examples/offload.c against
# include/spillway.h and runs it on a temporary directory, on host memory (no GPU needed).
# Exits with the example's status. Uses $CARGO_TARGET_DIR when set, else target/.
#
#   bash crates/capi/run-example.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# A relative CARGO_TARGET_DIR is relative to where this script was started.
target="$(realpath -m "${CARGO_TARGET_DIR:-$root/target}")"
export CARGO_TARGET_DIR="$target"

echo "== cargo build -p spillway-capi"
(cd "$root" && cargo build -p spillway-capi --locked)
lib="$target/debug"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== cc examples/offload.c"
cc -std=c11 -Wall -Wextra -Werror -pedantic -I "$here/include" \
  "$here/examples/offload.c" -o "$work/offload" \
  -L "$lib" -Wl,-rpath,"$lib" -lspillway
# The header also compiles as C++ (for back ends written in it).
if command -v c++ >/dev/null; then
  c++ -std=c++17 -Wall -Wextra -Werror -fsyntax-only -x c++ -I "$here/include" - <<<'#include "spillway.h"'
fi

echo "== offload $work/data"
mkdir "$work/data"
"$work/offload" "$work/data"
