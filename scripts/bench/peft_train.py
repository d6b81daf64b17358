#!/usr/bin/env python3
"""The reference side of the speed benchmark: transformers + PEFT training LoRA the usual way.

    "$VENV/bin/python" scripts/bench/peft_train.py --model DIR --batches FILE \
        --precision fp32|bf16-mixed [--warmup N] [--steps N] [--threads N]

Same work as examples/train_speed.rs: LoRA r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down;
AdamW (lr 1e-4, no weight decay), gradient norm clipped at 1.0; step i trains on saved batch
i (labels = inputs, every position trained). bf16-mixed is what PEFT users do on a CPU: an fp32
model under `torch.autocast("cpu", dtype=torch.bfloat16)`, adapters and optimizer in fp32.

Prints one JSON line: tokens_per_s (tokens of one step / median step time), median_step_s,
peak_rss_mb (ru_maxrss, the whole process including loading), first_loss (step 0, before any
update), final_loss (the last step's), and the per-step times and losses of the measured steps.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = load_file(args.batches)["input_ids"]
    total = args.warmup + args.steps
    if batches.shape[0] < total:
        raise SystemExit(f"{args.batches} holds {batches.shape[0]} batches, {total} steps asked for")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def autocast():
        if args.precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    times, losses, first_loss = [], [], None
    for step in range(total):
        ids = batches[step]
        started = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # what a training loop logs every step
        elapsed = time.perf_counter() - started
        if first_loss is None:
            first_loss = loss  # before any update: the base model's loss, equal on both sides
        if step >= args.warmup:
            times.append(elapsed)
            losses.append(loss)

    median = statistics.median(times)
    print(
        json.dumps(
            {
                "runner": "peft",
                "precision": args.precision,
                "threads": args.threads,
                "batch": int(batches.shape[1]),
                "seq": int(batches.shape[2]),
                "warmup": args.warmup,
                "steps": args.steps,
                "tokens_per_s": batches.shape[1] * batches.shape[2] / median,
                "median_step_s": median,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "first_loss": first_loss,
                "final_loss": losses[-1],
                "step_s": times,
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()
