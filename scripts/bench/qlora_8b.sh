#!/usr/bin/env bash
# QLoRA at 8B scale: one training step of a Llama-3-8B-shaped model whose bf16 weights are
# quantized to NF4 as they are read, against the 7.5 GB peak RSS target:
#
#   scripts/bench/qlora_8b.sh [--steps N]     (default 1 step; `scripts/bench.sh qlora-8b`)
#
# The model (random weights, 16 GB in ~5 GB bf16 shards) is built on first use by
# scripts/bench/make_models.py into ${LORAFIT_CACHE:-~/.cache/lorafit}/bench/llama3-8b, with the
# Llama 2 tokenizer of the test assets beside it (no Llama 3 tokenizer is among them; its 32k ids
# all fall inside the 128k-row embedding). `lorafit train` (release) then trains LoRA r 16 on
# every linear layer at batch 1 × 512 (packed tinyshakespeare paragraphs), bf16-mixed where the
# CPU computes bf16 natively (fp32 elsewhere), `model.quantize: nf4` with double-quantized scales,
# activation checkpointing, under /usr/bin/time. Prints the load time (lorafit's "loaded in"),
# the step time (its "trained N steps in S s"), the wall time and peak RSS, and the peak RSS
# against the target. Not part of the test command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
assets=${LORAFIT_ASSETS:-$repo/../shared/assets}
model="$cache/bench/llama3-8b"
target_gb=7.5
steps=1
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=${2:?--steps needs a number}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "qlora-8b: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

scripts/setup/python.sh
"$cache/venv-torch-2.13.0/bin/python" scripts/bench/make_models.py llama3-8b --out "$cache/bench"
cp "$assets/tokenizers/llama2/llama_tokenizer.json" "$model/tokenizer.json"
# Builds lorafit (release) once, before anything is timed.
scripts/lorafit --version > /dev/null
lorafit="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/lorafit"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/run.yaml" <<YAML
model:
  path: $model
  quantize: nf4
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: all-linear
data:
  train: $assets/datasets/tinyshakespeare/input.txt
  format: completion
  max_seq_len: 512
train:
  max_steps: $steps
  micro_batch_size: 1
  gradient_checkpointing: true
output:
  dir: $work/runs
  run_name: qlora-8b
YAML

echo "qlora-8b: $steps step(s) of $model in NF4, batch 1 × 512, checkpointing" >&2
/usr/bin/time -f '%M %e' -o "$work/time" "$lorafit" train "$work/run.yaml" > "$work/log" 2>&1 ||
  { echo "qlora-8b: lorafit train failed:" >&2; tail -20 "$work/log" >&2; exit 1; }
grep -E '^lorafit:|precision|loaded in|memory|trained' "$work/log" >&2 || true
load=$(sed -n 's/.*loaded in \([0-9.]*\) s.*/\1/p' "$work/log")
train=$(sed -n 's/.*trained [0-9]* steps* in \([0-9.]*\) s.*/\1/p' "$work/log")
read -r rss_kb wall < "$work/time"
awk -v load="$load" -v train="$train" -v n="$steps" -v wall="$wall" -v kb="$rss_kb" -v t="$target_gb" 'BEGIN {
  gb = kb * 1024 / 1e9
  printf "load %.1f s, step %.1f s, wall %.1f s, peak RSS %.2f GB = %.2f× the %.1f GB target (%s)\n",
    load, train / n, wall, gb, gb / t, t, gb <= t ? "met" : "NOT met"
}'
