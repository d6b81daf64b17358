#!/usr/bin/env bash
# Side-by-side training speed and memory of lorafit and transformers + PEFT on the same machine,
# model, data, LoRA (r 16, alpha 32, q/k/v/o/gate/up/down, no dropout) and AdamW:
#
#   scripts/bench.sh [tiny|small|medium|real|all|scale] [--steps N] [--warmup N] [--rounds N]
#                    [--threads N]
#
# Cases (random weights, built on first use into ${LORAFIT_CACHE:-~/.cache/lorafit}/bench/):
#   tiny    data/default-model (4 layers, hidden 128), batch 4 × seq 256, 2 warm-up + 8 measured
#           steps, fp32 and bf16-mixed, on saved random token batches (every position trained)
#   small   SmolLM2-135M shape, batch 4 × seq 512, 1 warm-up + 3 measured steps, likewise
#   medium  Qwen2.5-0.5B shape, batch 2 × seq 512, 1 warm-up + 3 measured steps, likewise
#   real    the small model with the SmolLM tokenizer on instruction data (alpaca_tiny, and the
#           ShareGPT conversations), max_seq_len 512, 4 rows a step, bf16-mixed, 1 warm-up + 4
#           measured steps: lorafit as `lorafit train` runs it (packed rows, prompts masked),
#           PEFT the usual way on the same tokenized examples (4 examples a step, padded to the
#           longest); compared by useful (label) tokens per second
#   all     tiny, small, medium and real (about 12 minutes here)
#   scale   the small model in bf16-mixed, batch 1 × seq 512, 1024 and 2048, with and without
#           activation checkpointing, 1 warm-up + 2 measured steps (about 10 minutes here)
# --steps / --warmup override the measured / warm-up steps of every case. --rounds repeats each
# comparison (default 1). The two runners alternate (PEFT first, then lorafit first for the next
# comparison) so that machine noise hits both. Threads default to the core count. The real case
# runs lorafit first: it writes the tokenized examples PEFT trains on.
#
# Prints a table (tokens/s, useful tokens/s, median step time, peak RSS, losses, model FLOP
# utilisation against this machine's measured GEMM throughput, lorafit/PEFT ratios) and keeps the
# raw results and a JSON summary in target/bench/. Not part of the test command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
bench_dir="$cache/bench"
assets=${LORAFIT_ASSETS:-$repo/../shared/assets}

which=all steps="" warmup="" rounds=1 threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    tiny|small|medium|real|all|scale) which=$1 ;;
    --steps) steps=${2:?--steps needs a number}; shift ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --threads) threads=${2:?--threads needs a number}; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
case "$which" in
  all) cases=(tiny small medium real) ;;
  *) cases=("$which") ;;
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
scripts/setup/libtorch.sh
scripts/setup/gloo.sh
scripts/setup/python.sh
py="$cache/venv-torch-2.13.0/bin/python"
cargo build --release --quiet --example train_speed
lorafit_bin="$repo/target/release/examples/train_speed"
mkdir -p "$bench_dir"
to_build=()
for case in "${cases[@]}"; do
  case "$case" in
    small|medium) to_build+=("$case") ;;
    real|scale) to_build+=(small) ;;
  esac
done
if [ ${#to_build[@]} -gt 0 ]; then
  "$py" scripts/bench/make_models.py $(printf '%s\n' "${to_build[@]}" | sort -u) --out "$bench_dir"
fi

mkdir -p target/bench
results="target/bench/bench-$(date -u +%Y%m%d-%H%M%S).jsonl"
say "raw results in $results"

# The roofline: this machine's fp32 and bf16 matmul throughput through libtorch.
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"

# One run of one runner; its JSON line goes into the results file under the case's label.
run_one() {  # runner label model precision warm-up steps [runner arguments...]
  local runner=$1 label=$2 model=$3 precision=$4 w=$5 n=$6 out
  shift 6
  say "$label $precision $runner ($w warm-up + $n measured steps)"
  if [ "$runner" = peft ]; then
    # transformers prints load progress and deprecation notes on stderr: keep them out of the way.
    out=$("$py" -W ignore scripts/bench/peft_train.py --model "$model" --precision "$precision" \
      --warmup "$w" --steps "$n" --threads "$threads" "$@" 2>>"$results.peft.log")
  else
    out=$("$lorafit_bin" --model "$model" --precision "$precision" \
      --warmup "$w" --steps "$n" --threads "$threads" "$@")
  fi
  printf '{"size": "%s", "model": "%s", "result": %s}\n' "$label" "$model" "$out" >> "$results"
}

# Both runners on the same arguments, alternating which goes first.
flip=0
both() {  # label model precision warm-up steps [runner arguments...]
  local order
  if [ $flip = 0 ]; then order=(peft lorafit); else order=(lorafit peft); fi
  flip=$((1 - flip))
  for runner in "${order[@]}"; do
    run_one "$runner" "$@"
  done
}

batches_for() {  # vocab batch seq count -> path of saved random batches
  local file="$bench_dir/batches-$2x$3-$4-v$1.safetensors"
  "$py" scripts/bench/make_batches.py --vocab "$1" --batch "$2" --seq "$3" --count "$4" --out "$file"
  echo "$file"
}

# The real-data case: a config for lorafit's data preparation, and the SmolLM tokenizer beside
# the small model (its vocabulary is the model's; the tokenizer adds a [PAD] it never emits).
real_case() {  # name data-file format
  local name=$1 data=$2 format=$3 config="target/bench/real-$1.yaml" examples="target/bench/real-$1.jsonl"
  local w=${warmup:-1} n=${steps:-4}
  cp "$assets/tokenizers/smollm/tokenizer.json" "$bench_dir/small/tokenizer.json"
  cat > "$config" <<YAML
model:
  path: $bench_dir/small
data:
  train: $assets/datasets/$data
  format: $format
  chat_template: chatml
  max_seq_len: 512
train:
  micro_batch_size: 4
output:
  dir: target/bench/runs
YAML
  run_one lorafit "real-$name" "$bench_dir/small" bf16-mixed "$w" "$n" --data "$config" --examples-out "$examples"
  run_one peft "real-$name" "$bench_dir/small" bf16-mixed "$w" "$n" --examples "$examples" --micro-batch 4
}

started=$(date +%s)
for case in "${cases[@]}"; do
  for round in $(seq "$rounds"); do
    case "$case" in
      tiny|small|medium)
        read -r model vocab batch seq w n <<< "$(shape "$case")"
        w=${warmup:-$w} n=${steps:-$n}
        file=$(batches_for "$vocab" "$batch" "$seq" $((w + n)))
        for precision in fp32 bf16-mixed; do
          both "$case" "$model" "$precision" "$w" "$n" --batches "$file"
        done
        ;;
      real)
        real_case alpaca alpaca/alpaca_tiny_torchtune.json alpaca
        real_case sharegpt sharegpt/dummy_conversation_fastchat.json chat
        ;;
      scale)
        w=${warmup:-1} n=${steps:-2}
        for seq in 512 1024 2048; do
          file=$(batches_for 49152 1 "$seq" $((w + n)))
          both "small-1x$seq" "$bench_dir/small" bf16-mixed "$w" "$n" --batches "$file"
          both "small-1x$seq-ckpt" "$bench_dir/small" bf16-mixed "$w" "$n" --batches "$file" --checkpointing
        done
        ;;
    esac
  done
done
say "runs took $(( $(date +%s) - started )) s on $threads threads"
# Measured again after the runs: the table takes the higher of the two, as the roofline.
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"
echo
"$py" scripts/bench/table.py "$results" --json "${results%.jsonl}.summary.json"
