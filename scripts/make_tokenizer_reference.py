"""Records what transformers' tokenizers produce for the real tokenizer files in the shared test
assets, so lorafit's tokenizer handling is checked against the reference reader.

    VENV/bin/python scripts/make_tokenizer_reference.py ../shared/assets/tokenizers

writes tests/fixtures/tokenizer_reference.json: for each tokenizer, its file (relative to the
assets' tokenizers/ folder) and, per text, the ids with special tokens as transformers adds them.
"""
import json
import pathlib
import sys

from transformers import PreTrainedTokenizerFast

TOKENIZERS = {
    "llama2": "llama2/llama_tokenizer.json",
    "gpt2": "gpt2/gpt2_tokenizer.json",
    "smollm": "smollm/tokenizer.json",
    "qwen3": "qwen3/tokenizer.json",
}
TEXTS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "Numbers 12345 and 3.14, café, naïve, 日本語, emoji 🙂\nnew line\ttab  two spaces",
    " leading space and trailing space ",
]


def main():
    root = pathlib.Path(sys.argv[1]).resolve()
    out = {}
    for name, rel in TOKENIZERS.items():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(root / rel))
        # Files may carry padding/truncation settings (smollm's pads to 192); ids are unpadded.
        out[name] = {
            "file": rel,
            "cases": [{"text": t, "ids": tok(t, add_special_tokens=True, padding=False, truncation=False)["input_ids"]}
                      for t in TEXTS],
        }
    dest = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer_reference.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
