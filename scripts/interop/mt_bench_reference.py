"""Greedy answers to MT-Bench-style records with transformers, as FastChat's gen_model_answer
asks them: each turn through the chat template after the earlier turns and their answers.

    python mt_bench_reference.py MODEL_DIR TEMPLATE.jinja PROMPTS.jsonl MAX_NEW_TOKENS

Prints one JSON list of answers per record.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, template_path, prompts_path, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
template = open(template_path).read()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
for line in open(prompts_path):
    record = json.loads(line)
    messages, answers = [], []
    for turn in record["turns"]:
        messages.append({"role": "user", "content": turn})
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer})
    print(json.dumps(answers))
