#!/usr/bin/env bash
# Creates the Python environment that lorafit's interop checks and data scripts run in: a venv at
#
#   ${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}/venv-torch-2.13.0
#
# holding exactly the packages pinned in scripts/setup/python_requirements.txt (torch 2.13.0,
# transformers, peft, safetensors, tokenizers, numpy, tensorboard, pyarrow, bitsandbytes, trl).
# torch comes from PyPI with its CUDA libraries, so the first run downloads about 2.8 GB (2.3 GB
# when scripts/setup/libtorch.sh has already put the 527 MB torch wheel in the cache's wheels/
# folder) and keeps a 5 GB venv.
#
# Idempotent: the venv records the sha256 of the pinned lines of the requirements file it was built
# from (comments and blank lines left out, so editing a comment rebuilds nothing), and when that
# still matches the script only says so (well under a second). Otherwise it builds a new venv under
# a temporary name and renames it into place, so an interrupted run never leaves a half-made venv
# where a good one is expected. LORAFIT_PYTHON picks the interpreter (default: python3).
# All messages go to stderr; nothing is printed to stdout.
set -euo pipefail

TORCH_VERSION=2.13.0
requirements="$(cd "$(dirname "$0")" && pwd)/python_requirements.txt"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
venv="$cache/venv-torch-$TORCH_VERSION"
stamp_name=lorafit-requirements.sha256   # kept inside the venv, next to pyvenv.cfg
python=${LORAFIT_PYTHON:-python3}

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
  *) echo "setup/python.sh: unknown argument '$1' (expected none)" >&2; exit 2 ;;
esac

say() { echo "setup/python.sh: $*" >&2; }

want=$(grep -Ev '^[[:space:]]*(#|$)' "$requirements" | sha256sum | cut -d' ' -f1)
is_ready() {
  # bin/python is a link to the base interpreter: -x also notices when that one has gone away.
  [ -x "$venv/bin/python" ] && [ "$(cat "$venv/$stamp_name" 2>/dev/null)" = "$want" ]
}

if is_ready; then
  say "venv ready at $venv"
  exit 0
fi

mkdir -p "$cache"
# Two runs at once (say, parallel test jobs) would each build 5 GB; the second waits instead and
# then finds the venv ready.
exec 9>"$cache/.venv-torch-$TORCH_VERSION.lock"
if command -v flock >/dev/null; then
  flock 9
  if is_ready; then
    say "venv ready at $venv"
    exit 0
  fi
fi

command -v "$python" >/dev/null || { say "'$python' not found; set LORAFIT_PYTHON to a Python 3.10+ interpreter"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { say "$("$python" --version 2>&1) is too old; torch $TORCH_VERSION needs Python 3.10 or newer (set LORAFIT_PYTHON)"; exit 1; }

# Everything is built inside one temporary directory in the cache (same file system, so the final
# rename is atomic) and removed with it on any exit, including Ctrl-C.
tmp=$(mktemp -d "$cache/.venv-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
build="$tmp/venv"
start=$(date +%s)

if [ -e "$venv" ]; then
  say "requirements changed (or venv incomplete): rebuilding $venv"
else
  say "creating $venv (first run: downloads about 2.3-2.8 GB, takes a few minutes)"
fi
"$python" -m venv "$build" >&2 ||
  { say "could not create a venv with $python (on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }

export PIP_DISABLE_PIP_VERSION_CHECK=1
wheels="$tmp/wheels"

# Reuse the torch wheel that setup/libtorch.sh downloaded when it fits this interpreter (the dry
# run asks pip itself). It is named as a file because pip ranks an identical file on the index
# above a local one, so --find-links alone would download it again.
local_torch=()
for wheel in "$cache/wheels"/torch-"$TORCH_VERSION"-*.whl; do
  [ -f "$wheel" ] || continue
  if "$build/bin/python" -m pip install --quiet --dry-run --no-deps --no-index "$wheel" >/dev/null 2>&1; then
    local_torch=("$wheel")
    break
  fi
done

# Download first, then install from the downloaded files only: the download folder measures what
# was fetched, and it goes away with the temporary directory.
"$build/bin/python" -m pip download --quiet --dest "$wheels" --find-links "$cache/wheels" \
  "${local_torch[@]}" -r "$requirements" >&2
fetched=$(du -sb "$wheels" | cut -f1)
reused=""
if [ ${#local_torch[@]} -gt 0 ]; then
  fetched=$(( fetched - $(stat -c %s "${local_torch[0]}") ))
  reused=", reused $(basename "${local_torch[0]}")"
fi
"$build/bin/python" -m pip install --quiet --no-index --find-links "$wheels" -r "$requirements" >&2
rm -rf "$wheels"

# Scripts in bin/ name their interpreter by absolute path; point them at the final location.
{ grep -rlI --null -F "$build" "$build/bin" "$build/pyvenv.cfg" || true; } | xargs -0 -r sed -i "s|$build|$venv|g"

"$build/bin/python" -c 'import torch, transformers, peft, safetensors, tokenizers, numpy, tensorboard, pyarrow, bitsandbytes, trl' ||
  { say "the new venv cannot import its packages; leaving the old state unchanged"; exit 1; }

echo "$want" > "$build/$stamp_name"

# Swap in the new venv. Between these two renames there is briefly no venv at all, never a
# partial one; the old venv ends up in $tmp and is deleted with it.
if [ -e "$venv" ]; then
  mv -T "$venv" "$tmp/old"
fi
mv -T "$build" "$venv"
rm -rf "$tmp"   # deleting an old venv's 5 GB of files can itself take a minute
say "venv ready at $venv: downloaded $(( fetched / 1000000 )) MB$reused, $(du -sh "$venv" | cut -f1) on disk, $(( $(date +%s) - start )) s"
