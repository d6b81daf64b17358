#!/usr/bin/env python3
"""The reference side of the data-parallel benchmark: PyTorch DDP over transformers + PEFT.

    "$VENV/bin/torchrun" --standalone --nproc-per-node N scripts/bench/ddp_train.py \
        --model DIR --batches FILE --recipe fp32 [--warmup N] [--steps N] [--threads N]

Each worker trains the model, adapters and recipe of scripts/bench/peft_train.py (built by its
own code) wrapped in DistributedDataParallel over Gloo (NCCL with `--device cuda`), on its slice
of every saved batch's rows: the global batch is the saved one, as in the single-process run.
DDP averages the gradients of the workers' mean losses; every row has the same number of label
tokens, so that is the gradient of the global batch's mean loss, and the logged loss (the
workers' losses averaged each step) equals the single-process run's.

Rank 0 prints peft_train.py's JSON line with `workers` added, `batch` and tokens/s counting the
global batch, and the step times of rank 0 (the steps are synchronised by the all-reduce).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_train  # noqa: E402


def main():
    args = peft_train.parser().parse_args()
    if args.examples:
        raise SystemExit("ddp_train.py runs on saved batches (--batches) only")
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    steps = peft_train.load_steps(args)
    batch = steps[0][0].shape[0]
    if batch % world:
        raise SystemExit(f"{args.batches}: {batch} rows a batch do not split evenly over {world} workers")
    per_rank = batch // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    steps = [tuple(t[rows] if t is not None else None for t in step) for step in steps]
    model, params, optimizer, autocast = peft_train.build(args)
    model = DistributedDataParallel(model)

    def logged_loss(loss):
        dist.all_reduce(loss)
        return loss.item() / world

    run = peft_train.train(args, model, params, optimizer, autocast, steps, logged_loss)
    tokens = torch.tensor([run["label_tokens"], run["real_tokens"]])
    dist.all_reduce(tokens)
    run["label_tokens"], run["real_tokens"] = tokens.tolist()
    if rank == 0:
        print(json.dumps(peft_train.result(args, steps, run, workers=world)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
