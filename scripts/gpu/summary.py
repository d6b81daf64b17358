#!/usr/bin/env python3
"""The JSON summary of scripts/gpu/check.sh (standard library only).

    python3 scripts/gpu/summary.py --facts F.json --default DIR --bench B.jsonl --tests LOG \
        --group RUN --group-log LOG --group-rc N [--seconds N]

- tests: the CUDA test binary's result line (passed, failed, ignored) and whether it ran at all;
- default: the logged training losses of the default run on each device (DIR/<device>/
  metrics.jsonl) and, when both CUDA and CPU ran, the largest relative difference, against the
  bf16 tolerance (1e-2): fp32 on both, but reductions run in a different order on the GPU;
- group_run: the one-worker NCCL group run under torchrun (RUN, its log and exit code): NCCL's
  version line, and its losses against the default run's on the same device;
- bench: per case, lorafit and PEFT tokens/s, peak GPU memory and MFU (model FLOPs per token, as
  scripts/bench/table.py counts them, × tokens/s / the measured bf16 matmul rate), and the
  lorafit/PEFT ratios.
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from table import flops_per_token  # noqa: E402

LOSS_TOLERANCE = 1e-2


def test_result(log):
    text = open(log).read() if os.path.exists(log) else ""
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
    if not m:
        return {"ran": False, "tail": text[-2000:]}
    skipped = len(re.findall(r"skipped: ", text))
    return {"ran": True, "result": m[1], "passed": int(m[2]), "failed": int(m[3]), "skipped": skipped}


def default_losses(root):
    runs = {}
    for device in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, device, "metrics.jsonl")
        if os.path.exists(path):
            rows = [json.loads(line) for line in open(path) if line.strip()]
            runs[device] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    out = {"losses": runs}
    if "cuda" in runs and "cpu" in runs:
        steps = sorted(set(runs["cuda"]) & set(runs["cpu"]))
        worst = max(abs(runs["cuda"][s] - runs["cpu"][s]) / max(abs(runs["cpu"][s]), 1e-8) for s in steps)
        out.update(max_relative_difference=worst, tolerance=LOSS_TOLERANCE, within=worst <= LOSS_TOLERANCE)
    return out


def group_run(run, log, rc, default):
    """The one-worker group run (NCCL on the GPU): whether it ran, NCCL's version line, and its
    losses against the default run's on the same device for the same steps."""
    path = os.path.join(run, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    text = open(log).read() if os.path.exists(log) else ""
    version = re.search(r"NCCL version [^\n]*", text)
    out = {"exit_code": rc, "steps": len(losses), "nccl_version": version[0] if version else None}
    alone = default["losses"].get(os.path.basename(run), {})
    steps = sorted(set(losses) & set(alone))
    if steps:
        worst = max(abs(losses[s] - alone[s]) / max(abs(alone[s]), 1e-8) for s in steps)
        out.update(max_relative_difference_from_default=worst, within=worst <= LOSS_TOLERANCE)
    if rc != 0:
        out["tail"] = text[-2000:]
    return out


def bench(path, bf16_tflops):
    cases = {}
    for line in open(path) if os.path.exists(path) else []:
        if not line.strip():
            continue
        record = json.loads(line)
        r = record["result"]
        with open(os.path.join(record["model"], "config.json")) as f:
            config = json.load(f)
        row = {
            "tokens_per_s": r["tokens_per_s"],
            "median_step_s": r["median_step_s"],
            "peak_gpu_mb": record["peak_gpu_mb"],
            "first_loss": r.get("first_loss"),
            "final_loss": r["final_loss"],
            "batch": r["batch"],
            "seq": r["seq"],
            "mfu": flops_per_token(config, r["seq"]) * r["tokens_per_s"] / (bf16_tflops * 1e12),
        }
        cases.setdefault(record["size"], {})[r["runner"]] = row
    for runners in cases.values():
        if "lorafit" in runners and "peft" in runners:
            l, p = runners["lorafit"], runners["peft"]
            runners["lorafit/peft"] = {
                "tokens_per_s": l["tokens_per_s"] / p["tokens_per_s"],
                "peak_gpu_mb": l["peak_gpu_mb"] / p["peak_gpu_mb"] if l["peak_gpu_mb"] and p["peak_gpu_mb"] else None,
                "first_loss_diff": (l["first_loss"] or 0) - (p["first_loss"] or 0),
            }
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--facts", "--default", "--bench", "--tests", "--group", "--group-log"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--group-rc", type=int, required=True)
    parser.add_argument("--seconds", type=int)
    args = parser.parse_args()
    facts = json.load(open(args.facts))
    default = default_losses(args.default)
    summary = {
        **facts,
        "seconds": args.seconds,
        "tests": test_result(args.tests),
        "default_run": default,
        "group_run": group_run(args.group, args.group_log, args.group_rc, default),
        "bench": bench(args.bench, facts["matmul"]["bf16_tflops"]),
    }
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
