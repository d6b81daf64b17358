#!/usr/bin/env python3
"""Random-weight models of fixed, well-known shapes for the speed benchmark (nothing downloaded).

    "$VENV/bin/python" scripts/bench/make_models.py SIZE [SIZE ...] [--out DIR]

SIZE is `small` (SmolLM2-135M's shape), `medium` (Qwen2.5-0.5B's shape) or `llama3-8b`
(Llama-3-8B's shape); `tiny` is the shipped data/default-model and needs nothing built. Each model
goes to DIR/SIZE (default DIR: ${LORAFIT_CACHE:-~/.cache/lorafit}/bench) as a Hugging Face
directory: config.json and an fp32 model.safetensors, no tokenizer (the benchmark feeds token ids
directly). `llama3-8b` (16 GB) is too big to build in fp32 through transformers on a 24 GB
machine: it is written in bf16 tensor by tensor, in ~5 GB shards with a
model.safetensors.index.json as transformers' `save_pretrained` shards, with the same
initialisation (normal(0, 0.02) weights, unit norms); the bench adds a tokenizer beside it.

Idempotent: a directory whose `bench-shape.json` matches the wanted shape is left alone; anything
else is rebuilt under a temporary name and renamed into place.
"""

import argparse
import json
import math
import os
import shutil
import struct
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
    "llama3-8b": dict(  # Meta-Llama-3-8B, untied lm_head
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
}

# Shapes written tensor by tensor in bf16 rather than built in fp32 through transformers.
STREAMED = {"llama3-8b"}
# Bytes per shard of a streamed model (transformers' default `max_shard_size`, "5GB").
SHARD_BYTES = 5 * 10**9
# The weights' standard deviation: transformers' `initializer_range` default, which the other
# shapes are initialised with.
INIT_STD = 0.02


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
            weights = ("model.safetensors", "model.safetensors.index.json")
            if json.load(f) == shape and any(os.path.exists(os.path.join(target, w)) for w in weights):
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
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if size in STREAMED:
        params = write_streamed(config, tmp)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(tmp, "bench-shape.json"), "w") as f:
        json.dump(shape, f, indent=1)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    print(
        f"make_models: {size} ({params / 1e6:.1f}M parameters) written to {target} "
        f"in {time.time() - started:.0f} s",
        file=sys.stderr,
    )


def llama_tensors(config):
    """(name, shape) of every tensor of a Llama checkpoint, in transformers' order."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    f, v = config.intermediate_size, config.vocab_size
    yield "model.embed_tokens.weight", (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (v, h)


def write_streamed(config, out_dir):
    """Writes a Llama `config`'s random bf16 weights to `out_dir` one tensor at a time, a few
    million values in memory at once: safetensors shards of at most SHARD_BYTES (each header
    computed from the shapes before any data is written) and their index. Returns the parameter
    count."""
    import torch

    assert config.model_type == "llama", "streamed shapes are Llama-shaped"
    config.dtype = torch.bfloat16
    os.makedirs(out_dir)
    config.save_pretrained(out_dir)
    shards, current, size = [], [], 0
    for name, shape in llama_tensors(config):
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(os.path.join(out_dir, file), tensors, generator)
        weight_map.update({name: file for name, _ in tensors})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total // 2


def write_shard(path, tensors, generator):
    """One safetensors file of bf16 `tensors`: norms are ones, the rest normal(0, INIT_STD) as
    transformers initialises Llama weights, generated and written in chunks of rows."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in tensors:
            if len(shape) == 1:
                f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            rows = max(1, (1 << 24) // shape[1])
            for start in range(0, shape[0], rows):
                chunk = torch.empty(min(rows, shape[0] - start), shape[1])
                chunk.normal_(0.0, INIT_STD, generator=generator)
                f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return offset


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
