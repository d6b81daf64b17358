#!/usr/bin/env python3
"""The reference side of the speed benchmark: transformers + PEFT training LoRA the usual way.

    "$VENV/bin/python" scripts/bench/peft_train.py --model DIR (--batches FILE | --examples FILE) \
        --recipe fp32|bf16-base|fp32-autocast|qlora|qlora-fp32 [--warmup N] [--steps N] [--threads N] [--checkpointing] \
        [--device cpu|cuda]

Same work as examples/train_speed.rs: LoRA r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down;
AdamW (lr 1e-4, no weight decay), gradient norm clipped at 1.0; step i trains on saved batch
i (labels = inputs, every position trained). The recipes, the ways PEFT users train:
  fp32           fp32 model and adapters (precision class fp32)
  bf16-base      the model loaded in bf16 (`dtype=torch.bfloat16`), PEFT's adapters kept in fp32
                 (`autocast_adapter_dtype=True`), under `torch.autocast("cpu", dtype=torch.bfloat16)`:
                 the usual bf16 recipe on a CPU (precision class bf16-mixed)
  fp32-autocast  an fp32 model under the same autocast: every frozen weight is cast to bf16 at
                 every op (autocast caches only casts of leaves that require grad), so it is the
                 slowest bf16 recipe, kept for reference (precision class bf16-mixed)
  qlora          QLoRA as PEFT + bitsandbytes users train: the model loaded in 4 bits
                 (`BitsAndBytesConfig`: NF4, double quantization, bf16 compute dtype), then
                 `prepare_model_for_kbit_training` (which casts the unquantized weights, embeddings,
                 norms and lm_head, to fp32), fp32 adapters, under the same bf16 autocast
                 (precision class bf16-mixed). bitsandbytes' native CPU dequantization misreads
                 rows whose length is not a multiple of 64 (see scripts/interop/bnb_check.py); the
                 benchmark's shapes have none
  qlora-fp32     the same with fp32 compute and no autocast, where the CPU has no native bf16
                 (precision class fp32)
The optimizer state is fp32 in every recipe.

`--device cuda` (scripts/gpu/check.sh) trains on the GPU, autocast there instead of on the CPU.
`--checkpointing` turns on transformers' gradient checkpointing (non-reentrant, as recommended
for PEFT; the QLoRA recipes pass it to `prepare_model_for_kbit_training`, which otherwise turns
it on by default). `--examples` is the real-data case: tokenized examples (JSON Lines of `input_ids` and
`labels`, -100 where not trained, as lorafit prepared them) trained the usual way: shuffled,
`--micro-batch` examples a step, right-padded to the longest in the batch with an attention mask.

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
# recipe -> (precision class, base model dtype, autocast to bf16)
RECIPES = {
    "fp32": ("fp32", "float32", False),
    "bf16-base": ("bf16-mixed", "bfloat16", True),
    "fp32-autocast": ("bf16-mixed", "float32", True),
    "qlora": ("bf16-mixed", "bfloat16", True),
    "qlora-fp32": ("fp32", "float32", False),
}
# The recipes whose base is stored in 4 bits by bitsandbytes (base dtype = compute dtype).
QLORA = {"qlora", "qlora-fp32"}


def parser():
    """The command line; scripts/bench/ddp_train.py takes the same."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batches")
    p.add_argument("--examples")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--recipe", choices=list(RECIPES), required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p


def main():
    args = parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = load_steps(args)
    model, params, optimizer, autocast = build(args)
    run = train(args, model, params, optimizer, autocast, steps)
    print(json.dumps(result(args, steps, run)))


def load_steps(args):
    """(input_ids, attention_mask, labels) of every step, on `args.device`."""
    from safetensors.torch import load_file

    total = args.warmup + args.steps
    if args.examples:
        steps = padded_batches(args.examples, args.micro_batch, total)
    else:
        saved = load_file(args.batches)["input_ids"]
        if saved.shape[0] < total:
            raise SystemExit(f"{args.batches} holds {saved.shape[0]} batches, {total} steps asked for")
        steps = [(ids, None, ids) for ids in saved[:total]]  # no padding: no mask
    # The batches go to the device before the clock starts, as lorafit's runner loads them.
    return [tuple(t.to(args.device) if t is not None else None for t in step) for step in steps]


def build(args):
    """The recipe's model with PEFT's adapters, the adapter parameters, AdamW, and the recipe's
    autocast (a context manager factory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, base_dtype, bf16_autocast = RECIPES[args.recipe]
    if args.recipe in QLORA:
        model = load_4bit(args, getattr(torch, base_dtype))
    else:
        # SDPA attention, transformers' default, named so a GPU run uses the fused kernels for sure.
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, base_dtype), attn_implementation="sdpa"
        ).to(args.device)
    if args.checkpointing and args.recipe not in QLORA:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    # autocast_adapter_dtype (PEFT's default, spelled out): fp32 adapters beside a bf16 base.
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def autocast():
        if bf16_autocast:
            return torch.autocast(args.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return model, params, optimizer, autocast


def load_4bit(args, compute_dtype):
    """The QLoRA recipes' model: quantized to NF4 by bitsandbytes while it loads, prepared for
    training by PEFT as its QLoRA guide does."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=quantization,
        dtype=compute_dtype,
        attn_implementation="sdpa",
        device_map=args.device,
    )
    kwargs = {"use_reentrant": False} if args.checkpointing else None
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=args.checkpointing, gradient_checkpointing_kwargs=kwargs
    )


def train(args, model, params, optimizer, autocast, steps, logged_loss=lambda loss: loss.item()):
    """One optimizer step per batch, the steps after the warm-up timed. `logged_loss` turns a
    step's loss tensor into the figure a training loop logs (a data-parallel run averages it over
    the workers). Returns the measured figures."""
    import torch

    times, losses, first_loss = [], [], None
    label_tokens = real_tokens = 0
    for step, (ids, mask, labels) in enumerate(steps):
        started = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = logged_loss(loss.detach())  # what a training loop logs every step
        elapsed = time.perf_counter() - started
        if first_loss is None:
            first_loss = loss  # before any update: the base model's loss, equal on both sides
        if step >= args.warmup:
            times.append(elapsed)
            losses.append(loss)
            label_tokens += int((labels[:, 1:] != -100).sum())
            real_tokens += int(mask.sum()) if mask is not None else ids.numel()
    return {
        "times": times,
        "losses": losses,
        "first_loss": first_loss,
        "label_tokens": label_tokens,
        "real_tokens": real_tokens,
    }


def result(args, steps, run, workers=1):
    """The JSON record of a run; `steps` are this process's batches, `workers` of them make a
    step (their label and real tokens are already summed in `run`)."""
    import torch

    median = statistics.median(run["times"])
    batch, seq = steps[0][0].shape
    return {
        "runner": "peft",
        "precision": RECIPES[args.recipe][0],
        "recipe": args.recipe,
        "threads": args.threads,
        "workers": workers,
        "batch": int(batch) * workers,
        "seq": int(seq),
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_s": int(batch) * workers * int(seq) / median,
        "median_step_s": median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": args.device,
        # The caching allocator's own peak, for reference beside the GPU check's nvidia-smi
        # figure (which counts the CUDA context and the allocator's reserve too).
        "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "first_loss": run["first_loss"],
        "final_loss": run["losses"][-1],
        "checkpointing": args.checkpointing,
        "label_tokens_per_s": run["label_tokens"] / sum(run["times"]),
        "real_tokens_per_s": run["real_tokens"] / sum(run["times"]),
        "step_s": run["times"],
        "losses": run["losses"],
    }


def padded_batches(path, micro_batch, total):
    """(input_ids, attention_mask, labels) of `total` steps: the examples shuffled (again each
    epoch) and cut into batches of `micro_batch`, right-padded to the longest of each batch."""
    import random

    import torch

    with open(path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    rng, steps = random.Random(0), []
    while len(steps) < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            batch = [examples[i] for i in order[start : start + micro_batch]]
            width = max(len(e["input_ids"]) for e in batch)
            pad = [width - len(e["input_ids"]) for e in batch]
            ids = torch.tensor([e["input_ids"] + [0] * p for e, p in zip(batch, pad)])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * p for e, p in zip(batch, pad)])
            labels = torch.tensor([e["labels"] + [-100] * p for e, p in zip(batch, pad)])
            steps.append((ids, mask, labels))
            if len(steps) == total:
                break
    return steps


if __name__ == "__main__":
    main()
