"""bitsandbytes' side of lorafit's 4-bit interop tests (tests/quantized.rs).

usage: bnb_check.py codes TENSORS.safetensors OUT.json
    TENSORS holds, for each weight NAME, `NAME.input` (the dense weight) and what lorafit made of
    it: `NAME.packed`, `NAME.absmax`, `NAME.offset`, `NAME.nested_absmax`, `NAME.nested_quant_map`
    and `NAME.quant_map`, plus `NAME.format` (0 = nf4, 1 = fp4) as a one-element tensor.
    bitsandbytes.functional.quantize_4bit(input, blocksize=64, quant_type, compress_statistics=True)
    runs on each input; OUT lists, per NAME, the parts that are not bit-identical.

usage: bnb_check.py dequant TENSORS.safetensors OUT.json
    TENSORS holds, for each weight NAME, `NAME.input` (the dense fp32 weight) and `NAME.ours`
    (lorafit's dequantization of its NF4 quantization). quantize_4bit(input) is dequantized by
    bitsandbytes' native CPU kernel and by its generic one (see `use_exact_dequantize`); OUT has,
    per NAME, {"exact_equal": bool, "native_equal": bool, "native_max_diff": float}, comparing
    each with `NAME.ours`.

usage: bnb_check.py logits MODEL_DIR IDS_JSON COMPUTE OUT.json
    Loads MODEL_DIR with transformers + bitsandbytes (4-bit NF4, double quantization, compute
    dtype COMPUTE: float32 or bfloat16) on CPU and writes the fp32 logits of the token ids.

usage: bnb_check.py peft MODEL_DIR ADAPTER_DIR IDS_JSON QUANT_TYPE OUT.json
    The model in 4 bits (QUANT_TYPE nf4 or fp4, double quantization, fp32 compute) with the PEFT
    LoRA adapter ADAPTER_DIR loaded on it: writes
    {"logits": ..., "tensors_loaded": N}, N the adapter tensors PEFT holds bit for bit as in the
    file (the adapter needs lora dropout 0: the model runs in train mode, see `logits`).

usage: bnb_check.py save MODEL_DIR QUANT_TYPE DOUBLE_QUANT IDS_JSON SAVE_DIR OUT.json
    Loads MODEL_DIR with transformers + bitsandbytes (QUANT_TYPE nf4 or fp4, DOUBLE_QUANT 0 or 1,
    fp32 compute) on CPU, saves it with `save_pretrained(SAVE_DIR)` (transformers' 4-bit
    checkpoint) and writes the fp32 logits of the token ids.

usage: bnb_check.py load MODEL_DIR IDS_JSON OUT.json
    Loads the 4-bit checkpoint MODEL_DIR with `from_pretrained` as it is (its config.json's
    quantization_config) on CPU and writes the fp32 logits of the token ids.
"""

import json
import sys

import torch
from safetensors.torch import load_file


def check_codes(tensors_path, out_path):
    import bitsandbytes.functional as F

    tensors = load_file(tensors_path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    report = {}
    for name in names:
        fmt = ["nf4", "fp4"][int(tensors[f"{name}.format"].item())]
        packed, state = F.quantize_4bit(
            tensors[f"{name}.input"], blocksize=64, quant_type=fmt, compress_statistics=True
        )
        theirs = {
            "packed": packed,
            "absmax": state.absmax,
            "offset": state.offset.reshape(1),
            "nested_absmax": state.state2.absmax,
            "nested_quant_map": state.state2.code,
            "quant_map": state.code,
        }
        report[name] = [
            part for part, value in theirs.items() if not torch.equal(value.cpu(), tensors[f"{name}.{part}"])
        ]
    with open(out_path, "w") as f:
        json.dump(report, f)


def exact_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' own generic dequantization (backends/default), which reads the blocks
    `quantize_4bit` writes: value i of the flattened weight is scaled by block i // blocksize."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax.float(), code, blocksize, shape, dtype)


def use_exact_dequantize():
    """Runs 4-bit layers on CPU with `exact_dequantize_4bit`.

    bitsandbytes 0.50.2's native CPU kernel (cdequantize_blockwise_cpu_*) scales row r, column c
    by block r * (n // 64) + c // 64 when the row length n is a multiple of 16 but not of 64: a
    32-wide row (the Llama 3 fixture's hidden size) takes block 0 for every row, and an 80-wide
    row the wrong block from row 1 on. Rows that are whole blocks, the hidden sizes of real models,
    dequantize right, and so do the CUDA kernels; the `dequant` command checks all of this."""
    import bitsandbytes  # noqa: F401 (registers its kernels first, so that this one replaces them)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", exact_dequantize_4bit)


def check_dequant(tensors_path, out_path):
    import bitsandbytes.functional as F

    tensors = load_file(tensors_path)
    report = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        packed, state = F.quantize_4bit(
            tensors[f"{name}.input"], blocksize=64, quant_type="nf4", compress_statistics=True
        )
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        exact = exact_dequantize_4bit(packed, absmax, 64, "nf4", state.shape, torch.float32)
        native = F.dequantize_4bit(packed, state)
        ours = tensors[f"{name}.ours"]
        report[name] = {
            "exact_equal": torch.equal(exact, ours),
            "native_equal": torch.equal(native, ours),
            "native_max_diff": (native - ours).abs().max().item(),
        }
    with open(out_path, "w") as f:
        json.dump(report, f)


def load_nf4(model_dir, dtype, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    use_exact_dequantize()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=dtype, device_map="cpu"
    )


def run_logits(model, ids_json):
    # In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for its own
    # gemm kernel, which refuses widths that are not multiples of its tile (stories260K's 32-wide
    # k/v projections); train mode keeps the dequantize + matmul path. The model has no dropout.
    model.train()
    ids = torch.tensor([json.loads(ids_json)])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()[0].tolist()


def logits(model_dir, ids_json, compute, out_path):
    model = load_nf4(model_dir, getattr(torch, compute))
    with open(out_path, "w") as f:
        json.dump(run_logits(model, ids_json), f)


def peft_logits(model_dir, adapter_dir, ids_json, quant_type, out_path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_nf4(model_dir, torch.float32, quant_type), adapter_dir)
    params = dict(model.named_parameters())
    loaded = 0
    for key, value in load_file(f"{adapter_dir}/adapter_model.safetensors").items():
        mine = params.get(key.replace(".weight", ".default.weight"))
        loaded += mine is not None and torch.equal(mine.detach().float(), value.float())
    with open(out_path, "w") as f:
        json.dump({"logits": run_logits(model, ids_json), "tensors_loaded": loaded}, f)


def save(model_dir, quant_type, double_quant, ids_json, save_dir, out_path):
    model = load_nf4(model_dir, torch.float32, quant_type, double_quant == "1")
    model.save_pretrained(save_dir)
    with open(out_path, "w") as f:
        json.dump(run_logits(model, ids_json), f)


def load_saved(model_dir, ids_json, out_path):
    from transformers import AutoModelForCausalLM

    use_exact_dequantize()
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    with open(out_path, "w") as f:
        json.dump(run_logits(model, ids_json), f)


if __name__ == "__main__":
    if sys.argv[1] == "codes":
        check_codes(*sys.argv[2:4])
    elif sys.argv[1] == "dequant":
        check_dequant(*sys.argv[2:4])
    elif sys.argv[1] == "save":
        save(*sys.argv[2:8])
    elif sys.argv[1] == "load":
        load_saved(*sys.argv[2:5])
    elif sys.argv[1] == "peft":
        peft_logits(*sys.argv[2:7])
    else:
        logits(*sys.argv[2:6])
