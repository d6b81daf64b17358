"""How transformers renders tool-calling chat records, for lorafit's chat rendering
(src/data/chat.rs) to be checked against, row by row. tests/chat_tools.rs runs it through
LORAFIT_INTEROP_PYTHON:

    ~/.cache/lorafit/venv-torch-2.13.0/bin/python scripts/interop/tool_chat_reference.py \\
        /work/shared/assets/tokenizers/qwen3 DATA_FILE

DATA_FILE is a JSON array or JSON Lines file of LLaMA-Factory-style records: ShareGPT
`conversations` with `function_call` / `observation` turns, or OpenAI-like `messages` whose
content parts may be `text`, `reasoning` and `tool_call`, plus a `tools` column (JSON text of a
list of function schemas). Each record is converted here, independently of lorafit, into the
messages and tools transformers takes (as LLaMA-Factory reads such data: a function call is an
assistant message with `tool_calls`, an observation a `tool` message, reasoning the message's
`reasoning_content`, bare schemas wrapped as `{"type": "function", "function": schema}`), and
rendered with `apply_chat_template(messages, tools=tools, tokenize=False)`.

Prints one JSON object per record: `row` (1-based), `text`, `spans` (the assistant turns, each
from the end of an `<|im_start|>assistant\\n` header to the end of the `<|im_end|>` after it) and
`tool_results` (each `<tool_response>...</tool_response>` block), ranges in characters (Python
string indices). The span rule is Qwen3's ChatML layout, found without lorafit's method.
"""
import json
import sys

from transformers import AutoTokenizer

HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"

ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "function_call": "assistant",
    "observation": "tool", "tool": "tool",
    "system": "system",
}


def calls(value):
    """`{"name", "arguments"}` (or a list of them, or nested in `function`), JSON text or not."""
    value = json.loads(value) if isinstance(value, str) else value
    out = []
    for call in value if isinstance(value, list) else [value]:
        function = call.get("function", call)
        arguments = function["arguments"]
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def to_messages(record):
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    for turn in record["messages"] if "messages" in record else record["conversations"]:
        name = turn["role"] if "role" in turn else turn["from"]
        content = turn["content"] if "content" in turn else turn["value"]
        message = {"role": ROLES[name], "content": ""}
        if name == "function_call":
            message["tool_calls"] = calls(content)
        elif isinstance(content, str):
            message["content"] = content
        else:
            texts, reasoning, tool_calls = [], [], []
            for part in content:
                value = part["text"] if "text" in part else part["value"]
                if part["type"] == "tool_call":
                    tool_calls += calls(value)
                else:
                    (reasoning if part["type"] == "reasoning" else texts).append(value)
            message["content"] = "\n".join(texts)
            if reasoning:
                message["reasoning_content"] = "\n".join(reasoning)
            if tool_calls:
                message["tool_calls"] = tool_calls
        messages.append(message)
    return messages


def to_tools(record):
    if not record.get("tools"):
        return None
    tools = json.loads(record["tools"]) if isinstance(record["tools"], str) else record["tools"]
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def ranges(text, open_, close):
    """Each range from the end of `open_` to the end of the next `close`."""
    out, pos = [], 0
    while (head := text.find(open_, pos)) != -1:
        start = head + len(open_)
        end = text.index(close, start) + len(close)
        out.append([start, end])
        pos = end
    return out


def main():
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as f:
        body = f.read()
    if body.lstrip().startswith("["):
        rows = list(enumerate(json.loads(body), 1))
    else:
        rows = [(i, json.loads(line)) for i, line in enumerate(body.splitlines(), 1) if line.strip()]
    for row, record in rows:
        messages = to_messages(record)
        text = tok.apply_chat_template(messages, tools=to_tools(record), tokenize=False)
        spans = ranges(text, HEADER, END)
        assert len(spans) == sum(m["role"] == "assistant" for m in messages), row
        results = [[s - len(RESULT_OPEN), e] for s, e in ranges(text, RESULT_OPEN, RESULT_CLOSE)]
        assert len(results) == sum(m["role"] == "tool" for m in messages), row
        print(json.dumps({"row": row, "text": text, "spans": spans, "tool_results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
