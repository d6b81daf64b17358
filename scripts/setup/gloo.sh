#!/usr/bin/env bash
# Installs the headers of Gloo, the collective-communication library inside libtorch that
# lorafit's data-parallel training (src/dist) runs on. libtorch_cpu.so contains Gloo's code and
# exports c10d's ProcessGroupGloo, but the PyTorch wheel ships none of gloo's own headers
# (gloo/algorithm.h, ...), which ProcessGroupGloo.hpp includes; build.rs needs them to compile
# the small C++ shim in src/dist/shim.cpp. Debian's libgloo-dev (a 2022 snapshot of gloo) provides
# them in /usr/include/gloo; the shim only uses gloo's stable device/context types through c10d,
# and was checked to give correct fp32 and bf16 all-reduce and broadcast against libtorch 2.13.
#
# Idempotent: when /usr/include/gloo/algorithm.h exists (or LORAFIT_GLOO_INCLUDE names a
# directory holding gloo/algorithm.h) it only says so. Otherwise it runs apt-get (as root, or with
# sudo when that is available). Without the headers lorafit still builds, without `dist`.
set -euo pipefail

say() { echo "setup/gloo.sh: $*" >&2; }

if [ -n "${LORAFIT_GLOO_INCLUDE:-}" ] && [ -f "$LORAFIT_GLOO_INCLUDE/gloo/algorithm.h" ]; then
  say "gloo headers from LORAFIT_GLOO_INCLUDE=$LORAFIT_GLOO_INCLUDE"
  exit 0
fi
if [ -f /usr/include/gloo/algorithm.h ]; then
  say "gloo headers already installed (/usr/include/gloo, Debian libgloo-dev)"
  exit 0
fi
command -v apt-get >/dev/null || {
  say "needs gloo's headers: install libgloo-dev, or set LORAFIT_GLOO_INCLUDE to a directory holding gloo/algorithm.h"
  exit 1
}
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { say "apt-get install libgloo-dev needs root"; exit 1; }
  sudo=sudo
fi
say "installing libgloo-dev (gloo's headers, for the data-parallel shim)"
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libgloo-dev >&2
say "installed gloo headers in /usr/include/gloo"
