#!/usr/bin/env python3
"""Check with Hugging Face PEFT that the default task is learnable by LoRA in the time budget.

    "$VENV/bin/python" scripts/check_default_task.py [--model data/default-model] [--data data/default]

Fine-tunes LoRA adapters on all seven projections of the default model (q, k, v, o, gate, up,
down) on default/train.jsonl, in plain PyTorch fp32 on the CPU, and reports: the time per optimizer
step, the validation loss before and after, and greedy answers to the held-out questions of
default/val.jsonl before and after (exact-match accuracy plus a few examples).

It prepares the data the way lorafit does for Alpaca rows: prompt ids = encode(prompt) with the
BOS token, response ids = encode(output) + EOS, labels -100 on the prompt, and the loss is the mean
over all label tokens of a step. Exit status 0 when the fine-tuned model answers at least
--min-accuracy of the validation questions exactly right, 1 otherwise.
"""

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_default_model import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, EOS_ID, PAD_ID  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_of(row):
    if row.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_NO_INPUT.format(instruction=row["instruction"])


def tokenize(tok, row, max_len):
    prompt = tok.encode(prompt_of(row)).ids                          # starts with <s>
    response = tok.encode(row["output"], add_special_tokens=False).ids + [EOS_ID]
    ids = (prompt + response)[:max_len]
    labels = ([-100] * len(prompt) + response)[:max_len]
    return ids, labels


def collate(examples):
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def token_loss_sum(model, ids, labels, mask):
    """Sum of next-token cross-entropies over label tokens, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def val_loss(model, examples, batch):
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            s, n = token_loss_sum(model, *collate(examples[i: i + batch]))
            total, count = total + s.item(), count + n
    return total / count


def greedy_answers(model, tok, rows, max_new_tokens=24):
    import torch

    answers = []
    with torch.no_grad():
        for row in rows:
            ids = tok.encode(prompt_of(row)).ids
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=EOS_ID, pad_token_id=PAD_ID)
            answers.append(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip())
    return answers


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(repo, "data", "default-model"))
    ap.add_argument("--data", default=os.path.join(repo, "data", "default"))
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=3, help="validation answers to print")
    ap.add_argument("--min-accuracy", type=float, default=0.8)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    train_rows = read_jsonl(os.path.join(args.data, "train.jsonl"))
    val_rows = read_jsonl(os.path.join(args.data, "val.jsonl"))
    train = [tokenize(tok, r, args.max_seq_len) for r in train_rows]
    val = [tokenize(tok, r, args.max_seq_len) for r in val_rows]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on {','.join(TARGETS)}: "
          f"{trainable:,} trainable parameters")
    print(f"train {len(train)} rows, val {len(val)} rows; AdamW lr {args.lr:g} wd {args.weight_decay:g}, "
          f"batch {args.batch}, {args.steps} steps, warmup {args.warmup}, cosine to 0")

    model.eval()
    loss_before = val_loss(model, val, 16)
    shown = val_rows[: args.show]
    before = greedy_answers(model, tok, val_rows)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(step):  # linear warm-up, then cosine to zero
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    order, pos = [], 0
    start = time.time()
    for step in range(args.steps):
        if pos + args.batch > len(order):  # a new shuffled epoch; drop the short remainder
            order, pos = list(range(len(train))), 0
            rng.shuffle(order)
        ids, labels, mask = collate([train[i] for i in order[pos: pos + args.batch]])
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        s, n = token_loss_sum(model, ids, labels, mask)
        loss = s / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0 or step == 0:
            print(f"  step {step + 1:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - start:5.1f} s", flush=True)
    train_secs = time.time() - start
    model.eval()

    loss_after = val_loss(model, val, 16)
    after = greedy_answers(model, tok, val_rows)
    acc_before = sum(a == r["output"] for a, r in zip(before, val_rows)) / len(val_rows)
    acc_after = sum(a == r["output"] for a, r in zip(after, val_rows)) / len(val_rows)

    print(f"\ntraining: {args.steps} steps in {train_secs:.1f} s ({1000 * train_secs / args.steps:.0f} ms/step)")
    print(f"val loss: {loss_before:.4f} -> {loss_after:.4f}")
    print(f"val exact-match answers: {acc_before:.0%} -> {acc_after:.0%} of {len(val_rows)}")
    for i, row in enumerate(shown):
        q = row["instruction"] + (f" [{row['input']}]" if row["input"] else "")
        print(f"\n  Q: {q}\n  expected: {row['output']}\n  before:   {before[i]!r}\n  after:    {after[i]!r}")
    return 0 if acc_after >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
