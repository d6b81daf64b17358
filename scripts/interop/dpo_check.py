"""TRL's DPOTrainer computes the preference losses lorafit computed (tests/preference.rs).

Reads a JSON list of jobs from --jobs; each names a loss (TRL `loss_type`), its beta and label
smoothing, the batch lorafit built (token ids, labels with -100 where untrained, real lengths:
chosen rows first, then rejected, as TRL concatenates them), and lorafit's loss, metrics and
adapter gradients (a safetensors file under PEFT's names). TRL is set up as a LoRA run with
`peft_config` (so its reference is the base model with the adapter off), the adapter's weights are
then those of --adapter, and `DPOTrainer._compute_loss` computes the loss and metrics on the same
batch; its backward gives TRL's gradients. Prints one JSON object per job with the differences.
"""

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def trainer_for(model_dir, adapter_dir, job):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig.from_pretrained(adapter_dir)
    lora.lora_dropout = 0.0
    lora.inference_mode = False  # saved adapters say True, which would freeze them
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=job["beta"],
        label_smoothing=job["label_smoothing"],
        loss_type=[job["loss_type"]],
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    # The data set only satisfies the constructor; the batch comes from lorafit.
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    result = set_peft_model_state_dict(trainer.model, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    return trainer


def batch_of(job):
    rows = job["rows"]
    seq = max(len(r["input_ids"]) for r in rows)
    pad = lambda v, fill: v + [fill] * (seq - len(v))
    ids = torch.tensor([pad(r["input_ids"], 0) for r in rows])
    mask = torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])
    completion = torch.tensor([pad([int(l != -100) for l in r["labels"]], 0) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def check(model_dir, adapter_dir, job):
    trainer = trainer_for(model_dir, adapter_dir, job)
    model = trainer.model
    model.train()
    loss = trainer._compute_loss(model, batch_of(job), False)
    loss.backward()
    theirs = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            theirs[name.replace(".default", "")] = p.grad
    ours = load_file(job["grads"])
    missing = sorted(set(ours) ^ set(theirs))
    grad_diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs)
    grad_scale = max(v.abs().max().item() for v in theirs.values())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    metric_diff = {k: abs(logged[k] - job["metrics"][k]) for k in METRICS}
    return {
        "name": job["name"],
        "trl_loss": loss.item(),
        "loss_diff": abs(loss.item() - job["loss"]),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
        "grads_compared": len(ours),
        "unmatched_grads": missing,
        "metric_diff": metric_diff,
        "trl_metrics": {k: logged[k] for k in METRICS},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--jobs", required=True)
    a = ap.parse_args()
    jobs = json.load(open(a.jobs))
    print(json.dumps([check(a.model, a.adapter, job) for job in jobs]))


if __name__ == "__main__":
    main()
