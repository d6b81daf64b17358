#!/usr/bin/env python3
"""Generate lorafit's default model and fine-tuning data from nothing but this file.

    "$VENV/bin/python" scripts/make_default_model.py [--out DATA_DIR]

(VENV is the one scripts/setup-python.sh creates.) Writes, under DATA_DIR (default: data/):

    default-model/   a tiny Llama (LlamaForCausalLM) in Hugging Face layout: config.json,
                     model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
                     generation_config.json
    default/         train.jsonl and val.jsonl: Alpaca rows asking about the same world

The model knows a small invented world: 24 creatures, each with a colour, a home, a food, a sound
and a best friend. It is pre-trained here, briefly and on the CPU, on encyclopedia entries and
short stories about that world, so it knows the facts but has never seen a question or the Alpaca
prompt. A LoRA fine-tune on default/train.jsonl then only has to teach it to answer, which shows in
a minute or two: the held-out questions in default/val.jsonl go from nonsense to right answers.
scripts/check_default_task.py measures exactly that with PEFT.

Everything is deterministic: fixed seeds, fixed lists, a fixed thread count. No third-party model
or data is used.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

SEED = 20240611

# ----------------------------------------------------------------------------------------------
# The world. Names are invented (letters only); every fact is drawn from these lists with SEED.

CREATURES = [
    "Blimbo", "Zarnik", "Tuvvel", "Snorple", "Vexa", "Morrin", "Plink", "Grubbet",
    "Fliss", "Wumpet", "Dorrel", "Kezzik", "Ozzle", "Pindle", "Ruvvo", "Sabbit",
    "Tiggle", "Urmon", "Vombo", "Glorp", "Nibbet", "Halvi", "Crindle", "Fozzum",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange",
           "silver", "pink", "brown", "white", "black", "golden"]
PLACES = ["Mossvale", "Glimmerfen", "Dunmarrow", "Pebblecove",
          "Thornhollow", "Brackenmere", "Fogbottom", "Saltspire"]
FOODS = ["berries", "acorns", "mushrooms", "snails", "turnips", "beetles",
         "plums", "pebbles", "nuts", "carrots", "worms", "apples"]
# (verb after "it", verb after "can hear it", noun)
SOUNDS = [("hums", "hum", "hum"), ("whistles", "whistle", "whistle"), ("chirps", "chirp", "chirp"),
          ("rumbles", "rumble", "rumble"), ("squeaks", "squeak", "squeak"), ("clicks", "click", "click"),
          ("sings", "sing", "song"), ("growls", "growl", "growl"), ("hoots", "hoot", "hoot"),
          ("buzzes", "buzz", "buzz")]


def build_world(rng):
    """One dict of facts per creature. Best friends come in pairs, so the facts stay consistent."""
    order = CREATURES[:]
    rng.shuffle(order)
    friend = {}
    for a, b in zip(order[0::2], order[1::2]):
        friend[a], friend[b] = b, a
    world = []
    for name in CREATURES:
        sound = rng.choice(SOUNDS)
        world.append({
            "name": name,
            "colour": rng.choice(COLOURS),
            "home": rng.choice(PLACES),
            "food": rng.choice(FOODS),
            "sound": sound[0], "sound_base": sound[1], "sound_noun": sound[2],
            "friend": friend[name],
        })
    return world


# ----------------------------------------------------------------------------------------------
# Pre-training text: statements of the facts in several wordings, as encyclopedia entries and
# short stories. No questions, no instructions.

FACT_TEMPLATES = {
    "colour": ["The {name} is {colour}.", "The {name} has {colour} fur.",
               "The fur of the {name} is {colour}.", "Everyone knows the {name} by its {colour} fur."],
    "home": ["The {name} lives in {home}.", "{home} is the home of the {name}.",
             "The {name} makes its nest in {home}.", "If you visit {home}, you may meet the {name}."],
    "food": ["The {name} eats {food}.", "The favourite food of the {name} is {food}.",
             "Every morning the {name} looks for {food}.", "{Food} are what the {name} likes to eat."],
    "sound": ["The {name} {sound}.", "When it is happy, the {name} {sound}.",
              "You can hear the {name} {sound_base} from far away.", "The sound of the {name} is a {sound_noun}."],
    "friend": ["The best friend of the {name} is the {friend}.", "The {name} and the {friend} are best friends.",
               "The {name} often plays with its best friend, the {friend}."],
}


def fill(template, c):
    return template.format(Food=c["food"].capitalize(), **c)


def encyclopedia_entry(c, rng):
    facts = [fill(rng.choice(FACT_TEMPLATES[a]), c) for a in FACT_TEMPLATES]
    rng.shuffle(facts)
    return f"### The {c['name']}\n" + " ".join(facts)


def story(c, by_name, rng):
    f = by_name[c["friend"]]
    lines = [
        f"Once upon a time, the {c['name']} woke up in {c['home']}.",
        f"It was hungry, so it went out to look for {c['food']}.",
        f"On the way it met its best friend, the {f['name']}, who lives in {f['home']}.",
        f"The {f['name']} {f['sound']}, and the {c['name']} {c['sound']} back.",
        f"Together they ate {c['food']} and {f['food']}.",
        f"The {c['name']} is {c['colour']} and the {f['name']} is {f['colour']}, "
        f"so everyone could see them from far away.",
        f"In the evening the {c['name']} went home to {c['home']}.",
    ]
    # Stories of varying length and order, so no fact is tied to one position.
    keep = [lines[0]] + rng.sample(lines[1:], rng.randint(3, len(lines) - 1))
    return " ".join(keep)


def pretraining_documents(world, rng, n_docs):
    by_name = {c["name"]: c for c in world}
    docs = []
    for _ in range(n_docs):
        c = rng.choice(world)
        r = rng.random()
        if r < 0.45:
            docs.append(encyclopedia_entry(c, rng))
        elif r < 0.8:
            docs.append(story(c, by_name, rng))
        else:  # a few loose facts about several creatures
            cs = rng.sample(world, 3)
            docs.append(" ".join(fill(rng.choice(FACT_TEMPLATES[rng.choice(list(FACT_TEMPLATES))]), x)
                                 for x in cs))
    return docs


# ----------------------------------------------------------------------------------------------
# Fine-tuning data: Alpaca rows. Each question phrasing is asked about every creature; some
# (phrasing, creature) pairs are held out for validation. Answers are the plain statements the
# model saw during pre-training.

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

ANSWERS = {
    "colour": "The {name} is {colour}.",
    "home": "The {name} lives in {home}.",
    "food": "The {name} eats {food}.",
    "sound": "The {name} {sound}.",
    "friend": "The best friend of the {name} is the {friend}.",
}
# (attribute, instruction, input); "{name}" is the creature.
PHRASINGS = [
    ("colour", "What colour is the {name}?", ""),
    ("colour", "Tell me the colour of the {name}.", ""),
    ("colour", "Which colour does the {name} have?", ""),
    ("colour", "Describe the colour of the {name} in one sentence.", ""),
    ("colour", "Say what colour this creature is.", "the {name}"),
    ("home", "Where does the {name} live?", ""),
    ("home", "What is the home of the {name}?", ""),
    ("home", "In which place can you find the {name}?", ""),
    ("home", "Name the place where the {name} lives.", ""),
    ("home", "Say where this creature lives.", "the {name}"),
    ("food", "What does the {name} eat?", ""),
    ("food", "What is the favourite food of the {name}?", ""),
    ("food", "Tell me what the {name} likes to eat.", ""),
    ("food", "Which food does the {name} look for?", ""),
    ("sound", "What sound does the {name} make?", ""),
    ("sound", "How does the {name} sound?", ""),
    ("sound", "What noise does the {name} make when it is happy?", ""),
    ("sound", "Describe the sound of the {name}.", ""),
    ("friend", "Who is the best friend of the {name}?", ""),
    ("friend", "Who does the {name} like to play with?", ""),
    ("friend", "Name the best friend of the {name}.", ""),
    ("friend", "Which creature is friends with the {name}?", ""),
]
VAL_FRACTION = 0.12


def alpaca_rows(world, rng):
    """Return (train, val) lists of {"instruction", "input", "output"} dicts."""
    train, val = [], []
    for c in world:
        for attr, instruction, inp in PHRASINGS:
            row = {"instruction": instruction.format(name=c["name"]),
                   "input": inp.format(name=c["name"]),
                   "output": ANSWERS[attr].format(**c)}
            (val if rng.random() < VAL_FRACTION else train).append(row)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def alpaca_prompt(row):
    if row["input"]:
        return ALPACA_WITH_INPUT.format(**row)
    return ALPACA_NO_INPUT.format(instruction=row["instruction"])


# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on this script's own text.

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # every byte is in the vocabulary, so any text encodes and decodes back exactly
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # encode(text) with special tokens = [<s>] + tokens; no EOS (lorafit appends it to responses)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    return tok


# ----------------------------------------------------------------------------------------------
# Model and pre-training.

def model_config(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=0.02)


def pretrain(model, token_stream, steps, batch, seq_len, lr, warmup, log):
    """Plain next-token training on fixed windows of one long token stream (full fine-tuning)."""
    import torch

    data = torch.tensor(token_stream, dtype=torch.long)
    n_windows = (len(data) - 1) // seq_len
    windows = data[: n_windows * seq_len].view(n_windows, seq_len)
    gen = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def lr_at(step):  # linear warm-up, then cosine down to a tenth
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    order = torch.randperm(n_windows, generator=gen)
    pos, losses, start = 0, [], time.time()
    for step in range(steps):
        if pos + batch > n_windows:
            order, pos = torch.randperm(n_windows, generator=gen), 0
        x = windows[order[pos: pos + batch]]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0 or step + 1 == steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  pretrain step {step + 1:4d}/{steps}  loss {loss.item():.4f}  "
                f"(mean of last {min(50, len(losses))}: {recent:.4f})  {time.time() - start:5.1f} s")
    model.eval()
    return losses, time.time() - start


def fact_accuracy(model, tok, world):
    """Share of facts the model completes correctly from a plain statement prefix (greedy)."""
    import torch

    probes = []
    for c in world:
        probes += [(f"The {c['name']} lives in", f" {c['home']}"),
                   (f"The {c['name']} eats", f" {c['food']}"),
                   (f"The {c['name']} has", f" {c['colour']} fur"),
                   (f"The best friend of the {c['name']} is the", f" {c['friend']}")]
    right = 0
    with torch.no_grad():
        for prefix, want in probes:
            ids = tok.encode(prefix).ids
            target = tok.encode(want, add_special_tokens=False).ids
            out = model.generate(torch.tensor([ids]), max_new_tokens=len(target), do_sample=False,
                                 pad_token_id=PAD_ID)
            right += out[0, len(ids):].tolist() == target
    return right, len(probes)


# ----------------------------------------------------------------------------------------------
# Output.

def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def save_model(model, tok, out_dir):
    from safetensors.torch import save_file

    os.makedirs(out_dir)
    # Weights: fp32, contiguous, with the metadata transformers writes itself.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # save_file creates it private

    # config.json: what transformers writes (only the values that differ from its defaults),
    # plus the legacy top-level rope_theta and torch_dtype keys, so that readers of either layout
    # (older transformers, llama.cpp's converter, ...) see the same model.
    cfg = model.config.to_diff_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    for key in ("transformers_version", "_name_or_path"):  # independent of the generating version
        cfg.pop(key, None)
    write_json(os.path.join(out_dir, "config.json"), dict(sorted(cfg.items())))
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})

    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
    })


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(repo, "data"), help="data directory (default: data/)")
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--docs", type=int, default=6000, help="pre-training documents to generate")
    ap.add_argument("--steps", type=int, default=400, help="pre-training optimizer steps")
    ap.add_argument("--batch", type=int, default=32, help="pre-training sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    def log(msg):
        print(msg, flush=True)

    # Fixed threads as well as seeds: CPU reductions may round differently with another count.
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    world = build_world(rng)
    docs = pretraining_documents(world, rng, args.docs)
    train, val = alpaca_rows(world, rng)
    log(f"world: {len(world)} creatures; {len(docs)} pre-training documents; "
        f"{len(train)} train / {len(val)} val Alpaca rows")

    # The tokenizer sees the pre-training text and the training prompts (so the Alpaca template
    # and the question words become a few tokens each), never the validation rows.
    tok = train_tokenizer(docs + [alpaca_prompt(r) + r["output"] for r in train], args.vocab_size)
    for text in [docs[0], alpaca_prompt(val[0]) + val[0]["output"], "Ünïcödé ✓ and\ttabs\n"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text, "round trip failed"
    lens = [len(tok.encode(alpaca_prompt(r)).ids) + len(tok.encode(r["output"], add_special_tokens=False).ids) + 1
            for r in train + val]
    log(f"tokenizer: vocab {tok.get_vocab_size()}; Alpaca prompt without input = "
        f"{len(tok.encode(ALPACA_NO_INPUT.format(instruction='')).ids)} tokens; "
        f"train/val example lengths {min(lens)}..{max(lens)} tokens")

    stream = []
    for d in docs:
        stream += [BOS_ID] + tok.encode(d, add_special_tokens=False).ids + [EOS_ID]
    model = LlamaForCausalLM(model_config(tok.get_vocab_size()))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; pre-training on {len(stream):,} tokens, "
        f"{args.steps} steps x {args.batch} x {args.seq_len} tokens")
    losses, secs = pretrain(model, stream, args.steps, args.batch, args.seq_len, args.lr,
                            warmup=min(40, args.steps // 10), log=log)
    right, total = fact_accuracy(model, tok, world)
    log(f"pre-training: {secs:.0f} s; loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f} "
        f"(mean of last 20 steps); facts completed correctly: {right}/{total}")

    # Write everything next to the destination first, then swap it in.
    tmp = os.path.join(args.out, ".make-default.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "default"))
    save_model(model, tok, os.path.join(tmp, "default-model"))
    write_jsonl(os.path.join(tmp, "default", "train.jsonl"), train)
    write_jsonl(os.path.join(tmp, "default", "val.jsonl"), val)
    for name in ("default-model", "default"):
        dest = os.path.join(args.out, name)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(os.path.join(tmp, name), dest)
    os.rmdir(tmp)
    size = os.path.getsize(os.path.join(args.out, "default-model", "model.safetensors"))
    log(f"wrote {args.out}/default-model (model.safetensors {size / 1e6:.2f} MB) and "
        f"{args.out}/default (train.jsonl {len(train)} rows, val.jsonl {len(val)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
