#!/usr/bin/env bash
# Runs lorafit's tests. Installs what they need first (libtorch, and a Python venv with torch,
# transformers and peft for the interop checks), both cached per user, so that on a machine that
# has them the setup takes a few seconds. Extra arguments go to `cargo test`.
#
# The tests against real models and data read them from LORAFIT_ASSETS (default: ../shared/assets
# beside the repository). These assets cannot be installed from anywhere, so where they are
# missing (a fresh clone) those tests are skipped, and the summary at the end says how many and
# why. LORAFIT_SKIP_ASSET_TESTS=1 skips them even where the assets exist.
# LORAFIT_REQUIRE_ASSETS=1 (set by .ci/run) turns every skip into a failure.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
require=${LORAFIT_REQUIRE_ASSETS:-0}

setup_start=$(date +%s%N)
scripts/setup/libtorch.sh
scripts/setup/gloo.sh
scripts/setup/python.sh
export LORAFIT_INTEROP_PYTHON="$cache/venv-torch-2.13.0/bin/python"
echo "test.sh: setup took $(( ($(date +%s%N) - setup_start) / 1000000 )) ms" >&2

default_assets=$(cd "$repo/.." && pwd)/shared/assets
if [ "${LORAFIT_SKIP_ASSET_TESTS:-0}" = 1 ]; then
  if [ "$require" = 1 ]; then
    echo "test.sh: LORAFIT_SKIP_ASSET_TESTS=1 and LORAFIT_REQUIRE_ASSETS=1 contradict each other" >&2
    exit 2
  fi
  unset LORAFIT_ASSETS
elif [ -n "${LORAFIT_ASSETS:-}" ]; then
  if [ ! -f "$LORAFIT_ASSETS/README.md" ]; then
    echo "test.sh: LORAFIT_ASSETS=$LORAFIT_ASSETS has no README.md: point it at the test assets" \
         "directory, or unset it to run without them" >&2
    exit 2
  fi
elif [ -f "$default_assets/README.md" ]; then
  export LORAFIT_ASSETS=$default_assets
elif [ "$require" = 1 ]; then
  echo "test.sh: LORAFIT_REQUIRE_ASSETS=1 but there are no test assets at $default_assets:" \
       "set LORAFIT_ASSETS to their directory" >&2
  exit 2
else
  echo "test.sh: no test assets at $default_assets: the tests that need them will be skipped" >&2
fi

# Each skipped test appends "<binary>::<test><TAB><reason>" here (tests/common/mod.rs, `skip`).
LORAFIT_SKIP_LOG=$(mktemp "${TMPDIR:-/tmp}/lorafit-skips.XXXXXX")
export LORAFIT_SKIP_LOG
trap 'rm -f "$LORAFIT_SKIP_LOG"' EXIT

status=0
cargo test "$@" || status=$?

# A test that lacks two things logs two lines: count tests, not lines.
skipped=$(cut -f1 "$LORAFIT_SKIP_LOG" | sort -u | wc -l)
if [ "$skipped" -gt 0 ]; then
  {
    echo "test.sh: $skipped tests skipped (they passed without running):"
    echo "  by test binary: $(cut -f1 "$LORAFIT_SKIP_LOG" | sort -u | cut -d: -f1 | uniq -c |
                           awk '{printf "%s%s %s", sep, $2, $1; sep=", "}')"
    echo "  because:"
    cut -f2 "$LORAFIT_SKIP_LOG" | sort | uniq -c | sed 's/^ */    /'
    if [ -z "${LORAFIT_ASSETS:-}" ]; then
      echo "  To run them, put the shared test assets (real models, tokenizers and data sets; not" \
           "part of the repository) at $default_assets, or set LORAFIT_ASSETS to their directory."
    fi
  } >&2
elif [ "$status" = 0 ]; then
  echo "test.sh: every test ran (none skipped)" >&2
fi
exit "$status"
