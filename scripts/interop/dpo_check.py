"""TRL's trainers compute the preference losses lorafit computed (tests/preference.rs).

Reads a JSON list of jobs from --jobs; each names a loss (TRL `loss_type`), its beta and label
smoothing, the batch lorafit built (token ids, labels with -100 where untrained, real lengths:
chosen rows first, then rejected, as TRL concatenates them), and lorafit's loss, metrics and
adapter gradients (a safetensors file under PEFT's names). TRL is set up as a LoRA run with
`peft_config` (so its reference is the base model with the adapter off), the adapter's weights are
then those of --adapter, and `DPOTrainer._compute_loss` computes the loss and metrics on the same
batch; its backward gives TRL's gradients. ORPO jobs go through `ORPOTrainer.get_batch_loss_metrics`
(its `concatenated_forward`, `odds_ratio_loss` and NLL on the chosen rows), KTO jobs through
`KTOTrainer._compute_loss` with the labels the job gives (`desirable`: unpaired answers, or a
batch of pairs unpaired, its chosen rows desirable), and the KL rows built here as TRL's
`add_kl_completion_ids` does (each prompt with the previous row's completion).
Prints one JSON object per job with the differences.
"""

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
METRICS_OF = {
    "orpo": METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"],
    "kto": ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"],
}


def trainer_for(model_dir, adapter_dir, job):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig.from_pretrained(adapter_dir)
    lora.lora_dropout = 0.0
    lora.inference_mode = False  # saved adapters say True, which would freeze them
    common = dict(output_dir=tempfile.mkdtemp(), beta=job["beta"], report_to=[], use_cpu=True, bf16=False)
    common["gradient_checkpointing"] = False
    # The data set only satisfies the constructor; the batch comes from lorafit.
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    kind = job["loss_type"]
    if kind == "orpo":
        args = ORPOConfig(**common)
        make = ORPOTrainer
    elif kind == "kto":
        args = KTOConfig(
            **common,
            desirable_weight=job["desirable_weight"],
            undesirable_weight=job["undesirable_weight"],
            per_device_train_batch_size=2,
            train_sampling_strategy="sequential",
        )
        make = KTOTrainer
    else:
        args = DPOConfig(**common, label_smoothing=job["label_smoothing"], loss_type=[kind])
        make = DPOTrainer
    trainer = make(model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    result = set_peft_model_state_dict(trainer.model, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    return trainer


def padded(rows):
    """input_ids, attention_mask, completion mask and labels (-100 off the completion) of
    `rows`, right-padded to the longest."""
    seq = max(len(r["input_ids"]) for r in rows)
    pad = lambda v, fill: v + [fill] * (seq - len(v))
    ids = torch.tensor([pad(r["input_ids"], 0) for r in rows])
    mask = torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])
    completion = torch.tensor([pad([int(l != -100) for l in r["labels"]], 0) for r in rows])
    labels = torch.tensor([pad(r["labels"], -100) for r in rows])
    return ids, mask, completion, labels


def batch_of(job):
    rows = job["rows"]
    ids, mask, completion, labels = padded(rows)
    kind = job["loss_type"]
    if kind == "orpo":
        n = len(rows) // 2
        batch = {}
        for side, part in [("chosen", slice(0, n)), ("rejected", slice(n, None))]:
            batch[f"{side}_input_ids"] = ids[part]
            batch[f"{side}_attention_mask"] = mask[part]
            batch[f"{side}_labels"] = labels[part]
        return batch
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
    if kind == "kto":
        # Each prompt with the previous row's completion, as TRL's `add_kl_completion_ids`.
        split = [r["labels"].index(next(l for l in r["labels"] if l != -100)) for r in rows]
        prompts = [r["input_ids"][:p] for r, p in zip(rows, split)]
        answers = [r["input_ids"][p:] for r, p in zip(rows, split)]
        answers = [answers[-1]] + answers[:-1]
        kl_rows = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
        kl_ids, kl_mask, kl_completion, _ = padded(kl_rows)
        batch.update(KL_input_ids=kl_ids, KL_attention_mask=kl_mask, KL_completion_mask=kl_completion)
        batch["label"] = torch.tensor(job["desirable"])
    return batch


def check(model_dir, adapter_dir, job):
    trainer = trainer_for(model_dir, adapter_dir, job)
    model = trainer.model
    model.train()
    kind = job["loss_type"]
    if kind == "orpo":
        loss, logged = trainer.get_batch_loss_metrics(model, batch_of(job))
    else:
        loss = trainer._compute_loss(model, batch_of(job), False)
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss.backward()
    theirs = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            theirs[name.replace(".default", "")] = p.grad
    ours = load_file(job["grads"])
    missing = sorted(set(ours) ^ set(theirs))
    grad_diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs)
    grad_scale = max(v.abs().max().item() for v in theirs.values())
    names = METRICS_OF.get(kind, METRICS)
    metric_diff = {k: abs(logged[k] - job["metrics"][k]) for k in names}
    return {
        "name": job["name"],
        "trl_loss": loss.item(),
        "loss_diff": abs(loss.item() - job["loss"]),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
        "grads_compared": len(ours),
        "unmatched_grads": missing,
        "metric_diff": metric_diff,
        "trl_metrics": {k: logged[k] for k in names},
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
