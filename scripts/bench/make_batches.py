#!/usr/bin/env python3
"""Seeded random token batches that both sides of the benchmark train on.

    "$VENV/bin/python" scripts/bench/make_batches.py --vocab V --batch B --seq T --count N --out FILE

Writes one safetensors file holding `input_ids`, int64 `[N, B, T]`, uniform in [0, V). The labels
are the ids themselves (every position is trained), so no label tensor is stored. Idempotent: an
existing file with the same shape and seed is kept.
"""

import argparse
import json
import os
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in vars(args).items() if k != "out"}
    if os.path.exists(args.out):
        with safe_open(args.out, "pt") as f:
            if f.metadata() == meta:
                return
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.count, args.batch, args.seq), generator=generator)
    tmp = args.out + ".tmp"
    save_file({"input_ids": ids}, tmp, metadata=meta)
    os.replace(tmp, args.out)
    print(f"make_batches: {json.dumps(meta)} -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
