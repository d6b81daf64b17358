#!/usr/bin/env bash
# Builds a release lorafit for CUDA against a PyTorch release other than the default one, so the
# binary can run on a GPU machine whose own torch (Python wheel) provides the libraries.
#
#   scripts/gpu/build_cuda.sh [--torch 2.11|2.12|2.13]     (default 2.11)
#
# tch's releases each pair with one PyTorch release (tch 0.24 ↔ 2.11, 0.25 ↔ 2.12, 0.26 ↔ 2.13, the
# default build). The source tree is the same: the script copies the tracked sources into
# target/cuda-<torch>/src, pins tch and torch-sys to the matching release there and builds it
# against the headers and libraries of PyPI's torch wheel for that release (CUDA 13). The libraries
# of the CUDA runtime, cuBLAS, cuDNN, NCCL... are not kept: they are needed only where the binary
# runs, and the GPU machine's torch brings them. So the link allows symbols those libraries would
# provide to stay unresolved here. Their headers, which NCCL's process group compiles against,
# come from the wheels of the versions that torch requires (pinned in cuda_requirements.txt).
#
# Output in target/cuda-<torch>/, stripped (together about 50 MB, under what a GPU check may take
# along): lorafit; train_speed, the bench's runner; cuda_tests, the tests that need a GPU
# (tests/cuda.rs). They link libtorch_cuda.so; on the GPU machine run them with
#   LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
# as scripts/gpu/check.sh does.
# Downloads the torch wheel once (about 530 MB, hash-checked) and keeps a 930 MB libtorch in the
# user cache, and the header wheels once (about 970 MB, of which 24 MB of headers are kept); a
# second run rebuilds only what changed.
set -euo pipefail

torch=2.11
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch=${2:?--torch needs a version}; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu/build_cuda.sh: unknown argument '$1' (expected --torch 2.11|2.12|2.13)" >&2; exit 2 ;;
  esac
done
case "$torch" in
  2.11) tch=0.24.0 ;;
  2.12) tch=0.25.0 ;;
  2.13) tch=0.26.0 ;;
  *) echo "gpu/build_cuda.sh: --torch $torch is not one of 2.11, 2.12, 2.13" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
say() { echo "gpu/build_cuda.sh: $*" >&2; }

# 1. The libtorch of that release, assembled from the PyPI wheel (headers and torch's own libraries).
libtorch="$cache/libtorch-$torch.0-cuda"
if [ "$(cat "$libtorch/build-version" 2>/dev/null)" != "$torch.0" ]; then
  command -v unzip >/dev/null || { say "needs 'unzip' (apt-get install unzip)"; exit 1; }
  wheels="$cache/wheels"
  mkdir -p "$wheels"
  say "downloading torch $torch.0 (about 530 MB, hash-checked) into $wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --require-hashes \
    -r <(grep "^torch==$torch.0 " "$here/cuda_requirements.txt") -d "$wheels"
  tmp=$(mktemp -d "$cache/.libtorch-cuda.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  unzip -q -o "$wheels"/torch-$torch.0-cp311-*.whl 'torch/include/*' torch/lib/libtorch.so \
    torch/lib/libtorch_cpu.so torch/lib/libtorch_cuda.so torch/lib/libc10.so \
    torch/lib/libc10_cuda.so torch/lib/libtorch_nvshmem.so torch/lib/libgomp.so.1 -d "$tmp"
  echo "$torch.0" > "$tmp/torch/build-version"   # torch-sys checks this against its own release
  rm -rf "$libtorch"
  mv "$tmp/torch" "$libtorch"
fi

# 1b. The headers NCCL's process group compiles against (NCCL, CUDA runtime, cuBLAS, cuSPARSE,
# cuSOLVER), from the wheels of the versions this torch requires (cuda_requirements.txt). Only
# their include/ directories are kept (24 MB of about 970 MB). Without pinned headers for this
# release lorafit builds without NCCL (data-parallel training on the CPU only).
pins=$(grep " # headers for torch==$torch.0\$" "$here/cuda_requirements.txt" || true)
headers="$cache/cuda-headers-$torch.0"
if [ -z "$pins" ]; then
  say "no NCCL headers pinned for torch $torch.0 in cuda_requirements.txt: building without NCCL"
elif [ "$(cat "$headers/pins" 2>/dev/null)" != "$pins" ]; then
  say "downloading the NCCL and CUDA header wheels (about 970 MB, hash-checked; headers kept)"
  tmp=$(mktemp -d "$cache/.cuda-headers.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # Their wheels are tagged manylinux 2014 to 2_28: pip download matches --platform exactly.
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
    --require-hashes -r <(echo "$pins") -d "$tmp/wheels"
  for wheel in "$tmp"/wheels/*.whl; do unzip -q -o "$wheel" 'nvidia/*/include/*' -d "$tmp/headers"; done
  echo "$pins" > "$tmp/headers/pins"
  rm -rf "$headers"
  mv "$tmp/headers" "$headers"
fi
[ -n "$pins" ] && export LORAFIT_NCCL_INCLUDE="$headers/nvidia/nccl/include:$headers/nvidia/cu13/include"

# 2. The sources (tracked, and new files git does not ignore) with tch pinned to the release that
# pairs with that PyTorch.
build="$repo/target/cuda-$torch"
mkdir -p "$build/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf -) |
  tar -xf - -C "$build/src"
sed -i -E "s/^(tch|torch-sys) = \"=[0-9.]+\"/\1 = \"=$tch\"/" "$build/src/Cargo.toml"
grep -q "^tch = \"=$tch\"" "$build/src/Cargo.toml" || { say "could not pin tch in Cargo.toml"; exit 1; }

# 3. The build. Its own target dir keeps the default build's artifacts untouched.
say "building lorafit (release) against torch $torch.0 with tch $tch"
export LIBTORCH="$libtorch" CARGO_TARGET_DIR="$build/target"
export RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"
cd "$build/src"
cargo build --release --quiet --bin lorafit --example train_speed
cuda_tests=$(cargo test --release --no-run --test cuda --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$cuda_tests" ] || { say "the cuda test binary was not built"; exit 1; }
for binary in "$CARGO_TARGET_DIR/release/lorafit" "$CARGO_TARGET_DIR/release/examples/train_speed" "$cuda_tests"; do
  name=$(basename "$binary"); name=${name%%-*}
  [ "$name" = cuda ] && name=cuda_tests
  strip -o "$build/$name" "$binary"
done
if [ -n "$pins" ]; then
  # The NCCL process group is linked in (its constructor comes from libtorch_cuda.so).
  # (grep -c reads to the end: grep -q would stop nm with SIGPIPE, failing the pipeline.)
  nm -D "$build/lorafit" | grep -c ProcessGroupNCCL > /dev/null || { say "NCCL was not compiled in"; exit 1; }
  say "NCCL compiled in (headers from $headers)"
fi
say "built in $build: $(cd "$build" && du -ch lorafit train_speed cuda_tests | tail -1 | cut -f1) in all; lorafit needs:"
readelf -d "$build/lorafit" | grep NEEDED | sed 's/.*\[/  /; s/\]//' >&2
