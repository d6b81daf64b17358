#!/usr/bin/env python3
"""Check a lorafit adapter against Hugging Face PEFT, the reference implementation.

    VENV/bin/python scripts/interop/peft_check.py --base BASE_DIR --adapter ADAPTER_DIR \
        --logits LOGITS_JSON [--tol 1e-4]
    VENV/bin/python scripts/interop/peft_check.py --jobs JOBS_JSON

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

--jobs checks many adapters in one process, which imports torch, transformers and peft once
(seconds) instead of once per adapter. JOBS_JSON is a list of

    {"name": str, "base": BASE_DIR, "adapter": ADAPTER_DIR, "logits": LOGITS_JSON, "tol": x}

("tol" optional). Prints one JSON line per job, in order: the line above plus "name", "status"
(the exit status that job alone would have) and "messages" (the reasons, also on stderr). Exit
status: the largest of the jobs' statuses, 2 for an unreadable or malformed JOBS_JSON.
"""

import argparse
import json
import math
import os
import sys
import traceback
import warnings

ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter it loads
DEFAULT_TOL = 1e-4


class BadInput(Exception):
    """An input file is missing, unreadable or malformed (exit status 2)."""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="Hugging Face model directory")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory")
    p.add_argument("--logits", help="JSON file with input_ids and lorafit's logits")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"max allowed |logit difference| (default {DEFAULT_TOL:g})")
    p.add_argument("--jobs", help="JSON list of checks to run in this one process (see above)")
    args = p.parse_args()
    single = (args.base, args.adapter, args.logits)
    if args.jobs is None and None in single:
        p.error("give --base, --adapter and --logits, or --jobs")
    if args.jobs is not None and single != (None, None, None):
        p.error("--jobs takes the paths from its file: drop --base, --adapter and --logits")
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


def quiet_hf_logging():
    """Keep stderr for findings: no progress bars, and no deprecation notices that PEFT triggers
    inside transformers. PEFT's own warnings (e.g. about missing adapter keys) stay."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def check(base_dir, adapter_dir, logits_path, tol):
    """Runs checks 1-3 on one adapter. Returns (exit status, result, messages): a message says
    why the input is unusable, or starts with "FAIL: " and says which check failed and how."""
    result = {"tensors_checked": 0, "max_abs_diff_peft": None, "max_abs_diff_merged": None, "ok": False}
    messages = []

    # Inputs first, so that a bad path costs no model load.
    try:
        for d, what in ((base_dir, "base model"), (adapter_dir, "adapter")):
            if not os.path.isdir(d):
                raise BadInput(f"{what} directory {d} does not exist")
        for f in (os.path.join(base_dir, "config.json"),
                  os.path.join(adapter_dir, "adapter_config.json"),
                  os.path.join(adapter_dir, "adapter_model.safetensors")):
            if not os.path.isfile(f):
                raise BadInput(f"{f} is missing")
        ids, logits = read_logits_json(logits_path)
        import torch
        from safetensors.torch import load_file

        try:
            input_ids = torch.tensor(ids, dtype=torch.long)
            want = torch.tensor(logits, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadInput(f"{logits_path}: 'logits' must hold only numbers ({e})")

        try:
            file_tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise BadInput(f"cannot read {adapter_dir}/adapter_model.safetensors: {e}")
        if not file_tensors:
            raise BadInput(f"{adapter_dir}/adapter_model.safetensors holds no tensors")
    except BadInput as e:
        messages.append(str(e))
        return 2, result, messages

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_hf_logging()
    try:
        # `dtype` is what transformers 5 calls the former `torch_dtype` argument.
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    except Exception as e:
        messages.append(f"cannot load the base model from {base_dir}: {e}")
        return 2, result, messages
    vocab = base.config.vocab_size
    if int(input_ids.max()) >= vocab:
        messages.append(f"{logits_path}: token id {int(input_ids.max())} is outside the base "
                        f"model's vocabulary ({vocab})")
        return 2, result, messages

    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except Exception as e:
        messages.append(f"FAIL: PEFT cannot load the adapter from {adapter_dir}: {type(e).__name__}: {e}")
        return 1, result, messages
    model.eval()

    ok = True
    n, problems = check_loaded_tensors(model, file_tensors)
    result["tensors_checked"] = n
    for p in problems:
        messages.append(f"FAIL: {p}")
    ok &= not problems

    for stage, key in (("PEFT model", "max_abs_diff_peft"), ("merged model", "max_abs_diff_merged")):
        if stage == "merged model":
            with torch.no_grad():
                model = model.merge_and_unload()
            model.eval()
        try:
            d = max_abs_diff(model, input_ids, want)
        except ValueError as e:
            messages.append(f"FAIL: {stage}: {e}")
            ok = False
            continue
        result[key] = json_number(d)
        if not (d <= tol):  # also catches NaN
            messages.append(f"FAIL: {stage}: max |logit diff| {d:.3e} exceeds the tolerance {tol:.1e}")
            ok = False

    result["ok"] = bool(ok)
    return (0 if ok else 1), result, messages


def read_jobs(path):
    """The jobs of --jobs: a list of {name, base, adapter, logits[, tol]} objects."""
    try:
        with open(path, encoding="utf-8") as f:
            jobs = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {path}: {e}")
    if not isinstance(jobs, list) or not jobs:
        raise BadInput(f"{path}: expected a non-empty list of jobs")
    for i, job in enumerate(jobs):
        if not isinstance(job, dict):
            raise BadInput(f"{path}: job {i} is not an object")
        for key in ("name", "base", "adapter", "logits"):
            if not isinstance(job.get(key), str):
                raise BadInput(f"{path}: job {i} needs a string '{key}'")
        tol = job.get("tol", DEFAULT_TOL)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise BadInput(f"{path}: job {i} ({job['name']}): 'tol' must be a non-negative number")
    return jobs


def main():
    args = parse_args()
    if args.jobs is None:
        status, result, messages = check(args.base, args.adapter, args.logits, args.tol)
        for m in messages:
            print(f"peft_check: {m}", file=sys.stderr)
        print(json.dumps(result))
        return status

    try:
        jobs = read_jobs(args.jobs)
    except BadInput as e:
        print(f"peft_check: {e}", file=sys.stderr)
        return 2
    worst = 0
    for job in jobs:
        try:
            status, result, messages = check(job["base"], job["adapter"], job["logits"],
                                             job.get("tol", DEFAULT_TOL))
        except Exception as e:  # a crash in one job still names it, and the others still run
            traceback.print_exc()
            status, result, messages = 1, {"ok": False}, [f"FAIL: {type(e).__name__}: {e}"]
        for m in messages:
            print(f"peft_check: {job['name']}: {m}", file=sys.stderr)
        print(json.dumps({"name": job["name"], "status": status, "messages": messages, **result}), flush=True)
        worst = max(worst, status)
    return worst


if __name__ == "__main__":
    sys.exit(main())
