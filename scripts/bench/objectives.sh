#!/usr/bin/env bash
# Time and peak memory of each training objective against SFT, as `lorafit train` runs them on
# the shipped default model (configs/default.yaml: fp32, micro-batch 8, max_seq_len 128):
#
#   scripts/bench/objectives.sh [--steps N]     (default 100 steps each; `scripts/bench.sh objectives`)
#
# sft and distill train on data/default; dpo, ipo, orpo and kto on the same questions as
# preference pairs (scripts/fixtures/default_pairs.py: each answer chosen, the next question's
# answer rejected), 8 pairs a step (kto: 8 answers). distill's teacher is the base model itself:
# its cost is that of any teacher of this shape. No validation or samples, so that only training
# is timed. Prints, per objective, the seconds per step (from lorafit's own "trained N steps in
# S s" line), the peak RSS of the process (/usr/bin/time), and both against SFT. Not part of the
# test command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
steps=100
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=${2:?--steps needs a number}; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "objectives: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/fixtures/default_pairs.py --out "$work/pairs" > /dev/null
# Builds lorafit (release) once, before anything is timed.
scripts/lorafit --version > /dev/null
lorafit="${CARGO_TARGET_DIR:-$repo/target}/release/lorafit"

common=(--set "train.max_steps=$steps" --set train.warmup_steps=0 --set train.eval_every=null
        --set data.validation=null --set "output.sample_prompts=[]" --set "output.dir=$work/runs")
pairs=(--set "data.train=$work/pairs/train_pairs.jsonl")

printf '%-8s %10s %10s %14s %12s\n' objective "s/step" "vs sft" "peak RSS MB" "vs sft"
sft_step="" sft_rss=""
for objective in sft distill dpo ipo orpo kto; do
  extra=()
  case "$objective" in
    sft) ;;
    distill) extra=(--set "distill.teacher=$repo/data/default-model") ;;
    *) extra=("${pairs[@]}") ;;
  esac
  log="$work/$objective.log"
  /usr/bin/time -f '%M' -o "$work/$objective.rss" "$lorafit" train configs/default.yaml "${common[@]}" \
    --set "train.objective=$objective" --set "output.run_name=$objective" "${extra[@]}" > "$log" 2>&1 ||
    { echo "objectives: $objective failed:" >&2; tail -20 "$log" >&2; exit 1; }
  seconds=$(sed -n 's/.*trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' "$log")
  step=$(awk -v s="$seconds" -v n="$steps" 'BEGIN { printf "%.4f", s / n }')
  rss=$(( $(tail -1 "$work/$objective.rss") / 1024 ))
  sft_step=${sft_step:-$step} sft_rss=${sft_rss:-$rss}
  awk -v o="$objective" -v s="$step" -v r="$rss" -v s0="$sft_step" -v r0="$sft_rss" \
    'BEGIN { printf "%-8s %10.4f %9.2fx %14d %11.2fx\n", o, s, s / s0, r, r / r0 }'
done
