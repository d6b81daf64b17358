"""Checks `lorafit data export` files against the Hugging Face tokenizer (transformers).

For each case, the records lorafit read (one JSON object per line, as the data files hold them)
are rendered here independently, the way a transformers user would: the Stanford Alpaca prompt
plus the response, the completion text, or `apply_chat_template` over the conversation. Then:

- ids: the exported `input_ids` equal the tokenizer's encoding of that whole text (with special
  tokens, plus EOS, for alpaca and completion; without them for chats, as
  `apply_chat_template(tokenize=True)` encodes);
- labels: exactly the response (alpaca) or every token (completion) is trained; in a chat each
  trained run of tokens decodes to one assistant turn (tool calls included) ending with the
  end-of-turn marker, one run per assistant turn, and no user, system or tool-result text is
  trained.

Usage: python check_data_export.py JOBS.json; JOBS.json is a list of cases:
  {"name", "tokenizer_dir", "records", "export", "format": "alpaca"|"completion"|"chat",
   "columns": {field: column}, "prompt_template_no_input": str|null,
   "chat_template_file": str|null, "end_of_turn": str|null}
Prints one line per case and exits 1 if any case differs.
"""

import json
import os
import sys

from transformers import PreTrainedTokenizerFast

# The record → messages conversion a transformers user would write (tool calls included).
from tool_chat_reference import to_messages, to_tools

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
def column(case, field):
    return case["columns"].get(field, field)


def alpaca_prompt(case, row):
    instruction = row[column(case, "instruction")]
    inp = row.get(column(case, "input")) or ""
    if inp.strip():
        return ALPACA_WITH_INPUT.replace("{instruction}", instruction).replace("{input}", inp)
    template = case.get("prompt_template_no_input") or ALPACA_NO_INPUT
    return template.replace("{instruction}", instruction)


def runs(labels):
    """Index ranges of consecutive trained tokens."""
    out, start = [], None
    for i, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


def check_row(case, tok, row, example):
    ids, labels = example["input_ids"], example["labels"]
    if any(l != -100 and l != i for i, l in zip(ids, labels)):
        return "a label differs from its input id"
    fmt = case["format"]
    if fmt == "chat":
        messages = to_messages(row)
        text = tok.apply_chat_template(messages, tools=to_tools(row), tokenize=False, **template_kwargs(case))
        expected = tok(text, add_special_tokens=False)["input_ids"]
    elif fmt == "alpaca":
        prompt = alpaca_prompt(case, row)
        response = row[column(case, "output")]
        expected = tok(prompt + response)["input_ids"] + [tok.eos_token_id]
    else:
        expected = tok(row[column(case, "text")])["input_ids"] + [tok.eos_token_id]
    if ids != expected:
        first = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        return (
            f"ids differ from token {first}: lorafit {tok.convert_ids_to_tokens(ids[first:first + 4])} "
            f"transformers {tok.convert_ids_to_tokens(expected[first:first + 4])} (lengths {len(ids)} / {len(expected)})"
        )
    trained = runs(labels)
    if fmt == "completion":
        # BOS carries no text of its own; everything else is trained.
        if trained != [(1 if ids[0] == tok.bos_token_id and tok.bos_token_id is not None else 0, len(ids))]:
            return f"completion should train every token, trained runs {trained}"
    elif fmt == "alpaca":
        if len(trained) != 1 or trained[0][1] != len(ids):
            return f"alpaca should train one final run, got {trained}"
        # The trained tokens cover the whole response and at most the end of the prompt that
        # shares the response's first token (`:The` when the prompt ends in `:`).
        start = trained[0][0]
        got = tok.decode(ids[start:-1]).strip()
        if not (response.strip() in got and (prompt + response).strip().endswith(got)):
            return f"trained text {got[:60]!r} is not the response {response[:60]!r}"
        if start + 1 < len(ids) and response.strip() in tok.decode(ids[start + 1:-1]):
            return f"token {start} is trained but holds no response text"
        untrained = [i for i in ids[:start] if i != tok.bos_token_id]
        if not prompt.startswith(tok.decode(untrained).strip()):
            return "the untrained tokens are not the start of the prompt"
    else:
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        if len(trained) != len(assistant):
            return f"{len(trained)} trained runs for {len(assistant)} assistant turns"
        for (start, end), content in zip(trained, assistant):
            got = tok.decode(ids[start:end])
            if content.strip() not in got or not got.endswith(case["end_of_turn"]):
                return f"trained run {got[:80]!r} is not the assistant turn {content[:60]!r} + end of turn"
        untrained = tok.decode([i for i, l in zip(ids, labels) if l == -100])
        for m in messages:
            if m["role"] != "assistant" and m["content"].strip() not in untrained:
                return f"the {m['role']} text {m['content'][:40]!r} is trained"
    return None


def load_tokenizer(model_dir):
    """The tokenizer as its tokenizer.json defines it, with the special tokens and chat template of
    tokenizer_config.json. transformers' AutoTokenizer is not used: version 5 rebuilds some
    tokenizers from their class (SmolLM's GPT2Tokenizer loses the file's Digits pre-tokenizer and
    splits ' \n2' differently), while the file is what the model was trained with."""
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    token = lambda v: v.get("content") if isinstance(v, dict) else v
    special = {k: token(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"), **special)
    tok.chat_template = config.get("chat_template")
    # The file may carry padding and truncation settings (SmolLM's pads to 192); examples are unpadded.
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    return tok


def template_kwargs(case):
    if case.get("chat_template_file"):
        with open(case["chat_template_file"]) as f:
            return {"chat_template": f.read()}
    return {}


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    failed = 0
    tokenizers = {}
    for case in jobs:
        tok = tokenizers.get(case["tokenizer_dir"])
        if tok is None:
            tok = tokenizers[case["tokenizer_dir"]] = load_tokenizer(case["tokenizer_dir"])
        with open(case["records"]) as f:
            rows = [json.loads(line) for line in f]
        with open(case["export"]) as f:
            examples = [json.loads(line) for line in f]
        problems = []
        if len(rows) != len(examples):
            problems.append(f"{len(examples)} examples exported for {len(rows)} rows")
        for n, (row, example) in enumerate(zip(rows, examples), 1):
            why = check_row(case, tok, row, example)
            if why:
                problems.append(f"row {n}: {why}")
        status = "ok" if not problems else "FAILED"
        print(f"{status} {case['name']}: {len(examples)} examples" + "".join(f"\n    {p}" for p in problems[:3]))
        failed += bool(problems)
    print(f"cases: {len(jobs) - failed} as transformers, {failed} different")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
