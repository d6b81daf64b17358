"""TRL's DPOTrainer trains the adapter lorafit trained (tests/preference.rs).

Reads --job, a JSON object: the pairs of each optimizer step in lorafit's order (token ids of the
prompt, the chosen and the rejected answer, as lorafit tokenized them), the optimizer and
schedule settings, and `runs`: the DPO betas to train with. For each run, TRL's `DPOTrainer` with
`peft_config` (its reference is the base with the adapter off) starts from the adapter in --init,
takes the same steps with the same settings (sequential order, `per_device_train_batch_size`
pairs a step, AdamW, linear schedule without warmup, the same clipping) and its adapter is
compared with lorafit's in --adapter. Prints a JSON list: per run, the largest difference from
lorafit's adapter, the largest change from the initial adapter, the tensors compared and TRL's
per-step losses.
"""

import argparse
import contextlib
import json
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


class LorafitOrder(DPOTrainer):
    """A DPOTrainer whose data set holds lorafit's token ids already, in the order it trains them."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


def train(model_dir, init_dir, job, beta):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig.from_pretrained(init_dir)
    lora.lora_dropout = 0.0
    lora.inference_mode = False  # saved adapters say True, which would freeze them
    steps = job["steps"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=beta,
        loss_type=["sigmoid"],
        learning_rate=job["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=job["weight_decay"],
        adam_beta1=job["adam_beta1"],
        adam_beta2=job["adam_beta2"],
        adam_epsilon=job["adam_eps"],
        max_grad_norm=job["max_grad_norm"],
        optim="adamw_torch",
        per_device_train_batch_size=len(steps[0]),
        gradient_accumulation_steps=1,
        max_steps=len(steps),
        train_sampling_strategy="sequential",
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    rows = [pair for step in steps for pair in step]
    trainer = LorafitOrder(
        model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora
    )
    result = set_peft_model_state_dict(trainer.model, load_file(f"{init_dir}/adapter_model.safetensors"))
    assert not result.unexpected_keys, result.unexpected_keys
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is the report
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return get_peft_model_state_dict(trainer.model), losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--job", required=True)
    a = ap.parse_args()
    job = json.load(open(a.job))
    ours = load_file(f"{a.adapter}/adapter_model.safetensors")
    init = load_file(f"{a.init}/adapter_model.safetensors")
    reports = []
    for beta in job["runs"]:
        theirs, losses = train(a.model, a.init, job, beta)
        theirs = {k: v.detach() for k, v in theirs.items()}
        reports.append(
            {
                "beta": beta,
                "max_abs_diff": max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs),
                "max_change_from_init": max((theirs[k] - init[k]).abs().max().item() for k in theirs if k in init),
                "compared": len(set(ours) & set(theirs)),
                "unmatched": sorted(set(ours) ^ set(theirs)),
                "trl_losses": losses,
            }
        )
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
