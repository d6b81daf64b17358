#!/usr/bin/env bash
# Side-by-side training speed and memory of lorafit and transformers + PEFT on the same machine,
# model, data, LoRA (r 16, alpha 32, q/k/v/o/gate/up/down, no dropout) and AdamW:
#
#   scripts/bench.sh [tiny|small|medium|real|all|scale|dist|qlora|qlora-8b|objectives] [--steps N] [--warmup N]
#                    [--rounds N] [--threads N] [--dist-on tiny|small|medium]
#                    [--qlora-on small|medium|both]
#
# PEFT runs each precision class its usual ways (scripts/bench/peft_train.py): fp32, and for
# bf16-mixed the bf16 base with fp32 adapters under autocast (`bf16-base`) plus, on tiny and
# small, the fp32 base under autocast (`fp32-autocast`, the slowest recipe, for reference).
# The table compares lorafit with the fastest PEFT recipe of the same precision class.
# bf16-mixed runs only where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in
# /proc/cpuinfo): elsewhere bf16 is emulated, many times slower, and reported as skipped; the
# real and scale cases then run in fp32.
#
# Cases (random weights, built on first use into ${LORAFIT_CACHE:-~/.cache/lorafit}/bench/):
#   tiny    data/default-model (4 layers, hidden 128), batch 4 × seq 256, 2 warm-up + 8 measured
#           steps, fp32 and bf16-mixed, on saved random token batches (every position trained)
#   small   SmolLM2-135M shape, batch 4 × seq 512, 1 warm-up + 3 measured steps, likewise
#   medium  Qwen2.5-0.5B shape, batch 2 × seq 512, 1 warm-up + 3 measured steps, likewise
#   real    the small model with the SmolLM tokenizer on instruction data (alpaca_tiny, and the
#           ShareGPT conversations), max_seq_len 512, 4 rows a step, 1 warm-up + 4 measured
#           steps: lorafit as `lorafit train` runs it (packed rows, prompts masked), PEFT the
#           usual way on the same tokenized examples (4 examples a step, padded to the longest);
#           compared by useful (label) tokens per second
#   all     tiny, small, medium and real (sized to finish in under 20 minutes on a 2-core CPU)
#   scale   the small model, batch 1 × seq 512, 1024 and 2048, with and without activation
#           checkpointing, 1 warm-up + 2 measured steps
#   dist    data-parallel: the small model in fp32 on the small case's batches (4 × 512, 1 warm-up
#           + 3 measured steps), T = --threads cores split as lorafit 1 worker × T threads,
#           lorafit 2 workers × T/2 threads (each takes half of every batch's rows), PyTorch DDP +
#           PEFT 2 workers × T/2 (scripts/bench/ddp_train.py, gloo) and lorafit 1 worker × T/2
#           (the baseline of the scaling efficiency); workers launched by the venv's torchrun.
#           `--dist-on tiny` runs it on the tiny case's model and batches instead (a quick check).
#           The table adds the speed-up, scaling efficiency, the share of a step lorafit spends
#           in all-reduces, and how far each run's losses are from lorafit 1 × T/2's.
#   qlora   4-bit frozen base (QLoRA) on the small and medium cases' batches (`--qlora-on` picks
#           one): lorafit with the base in NF4 (`--quantize nf4`, double-quantized scales), lorafit
#           with the base in bf16, and PEFT + bitsandbytes' QLoRA (`peft:qlora`: NF4, double
#           quantization, bf16 compute, prepare_model_for_kbit_training), all bf16-mixed and
#           without activation checkpointing (fp32 compute and `peft:qlora-fp32` where the CPU has
#           no native bf16). The table adds NF4 step time / bf16 step time, NF4 peak RSS / bf16
#           peak RSS and NF4 tokens/s / PEFT + bitsandbytes', beside the targets.
#   qlora-8b  lorafit alone: a Llama-3-8B-shaped model (random bf16 weights, 16 GB, built on first
#           use) quantized to NF4 as it is read, one step of `lorafit train` at batch 1 × 512 with
#           activation checkpointing under /usr/bin/time: load and step time, peak RSS against
#           the 7.5 GB target (scripts/bench/qlora_8b.sh; --steps sets the steps).
#   objectives  lorafit alone: each training objective (sft, distill, dpo, ipo, orpo, kto) as
#           `lorafit train` runs it on the default model, seconds per step and peak RSS against
#           SFT's (scripts/bench/objectives.sh; --steps sets the steps of each run).
# --steps / --warmup override the measured / warm-up steps of every case. --rounds repeats each
# comparison (default 1). The runners of a comparison alternate their order (PEFT first, then
# lorafit first for the next one) so that machine noise hits all. Threads default to the core
# count. The real case runs lorafit first: it writes the tokenized examples PEFT trains on.
#
# Prints the CPU (model, bf16 support) and a table (tokens/s, useful tokens/s, median step time,
# peak RSS, losses, model FLOP utilisation against this machine's measured GEMM throughput,
# lorafit/PEFT ratios) and keeps the raw results (JSON Lines) and a JSON summary in target/bench/.
# Not part of the test command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${LORAFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafit}
bench_dir="$cache/bench"
assets=${LORAFIT_ASSETS:-$repo/../shared/assets}

which=all steps="" warmup="" rounds=1 threads=$(nproc) dist_on=small qlora_on=both
while [ $# -gt 0 ]; do
  case "$1" in
    tiny|small|medium|real|all|scale|dist|qlora|qlora-8b|objectives) which=$1 ;;
    --steps) steps=${2:?--steps needs a number}; shift ;;
    --warmup) warmup=${2:?--warmup needs a number}; shift ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift ;;
    --threads) threads=${2:?--threads needs a number}; shift ;;
    --dist-on) dist_on=${2:?--dist-on needs tiny, small or medium}; shift ;;
    --qlora-on) qlora_on=${2:?--qlora-on needs small, medium or both}; shift ;;
    -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
case "$which" in
  objectives) exec scripts/bench/objectives.sh ${steps:+--steps "$steps"} ;;
  qlora-8b) exec scripts/bench/qlora_8b.sh ${steps:+--steps "$steps"} ;;
esac
case "$dist_on" in tiny|small|medium) ;; *) echo "bench: --dist-on $dist_on: expected tiny, small or medium" >&2; exit 2 ;; esac
case "$qlora_on" in
  small|medium) qlora_sizes=("$qlora_on") ;;
  both) qlora_sizes=(small medium) ;;
  *) echo "bench: --qlora-on $qlora_on: expected small, medium or both" >&2; exit 2 ;;
esac
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
lorafit_bin="${CARGO_TARGET_DIR:-$repo/target}/release/examples/train_speed"
mkdir -p "$bench_dir"
to_build=()
for case in "${cases[@]}"; do
  case "$case" in
    small|medium) to_build+=("$case") ;;
    real|scale) to_build+=(small) ;;
    dist) [ "$dist_on" = tiny ] || to_build+=("$dist_on") ;;
    qlora) to_build+=("${qlora_sizes[@]}") ;;
  esac
done
if [ ${#to_build[@]} -gt 0 ]; then
  "$py" scripts/bench/make_models.py $(printf '%s\n' "${to_build[@]}" | sort -u) --out "$bench_dir"
fi

mkdir -p target/bench
results="target/bench/bench-$(date -u +%Y%m%d-%H%M%S).jsonl"
say "raw results in $results"

# The CPU, and whether it computes bf16 natively: bf16 runs only where it does.
cpu=$("$lorafit_bin" --cpu)
echo "{\"cpu\": $cpu}" >> "$results"
if [[ $cpu == *'"native_bf16":true'* ]]; then
  precisions=(fp32 bf16-mixed) best=bf16-mixed
else
  precisions=(fp32) best=fp32
  say "no native bf16 on this CPU: bf16-mixed is emulated and skipped; real and scale run in fp32"
fi

# The roofline: this machine's fp32 and bf16 matmul throughput through libtorch (bounded time).
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"

# One run of one runner (`lorafit`, `peft:RECIPE`, or `ddp:RECIPE`: PEFT under DDP); its JSON
# line goes into the results file under the case's label. `workers` (default 1) processes of
# `per_worker` threads each (default all of --threads); several go through torchrun.
run_one() {  # runner label model precision warm-up steps [runner arguments...]
  local runner=$1 label=$2 model=$3 precision=$4 w=$5 n=$6 out
  local workers=${workers:-1} per_worker=${per_worker:-$threads}
  local launch=("$cache/venv-torch-2.13.0/bin/torchrun" --standalone --nproc-per-node "$workers")
  shift 6
  say "$label $precision $runner, $workers × $per_worker threads ($w warm-up + $n measured steps)"
  if [ "$runner" = lorafit ]; then
    if [ "$workers" -gt 1 ]; then launch+=(--no-python); else launch=(); fi
    # torchrun's notes (OMP_NUM_THREADS) go to the side log.
    out=$("${launch[@]}" "$lorafit_bin" --model "$model" --precision "$precision" \
      --warmup "$w" --steps "$n" --threads "$per_worker" "$@" 2>>"$results.launch.log")
  elif [ "${runner%%:*}" = ddp ]; then
    out=$(PYTHONWARNINGS=ignore "${launch[@]}" scripts/bench/ddp_train.py --model "$model" \
      --recipe "${runner#ddp:}" --warmup "$w" --steps "$n" --threads "$per_worker" "$@" 2>>"$results.peft.log")
  else
    # transformers prints load progress and deprecation notes on stderr: keep them out of the way.
    out=$("$py" -W ignore scripts/bench/peft_train.py --model "$model" --recipe "${runner#peft:}" \
      --warmup "$w" --steps "$n" --threads "$per_worker" "$@" 2>>"$results.peft.log")
  fi
  printf '{"size": "%s", "model": "%s", "result": %s}\n' "$label" "$model" "$out" >> "$results"
}

# The PEFT recipes a comparison runs: the usual one of the precision class, and on the cheap
# cases the fp32-base autocast reference too.
recipes() {  # case precision
  if [ "$2" = fp32 ]; then echo peft:fp32
  elif [ "$1" = tiny ] || [ "$1" = small ]; then echo peft:bf16-base peft:fp32-autocast
  else echo peft:bf16-base
  fi
}

# lorafit and the PEFT recipes on the same arguments, alternating the order.
flip=0
side_by_side() {  # "peft:RECIPE ..." label model precision warm-up steps [runner arguments...]
  local order i
  read -r -a order <<< "$1"
  shift
  order=("${order[0]}" lorafit "${order[@]:1}")
  if [ $flip = 1 ]; then
    for ((i = ${#order[@]} - 1; i >= 0; i--)); do run_one "${order[i]}" "$@"; done
  else
    for runner in "${order[@]}"; do run_one "$runner" "$@"; done
  fi
  flip=$((1 - flip))
}

# The data-parallel comparison on `threads` cores, the runners' order alternating between rounds.
dist_case() {  # model warm-up steps [runner arguments...]
  local half=$(( threads > 1 ? threads / 2 : 1 )) i workers per_worker runner
  local runs=("1 $threads lorafit" "2 $half lorafit" "2 $half ddp:fp32" "1 $half lorafit")
  for ((i = 0; i < ${#runs[@]}; i++)); do
    local which=$(( flip == 1 ? ${#runs[@]} - 1 - i : i ))
    read -r workers per_worker runner <<< "${runs[which]}"
    workers=$workers per_worker=$per_worker run_one "$runner" "$dist_on-dist" "$1" fp32 "$2" "$3" "${@:4}"
  done
  flip=$((1 - flip))
}

# lorafit NF4, lorafit with the dense base and PEFT + bitsandbytes QLoRA on the same batches, in
# the precision class lorafit trains best in here, the runners' order alternating between rounds.
qlora_case() {  # size
  local model vocab batch seq w n file i runner
  read -r model vocab batch seq w n <<< "$(shape "$1")"
  w=${warmup:-$w} n=${steps:-$n}
  file=$(batches_for "$vocab" "$batch" "$seq" $((w + n)))
  local recipe=peft:qlora
  [ "$best" = fp32 ] && recipe=peft:qlora-fp32
  local runs=("lorafit --quantize nf4" "lorafit" "$recipe")
  for ((i = 0; i < ${#runs[@]}; i++)); do
    read -r -a runner <<< "${runs[flip == 1 ? ${#runs[@]} - 1 - i : i]}"
    run_one "${runner[0]}" "$1-qlora" "$model" "$best" "$w" "$n" --batches "$file" "${runner[@]:1}"
  done
  flip=$((1 - flip))
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
  run_one lorafit "real-$name" "$bench_dir/small" "$best" "$w" "$n" --data "$config" --examples-out "$examples"
  run_one "$(recipes real "$best")" "real-$name" "$bench_dir/small" "$best" "$w" "$n" \
    --examples "$examples" --micro-batch 4
}

started=$(date +%s)
for case in "${cases[@]}"; do
  for round in $(seq "$rounds"); do
    case "$case" in
      tiny|small|medium)
        read -r model vocab batch seq w n <<< "$(shape "$case")"
        w=${warmup:-$w} n=${steps:-$n}
        file=$(batches_for "$vocab" "$batch" "$seq" $((w + n)))
        for precision in "${precisions[@]}"; do
          side_by_side "$(recipes "$case" "$precision")" "$case" "$model" "$precision" "$w" "$n" \
            --batches "$file"
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
          side_by_side "$(recipes scale "$best")" "small-1x$seq" "$bench_dir/small" "$best" "$w" "$n" \
            --batches "$file"
          side_by_side "$(recipes scale "$best")" "small-1x$seq-ckpt" "$bench_dir/small" "$best" "$w" "$n" \
            --batches "$file" --checkpointing
        done
        ;;
      qlora)
        for size in "${qlora_sizes[@]}"; do qlora_case "$size"; done
        ;;
      dist)
        read -r model vocab batch seq w n <<< "$(shape "$dist_on")"
        w=${warmup:-$w} n=${steps:-$n}
        dist_case "$model" "$w" "$n" --batches "$(batches_for "$vocab" "$batch" "$seq" $((w + n)))"
        ;;
    esac
  done
done
say "runs took $(( $(date +%s) - started )) s on $threads threads"
# Measured again after the runs: the table takes the higher of the two, as the roofline.
echo "{\"gemm\": $("$lorafit_bin" --gemm --threads "$threads")}" >> "$results"
echo
"$py" scripts/bench/table.py "$results" --json "${results%.jsonl}.summary.json"
