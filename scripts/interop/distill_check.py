"""The distillation loss lorafit computed (tests/distill.rs), recomputed with PyTorch and PEFT.

`teacher --model DIR --out DIR --seed N`: writes a teacher for the test: the model of --model
with every weight moved by 5% of its tensor's spread (seeded normal noise), with its tokenizer.

`check --model DIR --adapter DIR --teacher DIR --jobs FILE`: each job names a divergence
(forward_kl | reverse_kl | jsd), T, alpha and jsd_beta, the batch lorafit built (token ids and
labels, -100 where untrained) and lorafit's mean loss, mean divergence and cross-entropy, and
adapter gradients (a safetensors file under PEFT's names). The student is the base with the
adapter (PEFT), the teacher a plain transformers model; at every label position
`alpha · CE + (1 − alpha) · T² · D(teacher_T ‖ student_T)` is computed from the formula, summed and
divided by the label tokens, and its backward gives the reference gradients. D is also taken
from TRL's GKD `generalized_jsd_loss` (jsd) and, when torchtune is importable, forward KL from
torchtune's `ForwardKLLoss`, whose value is the cross-entropy H(p_t, p_s) = KL + H(p_t): its
gradient w.r.t. the student equals KL's, its value exceeds it by the teacher's entropy.
Prints one JSON object per job with the differences.
"""

import argparse
import importlib.util
import json
import math
import shutil
import warnings

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

warnings.filterwarnings("ignore")


def make_teacher(model_dir, out, seed):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.float().std())
    model.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(f"{model_dir}/{name}", f"{out}/{name}")


def divergence(kind, s, t, beta):
    """D(teacher ‖ student) per row from temperature-scaled log-probabilities."""
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # KL(p_a ‖ p_b)
    if kind == "forward_kl":
        return kl(t, s)
    if kind == "reverse_kl":
        return kl(s, t)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def label_logits(model, job):
    """Logits `[label tokens, vocab]` at the positions that predict a label, and those labels."""
    rows = job["rows"]
    seq = max(len(r["input_ids"]) for r in rows)
    pad = lambda v, fill: v + [fill] * (seq - len(v))
    ids = torch.tensor([pad(r["input_ids"], 0) for r in rows])
    mask = torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])
    labels = torch.tensor([pad(r["labels"], -100) for r in rows])[:, 1:]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    keep = labels != -100
    return logits[keep], labels[keep]


def torchtune_forward_kl():
    """torchtune's ForwardKLLoss, from its file alone (the package's __init__ wants torchao)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        return None
    path = f"{spec.submodule_search_locations[0]}/modules/loss/kd_losses.py"
    module_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ForwardKLLoss()


def trl_jsd(s_logits, t_logits, beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(
        s_logits[None], t_logits[None], beta=beta, temperature=temperature, reduction="sum"
    )


def check(student, teacher, job):
    student.zero_grad()
    T, alpha, beta = job["temperature"], job["alpha"], job["jsd_beta"]
    with torch.no_grad():
        t_logits, _ = label_logits(teacher, job)
    s_logits, labels = label_logits(student, job)
    n = labels.numel()
    s, t = F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1)
    d = divergence(job["loss"], s, t, beta)
    ce = F.cross_entropy(s_logits, labels, reduction="none")
    loss = (alpha * ce + (1 - alpha) * T * T * d).sum() / n
    loss.backward()
    theirs = {k.replace(".default", ""): p.grad for k, p in student.named_parameters() if p.grad is not None}
    ours = load_file(job["grads"])
    report = {
        "name": job["name"],
        "loss": loss.item(),
        "loss_diff": abs(loss.item() - job["loss_mean"]),
        "kl_diff": abs(d.sum().item() / n - job["kl_mean"]),
        "ce_diff": abs(ce.sum().item() / n - job["ce_mean"]),
        "unmatched_grads": sorted(set(ours) ^ set(theirs)),
        "grads_compared": len(set(ours) & set(theirs)),
        "grad_max_abs": max(v.abs().max().item() for v in theirs.values()),
        "grad_max_abs_diff": max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs),
    }
    s_det, t_det = s_logits.detach(), t_logits
    if job["loss"] == "jsd":
        report["trl_jsd_diff"] = abs(trl_jsd(s_det, t_det, beta, T).item() - d.sum().item())
    tt = torchtune_forward_kl() if job["loss"] == "forward_kl" else None
    if tt is not None:
        report.update(torchtune_comparison(tt, student, job, s_logits, t_logits, labels, ours))
    return report


def torchtune_comparison(tt, student, job, s_logits, t_logits, labels, ours):
    """The job's loss with torchtune's ForwardKLLoss as the soft term: the same gradient; its
    value less the teacher's mean entropy is the KL lorafit reports."""
    T, alpha = job["temperature"], job["alpha"]
    student.zero_grad()
    s_logits, _ = label_logits(student, job)
    soft = tt(s_logits / T, t_logits / T, labels)
    ce = F.cross_entropy(s_logits, labels)
    (alpha * ce + (1 - alpha) * T * T * soft).backward()
    theirs = {k.replace(".default", ""): p.grad for k, p in student.named_parameters() if p.grad is not None}
    t = F.log_softmax(t_logits / T, -1)
    entropy = -(t.exp() * t).sum(-1).mean().item()
    return {
        "torchtune_value": soft.item(),
        "torchtune_kl_diff": abs(soft.item() - entropy - job["kl_mean"]),
        "torchtune_teacher_entropy": entropy,
        "torchtune_grad_max_abs_diff": max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs),
    }


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check")
    for name in ["--model", "--adapter", "--teacher", "--jobs"]:
        c.add_argument(name, required=True)
    args = parser.parse_args()
    if args.command == "teacher":
        make_teacher(args.model, args.out, args.seed)
        return
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    student = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    student.train()  # the adapter's dropout is 0, and training mode is what lorafit's backward ran in
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    with open(args.jobs) as f:
        jobs = json.load(f)
    print(json.dumps([check(student, teacher, job) for job in jobs]))


if __name__ == "__main__":
    main()
