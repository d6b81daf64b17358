#!/usr/bin/env python3
"""The roofline for model FLOP utilisation: the measured matmul rate of this device through torch.

    python3 scripts/gpu/matmul_rate.py [--device cuda|cpu] [--n N]

Prints one JSON line with bf16 and fp32 TFLOP/s: the best of ten n×n by n×n products after
warm-ups (n 8192 on CUDA, 1024 on a CPU), synchronised around each. TF32 stays off for fp32, as
it is in libtorch by default, so fp32 is true fp32.
"""

import argparse
import json
import time


def rate(torch, device, dtype, n):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    n = args.n or (8192 if args.device == "cuda" else 1024)
    out = {"device": args.device, "n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[f"{name}_tflops"] = rate(torch, args.device, dtype, n)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
