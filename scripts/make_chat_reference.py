"""Records how transformers renders conversations with the real Qwen3 chat template, so lorafit's
chat rendering (src/data/chat.rs) is checked against the reference implementation.

From the repository root:

    ~/.cache/lorafit/venv-torch-2.13.0/bin/python scripts/make_chat_reference.py \\
        /work/shared/assets/tokenizers/qwen3

(the argument is the folder holding Qwen3's tokenizer_config.json and tokenizer.json; the venv is
the one scripts/setup-python.sh creates). Writes tests/fixtures/chat_reference.json: for each
conversation, the data record as a user would write it, the messages given to transformers, the
text of `apply_chat_template(messages, tokenize=False, add_generation_prompt=False)`, and the
assistant spans. Nothing from the tokenizer folder is copied, only rendered strings.

The spans are found here by a method independent of lorafit's: each one runs from the end of an
`<|im_start|>assistant\\n` header to the end of the `<|im_end|>` that follows it. They are given in
characters (Python string indices) together with the text they cover.
"""
import json
import pathlib
import sys

import transformers
from transformers import AutoTokenizer

HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"

# ShareGPT's `from` values, mapped to chat roles (the same mapping lorafit documents).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

CASES = [
    {
        "name": "system_multi_turn",
        "record": {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "2 + 2 = 4."},
                {"role": "user", "content": "And times 3?"},
                {"role": "assistant", "content": "4 × 3 = 12. Café ☕ is on me."},
            ]
        },
    },
    {
        "name": "no_system_single_turn",
        "record": {
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello!\n"},
            ]
        },
    },
    {
        # Reasoning in both assistant turns: Qwen3's template drops it from the earlier turn and
        # reformats it in the last one, so the rendering is not prefix-stable.
        "name": "thinking",
        "record": {
            "system": "Think before answering.",
            "messages": [
                {"role": "user", "content": "Is 17 prime?"},
                {"role": "assistant",
                 "content": "<think>\n17 has no divisor between 2 and 4.\n</think>\n\nYes, 17 is prime."},
                {"role": "user", "content": "Is 21 prime?"},
                {"role": "assistant",
                 "content": "<think>21 = 3 × 7, so not prime.</think>No: 21 = 3 × 7."},
            ],
        },
    },
    {
        # Reasoning only in the earlier turn; the last turn gets an empty think block.
        "name": "thinking_earlier_only",
        "record": {
            "messages": [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "<think>\nKeep it short.\n</think>\n\nBlue."},
                {"role": "user", "content": "Another one?"},
                {"role": "assistant", "content": "Green."},
            ]
        },
    },
    {
        "name": "sharegpt",
        "record": {
            "conversations": [
                {"from": "system", "value": "You are an AI assistant."},
                {"from": "human", "value": "What is the meaning of life?"},
                {"from": "gpt", "value": "The meaning of life is 42."},
                {"from": "human", "value": "That's ridiculous."},
                {"from": "gpt", "value": "I agree."},
            ]
        },
    },
    {
        "name": "tool_turn",
        "record": {
            "messages": [
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": "Let me check the weather service."},
                {"role": "tool", "content": "{\"temp_c\": 18, \"sky\": \"clear\"}"},
                {"role": "assistant", "content": "It is 18 °C and clear in Paris."},
            ]
        },
    },
]


def to_messages(record):
    """The record's messages as transformers takes them: the lorafit record layout, converted."""
    out = []
    if record.get("system"):
        out.append({"role": "system", "content": record["system"]})
    if "messages" in record:
        out += [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        out += [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
    return out


def assistant_spans(text):
    spans = []
    pos = 0
    while (head := text.find(HEADER, pos)) != -1:
        start = head + len(HEADER)
        end = text.index(END, start) + len(END)
        spans.append([start, end])
        pos = end
    return spans


def main():
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    out = {
        "transformers": transformers.__version__,
        "template": "qwen3 (tokenizers/qwen3/tokenizer_config.json)",
        "cases": [],
    }
    for case in CASES:
        messages = to_messages(case["record"])
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        spans = assistant_spans(text)
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        assert len(spans) == n_assistant, (case["name"], spans)
        out["cases"].append({
            "name": case["name"],
            "record": case["record"],
            "messages": messages,
            "text": text,
            "spans": spans,
            "span_texts": [text[s:e] for s, e in spans],
        })
    dest = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/chat_reference.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {dest} ({len(out['cases'])} conversations)")


if __name__ == "__main__":
    main()
