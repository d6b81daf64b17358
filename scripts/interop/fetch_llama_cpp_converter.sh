#!/usr/bin/env bash
# Fetches llama.cpp's LoRA-to-GGUF converter, the reference lorafit's GGUF adapter export is
# checked against, and with --runtime also builds llama.cpp itself to run GGUF files in.
# llama.cpp ships inside the llama-cpp-python source distribution on PyPI; this script downloads
# that sdist (llama-cpp-python 0.3.36, which vendors ggml-org/llama.cpp@0c1e57098; sha256 checked)
# with pip and extracts only what the converter needs:
#
#   vendor/llama.cpp/convert_lora_to_gguf.py, convert_hf_to_gguf.py, conversion/ (the model
#   classes both import) and gguf-py/ (the `gguf` package, used through PYTHONPATH)
#
# into ${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}/llama-cpp-python/<version>/, then
# prints the path of convert_lora_to_gguf.py on stdout. Run it as
#
#   PYTHONPATH=<dir>/gguf-py:<dir> python <dir>/convert_lora_to_gguf.py --base MODEL ADAPTER
#
# with a Python that has torch, transformers, numpy and safetensors (the lorafit venv).
# --runtime: also builds the sdist's llama.cpp library (CPU, only `libllama`, -O1: about 140
# compiler runs, with cmake and ninja from PyPI) and puts it beside the sdist's `llama_cpp`
# Python package (and its one missing dependency, diskcache) in <version>-runtime/, whose path
# it then prints instead: PYTHONPATH=<that dir> python -c 'import llama_cpp'.
# Idempotent: once extracted (built), it only prints the path. Messages go to stderr.
# LORAFIT_PYTHON picks the interpreter whose pip downloads (default: the lorafit venv, else python3).
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
root="$cache/llama-cpp-python"
dest="$root/$VERSION"
converter="$dest/convert_lora_to_gguf.py"
runtime="$dest-runtime"

want=converter
case "${1:-}" in
  "") ;;
  --runtime) want=runtime ;;
  -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
  *) echo "interop/fetch_llama_cpp_converter.sh: unknown argument '$1' (expected none or --runtime)" >&2; exit 2 ;;
esac

say() { echo "interop/fetch_llama_cpp_converter.sh: $*" >&2; }

is_ready() {
  [ -f "$dest/.complete" ] && [ -f "$converter" ] || return 1
  [ "$want" = converter ] || [ -f "$runtime/.complete" ]
}
done_path() { if [ "$want" = runtime ]; then echo "$runtime"; else echo "$converter"; fi; }

if is_ready; then
  done_path
  exit 0
fi

mkdir -p "$root"
# Two runs at once (parallel tests) would both download; the second waits and finds it ready.
exec 9>"$root/.lock"
if command -v flock >/dev/null; then
  flock 9
  if is_ready; then
    done_path
    exit 0
  fi
fi

python=${LORAFIT_PYTHON:-}
if [ -z "$python" ]; then
  venv_python="$cache/venv-torch-2.13.0/bin/python"
  if [ -x "$venv_python" ]; then python=$venv_python; else python=python3; fi
fi
"$python" -m pip --version >/dev/null 2>&1 || { say "'$python' has no pip; set LORAFIT_PYTHON"; exit 1; }

sdist_dir="$root/sdist"
sdist="$sdist_dir/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  mkdir -p "$sdist_dir"
  say "downloading the llama-cpp-python $VERSION source distribution"
  # Only llama-cpp-python itself must come as source; its build tools (needed by pip to read the
  # sdist's metadata) may come as wheels instead of being compiled.
  "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$sdist_dir" >&2
  found=$(ls "$sdist_dir"/llama*cpp*python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)
  [ -n "$found" ] || { say "pip did not leave a llama-cpp-python $VERSION sdist in $sdist_dir"; exit 1; }
  [ "$found" = "$sdist" ] || mv "$found" "$sdist"
fi
if [ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$SHA256" ]; then
  say "$sdist does not have the pinned sha256 $SHA256; removing it (run again to download it anew)"
  rm -f "$sdist"
  exit 1
fi

tmp="$root/.extract-$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
prefix=$(tar -tzf "$sdist" | awk -F/ 'NR == 1 { print $1 }')

if [ ! -f "$dest/.complete" ]; then
  say "extracting the converter from $(basename "$sdist")"
  tar -xzf "$sdist" -C "$tmp" --wildcards \
    "$prefix/vendor/llama.cpp/convert_lora_to_gguf.py" \
    "$prefix/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "$prefix/vendor/llama.cpp/conversion/*" \
    "$prefix/vendor/llama.cpp/gguf-py/*"
  touch "$tmp/$prefix/vendor/llama.cpp/.complete"
  rm -rf "$dest"
  mv "$tmp/$prefix/vendor/llama.cpp" "$dest"
  say "converter ready at $dest"
fi

if [ "$want" = runtime ] && [ ! -f "$runtime/.complete" ]; then
  tools="$root/tools"
  if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
    say "installing cmake and ninja into $tools"
    "$python" -m pip install --quiet --target "$tools" cmake ninja >&2
  fi
  say "building llama.cpp's library from $(basename "$sdist") (a few minutes)"
  tar -xzf "$sdist" -C "$tmp" "$prefix/llama_cpp" "$prefix/vendor/llama.cpp"
  src="$tmp/$prefix/vendor/llama.cpp"
  # The libraries are loaded from the package's lib/ folder: each finds the others beside itself.
  PYTHONPATH="$tools" PATH="$tools/bin:$PATH" cmake -S "$src" -B "$tmp/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$tools/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS_RELEASE="-O1 -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" \
    -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >&2
  PYTHONPATH="$tools" PATH="$tools/bin:$PATH" cmake --build "$tmp/build" --target llama >&2
  package="$tmp/$prefix/llama_cpp"
  mkdir -p "$package/lib"
  find "$tmp/build" -name 'lib*.so*' -exec cp -P {} "$package/lib/" \;
  mkdir -p "$tmp/runtime"
  mv "$package" "$tmp/runtime/llama_cpp"
  "$python" -m pip install --quiet --no-deps --target "$tmp/runtime" diskcache >&2
  touch "$tmp/runtime/.complete"
  rm -rf "$runtime"
  mv "$tmp/runtime" "$runtime"
  say "llama.cpp ready at $runtime"
fi
done_path
