#!/usr/bin/env python3
"""Converts a base model with its own byte-level BPE tokenizer to GGUF with llama.cpp's converter.

    python scripts/base_to_gguf.py LLAMA_CPP_DIR MODEL_DIR [convert_hf_to_gguf.py options ...]

e.g. `python scripts/base_to_gguf.py ~/llama.cpp data/default-model --outfile base.gguf`, with a
Python that has what llama.cpp's `requirements.txt` lists (torch, transformers, numpy).

llama.cpp's `convert_hf_to_gguf.py` names a BPE tokenizer's pre-tokenizer (how text is split
before the merges) by hashing the token ids of a fixed text, and refuses every tokenizer whose
hash it does not list: "BPE pre-tokenizer was not recognized". A tokenizer trained from scratch,
like the one of lorafit's default model, is never listed. When `tokenizer.json` splits text
exactly as GPT-2 does (a ByteLevel pre-tokenizer with GPT-2's regex, no prefix space, no
normalizer), llama.cpp's `gpt-2` pre-tokenizer is the same split: this script checks that, tells
the converter so, and runs it on MODEL_DIR with the other arguments. Any other tokenizer is
refused, saying why; tokenizers the converter recognises are converted as it would anyway.
"""

import json
import logging
import os
import sys


def gpt2_split(tokenizer_json):
    """Why the tokenizer does not split text as GPT-2 does, or None when it does."""
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        return "its model is not BPE"
    if tokenizer_json.get("normalizer") is not None:
        return "it has a normalizer"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')}, not ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its ByteLevel pre-tokenizer adds a prefix space or does not split with GPT-2's regex"
    return None


def main():
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(sys.argv) > 1 else 2
    llama_cpp, model_dir, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    converter = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    if not os.path.isfile(converter):
        sys.exit(f"{converter} not found: LLAMA_CPP_DIR must be a llama.cpp checkout")
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    try:
        with open(tokenizer_path, encoding="utf-8") as f:
            why_not = gpt2_split(json.load(f))
    except (OSError, ValueError) as e:
        sys.exit(f"{tokenizer_path}: cannot read it ({e})")

    sys.path[:0] = [os.path.join(llama_cpp, "gguf-py"), llama_cpp]
    import convert_hf_to_gguf

    # Newer llama.cpp keeps the model classes in its `conversion` package, older in the script.
    conversion = sys.modules.get("conversion")
    text_model = getattr(conversion, "TextModel", None) or convert_hf_to_gguf.TextModel
    recognised = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        # Its warning banner about an unrecognised hash would precede the answer given here.
        logger = logging.getLogger("hf-to-gguf")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            if why_not is not None:
                sys.exit(f"{tokenizer_path}: llama.cpp does not know this tokenizer, and it cannot be "
                         f"converted as GPT-2's split: {why_not}")
            print(f"{tokenizer_path}: GPT-2's split (ByteLevel, GPT-2 regex): tokenizer.ggml.pre = gpt-2",
                  file=sys.stderr)
            return "gpt-2"
        finally:
            logger.setLevel(level)

    text_model.get_vocab_base_pre = get_vocab_base_pre
    # The converter imports sentencepiece before it looks for a tokenizer.model; without that
    # file the package is never used, so a Python without it may convert the model all the same.
    if not os.path.exists(os.path.join(model_dir, "tokenizer.model")):
        def no_sentencepiece_model(self):
            raise FileNotFoundError(f"no tokenizer.model in {model_dir}")
        text_model._create_vocab_sentencepiece = no_sentencepiece_model
    sys.argv = [converter, model_dir, *rest]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
