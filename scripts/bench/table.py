#!/usr/bin/env python3
"""Summarises a benchmark results file (JSON Lines written by scripts/bench.sh) as a table.

    python3 scripts/bench/table.py RESULTS.jsonl [--json SUMMARY.json]

Needs only the standard library. Each record is `{"cpu": {...}}` (the CPU's model and bf16
support), `{"gemm": {...}}` (the machine's measured matmul throughput; bf16 "emulated" where the
CPU has no native bf16) or `{"size", "model", "result"}` with a runner's output. PEFT runs under
several recipes (`peft:fp32`, `peft:bf16-base`, `peft:fp32-autocast`); each belongs to the
precision class of lorafit's run it is compared with. Runs repeated over several rounds are
combined: median of the tokens/s and step-time medians, largest peak RSS, the last round's
losses. The ratio rows give lorafit against the fastest PEFT recipe of the same precision class
(named in the row): lorafit/PEFT for speed, step time and memory, and lorafit − PEFT for the
losses (first loss: step 0, before any update, so only numerics differ). The summary also holds
the ratios against every recipe.

Model FLOP utilisation (MFU) = model FLOPs per token × tokens/s / measured GEMM FLOP/s (bf16 GEMM
for bf16-mixed runs, fp32 GEMM for fp32 runs), with FLOPs per token of a LoRA training step:

    4·N_mm                  frozen matmuls: forward 2·N_mm, input-gradient backward 2·N_mm
                            (no weight gradient); N_mm = every block projection plus the output
                            projection (vocab × hidden, counted also when tied to the embeddings)
  + 6·L·T·H·d               causal attention, T = sequence length, H·d = query width: QKᵀ and PV
                            are 2·2·T·H·d forward, halved by the causal mask, backward twice that
  + 6·r·Σ(in + out)         the adapters: forward, input gradient and weight gradient, each
                            2·r·(in + out), summed over the adapted projections

Norms, RoPE, activations, softmax and the loss are elementwise and left out. The real-data
cases (`real-*`) train on padded or packed rows of differing lengths, so their MFU is not shown;
they are compared by useful tokens/s: label tokens (the tokens the loss is taken over) per second
over all measured steps.

A data-parallel case (`*-dist`: runs with differing workers × threads on the same batches) names
each runner with its layout (`lorafit 2×1`; `ddp:fp32` is PyTorch DDP + PEFT) and adds: the
speed-up of lorafit's multi-worker run over one worker with the same threads each, its scaling
efficiency (speed-up / workers), its speed against one worker with all the threads and against
DDP + PEFT with the same layout, the share of its step time spent in all-reduces (rank 0), and
for every run the largest difference of its per-step losses from lorafit's single worker.

A QLoRA case (`*-qlora`: lorafit with a 4-bit base, `lorafit:nf4`, beside lorafit with the dense
base and PEFT + bitsandbytes' QLoRA, `peft:qlora`) prints instead of the lorafit/PEFT row the
ratios the QLoRA targets are set on, each beside its target: NF4 step time / dense step time
(≤ 1.3×, 1.5× where the CPU has no native bf16), NF4 peak RSS / dense peak RSS (≤ 0.45×) and NF4
tokens/s / PEFT + bitsandbytes' (≥ 1.5×).
"""

import argparse
import json
import os
import statistics
import sys

RANK = 16
# The QLoRA targets: (ratio, the bound, whether the ratio must stay at or under it).
QLORA_TARGETS = [
    ("step_time_vs_dense", None, True),  # the bound depends on the CPU: see qlora_rows
    ("peak_rss_vs_dense", 0.45, True),
    ("tokens_per_s_vs_peft", 1.5, False),
]


def flops_per_token(config, seq):
    h = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    ffn = config["intermediate_size"]
    vocab = config["vocab_size"]
    # (in, out) of the seven adapted projections of one block.
    projections = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, ffn), (h, ffn), (ffn, h)]
    n_mm = layers * sum(i * o for i, o in projections) + vocab * h
    attention = 6 * layers * seq * heads * d
    adapters = 6 * RANK * layers * sum(i + o for i, o in projections)
    return 4 * n_mm + attention + adapters


def runner_name(r):
    """`lorafit`, `peft:RECIPE`, or `ddp:RECIPE` for PEFT under DDP (several workers)."""
    if r["runner"] == "lorafit":
        return f"lorafit:{r['quantize']}" if r.get("quantize") else "lorafit"
    return f"{'ddp' if r.get('workers', 1) > 1 else 'peft'}:{r.get('recipe', 'fp32-autocast')}"


def layout(r):
    return f"{r.get('workers', 1)}×{r['threads']}"


def name_layouts(runs):
    """Where a case's runs differ in workers × threads (the data-parallel case), each runner's name
    gets its layout, so that they are told apart: `lorafit 2×1`."""
    sizes = {}
    for (size, _, _), results in runs.items():
        sizes.setdefault(size, set()).update(layout(r) for r in results)
    named = {}
    for (size, precision, runner), results in runs.items():
        if len(sizes[size]) == 1:
            named[(size, precision, runner)] = results
            continue
        for r in results:
            named.setdefault((size, precision, f"{runner} {layout(r)}"), []).append(r)
    return named


def qlora_rows(size, precision, agg, cpu, summary):
    """The QLoRA ratios of a case (see the module's notes), printed beside their targets and added
    to the summary's `qlora`."""
    quantized = [name for name in agg if name.startswith("lorafit:")]
    peft = [name for name in agg if name.startswith("peft:")]
    if not quantized or "lorafit" not in agg:
        return
    q, dense = agg[quantized[0]], agg["lorafit"]
    ratios = {
        "step_time_vs_dense": q["median_step_s"] / dense["median_step_s"],
        "peak_rss_vs_dense": q["peak_rss_mb"] / dense["peak_rss_mb"],
    }
    if peft:
        ratios["tokens_per_s_vs_peft"] = q["tokens_per_s"] / agg[peft[0]]["tokens_per_s"]
    native = cpu is None or cpu["native_bf16"]
    d = {"size": size, "precision": precision, "runner": quantized[0], "against_peft": peft[0] if peft else None}
    figures = []
    for key, bound, at_most in QLORA_TARGETS:
        if key not in ratios:
            continue
        bound = bound if bound is not None else (1.3 if native else 1.5)
        met = ratios[key] <= bound if at_most else ratios[key] >= bound
        d[key] = {"ratio": ratios[key], "target": bound, "met": met}
        sign = "≤" if at_most else "≥"
        figures.append(f"{key} {ratios[key]:.2f}x (target {sign} {bound}x: {'met' if met else 'missed'})")
    summary.setdefault("qlora", []).append(d)
    print(f"{size:<18} {precision:<10} {quantized[0]}: " + "; ".join(figures))


def dist_rows(size, runs, summary):
    """The data-parallel figures of a case whose lorafit runs include several workers (see the
    module's notes); printed and added to the summary's `dist`."""
    for precision in ["fp32", "bf16-mixed"]:
        mine = {k[2]: v for k, v in runs.items() if k[:2] == (size, precision)}
        multi = [name for name, rs in mine.items() if name.startswith("lorafit ") and rs[-1].get("workers", 1) > 1]
        if not multi:
            continue
        name = multi[0]
        last = mine[name][-1]
        workers, threads = last["workers"], last["threads"]
        speed = {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in mine.items()}
        base = f"lorafit 1×{threads}"
        d = {"size": size, "precision": precision, "runner": name}
        if base in speed:
            d["speedup"] = speed[name] / speed[base]
            d["scaling_efficiency"] = d["speedup"] / workers
        if f"lorafit 1×{workers * threads}" in speed:
            d["vs_one_worker_all_threads"] = speed[name] / speed[f"lorafit 1×{workers * threads}"]
        ddp = [n for n in speed if n.startswith("ddp:") and n.endswith(f" {workers}×{threads}")]
        if ddp:
            d["vs_ddp"] = speed[name] / speed[ddp[0]]
        d["allreduce_share"] = statistics.median(r["allreduce_share"] for r in mine[name])
        if base in mine:
            ref = mine[base][-1]["losses"]
            d["max_loss_diff"] = {
                n: max(abs(a - b) for a, b in zip(rs[-1]["losses"], ref)) for n, rs in mine.items()
            }
        summary.setdefault("dist", []).append(d)
        figures = [
            f"speed-up over {base} {d['speedup']:.2f}x (scaling efficiency {100 * d['scaling_efficiency']:.0f}%)"
            if "speedup" in d
            else None,
            f"vs lorafit 1×{workers * threads} {d['vs_one_worker_all_threads']:.2f}x"
            if "vs_one_worker_all_threads" in d
            else None,
            f"vs {ddp[0]} {d['vs_ddp']:.2f}x" if ddp else None,
            f"all-reduce {100 * d['allreduce_share']:.1f}% of a step",
        ]
        print(f"{size} {precision} {name}: " + "; ".join(f for f in figures if f))
        if "max_loss_diff" in d:
            diffs = ", ".join(f"{n} {v:.1e}" for n, v in d["max_loss_diff"].items() if n != base)
            print(f"{size} {precision} largest per-step loss difference from {base}: {diffs}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()

    gemm, cpu = None, None
    runs = {}  # (size, precision, runner) -> list of results; runner "lorafit" or "peft:RECIPE"
    models = {}
    with open(args.results) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "cpu" in record:
                cpu = record["cpu"]
                continue
            if "gemm" in record:
                # Measured before and after the runs: the higher figure is the roofline.
                g = record["gemm"]
                if gemm is None:
                    gemm = dict(g)
                else:
                    for key in ("fp32_gflops", "bf16_gflops"):
                        if isinstance(g[key], (int, float)):
                            gemm[key] = max(gemm[key], g[key])
                continue
            r = record["result"]
            runs.setdefault((record["size"], r["precision"], runner_name(r)), []).append(r)
            models[record["size"]] = record["model"]
    runs = name_layouts(runs)

    summary = {"cpu": cpu, "gemm": gemm, "runs": []}
    if cpu:
        yes = lambda flag: "yes" if cpu[flag] else "no"
        print(
            f"CPU {cpu['model']}, {cpu['cores']} cores: AVX512-BF16 {yes('avx512_bf16')}, AMX-BF16 "
            f"{yes('amx_bf16')}" + ("" if cpu["native_bf16"] else " (bf16 emulated: bf16-mixed skipped)")
        )
    if gemm:
        bf16 = gemm["bf16_gflops"]
        bf16 = f"{bf16:.0f} GFLOP/s" if isinstance(bf16, (int, float)) else str(bf16)
        print(
            f"GEMM {gemm['gemm_n']}², {gemm['threads']} threads: fp32 {gemm['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {bf16}"
        )
    header = (
        f"{'case':<18} {'precision':<10} {'runner':<18} {'batch×seq':>9} {'tokens/s':>9} {'useful/s':>9} "
        f"{'step s':>8} {'peak RSS MB':>11} {'first loss':>10} {'final loss':>10} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    sizes = list(dict.fromkeys(k[0] for k in runs))
    for size in sizes:
        with open(os.path.join(models[size], "config.json")) as f:
            config = json.load(f)
        for precision in ["fp32", "bf16-mixed"]:
            agg = {}
            runners = sorted(
                {k[2] for k in runs if k[:2] == (size, precision)}, key=lambda r: (r.startswith("lorafit"), r)
            )
            for runner in runners:
                results = runs.get((size, precision, runner))
                if not results:
                    continue
                last = results[-1]
                tokens_per_s = statistics.median(r["tokens_per_s"] for r in results)
                useful = [r["label_tokens_per_s"] for r in results if "label_tokens_per_s" in r]
                row = {
                    "size": size,
                    "precision": precision,
                    "runner": runner,
                    "batch": last["batch"],
                    "seq": last["seq"],
                    "rounds": len(results),
                    "measured_steps": last["steps"],
                    "tokens_per_s": tokens_per_s,
                    "useful_tokens_per_s": statistics.median(useful) if useful else float("nan"),
                    "checkpointing": last.get("checkpointing", False),
                    "median_step_s": statistics.median(r["median_step_s"] for r in results),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                    "first_loss": last.get("first_loss", float("nan")),
                    "final_loss": last["final_loss"],
                    "flops_per_token": flops_per_token(config, last["seq"]),
                }
                peak = gemm and gemm["bf16_gflops" if precision == "bf16-mixed" else "fp32_gflops"]
                if isinstance(peak, (int, float)) and not size.startswith("real-"):
                    row["mfu"] = row["flops_per_token"] * tokens_per_s / (peak * 1e9)
                agg[runner] = row
                summary["runs"].append(row)
                mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "     -"
                print(
                    f"{size:<18} {precision:<10} {runner:<18} {row['batch']:>4}×{row['seq']:<4} "
                    f"{tokens_per_s:>9.0f} {row['useful_tokens_per_s']:>9.0f} {row['median_step_s']:>8.3f} "
                    f"{row['peak_rss_mb']:>11.0f} "
                    f"{row['first_loss']:>10.4f} {row['final_loss']:>10.4f} {mfu}"
                )
            if any(name.startswith("lorafit:") for name in agg):
                qlora_rows(size, precision, agg, cpu, summary)
                continue
            peft = [r for name, r in agg.items() if name != "lorafit"]
            if "lorafit" not in agg or not peft:
                continue
            l, fastest = agg["lorafit"], max(peft, key=lambda r: r["tokens_per_s"])
            for p in sorted(peft, key=lambda r: r is not fastest):
                ratio = {
                    "size": size,
                    "precision": precision,
                    "against": p["runner"],
                    "fastest_peft": p is fastest,
                    "tokens_per_s_ratio": l["tokens_per_s"] / p["tokens_per_s"],
                    "useful_tokens_per_s_ratio": l["useful_tokens_per_s"] / p["useful_tokens_per_s"],
                    "step_time_ratio": l["median_step_s"] / p["median_step_s"],
                    "peak_rss_ratio": l["peak_rss_mb"] / p["peak_rss_mb"],
                    "first_loss_diff": l["first_loss"] - p["first_loss"],
                    "final_loss_diff": l["final_loss"] - p["final_loss"],
                }
                summary.setdefault("ratios", []).append(ratio)
                if p is not fastest:
                    continue
                print(
                    f"{size:<18} {precision:<10} {'lorafit/' + p['runner']:<18} {'':>9} "
                    f"{ratio['tokens_per_s_ratio']:>8.2f}x {ratio['useful_tokens_per_s_ratio']:>8.2f}x "
                    f"{ratio['step_time_ratio']:>7.2f}x "
                    f"{ratio['peak_rss_ratio']:>10.2f}x {ratio['first_loss_diff']:>+10.4f} {ratio['final_loss_diff']:>+10.4f}"
                )
    for size in sizes:
        dist_rows(size, runs, summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
