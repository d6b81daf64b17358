#!/usr/bin/env bash
# Side-by-side training speed of lorafit and transformers + PEFT on the same machine, model, saved
# token batches, LoRA (r 16, alpha 32, q/k/v/o/gate/up/down, no dropout) and AdamW, in fp32 and
# bf16-mixed:
#
#   scripts/bench.sh [tiny|small|medium|all] [--steps N] [--warmup N] [--rounds N] [--threads N]
#
# Sizes (random weights, built on first use into ${LORAFIT_CACHE:-~/.cache/lorafit}/bench/):
#   tiny    data/default-model (4 layers, hidden 128), batch 4 × seq 256, 2 warm-up + 8 measured steps
#   small   SmolLM2-135M shape, batch 4 × seq 512, 1 warm-up + 3 measured steps
#   medium  Qwen2.5-0.5B shape, batch 2 × seq 512, 1 warm-up + 3 measured steps
# --steps / --warmup override the measured / warm-up steps of every size. --rounds repeats each
# comparison (default 1). The two runners alternate (PEFT, lorafit, then lorafit, PEFT for the
# next precision or round) so that machine noise hits both. Threads default to the core count.
#
# Prints a table (tokens/s, median step time, peak RSS, final loss, model FLOP utilisation against
# this machine's measured GEMM throughput, lorafit/PEFT ratios) and keeps the raw results and a
# JSON summary in target/bench/. Not part of the test command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
bench_dir="$cache/bench"

which=all steps="" warmup="" rounds=1 threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    tiny|small|medium|all) which=$1 ;;
    --steps) steps=${2:?--steps needs a number}; shift ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --threads) threads=${2:?--threads needs a number}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
case "$which" in
  all) sizes=(tiny small medium) ;;
  *) sizes=("$which") ;;
esac

say() { echo "bench: $*" >&2; }

# size -> model dir, vocab, batch, seq, warm-up steps, measured steps
shape() {
  case "$1" in
    tiny) echo "$repo/data/default-model 768 4 256 2 8" ;;
    small) echo "$bench_dir/small 49152 4 512 1 3" ;;
    medium) echo "$bench_dir/medium 151936 2 512 1 3" ;;
  esac
}

# Everything the runs need, built (or found ready) first.
scripts/setup-libtorch.sh
scripts/setup-python.sh
py="$cache/venv-torch-2.13.0/bin/python"
cargo build --release --quiet --example train_speed
lorafit_bin="$repo/target/release/examples/train_speed"
mkdir -p "$bench_dir"
to_build=()
for size in "${sizes[@]}"; do
  [ "$size" = tiny ] || to_build+=("$size")
done
if [ ${#to_build[@]} -gt 0 ]; then
  "$py" scripts/bench/make_models.py "${to_build[@]}" --out "$bench_dir"
fi

mkdir -p target/bench
results="target/bench/bench-$(date -u +%Y%m%d-%H%M%S).jsonl"
say "raw results in $results"

# The roofline: this machine's fp32 and bf16 matmul throughput through libtorch.
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"

# One run of one runner; its JSON line goes into the results file.
run_one() {  # runner size model batches precision warm-up steps
  local runner=$1 size=$2 model=$3 batches=$4 precision=$5 w=$6 n=$7 out
  say "$size $precision $runner ($w warm-up + $n measured steps)"
  if [ "$runner" = peft ]; then
    # transformers prints load progress and deprecation notes on stderr: keep them out of the way.
    out=$("$py" -W ignore scripts/bench/peft_train.py --model "$model" --batches "$batches" \
      --precision "$precision" --warmup "$w" --steps "$n" --threads "$threads" 2>>"$results.peft.log")
  else
    out=$("$lorafit_bin" --model "$model" --batches "$batches" \
      --precision "$precision" --warmup "$w" --steps "$n" --threads "$threads")
  fi
  printf '{"size": "%s", "model": "%s", "result": %s}\n' "$size" "$model" "$out" >> "$results"
}

started=$(date +%s)
flip=0
for size in "${sizes[@]}"; do
  read -r model vocab batch seq w n <<< "$(shape "$size")"
  w=${warmup:-$w}
  n=${steps:-$n}
  batches="$bench_dir/batches-$size-${batch}x${seq}-$((w + n)).safetensors"
  "$py" scripts/bench/make_batches.py --vocab "$vocab" --batch "$batch" --seq "$seq" \
    --count $((w + n)) --out "$batches"
  for round in $(seq "$rounds"); do
    for precision in fp32 bf16-mixed; do
      if [ $flip = 0 ]; then order=(peft lorafit); else order=(lorafit peft); fi
      flip=$((1 - flip))
      for runner in "${order[@]}"; do
        run_one "$runner" "$size" "$model" "$batches" "$precision" "$w" "$n"
      done
    done
  done
done
say "runs took $(( $(date +%s) - started )) s on $threads threads"
# Measured again after the runs: the table takes the higher of the two, as the roofline.
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"
echo
"$py" scripts/bench/table.py "$results" --json "${results%.jsonl}.summary.json"
