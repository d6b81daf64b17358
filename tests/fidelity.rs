//! What lorafit trains on is what the model sees: `lorafit data export` over every shared data
//! set (tool calls with the Qwen3 template), with every shared tokenizer, gives the ids the Hugging Face tokenizer gives for the whole
//! rendered text (scripts/interop/check_data_export.py renders each record independently with
//! transformers), with exactly the responses / assistant turns trained.

mod common;

use lorafit::data::source::{expand_paths, read_split};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A shared data set in its natural layout.
struct DataSet {
    path: &'static str,
    format: &'static str,
    columns: &'static [(&'static str, &'static str)],
}

const DATA_SETS: &[DataSet] = &[
    DataSet { path: "alpaca/alpaca_tiny_torchtune.json", format: "alpaca", columns: &[] },
    DataSet { path: "alpaca/identity_llamafactory.json", format: "alpaca", columns: &[] },
    // Dolly's prompts are already rendered with the Alpaca template.
    DataSet {
        path: "dolly/dolly_prompt_answer_151.jsonl",
        format: "alpaca",
        columns: &[("instruction", "prompt"), ("output", "answer")],
    },
    DataSet { path: "sharegpt/dummy_conversation_fastchat.json", format: "chat", columns: &[] },
    DataSet { path: "sharegpt/chat_tiny_torchtune.json", format: "chat", columns: &[] },
    DataSet { path: "sharegpt/v1_sft_demo_llamafactory.jsonl", format: "chat", columns: &[] },
    DataSet { path: "sharegpt/c4_demo_llamafactory.jsonl", format: "completion", columns: &[] },
    DataSet { path: "tinyshakespeare/input.txt", format: "completion", columns: &[] },
    DataSet { path: "hf-arrow-parquet/alpaca_tiny_save_to_disk", format: "alpaca", columns: &[] },
    DataSet { path: "hf-arrow-parquet/sharegpt_dummy_save_to_disk", format: "chat", columns: &[] },
    DataSet { path: "hf-arrow-parquet/alpaca_tiny_parquet/data/*.parquet", format: "alpaca", columns: &[] },
    DataSet { path: "hf-arrow-parquet/sharegpt_dummy_parquet/data/*.parquet", format: "chat", columns: &[] },
    DataSet { path: "hf-arrow-parquet/alpaca_tiny.ipc_file.arrow", format: "alpaca", columns: &[] },
];

/// Tool-calling chats, which need a template that renders tools (the Qwen3 tokenizer's).
const TOOL_DATA_SETS: &[DataSet] = &[
    DataSet { path: "sharegpt/glaive_toolcall_zh_demo_llamafactory.json", format: "chat", columns: &[] },
    DataSet { path: "sharegpt/reason_tool_use_demo_50_llamafactory.jsonl", format: "chat", columns: &[] },
];

/// The shared tokenizers: (name, tokenizer.json, tokenizer_config.json).
const TOKENIZERS: &[(&str, &str, &str)] = &[
    ("llama2", "llama2/llama_tokenizer.json", "llama2/llama_tokenizer_config.json"),
    ("gpt2", "gpt2/gpt2_tokenizer.json", "gpt2/gpt2_tokenizer_config.json"),
    ("smollm", "smollm/tokenizer.json", "smollm/tokenizer_config.json"),
    ("qwen3", "qwen3/tokenizer.json", "qwen3/tokenizer_config.json"),
];

/// ChatML as its authors publish it, for tokenizers that come without a chat template.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}\
                      {{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A model directory holding only what data preparation reads: the tokenizer files and a
/// config.json whose vocabulary covers the tokenizer, whose EOS is the tokenizer's and whose
/// positions cover the longest example.
fn model_dir_for(root: &Path, name: &str, tokenizer: &Path, tokenizer_config: &Path) -> PathBuf {
    let dir = root.join(format!("model-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).unwrap();
    std::fs::copy(tokenizer_config, dir.join("tokenizer_config.json")).unwrap();
    let tok_json: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer).unwrap()).unwrap();
    let tok_config: Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizer_config).unwrap()).unwrap();
    let token_text = |v: &Value| v.as_str().or_else(|| v.get("content")?.as_str()).map(str::to_string);
    let eos = token_text(&tok_config["eos_token"]).expect("the tokenizer names its EOS");
    let id_of = |text: &str| {
        tok_json["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["content"] == text)
            .and_then(|t| t["id"].as_i64())
            .or_else(|| tok_json["model"]["vocab"].get(text).and_then(Value::as_i64))
    };
    let largest = tok_json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_i64())
        .chain(tok_json["model"]["vocab"].as_object().unwrap().values().filter_map(Value::as_i64))
        .max()
        .unwrap();
    let config = json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 1,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8, "vocab_size": largest + 1,
        "max_position_embeddings": 1_000_000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": id_of(&eos).expect("EOS is a token"),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// The records lorafit reads from `path`, one JSON object per line, for the Python side.
fn write_records(path: &Path, out: &Path) -> usize {
    let mut text = String::new();
    let mut n = 0;
    for file in expand_paths(path).unwrap() {
        for record in read_split(&file, "train").unwrap() {
            text.push_str(&Value::Object(record.fields).to_string());
            text.push('\n');
            n += 1;
        }
    }
    std::fs::write(out, text).unwrap();
    n
}

/// Exports every shared data set prepared with the shared tokenizer `tok_name` and has
/// scripts/interop/check_data_export.py compare each example with transformers.
fn export_matches_transformers(tok_name: &str) {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else { return };
    let (_, tokenizer, tokenizer_config) = TOKENIZERS.iter().find(|t| t.0 == tok_name).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let chatml = tmp.path().join("chatml.jinja");
    std::fs::write(&chatml, CHATML).unwrap();
    let tokenizers = assets.join("tokenizers");
    let model =
        model_dir_for(tmp.path(), tok_name, &tokenizers.join(tokenizer), &tokenizers.join(tokenizer_config));
    let own_template = tok_name == "qwen3";
    let sets: Vec<&DataSet> =
        DATA_SETS.iter().chain(if own_template { TOOL_DATA_SETS } else { &[] }).collect();
    let mut jobs = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let name = format!("{tok_name} × {}", set.path);
        let records = tmp.path().join(format!("records-{i}.jsonl"));
        let rows = write_records(&assets.join("datasets").join(set.path), &records);
        let export = tmp.path().join(format!("export-{i}.jsonl"));
        let columns: serde_json::Map<String, Value> =
            set.columns.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let dolly = set.path.starts_with("dolly");
        let config = json!({
            "model": {"path": model},
            "data": {
                "train": assets.join("datasets").join(set.path),
                "format": set.format,
                "columns": columns,
                "chat_template": if own_template { json!("auto") } else { json!(chatml) },
                "prompt_template_no_input": if dolly { json!("{instruction}") } else { Value::Null },
                "max_seq_len": 1_000_000,
            },
            "output": {"dir": tmp.path().join("checkpoints")},
        });
        let config_path = tmp.path().join("config.yaml");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let out = common::lorafit(
            tmp.path(),
            &["data", "export", config_path.to_str().unwrap(), "--out", export.to_str().unwrap()],
        );
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let exported = std::fs::read_to_string(&export).unwrap().lines().count();
        assert_eq!(exported, rows, "{name}: every row becomes one example");
        jobs.push(json!({
            "name": name,
            "tokenizer_dir": model,
            "records": records,
            "export": export,
            "format": set.format,
            "columns": columns,
            "prompt_template_no_input": if dolly { json!("{instruction}") } else { Value::Null },
            "chat_template_file": if own_template { Value::Null } else { json!(chatml) },
            "end_of_turn": "<|im_end|>",
        }));
    }
    let jobs_path = tmp.path().join("jobs.json");
    std::fs::write(&jobs_path, Value::Array(jobs).to_string()).unwrap();
    let out = std::process::Command::new(python)
        .arg(common::repo().join("scripts/interop/check_data_export.py"))
        .arg(&jobs_path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), sets.len(), "{report}");
}

#[test]
fn data_export_equals_transformers_with_the_llama2_sentencepiece_tokenizer() {
    export_matches_transformers("llama2");
}

#[test]
fn data_export_equals_transformers_with_the_gpt2_tokenizer() {
    export_matches_transformers("gpt2");
}

#[test]
fn data_export_equals_transformers_with_the_smollm_tokenizer() {
    export_matches_transformers("smollm");
}

#[test]
fn data_export_equals_transformers_with_the_qwen3_tokenizer_and_template_tool_calls_included() {
    export_matches_transformers("qwen3");
}

/// A project directory with the default model and `rows` as its training data (format and
/// other data keys in `data_yaml`).
fn project(rows: &str, data_yaml: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("train.jsonl"), rows).unwrap();
    let model = common::repo().join("data/default-model");
    let config = format!(
        "model: {{path: {}}}\ndata: {{train: train.jsonl, {data_yaml}}}\ntrain: {{max_steps: 2, micro_batch_size: 2}}\n",
        serde_json::to_string(&model).unwrap()
    );
    std::fs::write(tmp.path().join("run.yaml"), config).unwrap();
    tmp
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sentencepiece_responses_are_tokenized_inside_the_whole_text() {
    let Some(assets) = common::assets() else { return };
    let tokenizers = assets.join("tokenizers");
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir_for(
        tmp.path(),
        "llama2",
        &tokenizers.join("llama2/llama_tokenizer.json"),
        &tokenizers.join("llama2/llama_tokenizer_config.json"),
    );
    let spec = lorafit::model::ModelSpec::from_dir(&model).unwrap();
    let tok = lorafit::data::TextTokenizer::from_model_dir(&model, &spec.eos_token_ids).unwrap();
    let mut cfg = lorafit::config::Config::new(&model, tmp.path().join("unused"));
    cfg.data.prompt_template_no_input = Some("Q: {instruction}\n".into());
    let record = lorafit::data::source::Record {
        file: "rows.jsonl".into(),
        row: 1,
        fields: serde_json::from_str(r#"{"instruction": "Greet me", "output": "Hello there"}"#).unwrap(),
    };
    let rows = lorafit::data::source::Rows { records: vec![record], bad: vec![] };
    let prepared = lorafit::data::format::prepare_records(&rows, &cfg.data, &tok, None).unwrap();
    let example = &prepared.examples[0];
    let mut whole = tok.encode("Q: Greet me\nHello there", true).unwrap();
    whole.push(tok.eos_id);
    assert_eq!(example.input_ids, whole, "the ids of the whole text, then EOS");
    // `<0x0A>` then `Hello` (no `▁Hello` and no lone `▁`), and exactly the response trained.
    let trained: Vec<i64> =
        example.labels.iter().copied().filter(|&l| l != lorafit::data::format::IGNORE).collect();
    assert_eq!(trained.last(), Some(&tok.eos_id));
    assert_eq!(tok.decode(&trained[..trained.len() - 1]).unwrap(), "Hello there");
    assert_eq!(trained.len(), tok.encode("Hello there", false).unwrap().len() + 1);
}

#[test]
fn preference_and_kto_rows_are_refused_for_supervised_training() {
    let Some(assets) = common::assets() else { return };
    let sharegpt = assets.join("datasets/sharegpt");
    let model = common::repo().join("data/default-model");
    for (file, words) in [
        ("dpo_zh_demo_llamafactory.json", ["`chosen`", "`rejected`"]),
        ("v1_dpo_demo_llamafactory.jsonl", ["`chosen_messages`", "`rejected_messages`"]),
    ] {
        let mut cfg = lorafit::config::Config::new(&model, sharegpt.join(file));
        cfg.data.format = lorafit::config::DataFormat::Chat;
        let spec = lorafit::model::ModelSpec::from_dir(&model).unwrap();
        let tok = lorafit::data::TextTokenizer::from_model_dir(&model, &spec.eos_token_ids).unwrap();
        let chat = lorafit::data::format::ChatFormat::resolve("chatml", &model).expect("chatml is built in");
        let Err(err) =
            lorafit::data::format::prepare(cfg.data.train.paths()[0], &cfg.data, &tok, Some(&chat))
        else {
            panic!("{file}: preference pairs were prepared for supervised training");
        };
        let err = format!("{err:#}");
        assert!(words.iter().all(|w| err.contains(w)) && err.contains("preference"), "{file}: {err}");
    }
    // KTO rows: a conversation and a true/false label, made from the pairs as TRL lays them out.
    let kto = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}], "label": false}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}], "label": true}
"#;
    let p = project(kto, "format: chat, chat_template: chatml");
    let out = common::lorafit(p.path(), &["train", "run.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("`label`") && stderr_of(&out).contains("KTO"), "{}", stderr_of(&out));
    assert!(!p.path().join("checkpoints").exists(), "a refused run writes nothing");
}

#[test]
fn column_renames_must_name_real_columns_and_ignored_columns_are_noted() {
    let rows = "{\"question\": \"Who?\", \"answer\": \"Me.\", \"id\": 7, \"category\": \"qa\"}\n";
    // A rename of a column no row has, with the format named and left to be detected.
    for format in ["format: alpaca, ", ""] {
        let p = project(rows, &format!("{format}columns: {{instruction: prompt, output: answer}}"));
        let out = common::lorafit(p.path(), &["data", "preview", "run.yaml"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("`prompt`") && err.contains("question"), "{format}: {err}");
    }
    // A rename of a field the format does not read.
    let p = project(rows, "format: alpaca, columns: {query: question}");
    let err = stderr_of(&common::lorafit(p.path(), &["data", "preview", "run.yaml"]));
    assert!(err.contains("`query`") && err.contains("instruction, input, output"), "{err}");
    // Correct renames: the columns left over are named once.
    let p = project(rows, "columns: {instruction: question, output: answer}");
    let out = common::lorafit(p.path(), &["data", "preview", "run.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(text.matches("does not read: category, id").count(), 1, "{text}");
}

#[test]
fn templates_are_named_and_never_replaced_silently() {
    let rows = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";
    // The default model has no chat template: `auto` says so instead of using ChatML.
    let p = project(rows, "format: chat");
    let err = stderr_of(&common::lorafit(p.path(), &["data", "preview", "run.yaml"]));
    assert!(err.contains("has no chat template") && err.contains("chatml"), "{err}");
    // A misspelt name lists the known ones instead of being compiled as a template.
    let p = project(rows, "format: chat, chat_template: vicuna");
    let err = stderr_of(&common::lorafit(p.path(), &["data", "preview", "run.yaml"]));
    assert!(err.contains("unknown chat template `vicuna`") && err.contains("auto, chatml, llama3"), "{err}");
    assert!(!err.contains("row"), "the template, not a data row, is at fault: {err}");
    // A .jinja file is read, and the preview says which template it used.
    let p = project(rows, "format: chat, chat_template: my.jinja");
    std::fs::write(
        p.path().join("my.jinja"),
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    .unwrap();
    let out = common::lorafit(p.path(), &["data", "preview", "run.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(text.contains("chat template: the file my.jinja"), "{text}");
    assert!(text.contains("<|user|>hi"), "{text}");
}

#[test]
fn generation_uses_the_runs_prompt_format_and_every_stop_token() {
    let rows = "{\"instruction\": \"Name a colour.\", \"output\": \"Blue.\"}\n{\"instruction\": \"Name a fruit.\", \"output\": \"Pear.\"}\n";
    let p = project(rows, "format: alpaca");
    let out = common::lorafit(p.path(), &["train", "run.yaml", "--set", "output.run_name=r"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = common::lorafit(
        p.path(),
        &[
            "generate",
            "--run",
            "checkpoints/r",
            "--prompt",
            "Name a tree.",
            "--max-new-tokens",
            "3",
            "--show-prompt",
        ],
    );
    let shown = stderr_of(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("### Instruction:\nName a tree.\n\n### Response:\n"), "{shown}");
    // A typo in --template is an error listing the templates, not Jinja text.
    let model = common::repo().join("data/default-model");
    let out = common::lorafit(
        p.path(),
        &["generate", "--model", model.to_str().unwrap(), "--chat", "--template", "chatmll", "--prompt", "x"],
    );
    assert!(stderr_of(&out).contains("unknown chat template `chatmll`"), "{}", stderr_of(&out));

    // Stop tokens: config.json's EOS, generation_config.json's (an instruct model's end of turn)
    // and the template's end-of-turn token.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"eos_token_id": [2, 3]}"#).unwrap();
    let spec = lorafit::model::ModelSpec::from_dir(tmp.path()).unwrap();
    let tok = lorafit::data::TextTokenizer::from_model_dir(tmp.path(), &spec.eos_token_ids).unwrap();
    let stop = lorafit::generate::stop_tokens(tmp.path(), &spec.eos_token_ids, None, &tok).unwrap();
    let mut expected = spec.eos_token_ids.clone();
    expected.extend([2, 3]);
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(stop, expected);
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"eos_token_id": "two"}"#).unwrap();
    let err = lorafit::generate::stop_tokens(tmp.path(), &spec.eos_token_ids, None, &tok).unwrap_err();
    assert!(err.to_string().contains("generation_config.json"), "{err}");
}

#[test]
fn token_ids_beyond_the_embedding_are_refused_before_anything_is_written() {
    // The default model cut to its first 100 embedding and output rows: a consistent model whose
    // tokenizer has more ids than it can embed.
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("data/default-model");
    let small = tmp.path().join("model");
    std::fs::create_dir_all(&small).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), small.join(f)).unwrap();
    }
    let tensors: Vec<(String, tch::Tensor)> =
        lorafit::files::read_safetensors(&model.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let cut = name == "model.embed_tokens.weight" || name == "lm_head.weight";
                (name, if cut { t.narrow(0, 0, 100).contiguous() } else { t })
            })
            .collect();
    std::fs::write(
        small.join("model.safetensors"),
        lorafit::files::safetensors_bytes(&tensors, &[("format", "pt")]).unwrap(),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = json!(100);
    std::fs::write(small.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("train.jsonl"),
        "{\"instruction\": \"Name a colour.\", \"output\": \"Blue.\"}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("run.yaml"),
        "model: {path: model}\ndata: {train: train.jsonl}\ntrain: {max_steps: 1}\n",
    )
    .unwrap();
    for args in [vec!["train", "run.yaml"], vec!["data", "export", "run.yaml", "--out", "x.jsonl"]] {
        let out = common::lorafit(tmp.path(), &args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("embedding has 100 rows") && err.contains("tokenizer is larger"), "{err}");
    }
    assert!(!tmp.path().join("checkpoints").exists(), "a refused run writes nothing");
    let out = common::lorafit(
        tmp.path(),
        &["generate", "--model", "model", "--prompt", "Name a colour.", "--max-new-tokens", "1"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("embedding has 100 rows"), "{}", stderr_of(&out));
}
