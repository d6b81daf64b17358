#!/usr/bin/env bash
# Runs lorafit's tests. Installs what they need first (libtorch, and a Python venv with torch,
# transformers and peft for the interop checks), both cached per user, so that on a machine that
# has them the setup takes a few seconds. Extra arguments go to `cargo test`.
#
# The tests against real models and data read them from LORAFIT_ASSETS (default: ../shared/assets
# beside the repository). LORAFIT_SKIP_ASSET_TESTS=1 runs without them.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}

setup_start=$(date +%s%N)
scripts/setup-libtorch.sh
scripts/setup-python.sh
export LORAFIT_INTEROP_PYTHON="$cache/venv-torch-2.13.0/bin/python"
echo "test.sh: setup took $(( ($(date +%s%N) - setup_start) / 1000000 )) ms" >&2

if [ "${LORAFIT_SKIP_ASSET_TESTS:-0}" = 1 ]; then
  unset LORAFIT_ASSETS
  echo "test.sh: LORAFIT_SKIP_ASSET_TESTS=1: the tests against real models and PEFT are skipped" >&2
else
  export LORAFIT_ASSETS=${LORAFIT_ASSETS:-$(cd "$repo/.." && pwd)/shared/assets}
  if [ ! -f "$LORAFIT_ASSETS/README.md" ]; then
    echo "test.sh: no test assets at $LORAFIT_ASSETS: set LORAFIT_ASSETS to their directory," \
         "or LORAFIT_SKIP_ASSET_TESTS=1 to run without them" >&2
    exit 1
  fi
fi
cargo test "$@"
