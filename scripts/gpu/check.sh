#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine that has Python with torch, transformers and
# peft but no Rust toolchain. It takes along the binaries scripts/gpu/build_cuda.sh made here.
#
#   scripts/gpu/check.sh [--cpu] [--bin DIR] [--out DIR]
#
#   (a) the CUDA build's own checks (the CUDA test binary: fp16 loss scaling on the GPU, which
#       attention path runs, CUDA against CPU numerics)
#   (b) the shipped default run on the GPU and on the CPU, losses compared
#   (c) lorafit train under torchrun as a one-worker NCCL group (one GPU: NCCL refuses two ranks
#       on one), its losses against (b)'s on the GPU
#   (d) the small (SmolLM2-135M shape) and medium (Qwen2.5-0.5B shape) random models at batch
#       8 × 1024 in bf16-mixed, lorafit and transformers + PEFT (SDPA attention, bf16 base, fp32
#       adapters) alternating on the same saved batches; tokens/s, peak GPU memory (nvidia-smi,
#       the same way for both) and MFU against this GPU's measured bf16 matmul rate
#   (e) summary.json in --out (default $OUT, else target/gpu-check)
#
# --cpu rehearses the whole script on a CPU with tiny sizes (the default model, batch 2 × 128)
# against the default build (target/release), so the one GPU run is spent measuring.
# --bin names the directory with lorafit, train_speed and cuda_tests (default target/cuda-2.11).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
mode=cuda bin=target/cuda-2.11 out=${OUT:-target/gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; bin=target/release ;;
    --bin) bin=${2:?--bin needs a directory}; shift ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu/check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "gpu/check.sh: $*" >&2; }
started=$(date +%s)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/lorafit-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The CUDA build runs against this machine's own torch libraries (the default build's rpath
# already names its libtorch).
if [ "$mode" = cuda ]; then
  torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
lorafit="$bin/lorafit" train_speed="$bin/train_speed" cuda_tests="$bin/cuda_tests"
if [ "$mode" = cpu ]; then
  # The rehearsal builds the same three programs with the default (CPU) build.
  cargo build --release --quiet --bin lorafit --example train_speed
  train_speed="$bin/examples/train_speed"
  cuda_tests=$(cargo test --release --no-run --test cuda --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
for b in "$lorafit" "$train_speed" "$cuda_tests"; do
  [ -x "$b" ] || { say "missing $b (build it with scripts/gpu/build_cuda.sh, or cargo build --release for --cpu)"; exit 1; }
done

# Peak GPU memory of one command: nvidia-smi sampled every 50 ms, less the memory in use before.
peak_gpu_mb() {  # file-to-write command...
  local file=$1; shift
  if [ "$mode" = cpu ]; then "$@"; echo null > "$file"; return; fi
  local idle
  idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$file.samples" &
  local sampler=$!
  "$@"
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  sort -n "$file.samples" | tail -1 | awk -v idle="$idle" '{print $1 - idle}' > "$file"
}

# Facts and the roofline.
{
  echo "{\"mode\": \"$mode\","
  echo " \"torch\": $("$py" -c 'import json, torch; print(json.dumps(torch.__version__))'),"
  if [ "$mode" = cuda ]; then
    echo " \"gpu\": $(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | "$py" -c 'import json, sys; print(json.dumps(sys.stdin.read().strip()))'),"
  fi
  echo " \"matmul\": $("$py" scripts/gpu/matmul_rate.py --device "$mode")}"
} > "$work/facts.json"
say "$(cat "$work/facts.json" | tr -d '\n')"

# (a) The CUDA build's own checks.
say "(a) the CUDA test binary"
"$cuda_tests" --test-threads 1 --nocapture > "$out/cuda_tests.log" 2>&1 || true
tail -3 "$out/cuda_tests.log" >&2

# (b) The shipped default on the GPU and on the CPU.
steps=200
[ "$mode" = cpu ] && steps=40
for device in "$mode" cpu; do
  say "(b) the default run on $device ($steps steps)"
  "$lorafit" train configs/default.yaml --set train.device="$device" --set train.max_steps="$steps" \
    --set output.dir="$work/default" --set output.run_name="$device" > "$work/default-$device.log" 2>&1 \
    || { tail -20 "$work/default-$device.log" >&2; exit 1; }
  [ "$mode" = cpu ] && break   # --cpu: one run stands for both
done

# (c) NCCL: lorafit train as a one-worker group under torchrun (NCCL refuses two ranks on one
# GPU), the default run's first steps; NCCL_DEBUG=INFO prints NCCL's version line. --cpu
# rehearses it as a one-worker Gloo group.
say "(c) lorafit train under torchrun: a one-worker $([ "$mode" = cuda ] && echo NCCL || echo Gloo) group"
nccl_rc=0
NCCL_DEBUG=INFO "$py" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python \
  "$lorafit" train configs/default.yaml --set train.device="$mode" --set train.max_steps=20 --set train.log_every=1 \
  --set output.dir="$work/group" --set output.run_name="$mode" > "$out/group.log" 2>&1 || nccl_rc=$?
[ "$nccl_rc" = 0 ] || tail -20 "$out/group.log" >&2

# (d) small and medium, lorafit and PEFT alternating on the same batches.
if [ "$mode" = cuda ]; then
  cases="small medium" batch=8 seq=1024 w=2 n=5
else
  cases="tiny" batch=2 seq=128 w=1 n=2
fi
"$py" scripts/bench/make_models.py $cases --out "$work/models" >&2 2>/dev/null || true
: > "$out/bench.jsonl"
for c in $cases; do
  model="$work/models/$c"; [ "$c" = tiny ] && model="$repo/data/default-model"
  vocab=$("$py" -c "import json; print(json.load(open('$model/config.json'))['vocab_size'])")
  batches="$work/batches-$c.safetensors"
  "$py" scripts/bench/make_batches.py --vocab "$vocab" --batch "$batch" --seq "$seq" --count $((w + n)) --out "$batches"
  for runner in peft lorafit; do
    say "(d) $c bf16-mixed $runner"
    if [ "$runner" = peft ]; then
      peak_gpu_mb "$work/peak" "$py" -W ignore scripts/bench/peft_train.py --model "$model" --device "$mode" \
        --recipe bf16-base --warmup "$w" --steps "$n" --batches "$batches" \
        > "$work/run.json" 2>>"$out/peft.log"
    else
      peak_gpu_mb "$work/peak" "$train_speed" --model "$model" --device "$mode" --precision bf16-mixed \
        --warmup "$w" --steps "$n" --batches "$batches" > "$work/run.json"
    fi
    printf '{"size": "%s", "model": "%s", "peak_gpu_mb": %s, "result": %s}\n' \
      "$c" "$model" "$(cat "$work/peak")" "$(cat "$work/run.json")" >> "$out/bench.jsonl"
  done
done

# (e) The summary.
"$py" scripts/gpu/summary.py --facts "$work/facts.json" --default "$work/default" \
  --bench "$out/bench.jsonl" --tests "$out/cuda_tests.log" \
  --group "$work/group/$mode" --group-log "$out/group.log" --group-rc "$nccl_rc" --seconds $(( $(date +%s) - started )) \
  > "$out/summary.json"
cat "$out/summary.json"
