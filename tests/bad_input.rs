//! A catalogue of malformed inputs, one row per case, through the command line: the config
//! (YAML, types, ranges, unknown keys, `--set`), the model directory, the tokenizer, the data
//! files of every format, adapters and the flags of every subcommand. Each must exit with code
//! 1 (an error, never a panic's 101), print one paragraph naming the culprit, and write nothing:
//! no run directory, no data cache entry (`<output.dir>/.data-cache`), no output file.

mod common;

use lorafit::files::{read_safetensors, safetensors_bytes};
use lorafit::lora::peft;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// One malformed input: its name; YAML appended to the base config; files written into the
/// project (replacing the base ones); a further setup step; the command line; and the words
/// the error must hold (the file, key, row or flag at fault).
///
/// In the config, files and arguments `{model}` stands for the shipped default model and
/// `{fixture}` for the llama3 test model (whose PEFT adapter the adapter cases start from).
/// The commands run in the project directory, where `model/` or `adapter/` are the copies
/// [`copy_model`] and [`copy_adapter`] make.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static [u8])],
    fn(&Path),
    &'static [&'static str],
    &'static [&'static str],
);

const TRAIN: &[&str] = &["train", "run.yaml"];

/// The config every case starts from: it trains on the default model, and would succeed.
const BASE_CONFIG: &str = "model:\n  path: {model}\ndata:\n  train: data.jsonl\n  format: completion\n  \
                           max_seq_len: 64\ntrain:\n  max_steps: 2\n";

fn none(_: &Path) {}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // The config file: YAML syntax.
    ("yaml tab indent", "", &[("run.yaml", b"model:\n\tpath: x\n")], none, TRAIN, &["run.yaml"]),
    ("yaml unclosed list", "lora:\n  target_modules: [q_proj, v_proj\n", &[], none, TRAIN, &["run.yaml"]),
    ("yaml duplicate section", "data:\n  format: alpaca\n", &[], none, TRAIN, &["run.yaml", "data"]),
    ("yaml a list", "", &[("run.yaml", b"- model\n- data\n")], none, TRAIN, &["run.yaml"]),
    ("yaml empty", "", &[("run.yaml", b"")], none, TRAIN, &["run.yaml"]),
    ("yaml not utf-8", "", &[("run.yaml", b"model:\n  path: caf\xe9\n")], none, TRAIN, &["run.yaml"]),
    ("config missing", "", &[], none, &["train", "nosuch.yaml"], &["nosuch.yaml"]),
    ("config a directory", "", &[("sub/x", b"")], none, &["train", "sub"], &["sub"]),
    // Keys, types and ranges.
    ("unknown key", "lora:\n  rank: 8\n", &[], none, TRAIN, &["run.yaml", "lora.rank"]),
    ("unknown section", "optimizer:\n  lr: 0.1\n", &[], none, TRAIN, &["run.yaml", "optimizer"]),
    ("r not a number", "lora:\n  r: eight\n", &[], none, TRAIN, &["run.yaml", "lora.r"]),
    ("r zero", "lora:\n  r: 0\n", &[], none, TRAIN, &["lora.r"]),
    ("r negative", "lora:\n  r: -4\n", &[], none, TRAIN, &["lora.r"]),
    ("alpha nan", "lora:\n  alpha: .nan\n", &[], none, TRAIN, &["lora.alpha"]),
    ("dropout above 1", "lora:\n  dropout: 1.5\n", &[], none, TRAIN, &["lora.dropout"]),
    ("target matching nothing", "lora:\n  target_modules: [nonexistent_proj]\n", &[], none, TRAIN, &["nonexistent_proj"]),
    ("target regex invalid", "lora:\n  target_modules: \"q_proj(\"\n", &[], none, TRAIN, &["target_modules"]),
    ("sample prompts not a list", "output:\n  sample_prompts: 3\n", &[], none, TRAIN, &["output.sample_prompts"]),
    // --set overrides.
    ("set lr negative", "", &[], none, &["train", "run.yaml", "--set", "train.lr=-1"], &["train.lr"]),
    ("set lr a word", "", &[], none, &["train", "run.yaml", "--set", "train.lr=fast"], &["train.lr"]),
    ("set micro batch 0", "", &[], none, &["train", "run.yaml", "--set", "train.micro_batch_size=0"], &["train.micro_batch_size"]),
    ("set grad accum 0", "", &[], none, &["train", "run.yaml", "--set", "train.grad_accum_steps=0"], &["train.grad_accum_steps"]),
    ("set max_seq_len 0", "", &[], none, &["train", "run.yaml", "--set", "data.max_seq_len=0"], &["data.max_seq_len"]),
    ("set val_split 1.5", "", &[], none, &["train", "run.yaml", "--set", "data.val_split=1.5"], &["data.val_split"]),
    ("set format unknown", "", &[], none, &["train", "run.yaml", "--set", "data.format=sharegpt"], &["data.format"]),
    ("set scheduler unknown", "", &[], none, &["train", "run.yaml", "--set", "train.lr_scheduler=triangle"], &["train.lr_scheduler"]),
    ("set precision unknown", "", &[], none, &["train", "run.yaml", "--set", "train.precision=fp8"], &["train.precision"]),
    ("set device unknown", "", &[], none, &["train", "run.yaml", "--set", "train.device=tpu"], &["train.device"]),
    ("set without =", "", &[], none, &["train", "run.yaml", "--set", "lora.r"], &["--set lora.r"]),
    ("set unknown key", "", &[], none, &["train", "run.yaml", "--set", "lora.rnak=8"], &["lora.rnak"]),
    ("set unclosed list", "", &[], none, &["train", "run.yaml", "--set", "lora.target_modules=[q_proj"], &["lora.target_modules"]),
    ("chat template unknown", "", &[], none, &["train", "run.yaml", "--set", "data.format=chat", "--set", "data.chat_template=nosuch"], &["nosuch"]),
    ("column rename of nothing", "", &[], none, &["train", "run.yaml", "--set", "data.columns={text: body}"], &["body"]),
    // The model directory.
    ("model missing", "", &[], none, &["train", "run.yaml", "--set", "model.path=nosuch"], &["nosuch"]),
    ("config.json garbage", "", &[("model/config.json", b"{not json")], copy_model, MODEL_TRAIN, &["model/config.json"]),
    ("config.json empty object", "", &[("model/config.json", b"{}")], copy_model, MODEL_TRAIN, &["model/config.json"]),
    ("config.json a list", "", &[("model/config.json", b"[1, 2]")], copy_model, MODEL_TRAIN, &["model/config.json"]),
    ("config.json hidden_size a string", "", &[], hidden_size_string, MODEL_TRAIN, &["model/config.json", "hidden_size"]),
    ("config.json unknown architecture", "", &[], bert_model, MODEL_TRAIN, &["model/config.json", "bert"]),
    ("safetensors truncated", "", &[], truncated_weights, MODEL_TRAIN, &["model.safetensors"]),
    ("safetensors garbage", "", &[("model/model.safetensors", b"garbage, not tensors")], copy_model, MODEL_TRAIN, &["model.safetensors"]),
    ("safetensors header length past the end", "", &[("model/model.safetensors", b"\xff\xff\0\0\0\0\0\0{}")], copy_model, MODEL_TRAIN, &["model.safetensors"]),
    ("safetensors missing", "", &[], no_weights, MODEL_TRAIN, &["model"]),
    ("tensor missing", "", &[], missing_tensor, MODEL_TRAIN, &["model.layers.1.mlp.up_proj.weight"]),
    ("tensor of the wrong shape", "", &[], misshapen_tensor, MODEL_TRAIN, &["model.layers.1.mlp.up_proj.weight"]),
    // The tokenizer.
    ("tokenizer.json missing", "", &[], no_tokenizer, MODEL_TRAIN, &["tokenizer.json"]),
    ("tokenizer.json garbage", "", &[("model/tokenizer.json", b"{\"model\": ")], copy_model, MODEL_TRAIN, &["tokenizer.json"]),
    ("tokenizer.json wrong layout", "", &[("model/tokenizer.json", b"{\"model\": 5}")], copy_model, MODEL_TRAIN, &["tokenizer.json"]),
    ("tokenizer_config.json garbage, chat", "", &[("model/tokenizer_config.json", b"{,}"), ("data.jsonl", CHAT_ROW)], copy_model, &["train", "run.yaml", "--set", "model.path=model", "--set", "data.format=chat"], &["tokenizer_config.json"]),
    // Data, every format.
    ("data missing", "", &[], none, &["train", "run.yaml", "--set", "data.train=nosuch.jsonl"], &["nosuch.jsonl"]),
    ("data pattern matching nothing", "", &[], none, &["train", "run.yaml", "--set", "data.train=shards/*.parquet"], &["shards/*.parquet"]),
    ("validation missing", "", &[], none, &["train", "run.yaml", "--set", "data.validation=nosuch.jsonl"], &["nosuch.jsonl"]),
    ("data empty", "", &[("data.jsonl", b"")], none, TRAIN, &["data.jsonl", "empty"]),
    ("jsonl broken line", "", &[("data.jsonl", b"{\"text\": \"fine\"}\n{\"text\": broken\n")], none, TRAIN, &["data.jsonl:2"]),
    ("jsonl truncated", "", &[("data.jsonl", b"{\"text\": \"fine\"}\n{\"text\": \"cut in the mi")], none, TRAIN, &["data.jsonl:2"]),
    ("jsonl wrong column", "", &[("data.jsonl", b"{\"prompt\": \"wrong column\"}\n")], none, TRAIN, &["data.jsonl:1", "prompt"]),
    ("jsonl text a number", "", &[("data.jsonl", b"{\"text\": \"fine\"}\n{\"text\": 5}\n")], none, TRAIN, &["data.jsonl:2", "text"]),
    ("jsonl not objects", "", &[("data.jsonl", b"{\"text\": \"fine\"}\n42\n")], none, TRAIN, &["data.jsonl:2"]),
    ("jsonl not utf-8", "", &[("data.jsonl", b"{\"text\": \"caf\xe9\"}\n")], none, TRAIN, &["data.jsonl:1", "UTF-8"]),
    ("jsonl binary garbage", "", &[("data.jsonl", b"\x00\x01\x02\xff\xfe garbage\n")], none, TRAIN, &["data.jsonl:1"]),
    ("json array truncated", "", &[("data.json", b"[{\"text\": \"a\"}, {\"te")], none, DATA_JSON, &["data.json"]),
    ("json array of numbers", "", &[("data.json", b"[1, 2]")], none, DATA_JSON, &["data.json"]),
    ("json object of rows, wrong column", "", &[("data.json", b"{\"data\": [{\"body\": \"x\"}]}")], none, DATA_JSON, &["data.json:1", "body"]),
    ("parquet garbage", "", &[("data.parquet", b"PAR1 not really parquet PAR1")], none, &["train", "run.yaml", "--set", "data.train=data.parquet"], &["data.parquet"]),
    ("parquet truncated", "", &[("data.parquet", b"PAR1\x15\x04\x15")], none, &["train", "run.yaml", "--set", "data.train=data.parquet"], &["data.parquet"]),
    ("arrow stream garbage", "", &[("data.arrow", b"\xff\xff\xff\xff\x10\0\0\0garbage")], none, &["train", "run.yaml", "--set", "data.train=data.arrow"], &["data.arrow"]),
    ("arrow file garbage", "", &[("data.arrow", b"ARROW1\0\0garbage")], none, &["train", "run.yaml", "--set", "data.train=data.arrow"], &["data.arrow"]),
    ("dataset folder without state", "", &[("ds/data-00000.arrow", b"")], none, &["train", "run.yaml", "--set", "data.train=ds"], &["ds"]),
    ("txt not utf-8", "", &[("data.txt", b"Once upon a time.\n\nna\xefve\n")], none, &["train", "run.yaml", "--set", "data.train=data.txt"], &["data.txt:3", "UTF-8"]),
    ("alpaca without output", "", &[("data.jsonl", b"{\"instruction\": \"Say hi.\"}\n")], none, &["train", "run.yaml", "--set", "data.format=alpaca"], &["data.jsonl:1", "output"]),
    ("segments label a string", "", &[("data.jsonl", b"{\"segments\": [{\"text\": \"a\", \"label\": \"yes\"}]}\n")], none, &["train", "run.yaml", "--set", "data.format=input_output"], &["data.jsonl:1", "label"]),
    ("chat unknown role", "", &[("data.jsonl", b"{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n")], none, CHAT_TRAIN, &["data.jsonl:1", "wizard"]),
    ("chat empty", "", &[("data.jsonl", b"{\"messages\": []}\n")], none, CHAT_TRAIN, &["data.jsonl:1", "messages"]),
    ("chat messages a string", "", &[("data.jsonl", b"{\"messages\": \"hi\"}\n")], none, CHAT_TRAIN, &["data.jsonl:1", "messages"]),
    ("chat tool call arguments broken", "", &[("data.jsonl", b"{\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}, {\"from\": \"function_call\", \"value\": \"{broken\"}]}\n")], none, CHAT_TRAIN, &["data.jsonl:1"]),
    ("preference pairs", "", &[("data.jsonl", b"{\"chosen\": \"a\", \"rejected\": \"b\"}\n")], none, TRAIN, &["data.jsonl", "chosen"]),
    ("precompute_ref without pairs", "", &[], none, &["train", "run.yaml", "--set", "train.precompute_ref=true"], &["train.precompute_ref", "sft"]),
    // Adapters: --init-from, eval, merge and export.
    ("init_from missing", "lora:\n  init_from: nosuch\n", &[], none, FIXTURE_TRAIN, &["nosuch"]),
    ("init_from config garbage", "lora:\n  init_from: adapter\n", &[("adapter/adapter_config.json", b"{\"r\": 8,")], copy_adapter, FIXTURE_TRAIN, &["adapter/adapter_config.json"]),
    ("adapter config a list", "", &[("adapter/adapter_config.json", b"[]")], copy_adapter, EXPORT, &["adapter/adapter_config.json"]),
    ("adapter r a string", "", &[], adapter_r_string, EXPORT, &["adapter/adapter_config.json", "`r`"]),
    ("adapter r against the weights", "", &[], adapter_r_8, EVAL_ADAPTER, &["adapter"]),
    ("adapter r zero", "", &[], adapter_r_0, EVAL_ADAPTER, &["adapter/adapter_config.json", "`r`"]),
    ("adapter r beyond an i64", "", &[], adapter_r_huge, EVAL_ADAPTER, &["rank 9223372036854775813"]),
    ("adapter r beyond memory", "", &[], adapter_r_2_40, EVAL_ADAPTER, &["rank 1099511627776"]),
    ("adapter without config", "", &[], adapter_without_config, MERGE, &["adapter/adapter_config.json"]),
    ("adapter without weights", "", &[], adapter_without_weights, MERGE, &["adapter/adapter_model.safetensors"]),
    ("adapter weights garbage", "", &[("adapter/adapter_model.safetensors", b"\x08\0\0\0\0\0\0\0{\"a\": 1}")], copy_adapter, EXPORT, &["adapter/adapter_model.safetensors"]),
    ("adapter weights transposed", "", &[], adapter_transposed, EVAL_ADAPTER, &["layers.0.self_attn.q_proj.lora_A"]),
    ("adapter weights NaN", "", &[], adapter_nan, EXPORT, &["layers.0.self_attn.q_proj.lora_A", "NaN"]),
    // Flags of every subcommand.
    ("merge dtype unknown", "", &[], copy_adapter, &["merge", "--model", "{fixture}", "--adapter", "adapter", "--out", "merged", "--dtype", "int8"], &["--dtype int8"]),
    ("merge into a full directory", "", &[("merged/keep.txt", b"mine")], copy_adapter, MERGE, &["merged"]),
    ("export dtype unknown", "", &[], copy_adapter, &["export", "--adapter", "adapter", "--model", "{fixture}", "--out", "out.gguf", "--dtype", "f64"], &["--dtype f64"]),
    ("export format unknown", "", &[], copy_adapter, &["export", "--adapter", "adapter", "--model", "{fixture}", "--out", "out.gguf", "--format", "onnx"], &["onnx"]),
    ("export model missing", "", &[], copy_adapter, &["export", "--adapter", "adapter", "--model", "nosuch", "--out", "out.gguf"], &["nosuch"]),
    ("quantize model missing", "", &[], none, &["quantize", "--model", "nosuch", "--out", "quantized"], &["--model", "nosuch"]),
    ("quantize model not a model", "", &[("notamodel/readme.txt", b"hi")], none, &["quantize", "--model", "notamodel", "--out", "quantized"], &["--model", "notamodel", "config.json"]),
    ("quantize format unknown", "", &[], none, &["quantize", "--model", "{model}", "--out", "quantized", "--format", "int8"], &["--format int8", "nf4"]),
    ("quantize into a full directory", "", &[("quantized/keep.txt", b"mine")], none, &["quantize", "--model", "{model}", "--out", "quantized"], &["--out", "quantized"]),
    ("quantize into a file", "", &[("quantized", b"mine")], none, &["quantize", "--model", "{model}", "--out", "quantized"], &["--out", "quantized"]),
    ("inspect model missing", "", &[], none, &["inspect", "nosuch"], &["nosuch"]),
    ("inspect targets unclosed", "", &[], none, &["inspect", "{model}", "--targets", "[q_proj"], &["--targets"]),
    ("inspect targets matching nothing", "", &[], none, &["inspect", "{model}", "--targets", "[nonexistent_proj]"], &["nonexistent_proj"]),
    ("generate model missing", "", &[], none, &["generate", "--model", "nosuch", "--prompt", "hi"], &["nosuch"]),
    ("generate run missing", "", &[], none, &["generate", "--run", "nosuch", "--prompt", "hi"], &["nosuch"]),
    ("generate adapter missing", "", &[], none, &["generate", "--model", "{model}", "--adapter", "nosuch", "--prompt", "hi"], &["nosuch"]),
    ("generate template unknown", "", &[], none, &["generate", "--model", "{model}", "--chat", "--template", "nosuch", "--prompt", "hi"], &["nosuch"]),
    ("generate config broken", "lora:\n  r: eight\n", &[], none, &["generate", "--config", "run.yaml", "--prompt", "hi"], &["run.yaml", "lora.r"]),
    ("eval adapter missing", "", &[], none, &["eval", "--model", "{model}", "--data", "data.jsonl", "--adapter", "nosuch", "--set", "data.format=completion"], &["nosuch"]),
    ("eval data missing", "", &[], none, &["eval", "--model", "{model}", "--data", "nosuch.jsonl", "--adapter", "none"], &["nosuch.jsonl"]),
    ("eval set unknown key", "", &[], none, &["eval", "run.yaml", "--adapter", "none", "--set", "data.nope=1"], &["data.nope"]),
    ("preview set bad value", "", &[], none, &["data", "preview", "run.yaml", "--set", "data.format=nope"], &["data.format"]),
    ("preview bad rows", "", &[("data.jsonl", b"{\"text\": 5}\n")], none, &["data", "preview", "run.yaml"], &["data.jsonl:1"]),
    ("data export into a missing folder", "", &[], none, &["data", "export", "run.yaml", "--out", "no/such/dir/out.jsonl"], &["no/such/dir/out.jsonl"]),
    ("data export validation without any", "", &[], none, &["data", "export", "run.yaml", "--out", "out.jsonl", "--split", "validation"], &["validation"]),
];

const MODEL_TRAIN: &[&str] = &["train", "run.yaml", "--set", "model.path=model"];
const FIXTURE_TRAIN: &[&str] = &["train", "run.yaml", "--set", "model.path={fixture}"];
const DATA_JSON: &[&str] = &["train", "run.yaml", "--set", "data.train=data.json"];
const CHAT_TRAIN: &[&str] =
    &["train", "run.yaml", "--set", "data.format=chat", "--set", "data.chat_template=chatml"];
const EXPORT: &[&str] = &["export", "--adapter", "adapter", "--model", "{fixture}", "--out", "out.gguf"];
const MERGE: &[&str] = &["merge", "--model", "{fixture}", "--adapter", "adapter", "--out", "merged"];
const EVAL_ADAPTER: &[&str] = &[
    "eval",
    "--model",
    "{fixture}",
    "--data",
    "data.jsonl",
    "--adapter",
    "adapter",
    "--set",
    "data.format=completion",
];
const CHAT_ROW: &[u8] =
    b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n";

#[test]
fn every_bad_input_exits_1_naming_the_culprit_and_writes_nothing() {
    assert!(CASES.len() >= 60, "the catalogue holds {} cases", CASES.len());
    let failures: Vec<String> = CASES.iter().filter_map(run_case).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}

/// Runs one case in a fresh project; what went wrong, if anything.
fn run_case(case: &Case) -> Option<String> {
    let (name, yaml, files, setup, args, words) = *case;
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    common::write(&dir.join("run.yaml"), &expand(&format!("{BASE_CONFIG}{yaml}")));
    common::write(&dir.join("data.jsonl"), common::STORY_ROWS);
    setup(dir);
    for (path, body) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let before = listing(dir);
    let args: Vec<String> = args.iter().map(|a| expand(a)).collect();
    let out = common::lorafit(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut wrong = Vec::new();
    if out.status.code() != Some(1) {
        wrong.push(format!("exit status {:?}, not 1", out.status.code()));
    }
    // One paragraph: a long cause (a regex's parse error) may span lines, but no blank line.
    if !stderr.starts_with("error: ") || stderr.trim_end().contains("\n\n") {
        wrong.push("not one paragraph starting `error: `".to_string());
    }
    wrong.extend(words.iter().filter(|w| !stderr.contains(*w)).map(|w| format!("{w:?} not named")));
    let after = listing(dir);
    let written: Vec<_> =
        after.iter().filter(|(p, len)| before.get(*p) != Some(len)).map(|(p, _)| p).collect();
    if !written.is_empty() {
        wrong.push(format!("wrote {written:?}"));
    }
    (!wrong.is_empty())
        .then(|| format!("{name} ({}): {}\n  stderr: {stderr}", args.join(" "), wrong.join("; ")))
}

fn expand(text: &str) -> String {
    let model = common::repo().join("data/default-model");
    text.replace("{model}", &model.display().to_string())
        .replace("{fixture}", &common::fixture("llama3").display().to_string())
}

/// Every path under `dir` (folders included) and its size.
fn listing(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.insert(
                path.strip_prefix(dir).unwrap().to_path_buf(),
                if meta.is_dir() { 0 } else { meta.len() },
            );
        }
    }
    out
}

/// Copies the default model into `model/`.
fn copy_model(dir: &Path) {
    let source = common::repo().join("data/default-model");
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join("model").join(path.file_name().unwrap())).unwrap();
    }
}

/// Copies the default model and edits its config.json.
fn edit_model_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    copy_model(dir);
    edit_json(&dir.join("model/config.json"), edit);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

fn hidden_size_string(dir: &Path) {
    edit_model_config(dir, |c| c["hidden_size"] = "128".into());
}

fn bert_model(dir: &Path) {
    edit_model_config(dir, |c| {
        c["model_type"] = "bert".into();
        c["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    });
}

fn truncated_weights(dir: &Path) {
    copy_model(dir);
    let path = dir.join("model/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
}

fn no_weights(dir: &Path) {
    copy_model(dir);
    std::fs::remove_file(dir.join("model/model.safetensors")).unwrap();
}

fn no_tokenizer(dir: &Path) {
    copy_model(dir);
    std::fs::remove_file(dir.join("model/tokenizer.json")).unwrap();
}

/// Rewrites a safetensors file with `edit` applied to each (name, tensor); `None` drops it.
fn edit_tensors(path: &Path, edit: impl Fn(&str, Tensor) -> Option<Tensor>) {
    let tensors: Vec<(String, Tensor)> = read_safetensors(path)
        .unwrap()
        .into_iter()
        .filter_map(|(name, t)| edit(&name, t).map(|t| (name, t)))
        .collect();
    std::fs::write(path, safetensors_bytes(&tensors, &[("format", "pt")]).unwrap()).unwrap();
}

const UP_PROJ: &str = "model.layers.1.mlp.up_proj.weight";

fn missing_tensor(dir: &Path) {
    copy_model(dir);
    edit_tensors(&dir.join("model/model.safetensors"), |name, t| (name != UP_PROJ).then_some(t));
}

fn misshapen_tensor(dir: &Path) {
    copy_model(dir);
    edit_tensors(&dir.join("model/model.safetensors"), |name, t| {
        Some(if name == UP_PROJ { t.tr().contiguous() } else { t })
    });
}

/// Copies the llama3 fixture's PEFT adapter into `adapter/`.
fn copy_adapter(dir: &Path) {
    let source = common::fixture("llama3").join("adapter");
    std::fs::create_dir_all(dir.join("adapter")).unwrap();
    for file in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        std::fs::copy(source.join(file), dir.join("adapter").join(file)).unwrap();
    }
}

fn adapter_r_string(dir: &Path) {
    copy_adapter(dir);
    edit_json(&dir.join("adapter").join(peft::CONFIG_FILE), |c| c["r"] = "8".into());
}

/// The fixture's adapter has rank 4.
fn adapter_r_8(dir: &Path) {
    copy_adapter(dir);
    edit_json(&dir.join("adapter").join(peft::CONFIG_FILE), |c| c["r"] = 8.into());
}

fn adapter_r_0(dir: &Path) {
    copy_adapter(dir);
    edit_json(&dir.join("adapter").join(peft::CONFIG_FILE), |c| c["r"] = 0.into());
}

fn adapter_r_huge(dir: &Path) {
    copy_adapter(dir);
    edit_json(&dir.join("adapter").join(peft::CONFIG_FILE), |c| c["r"] = ((1u64 << 63) + 5).into());
}

fn adapter_r_2_40(dir: &Path) {
    copy_adapter(dir);
    edit_json(&dir.join("adapter").join(peft::CONFIG_FILE), |c| c["r"] = (1u64 << 40).into());
}

fn adapter_without_config(dir: &Path) {
    copy_adapter(dir);
    std::fs::remove_file(dir.join("adapter").join(peft::CONFIG_FILE)).unwrap();
}

fn adapter_without_weights(dir: &Path) {
    copy_adapter(dir);
    std::fs::remove_file(dir.join("adapter").join(peft::WEIGHTS_FILE)).unwrap();
}

const Q_LORA_A: &str = "layers.0.self_attn.q_proj.lora_A";

fn adapter_transposed(dir: &Path) {
    copy_adapter(dir);
    edit_tensors(&dir.join("adapter").join(peft::WEIGHTS_FILE), |name, t| {
        Some(if name.contains(Q_LORA_A) { t.tr().contiguous() } else { t })
    });
}

fn adapter_nan(dir: &Path) {
    copy_adapter(dir);
    edit_tensors(&dir.join("adapter").join(peft::WEIGHTS_FILE), |name, t| {
        Some(if name.contains(Q_LORA_A) { t.fill(f64::NAN) } else { t })
    });
}
