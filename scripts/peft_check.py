#!/usr/bin/env python3
"""Check a lorafit adapter against Hugging Face PEFT, the reference implementation.

    VENV/bin/python scripts/peft_check.py --base BASE_DIR --adapter ADAPTER_DIR \
        --logits LOGITS_JSON [--tol 1e-4]

BASE_DIR is a Hugging Face model directory (config.json, *.safetensors). ADAPTER_DIR is a PEFT LoRA
adapter (adapter_config.json + adapter_model.safetensors). LOGITS_JSON is what lorafit computed
for the base model with the adapter applied, in fp32:

    {"input_ids": [[int, ...], ...], "logits": [[[float] * vocab] * seq] * batch}

(all rows the same length, no padding). The checks, in order:

1. PEFT loads the adapter, and every tensor of adapter_model.safetensors ends up, bit for bit, in
   the parameter PEFT made for it (PEFT inserts the adapter name: `...q_proj.lora_A.weight` in the
   file is `...q_proj.lora_A.default.weight` in the model). The model has no LoRA parameter that
   the file does not provide (which would mean PEFT kept its own initialisation for it).
2. The PEFT model's logits on input_ids match lorafit's: max |diff| <= tol.
3. The same after `merge_and_unload()`, i.e. with the adapter folded into the base weights.

Prints one JSON line to stdout,
    {"tensors_checked": N, "max_abs_diff_peft": x, "max_abs_diff_merged": y, "ok": bool},
and the reason for every failed check to stderr. Exit status: 0 when every check passes, 1 when
one fails, 2 for bad arguments or unreadable/malformed input files.
"""

import argparse
import json
import math
import os
import sys
import warnings

ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter it loads


class BadInput(Exception):
    """An input file is missing, unreadable or malformed (exit status 2)."""


def fail(msg):
    print(f"peft_check: FAIL: {msg}", file=sys.stderr)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    p.add_argument("--logits", required=True, help="JSON file with input_ids and lorafit's logits")
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference| (default 1e-4)")
    args = p.parse_args()
    if not (args.tol >= 0):
        p.error("--tol must be a non-negative number")
    return args


def read_logits_json(path):
    """Return (input_ids, logits) as nested lists, after checking that their shapes agree."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {path}: {e}")
    if not isinstance(doc, dict) or "input_ids" not in doc or "logits" not in doc:
        raise BadInput(f"{path}: expected an object with keys 'input_ids' and 'logits'")
    ids, logits = doc["input_ids"], doc["logits"]
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        raise BadInput(f"{path}: 'input_ids' must be a non-empty list of non-empty lists of token ids")
    seq = len(ids[0])
    if any(len(r) != seq for r in ids):
        raise BadInput(f"{path}: 'input_ids' rows differ in length (padding is not supported)")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for r in ids for t in r):
        raise BadInput(f"{path}: 'input_ids' must hold non-negative integers")
    if not isinstance(logits, list) or len(logits) != len(ids):
        raise BadInput(f"{path}: 'logits' must have one entry per input_ids row ({len(ids)})")
    vocab = None
    for b, row in enumerate(logits):
        if not isinstance(row, list) or len(row) != seq:
            raise BadInput(f"{path}: logits[{b}] must have {seq} positions like input_ids[{b}]")
        for t, vec in enumerate(row):
            if not isinstance(vec, list) or not vec:
                raise BadInput(f"{path}: logits[{b}][{t}] must be a non-empty list of numbers")
            vocab = len(vec) if vocab is None else vocab
            if len(vec) != vocab:
                raise BadInput(f"{path}: logits[{b}][{t}] has {len(vec)} values, logits[0][0] has {vocab}")
    return ids, logits


def model_param_name(file_key):
    """Where PEFT puts a tensor of adapter_model.safetensors when it loads it as ADAPTER_NAME.

    Mirrors peft.utils.save_and_load: the adapter name goes right after the `lora_*` module
    (`...lora_A.weight` -> `...lora_A.default.weight`, `...lora_embedding_A` ->
    `...lora_embedding_A.default`). Other keys belong to modules_to_save copies.
    """
    prefix, sep, suffix = file_key.rpartition("lora_")
    if sep:
        if "." in suffix:
            head, tail = suffix.split(".", 1)
            return f"{prefix}lora_{head}.{ADAPTER_NAME}.{tail}"
        return f"{file_key}.{ADAPTER_NAME}"
    module, _, leaf = file_key.rpartition(".")
    return f"{module}.modules_to_save.{ADAPTER_NAME}.{leaf}"


def is_lora_param(name):
    """True for the LoRA parameters of ADAPTER_NAME, e.g. `...q_proj.lora_B.default.weight`."""
    parts = name.split(".")
    return any(p.startswith("lora_") and parts[i + 1] == ADAPTER_NAME for i, p in enumerate(parts[:-1]))


def check_loaded_tensors(model, file_tensors):
    """Check 1. Returns (number of file tensors checked, list of failure messages)."""
    import torch

    params = dict(model.named_parameters())
    problems = []
    expected = set()
    for key, want in sorted(file_tensors.items()):
        name = model_param_name(key)
        expected.add(name)
        got = params.get(name)
        if got is None:
            problems.append(f"adapter tensor {key} was not loaded: the model has no parameter {name}")
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key}: file shape {list(want.shape)}, model parameter {name} has {list(got.shape)}")
            continue
        # float64 holds fp32/bf16/fp16 values exactly, so this is a bitwise value comparison even
        # when PEFT stores the adapter in another dtype than the file.
        g, w = got.detach().to(torch.float64), want.to(torch.float64)
        if not torch.equal(g, w):
            diff = (g - w).abs()
            n = int((diff != 0).sum())
            problems.append(f"{key}: {n} of {w.numel()} values differ from the model's {name} "
                            f"(max |diff| {diff.max().item():.3e}); PEFT did not load what the file holds")
    for name in sorted(params):
        if is_lora_param(name) and name not in expected:
            problems.append(f"the model has LoRA parameter {name} but the adapter file has no tensor "
                            f"for it (PEFT kept its own initialisation)")
    return len(file_tensors), problems


def max_abs_diff(model, input_ids, want):
    """Check 2/3: max |model logits - lorafit logits| (NaN when any value is not finite)."""
    import torch

    with torch.no_grad():
        got = model(input_ids=input_ids).logits.to(torch.float32)
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"logits shape {list(want.shape)} in the JSON, the model gives {list(got.shape)}")
    diff = (got - want).abs()
    if not torch.isfinite(got).all() or not torch.isfinite(want).all():
        return float("nan")
    return diff.max().item()


def json_number(x):
    return x if x is not None and math.isfinite(x) else None


def main():
    args = parse_args()
    result = {"tensors_checked": 0, "max_abs_diff_peft": None, "max_abs_diff_merged": None, "ok": False}

    def finish(code):
        print(json.dumps(result))
        return code

    # Inputs first, so that a bad path costs no model load.
    try:
        for d, what in ((args.base, "base model"), (args.adapter, "adapter")):
            if not os.path.isdir(d):
                raise BadInput(f"{what} directory {d} does not exist")
        for f in (os.path.join(args.base, "config.json"),
                  os.path.join(args.adapter, "adapter_config.json"),
                  os.path.join(args.adapter, "adapter_model.safetensors")):
            if not os.path.isfile(f):
                raise BadInput(f"{f} is missing")
        ids, logits = read_logits_json(args.logits)
        import torch
        from safetensors.torch import load_file

        try:
            input_ids = torch.tensor(ids, dtype=torch.long)
            want = torch.tensor(logits, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadInput(f"{args.logits}: 'logits' must hold only numbers ({e})")

        try:
            file_tensors = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise BadInput(f"cannot read {args.adapter}/adapter_model.safetensors: {e}")
        if not file_tensors:
            raise BadInput(f"{args.adapter}/adapter_model.safetensors holds no tensors")
    except BadInput as e:
        print(f"peft_check: {e}", file=sys.stderr)
        return finish(2)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Keep stderr for findings: no progress bars, and no deprecation notices that PEFT triggers
    # inside transformers. PEFT's own warnings (e.g. about missing adapter keys) stay.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    try:
        # `dtype` is what transformers 5 calls the former `torch_dtype` argument.
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    except Exception as e:
        print(f"peft_check: cannot load the base model from {args.base}: {e}", file=sys.stderr)
        return finish(2)
    vocab = base.config.vocab_size
    if int(input_ids.max()) >= vocab:
        print(f"peft_check: {args.logits}: token id {int(input_ids.max())} is outside the base "
              f"model's vocabulary ({vocab})", file=sys.stderr)
        return finish(2)

    try:
        model = PeftModel.from_pretrained(base, args.adapter)
    except Exception as e:
        fail(f"PEFT cannot load the adapter from {args.adapter}: {type(e).__name__}: {e}")
        return finish(1)
    model.eval()

    ok = True
    n, problems = check_loaded_tensors(model, file_tensors)
    result["tensors_checked"] = n
    for p in problems:
        fail(p)
    ok &= not problems

    for stage, key in (("PEFT model", "max_abs_diff_peft"), ("merged model", "max_abs_diff_merged")):
        if stage == "merged model":
            with torch.no_grad():
                model = model.merge_and_unload()
            model.eval()
        try:
            d = max_abs_diff(model, input_ids, want)
        except ValueError as e:
            fail(f"{stage}: {e}")
            ok = False
            continue
        result[key] = json_number(d)
        if not (d <= args.tol):  # also catches NaN
            fail(f"{stage}: max |logit diff| {d:.3e} exceeds the tolerance {args.tol:.1e}")
            ok = False

    result["ok"] = bool(ok)
    return finish(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
