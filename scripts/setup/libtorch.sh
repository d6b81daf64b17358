#!/usr/bin/env bash
# Installs the libtorch that tch 0.26 needs (PyTorch 2.13.0) into a per-user cache and points the
# repository at it through the `.libtorch` link that `.cargo/config.toml` names.
#
#   scripts/setup/libtorch.sh          CPU libtorch assembled from three PyPI wheels (default)
#   scripts/setup/libtorch.sh --cuda   the full CUDA torch wheel and its dependencies, in a venv
#
# CPU mode downloads about 540 MB (torch 527 MB, nvidia-cuda-runtime 2.2 MB, nvidia-cuda-cupti
# 10.7 MB; the last two hold the small CUDA runtime and CUPTI libraries that libtorch_cpu.so links
# to) and keeps a 486 MB directory. CUDA mode downloads about 2.7 GB and keeps about 4.7 GB.
# Both are idempotent: a second run only checks what is there and takes well under a second.
# A LIBTORCH already set in the environment is respected and nothing is installed.
set -euo pipefail

TORCH_VERSION=2.13.0
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
mode=cpu
case "${1:-}" in
  "") ;;
  --cuda) mode=cuda ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "setup/libtorch.sh: unknown argument '$1' (expected nothing or --cuda)" >&2; exit 2 ;;
esac

say() { echo "setup/libtorch.sh: $*" >&2; }
size_of() { du -sh "$1" 2>/dev/null | cut -f1; }

# Replace the repository's `.libtorch` link in one rename, so a build never sees it half-made.
link_repo_to() {
  local target=$1
  if [ "$(readlink "$repo/.libtorch" 2>/dev/null)" != "$target" ]; then
    ln -sfn "$target" "$repo/.libtorch.tmp.$$"
    mv -T "$repo/.libtorch.tmp.$$" "$repo/.libtorch"
  fi
}

if [ -n "${LIBTORCH:-}" ]; then
  if [ ! -d "$LIBTORCH/lib" ] || [ ! -d "$LIBTORCH/include" ]; then
    say "LIBTORCH=$LIBTORCH is set but has no lib/ and include/; unset it to let this script install libtorch"
    exit 1
  fi
  say "using LIBTORCH=$LIBTORCH from the environment (nothing installed)"
  exit 0
fi

if [ "$mode" = cuda ]; then
  # The same venv serves the Python interop tests (scripts/setup/python.sh adds their packages).
  venv="$cache/venv-torch-$TORCH_VERSION"
  "$here/python.sh" >&2
  torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  # Equivalent to LIBTORCH_USE_PYTORCH=1 with the venv active: torch-sys builds against the
  # include/ and lib/ of the installed torch package.
  link_repo_to "$torch_dir"
  say "CUDA libtorch: $torch_dir ($(size_of "$venv") venv)"
  exit 0
fi

dest="$cache/libtorch-$TORCH_VERSION-cpu"
if [ "$(cat "$dest/build-version" 2>/dev/null)" = "$TORCH_VERSION" ] && [ -f "$dest/lib/libtorch_cpu.so" ]; then
  link_repo_to "$dest"
  say "libtorch $TORCH_VERSION (CPU) already installed at $dest"
  exit 0
fi

command -v unzip >/dev/null || { say "needs 'unzip' (apt-get install unzip)"; exit 1; }
command -v cc >/dev/null || { say "needs a C compiler 'cc' (apt-get install gcc)"; exit 1; }

wheels="$cache/wheels"
mkdir -p "$wheels"
start=$(date +%s)
# The torch wheel is fetched for CPython 3.11 whatever the local Python is, so that one set of
# pinned hashes covers every machine: only its shared libraries and headers are used.
say "downloading torch $TORCH_VERSION and the CUDA runtime/CUPTI wheels into $wheels (about 540 MB, hash-checked)"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --require-hashes -r "$here/libtorch_cpu_requirements.txt" -d "$wheels"

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.libtorch-assemble.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
unzip -q -o "$wheels"/torch-$TORCH_VERSION-cp311-*.whl 'torch/include/*' \
  torch/lib/libtorch_cpu.so torch/lib/libc10.so torch/lib/libgomp.so.1 -d "$tmp"
unzip -q -o "$wheels"/nvidia_cuda_runtime-*.whl 'nvidia/cu13/lib/libcudart.so.13' -d "$tmp"
unzip -q -o "$wheels"/nvidia_cuda_cupti-*.whl 'nvidia/cu13/lib/libcupti.so.13' -d "$tmp"
mv "$tmp"/nvidia/cu13/lib/* "$tmp"/torch/lib/
# torch-sys always links -ltorch, yet nothing needs libtorch.so's symbols on CPU (the wheel's real
# one pulls in libtorch_cuda.so and all of CUDA), so an empty library of that name stands in.
echo '' | cc -x c -shared -fPIC -Wl,-soname,libtorch.so -o "$tmp"/torch/lib/libtorch.so -
echo "$TORCH_VERSION" > "$tmp"/torch/build-version   # torch-sys checks this against its own version
rm -rf "$dest"
mv "$tmp"/torch "$dest"
link_repo_to "$dest"
say "installed libtorch $TORCH_VERSION (CPU) at $dest: downloaded $(size_of "$wheels"), kept $(size_of "$dest"), $(( $(date +%s) - start )) s"
