#!/usr/bin/env python3
"""Random-weight models of fixed, well-known shapes for the speed benchmark (nothing downloaded).

    "$VENV/bin/python" scripts/bench/make_models.py SIZE [SIZE ...] [--out DIR]

SIZE is `small` (SmolLM2-135M's shape) or `medium` (Qwen2.5-0.5B's shape); `tiny` is the shipped
data/default-model and needs nothing built. Each model goes to DIR/SIZE (default DIR:
${LORAFIT_CACHE:-~/.cache/lorafit}/bench) as a Hugging Face directory: config.json and an fp32
model.safetensors, no tokenizer (the benchmark feeds token ids directly).

Idempotent: a directory whose `bench-shape.json` matches the wanted shape is left alone; anything
else is rebuilt under a temporary name and renamed into place.
"""

import argparse
import json
import os
import shutil
import sys
import time

# The shapes. Only what decides the arithmetic and memory is pinned; the rest are the families'
# defaults. The weights are random (initializer_range 0.02), so the loss starts near ln(vocab).
SHAPES = {
    "small": dict(  # SmolLM2-135M
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "medium": dict(  # Qwen2.5-0.5B (qwen2 always has q/k/v biases)
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
}


def default_out():
    cache = os.environ.get("LORAFIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorafit"
    )
    return os.path.join(cache, "bench")


def build(size, out_dir):
    shape = SHAPES[size]
    target = os.path.join(out_dir, size)
    stamp = os.path.join(target, "bench-shape.json")
    try:
        with open(stamp) as f:
            if json.load(f) == shape and os.path.exists(os.path.join(target, "model.safetensors")):
                print(f"make_models: {size} ready at {target}", file=sys.stderr)
                return
    except (OSError, ValueError):
        pass

    import torch  # imported only when there is something to build: it takes seconds
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.time()
    torch.manual_seed(0)
    args = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **args)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "bench-shape.json"), "w") as f:
        json.dump(shape, f, indent=1)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"make_models: {size} ({params / 1e6:.1f}M parameters) written to {target} "
        f"in {time.time() - started:.0f} s",
        file=sys.stderr,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sizes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--out", default=default_out())
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for size in args.sizes:
        build(size, args.out)


if __name__ == "__main__":
    main()
