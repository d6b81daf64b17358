#!/usr/bin/env python3
"""Generate the tiny model fixtures under tests/fixtures/models/ from nothing but this file.

    "$VENV/bin/python" scripts/make_model_fixtures.py [--out DIR]

(VENV is the one scripts/setup-python.sh creates, by default ~/.cache/lorafit/venv-torch-2.13.0.)
DIR defaults to tests/fixtures/models/. The whole folder is rebuilt in a temporary folder beside it
and then swapped in, so a failed run leaves the old fixtures in place. --only NAME... builds a
subset (into a DIR other than the default). Takes about a minute on one CPU core.

One folder per model family lorafit supports. Each holds a tiny random-weight checkpoint written by
transformers' own `save_pretrained` (config.json, model.safetensors, generation_config.json), the
shared tokenizer (tokenizer.json, tokenizer_config.json), a PEFT LoRA adapter written by PEFT's own
`save_pretrained` (adapter/adapter_config.json, adapter/adapter_model.safetensors), the outputs
transformers and PEFT compute for fixed inputs (reference.safetensors) and a description of the
checkpoint (meta.json). See tests/fixtures/README.md for the list of families and what each
exercises.

reference.safetensors holds
    input_ids       int64 [2, 12], ids in 3..255, the same for every family
    logits          fp32 [2, 12, 256]: the base model in fp32, eval mode
    logits_bf16     fp32 [2, 12, 256]: the base model after `model.to(torch.bfloat16)`, logits
                    computed in bf16 and then widened to fp32
    logits_adapter  fp32 [2, 12, 256]: base + LoRA adapter (PEFT), fp32
    logits_merged   fp32 [2, 12, 256]: the same after `merge_and_unload()`
and, for phi3 only (LongRoPE switches its frequencies on the total sequence length),
    input_ids_short int64 [2, 8]: the first 8 ids of input_ids, as long as
                    original_max_position_embeddings, so the short factors are used
    logits_short    fp32 [2, 8, 256]
    generate_prompts, generated   int64 [2, 5], [2, 16]: greedy generate() across that length
for gemma2 and gemma3, embeddings_bf16 (fp32 [2, 12, 32], the bf16 model's scaled embeddings),
and for gpt2, dropout_input_ids (int64 [4, 64]), dropout_eval_loss (fp32 []) and
dropout_train_losses (fp32 [4000]): see the functions that record them.

Every logit comes from the eager attention implementation. After writing a family the script loads
it back from disk (AutoModelForCausalLM.from_pretrained, PeftModel.from_pretrained) and checks that
the recorded logits are reproduced, that transformers' default attention implementation agrees,
that the adapter and each family's quirk change the logits by a clear margin (so a reader that
ignores them fails), and that the adapter file holds what PEFT loads.

Deterministic: fixed seeds, one thread, and PYTHONHASHSEED=0 (the script re-executes itself with it
when it is not set, because PEFT writes adapter_config.json's target_modules from a Python set).
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib

SEED = 20250101
VOCAB = 256
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BATCH, SEQ = 2, 12
TOKEN_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None)

LORA_R, LORA_ALPHA = 4, 8
LORA_B_STD = 0.05

# A quirk counts as exercised when turning it off moves some logit by at least this much.
MIN_QUIRK_EFFECT = 0.05
# Reloaded fp32 logits must match the recorded ones to this (same kernels, so normally exactly).
TOL_EXACT = 1e-5
TOL_SDPA = 1e-4
TOL_MERGED = 1e-4

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with exactly VOCAB entries, trained on generated English text.

NAMES = ["Alice", "Bob", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack",
         "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tom",
         "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zoe"]
ADJECTIVES = ["small", "large", "quiet", "bright", "old", "new", "warm", "cold", "green", "blue",
              "happy", "tired", "quick", "slow", "clever", "gentle", "heavy", "empty", "round"]
NOUNS = ["cat", "dog", "bird", "house", "river", "garden", "book", "letter", "window", "table",
         "tree", "road", "city", "school", "teacher", "friend", "child", "apple", "box", "boat"]
VERBS = ["sees", "finds", "opens", "reads", "carries", "paints", "visits", "likes", "watches",
         "follows", "builds", "cleans", "moves", "holds", "writes"]
PLACES = ["the market", "the park", "the station", "the village", "the hill", "the kitchen",
          "the library", "the harbour", "the forest", "the bridge"]
TIMES = ["In the morning", "At night", "On Monday", "Every day", "Last week", "Today",
         "After lunch", "In winter", "Before dinner", "Yesterday"]


def english_text(rng, n):
    """n short English sentences built from the word lists above (with digits and punctuation)."""
    out = []
    for _ in range(n):
        k = rng.randrange(6)
        a, b = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
        n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
        who, verb, place = rng.choice(NAMES), rng.choice(VERBS), rng.choice(PLACES)
        if k == 0:
            out.append(f"The {a} {n1} {verb} the {b} {n2}.")
        elif k == 1:
            out.append(f"{rng.choice(TIMES)}, {who} {verb} a {a} {n1} near {place}.")
        elif k == 2:
            out.append(f"Does {who} know where the {n1} is? It is in {place}!")
        elif k == 3:
            out.append(f"{who} has {rng.randrange(2, 100)} {n1}s and {rng.randrange(2, 10)} {n2}s.")
        elif k == 4:
            out.append(f"\"Look at the {a} {n1},\" said {who}; \"it {verb} {place}.\"")
        else:
            out.append(f"{who} and {rng.choice(NAMES)} walk to {place} at {rng.randrange(1, 13)}:"
                       f"{rng.randrange(0, 60):02d} (with a {b} {n2}).")
    return out


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(SEED)
    texts = [" ".join(english_text(rng, 8)) for _ in range(600)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet (256 symbols) does not fit in 256 ids together with the specials and
    # some merges, so the alphabet is printable ASCII plus newline; other bytes encode to <unk>.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ascii_chars = [chr(c) for c in range(32, 127)] + ["\n"]
    alphabet = sorted({piece for ch in ascii_chars for piece, _ in byte_level.pre_tokenize_str(ch)})
    assert len(alphabet) == len(ascii_chars), alphabet
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet))
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert tok.get_vocab_size() == VOCAB, f"tokenizer has {tok.get_vocab_size()} entries, not {VOCAB}"
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    for text in texts[:50] + ["Hello, World! 123 ~{}|"]:
        enc = tok.encode(text)
        assert enc.ids[0] == BOS_ID and UNK_ID not in enc.ids, text
        assert tok.decode(enc.ids, skip_special_tokens=True) == text, "round trip failed"
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "add_bos_token": True, "add_eos_token": False,
    "model_max_length": 64, "clean_up_tokenization_spaces": False,
}


# ----------------------------------------------------------------------------------------------
# Families. Each entry: the config (built by hand from transformers' config classes), the model
# class, the LoRA target modules (every linear projection by leaf name, lm_head excluded), the
# quirk it exercises, and "knock-outs": changes that switch a quirk off, each of which must move
# the logits by at least MIN_QUIRK_EFFECT.

def cfg_llama3():
    from transformers import LlamaConfig
    # head_dim 16, theta 1e4: wavelengths 2*pi*1e4^(i/8) = 6.3, 19.9, 62.8, ... With
    # original_max_position_embeddings 32, low_freq_factor 1 and high_freq_factor 4 the bands are
    # (< 8: kept), (8..32: smoothed), (> 32: divided by factor), so all three branches are used.
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        **TOKEN_IDS)


def cfg_llama_legacy():
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        **TOKEN_IDS)


def cfg_smollm2():
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        **TOKEN_IDS)


def cfg_mistral():
    from transformers import MistralConfig
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **TOKEN_IDS)


def cfg_qwen2():
    from transformers import Qwen2Config
    # As in Qwen2 hub configs: a sliding_window value with use_sliding_window false (unused).
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        sliding_window=4, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **TOKEN_IDS)


def cfg_qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **TOKEN_IDS)


def cfg_gemma2():
    from transformers import Gemma2Config
    # Soft-caps far below Gemma 2's 50/30, so that they bend logits of this scale measurably.
    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", sliding_window=4,
        attn_logit_softcapping=4.0, final_logit_softcapping=10.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **TOKEN_IDS)


def cfg_gemma3():
    from transformers import Gemma3TextConfig
    # Local layers: theta 1e4, no scaling; global layers: theta 1e6 with linear scaling 8 (as in
    # Gemma 3 4B/12B/27B). Layer types s, s, f, s (sliding_window_pattern 3).
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", sliding_window=4, sliding_window_pattern=3,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        **TOKEN_IDS)


def cfg_phi3():
    from transformers import Phi3Config
    # original_max_position_embeddings 8 < SEQ, so the 12-token reference uses the long factors and
    # input_ids_short (8 tokens) the short ones; both scale cos/sin by sqrt(1 + ln(64/8)/ln(8)).
    return Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        original_max_position_embeddings=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.25, 1.5, 2.0],
                         "long_factor": [1.0, 2.0, 4.0, 8.0]},
        **TOKEN_IDS)


def cfg_gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def knock(**changes):
    """A knock-out that sets config attributes."""
    def apply(cfg, state):
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg, state
    return apply


def knock_state(pattern, fn):
    """A knock-out that rewrites the tensors whose name contains `pattern`."""
    def apply(cfg, state):
        return cfg, {k: (fn(v) if pattern in k else v) for k, v in state.items()}
    return apply


NO_WINDOW = 1024  # a sliding window longer than any sequence here: full causal attention


def _default_rope(theta):
    return {"rope_type": "default", "rope_theta": theta}


def _zeros(t):
    return t * 0


def _ones(t):
    return t * 0 + 1


def _minus_one(t):
    return t - 1


# ----------------------------------------------------------------------------------------------
# Extra references of single families: fn(folder, input_ids, ref, notes) adds tensors to `ref`.

# GPT-2's dropout: transformers' train-mode loss is recorded over DROPOUT_DRAWS draws; the test
# compares the mean of DROPOUT_TEST_DRAWS of lorafit's draws with theirs, at a tolerance of
# DROPOUT_SIGMAS standard errors of the difference of the two means.
DROPOUT_DRAWS, DROPOUT_TEST_DRAWS, DROPOUT_SIGMAS = 4000, 1000, 5.0
DROPOUT_KNOCKOUT_DRAWS = 1000


def dropout_tolerance(std, test_std):
    return DROPOUT_SIGMAS * (std ** 2 / DROPOUT_DRAWS + test_std ** 2 / DROPOUT_TEST_DRAWS) ** 0.5


def gpt2_dropout_losses(folder, input_ids, ref, notes):
    """Train-mode losses of the model's own greedy text: 4 rows of 64 tokens, from 4-token prompts.

    On its own greedy text the eval loss is low and every dropout raises it, so the mean loss tells
    whether each of embd_pdrop, attn_pdrop and resid_pdrop is applied (on random text their effects
    on the mean cancel out). Each one switched off must move the mean by more than the test's
    tolerance (taking lorafit's spread to be transformers').
    """
    import torch

    model = load_model(folder)
    ids = input_ids[:, :8].reshape(4, 4)
    with torch.no_grad():
        while ids.shape[1] < model.config.n_positions:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)

    def losses(m, n):
        m.train()
        torch.manual_seed(SEED)
        with torch.no_grad():
            return torch.tensor([m(input_ids=ids, labels=ids).loss.item() for _ in range(n)])

    with torch.no_grad():
        eval_loss = model.eval()(input_ids=ids, labels=ids).loss
    draws = losses(model, DROPOUT_DRAWS)
    mean, std = draws.mean().item(), draws.std().item()
    tol = dropout_tolerance(std, std)
    assert abs(mean - eval_loss.item()) > 2 * tol, (mean, eval_loss.item(), tol)
    effects = {}
    for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        knocked = losses(load_model(folder, **{key: 0.0}), DROPOUT_KNOCKOUT_DRAWS)
        shift = knocked.mean().item() - mean
        noise = 3 * knocked.std().item() / DROPOUT_KNOCKOUT_DRAWS ** 0.5
        assert abs(shift) > tol + noise, f"gpt2: {key} = 0 moves the mean train loss only by {shift}"
        effects[key] = round(shift, 4)
    ref["dropout_input_ids"] = ids
    ref["dropout_eval_loss"] = eval_loss.float()
    ref["dropout_train_losses"] = draws.float()
    notes.append(f"dropout: eval loss {eval_loss.item():.4f}, train-mode mean {mean:.4f} (std {std:.4f}, "
                 f"{DROPOUT_DRAWS} draws); the test's tolerance is about {tol:.4f}; setting one "
                 f"dropout to 0 moves the mean by {effects}")


def longrope_generation(folder, input_ids, ref, notes):
    """Greedy generate() (KV cache) from 5-token prompts to 21 tokens, across
    original_max_position_embeddings 8.

    Phi-3's prepare_inputs_for_generation drops the cache at the step that first exceeds the
    original context, so every key is computed again with the long factors. Decoding that keeps
    the short-factor keys (GenerationMixin's own prepare_inputs_for_generation) must give other
    tokens, or the fixture would not tell the two apart.
    """
    import torch
    from transformers import GenerationMixin

    model = load_model(folder)
    model.generation_config.eos_token_id = None  # always the full length, as lorafit's greedy
    prompts = input_ids[:, :5].clone()

    def generate():
        with torch.no_grad():
            return torch.cat([model.generate(p[None], attention_mask=torch.ones_like(p[None]), do_sample=False,
                                             max_new_tokens=16)[:, 5:] for p in prompts])

    generated = generate()
    cls = type(model)
    own = cls.prepare_inputs_for_generation
    cls.prepare_inputs_for_generation = GenerationMixin.prepare_inputs_for_generation
    try:
        stale = generate()
    finally:
        cls.prepare_inputs_for_generation = own
    differ = (generated != stale).any(1).sum().item()
    assert differ == len(prompts), f"phi3: keeping short-factor keys changes only {differ} generations"
    ref["generate_prompts"] = prompts
    ref["generated"] = generated
    notes.append("generated: greedy generate() with the KV cache; keeping the short-factor keys "
                 f"past position 8 gives other tokens for both prompts: {stale.tolist()}")


def bf16_embeddings(folder, input_ids, ref, notes):
    """The scaled embeddings of the bf16 model: the scale √hidden_size is cast to bf16 first."""
    import torch

    model = load_model(folder).to(torch.bfloat16)
    with torch.no_grad():
        embedded = model.get_input_embeddings()(input_ids)
        unrounded = (model.get_input_embeddings().weight[input_ids].float()
                     * model.config.hidden_size ** 0.5).bfloat16()
    differ = (embedded != unrounded).sum().item()
    assert differ > 0, "the bf16 scale changes no embedding"
    ref["embeddings_bf16"] = embedded.float()
    notes.append(f"embeddings_bf16: {differ} of {embedded.numel()} values differ when the scale "
                 "is not rounded to bf16 before multiplying")


FAMILIES = [
    dict(name="llama3", cls="LlamaForCausalLM", config=cfg_llama3, targets=LLAMA_TARGETS,
         quirk="rope_parameters of type llama3 (all three frequency bands used); GQA 2:1; untied",
         knockouts={"llama3 rope scaling off": knock(rope_parameters=_default_rope(10000.0))}),
    dict(name="llama-legacy", cls="LlamaForCausalLM", config=cfg_llama_legacy,
         targets=LLAMA_TARGETS, legacy_config=True,
         quirk="legacy config.json layout: top-level rope_theta, rope_scaling {type: linear, "
               "factor: 2.0} (old `type` key), torch_dtype; multi-head attention (no GQA)",
         knockouts={"linear rope scaling off": knock(rope_parameters=_default_rope(10000.0))}),
    dict(name="smollm2", cls="LlamaForCausalLM", config=cfg_smollm2, targets=LLAMA_TARGETS,
         quirk="tied embeddings: no lm_head.weight in model.safetensors; rope_theta 1e5",
         knockouts={}),
    dict(name="mistral", cls="MistralForCausalLM", config=cfg_mistral, targets=LLAMA_TARGETS,
         quirk="sliding_window 4 < sequence length 12, on every layer",
         knockouts={"sliding window off": knock(sliding_window=NO_WINDOW),
                    "sliding window 5 (off by one)": knock(sliding_window=5)}),
    dict(name="qwen2", cls="Qwen2ForCausalLM", config=cfg_qwen2, targets=LLAMA_TARGETS,
         quirk="bias on q/k/v projections (not on o_proj); tied embeddings; rope_theta 1e6",
         knockouts={"q/k/v biases zeroed": knock_state("_proj.bias", _zeros)}),
    dict(name="qwen3", cls="Qwen3ForCausalLM", config=cfg_qwen3, targets=LLAMA_TARGETS,
         quirk="per-head RMSNorm on q and k (q_norm, k_norm, weight [head_dim]); head_dim 16 != "
               "hidden_size / heads = 8; tied embeddings",
         knockouts={"q/k norm weights set to 1": knock_state("_norm.weight", _ones)}),
    dict(name="gemma2", cls="Gemma2ForCausalLM", config=cfg_gemma2, targets=LLAMA_TARGETS,
         quirk="RMSNorm x*(1+w) (computed in fp32); embeddings * sqrt(hidden_size); four norms per "
               "block; gelu_pytorch_tanh; query_pre_attn_scalar 24 != head_dim 16; attention and "
               "final logit soft-capping; layers alternate sliding (window 4) / global; tied",
         knockouts={"attention soft-capping off": knock(attn_logit_softcapping=None),
                    "final soft-capping off": knock(final_logit_softcapping=None),
                    "sliding window off": knock(sliding_window=NO_WINDOW),
                    "sliding window 5 (off by one)": knock(sliding_window=5),
                    "query_pre_attn_scalar = head_dim": knock(query_pre_attn_scalar=16),
                    "norms scale by w, not 1+w": knock_state("norm.weight", _minus_one)},
         extras=[bf16_embeddings]),
    dict(name="gemma3", cls="Gemma3ForCausalLM", config=cfg_gemma3, targets=LLAMA_TARGETS,
         quirk="text-only Gemma 3 (model_type gemma3_text): q/k RMSNorm x*(1+w); separate rope "
               "for local (theta 1e4) and global (theta 1e6, linear factor 8) layers; layer types "
               "s,s,f,s with sliding window 4; embeddings * sqrt(hidden_size); four norms per "
               "block; query_pre_attn_scalar 24; tied",
         knockouts={"sliding window off": knock(sliding_window=NO_WINDOW),
                    "sliding window 5 (off by one)": knock(sliding_window=5),
                    "norms scale by w, not 1+w": knock_state("norm.weight", _minus_one),
                    "global rope = local rope": knock(rope_parameters={
                        "sliding_attention": _default_rope(10000.0),
                        "full_attention": _default_rope(10000.0)}),
                    "global linear scaling off": knock(rope_parameters={
                        "sliding_attention": _default_rope(10000.0),
                        "full_attention": _default_rope(1000000.0)})},
         extras=[bf16_embeddings]),
    dict(name="phi3", cls="Phi3ForCausalLM", config=cfg_phi3,
         targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
         quirk="fused qkv_proj (q 32 | k 16 | v 16 rows) and gate_up_proj (gate | up); rope "
               "longrope with original_max_position_embeddings 8 and max_position_embeddings 64: "
               "sequences longer than 8 (input_ids) use long_factor, up to 8 (input_ids_short) "
               "short_factor; cos/sin scaled by sqrt(1 + ln(64/8)/ln(8)) in both cases",
         knockouts={"longrope off": knock(rope_parameters={
             "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})},
         extras=[longrope_generation]),
    dict(name="gpt2", cls="GPT2LMHeadModel", config=cfg_gpt2, targets=["c_attn", "c_proj", "c_fc"],
         quirk="Conv1D weights stored [in, out] (PEFT fan_in_fan_out true); learned position "
               "embeddings (wpe); LayerNorm with bias; biases on every projection; gelu_new; "
               "keys with the transformer. prefix; tied lm_head",
         knockouts={"position embeddings zeroed": knock_state("wpe.weight", _zeros)},
         extras=[gpt2_dropout_losses]),
    dict(name="gpt2-noprefix", copy_of="gpt2",
         quirk="gpt2 with model.safetensors keys lacking the transformer. prefix (h.0.attn.c_attn."
               "weight, wte.weight, ...), as some hub checkpoints have them; otherwise identical "
               "to gpt2 (same weights, adapter and reference)"),
]


# ----------------------------------------------------------------------------------------------
# Helpers.

def write_json(path, obj, compact_lists=False):
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    if compact_lists:  # [\n  256,\n  32\n] -> [256, 32]
        text = re.sub(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]",
                      lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def family_seed(name):
    return SEED + zlib.crc32(name.encode())


def linear_types():
    import torch
    from transformers.pytorch_utils import Conv1D
    return (torch.nn.Linear, Conv1D)


def randomize_weights(model, seed):
    """Random weights at a scale where every quirk shows in the logits.

    N(mean, variance): Linear/Conv1D weights N(0, 1/fan_in) (lm_head N(0, 4/fan_in)), embeddings N(0, 0.25), biases
    N(0, 0.01), norm weights their initial value (1, or 0 for Gemma's 1+w) plus N(0, 0.01).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            mod = owner[name]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if isinstance(mod, torch.nn.Embedding):
                p.copy_(noise * 0.5)
            elif name.endswith(".bias"):
                p.copy_(noise * 0.1)
            elif isinstance(mod, Conv1D):  # weight [in, out]
                p.copy_(noise / p.shape[0] ** 0.5)
            elif isinstance(mod, torch.nn.Linear):  # weight [out, in]
                gain = 2.0 if name.startswith("lm_head") else 1.0
                p.copy_(noise * gain / p.shape[1] ** 0.5)
            elif p.dim() == 1:  # norm weights
                p.add_(noise * 0.1)
            else:
                raise AssertionError(f"no init rule for {name} {tuple(p.shape)} ({type(mod).__name__})")


def load_model(path, attn="eager", dtype=None, **config):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}  # None: transformers' default choice
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, output_loading_info=True, **kwargs, **config)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not bad, f"{path}: loading reported {bad}"
    return model.eval()


def forward(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_close(what, got, want, tol):
    d = max_diff(got, want)
    assert got.shape == want.shape and d <= tol, f"{what}: max |diff| {d:.3g} > {tol} (shapes " \
                                                 f"{tuple(got.shape)} / {tuple(want.shape)})"
    return d


def dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------------------------
# Building one family.

def lora_config(fam):
    from peft import LoraConfig
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(fam["targets"]), init_lora_weights=True)


def randomize_lora(peft_model, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:  # [r, in]
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                n += 1
            elif ".lora_B." in name:  # [out, r]
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
                n += 1
    return n


def rewrite_legacy_config(path):
    """Rewrite config.json into the pre-transformers-5 layout (rope_theta + rope_scaling, torch_dtype)."""
    cfg = read_json(path)
    rope = cfg.pop("rope_parameters")
    assert rope == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, rope
    out = {}
    for k, v in cfg.items():
        if k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    out["rope_theta"] = rope["rope_theta"]
    out["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    write_json(path, dict(sorted(out.items())))


def strip_prefix(path, prefix):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith(prefix) for k in state), sorted(state)
    save_file({k[len(prefix):]: v for k, v in state.items()}, path, metadata=meta)


def describe(model, fam, folder, cfg_json, lcfg_json, knock_effects, extra_notes):
    from safetensors import safe_open
    from transformers.pytorch_utils import Conv1D

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(os.path.join(folder, "reference.safetensors"), "pt") as f:
        ref_shapes = {k: {"dtype": str(f.get_slice(k).get_dtype()), "shape": list(f.get_slice(k).get_shape())}
                      for k in f.keys()}
    linears = []
    for name, mod in model.named_modules():
        if not isinstance(mod, linear_types()):
            continue
        key = f"{name}.weight"
        if key not in shapes and name.startswith("transformer."):
            key = key[len("transformer."):]  # gpt2-noprefix
        entry = {"path": name, "kind": "Conv1D" if isinstance(mod, Conv1D) else "Linear",
                 "in_features": mod.nx if isinstance(mod, Conv1D) else mod.in_features,
                 "out_features": mod.nf if isinstance(mod, Conv1D) else mod.out_features}
        if key in shapes:
            entry["weight_key"], entry["weight_shape"] = key, shapes[key]
        else:
            assert name == "lm_head" and cfg_json.get("tie_word_embeddings", True), name
            emb = model.get_input_embeddings().weight
            tied_key = next(k for k in shapes if k.endswith(("embed_tokens.weight", "wte.weight")))
            entry["weight_key"], entry["weight_shape"] = None, list(emb.shape)
            entry["tied_to"] = tied_key
        bias_key = key[: -len("weight")] + "bias"
        entry["bias_key"] = bias_key if bias_key in shapes else None
        entry["lora_target"] = name.split(".")[-1] in fam["targets"]
        linears.append(entry)
    return {
        "family": fam["name"],
        "model_type": cfg_json["model_type"],
        "architecture": cfg_json["architectures"][0],
        "quirk": fam["quirk"],
        "tied_embeddings": bool(model.config.tie_word_embeddings),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_tensors_in_file": len(shapes),
        "tensors": shapes,
        "linear_modules": linears,
        "lora": {"r": lcfg_json["r"], "lora_alpha": lcfg_json["lora_alpha"],
                 "target_modules": sorted(lcfg_json["target_modules"]),
                 "fan_in_fan_out": lcfg_json["fan_in_fan_out"],
                 "lora_A_std": "1/sqrt(in_features)", "lora_B_std": LORA_B_STD},
        "reference": {"tensors": ref_shapes, "attn_implementation": "eager"},
        "quirk_effects_max_abs_logit_change": knock_effects,
        "notes": extra_notes,
    }


def build_family(fam, out_root, tok_path, input_ids):
    import torch
    import transformers
    from peft import get_peft_model
    from safetensors.torch import save_file

    name = fam["name"]
    folder = os.path.join(out_root, name)
    seed = family_seed(name)
    repo_path = f"tests/fixtures/models/{name}"
    notes = []

    # 1. The model, saved by transformers.
    cfg = fam["config"]()
    cls = getattr(transformers, fam["cls"])
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    leaves = {n.split(".")[-1] for n, m in model.named_modules()
              if isinstance(m, linear_types()) and n != "lm_head"}
    assert leaves == set(fam["targets"]), f"{name}: linear projections {sorted(leaves)}"
    randomize_weights(model, seed)
    logits_mem = forward(model, input_ids)
    model.save_pretrained(folder)
    shutil.copy(tok_path, os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), TOKENIZER_CONFIG)
    if fam.get("legacy_config"):
        rewrite_legacy_config(os.path.join(folder, "config.json"))
        notes.append("config.json rewritten by hand from transformers' output into the legacy "
                     "layout; transformers loads it to the same logits")

    # 2. Reference logits from the checkpoint as written.
    base = load_model(folder)
    logits = forward(base, input_ids)
    check_close(f"{name}: logits after save/load", logits, logits_mem, TOL_EXACT)
    ref = {"input_ids": input_ids.clone(), "logits": logits}
    if name == "phi3":
        short = input_ids[:, :8].clone()
        ref["input_ids_short"] = short
        ref["logits_short"] = forward(base, short)
        d = max_diff(ref["logits_short"], logits[:, :8])
        assert d >= MIN_QUIRK_EFFECT, f"phi3: short/long factor switch changes logits only by {d}"
        notes.append(f"logits_short differ from logits[:, :8] by up to {d:.3f}: the same 8 tokens "
                     "give other logits inside a 12-token sequence (long factors)")
    ref["logits_bf16"] = forward(load_model(folder).to(torch.bfloat16), input_ids)
    for extra in fam.get("extras", []):
        extra(folder, input_ids, ref, notes)

    # 3. Quirk knock-outs: the same weights with the quirk switched off must change the logits.
    effects = {}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for what, apply in fam["knockouts"].items():
        kcfg, kstate = apply(fam["config"](), dict(state))
        kmodel = cls._from_config(kcfg, attn_implementation="eager").eval()
        missing, unexpected = kmodel.load_state_dict(kstate, strict=False)
        assert not unexpected and not [m for m in missing if "lm_head" not in m], (missing, unexpected)
        if kcfg.tie_word_embeddings:
            kmodel.tie_weights()
        effects[what] = round(max_diff(forward(kmodel, input_ids), logits), 4)
        assert effects[what] >= MIN_QUIRK_EFFECT, f"{name}: knock-out '{what}' changes logits only " \
                                                  f"by {effects[what]}"

    # 4. The adapter, made and saved by PEFT.
    base = load_model(folder)
    # PEFT records the base model's name_or_path in adapter_config.json; use the repository path
    # rather than the temporary folder this is built in.
    base.name_or_path = repo_path
    lcfg = lora_config(fam)
    peft_model = get_peft_model(base, lcfg).eval()
    n_lora = randomize_lora(peft_model, seed + 1)
    assert n_lora > 0
    ref["logits_adapter"] = forward(peft_model, input_ids)
    adapter_dir = os.path.join(folder, "adapter")
    peft_model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # PEFT's boilerplate model card
    merged = peft_model.merge_and_unload()
    ref["logits_merged"] = forward(merged, input_ids)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"),
              metadata={"format": "pt"})
    d = max_diff(ref["logits_adapter"], logits)
    assert d >= MIN_QUIRK_EFFECT, f"{name}: the adapter changes logits only by {d}"
    check_close(f"{name}: merged vs adapter", ref["logits_merged"], ref["logits_adapter"], TOL_MERGED)

    cfg_json = read_json(os.path.join(folder, "config.json"))
    lcfg_json = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    meta = describe(load_model(folder), fam, folder, cfg_json, lcfg_json, effects, notes)
    meta["effect_of_adapter_max_abs_logit_change"] = round(d, 4)
    write_json(os.path.join(folder, "meta.json"), meta, compact_lists=True)
    return meta


def copy_family(fam, out_root):
    """gpt2-noprefix: the gpt2 folder with the transformer. prefix stripped from the weight keys."""
    name, src = fam["name"], os.path.join(out_root, fam["copy_of"])
    folder = os.path.join(out_root, name)
    shutil.copytree(src, folder)
    strip_prefix(os.path.join(folder, "model.safetensors"), "transformer.")
    meta = read_json(os.path.join(folder, "meta.json"))
    fam_src = next(f for f in FAMILIES if f["name"] == fam["copy_of"])
    # The same adapter, loaded and saved again by PEFT so that it names this folder as its base.
    from peft import PeftModel
    base = load_model(folder)
    base.name_or_path = f"tests/fixtures/models/{name}"
    adapter_dir = os.path.join(folder, "adapter")
    peft_model = PeftModel.from_pretrained(base, os.path.join(src, "adapter"))
    peft_model.peft_config["default"].base_model_name_or_path = base.name_or_path
    shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    model = load_model(folder)
    cfg_json = read_json(os.path.join(folder, "config.json"))
    lcfg_json = read_json(os.path.join(folder, "adapter", "adapter_config.json"))
    new = describe(model, dict(fam_src, name=name, quirk=fam["quirk"]), folder, cfg_json, lcfg_json,
                   meta["quirk_effects_max_abs_logit_change"],
                   ["copy of gpt2 (same config, weights, adapter, reference) with the keys of "
                    "model.safetensors renamed; transformers loads it to the same logits"])
    new["effect_of_adapter_max_abs_logit_change"] = meta["effect_of_adapter_max_abs_logit_change"]
    write_json(os.path.join(folder, "meta.json"), new, compact_lists=True)
    return new


# ----------------------------------------------------------------------------------------------
# Checks from disk.

def verify(fam, folder):
    """Reload the folder and check that it reproduces every recorded output."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = fam["name"]
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    ids = ref["input_ids"]
    assert ids.dtype == torch.int64 and list(ids.shape) == [BATCH, SEQ]
    assert int(ids.min()) >= 3 and int(ids.max()) < VOCAB
    for k in ("logits", "logits_bf16", "logits_adapter", "logits_merged"):
        assert ref[k].dtype == torch.float32 and list(ref[k].shape) == [BATCH, SEQ, VOCAB], k

    base = load_model(folder)
    res = {"logits": check_close(f"{name}: reload", forward(base, ids), ref["logits"], TOL_EXACT)}
    if "input_ids_short" in ref:
        check_close(f"{name}: reload short", forward(base, ref["input_ids_short"]),
                    ref["logits_short"], TOL_EXACT)
    default = load_model(folder, attn=None)
    res["default_attn"] = default.config._attn_implementation
    res["default_attn_diff"] = check_close(f"{name}: {res['default_attn']} attention",
                                           forward(default, ids), ref["logits"], TOL_SDPA)
    res["bf16"] = check_close(f"{name}: bf16", forward(load_model(folder).to(torch.bfloat16), ids),
                              ref["logits_bf16"], 1e-6)
    res["bf16_vs_fp32"] = max_diff(ref["logits_bf16"], ref["logits"])

    adapter_dir = os.path.join(folder, "adapter")
    lcfg = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    assert lcfg["r"] == LORA_R and lcfg["lora_alpha"] == LORA_ALPHA, lcfg
    assert sorted(lcfg["target_modules"]) == sorted(fam["targets"]), lcfg["target_modules"]
    assert lcfg["fan_in_fan_out"] == (name.startswith("gpt2")), lcfg["fan_in_fan_out"]
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        params = dict(peft_model.named_parameters())
        lora_params = {k for k in params if ".lora_" in k}
        seen = set()
        for key in f.keys():
            t = f.get_tensor(key)
            assert t.abs().max() > 0, f"{key} is all zeros"
            pkey = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            assert pkey in params and torch.equal(params[pkey].detach(), t), key
            seen.add(pkey)
        assert seen == lora_params, sorted(lora_params - seen)
    res["lora_tensors"] = len(seen)
    res["adapter"] = check_close(f"{name}: adapter reload", forward(peft_model, ids),
                                 ref["logits_adapter"], TOL_EXACT)
    res["merged"] = check_close(f"{name}: merged reload", forward(peft_model.merge_and_unload(), ids),
                                ref["logits_merged"], TOL_EXACT)
    return res


# ----------------------------------------------------------------------------------------------

def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(repo, "tests", "fixtures", "models"),
                    help="output folder (default: tests/fixtures/models/)")
    ap.add_argument("--only", nargs="*", help="build only these families into a scratch folder "
                    "(for debugging; requires --out to differ from the default)")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    import peft
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    out = os.path.abspath(args.out)
    if args.only and out == os.path.join(repo, "tests", "fixtures", "models"):
        raise SystemExit("--only would leave the default fixture folder incomplete; use --out")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".models.tmp-", dir=parent)
    start = time.time()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    try:
        tok = train_tokenizer()
        tok_path = os.path.join(tmp, "tokenizer.json")
        tok.save(tok_path)
        input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))

        families = [f for f in FAMILIES if not args.only or f["name"] in args.only]
        for fam in families:
            t0 = time.time()
            if "copy_of" in fam:
                meta = copy_family(fam, tmp)
                fam_check = dict(next(f for f in FAMILIES if f["name"] == fam["copy_of"]), name=fam["name"])
            else:
                meta = build_family(fam, tmp, tok_path, input_ids)
                fam_check = fam
            res = verify(fam_check, os.path.join(tmp, fam["name"]))
            size = dir_size(os.path.join(tmp, fam["name"]))
            print(f"{fam['name']:14s} {size / 1024:6.1f} KiB  {meta['num_parameters']:6d} params  "
                  f"{meta['num_tensors_in_file']:3d} tensors  {res['lora_tensors']:3d} lora  "
                  f"reload {res['logits']:.1e} {res['default_attn']} {res['default_attn_diff']:.1e} "
                  f"merged {res['merged']:.1e} "
                  f"bf16-vs-fp32 {res['bf16_vs_fp32']:.3f}  adapter-effect "
                  f"{meta['effect_of_adapter_max_abs_logit_change']:.3f}  quirks "
                  f"{meta['quirk_effects_max_abs_logit_change']}  ({time.time() - t0:.1f} s)",
                  flush=True)
        os.remove(tok_path)
        for root, _, files in os.walk(tmp):  # safetensors writes its files 0600
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        os.chmod(tmp, 0o755)

        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".models.old-", dir=parent)
            os.rename(out, os.path.join(old, "models"))
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = dir_size(out)
    print(f"wrote {out}: {total / 1024:.1f} KiB in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
