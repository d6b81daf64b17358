//! `lorafit init`: the config it writes loads, trains, adapts the layers PEFT's `all-linear`
//! adapts, takes the record layout from the data, and never replaces a file unasked.

use std::path::Path;
use std::process::Output;

use lorafit::config::{Config, DataFormat, TargetModules};
use lorafit::init::PRESETS;

mod common;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn init(cwd: &Path, args: &[&str]) -> Output {
    common::lorafit(cwd, &[&["init"], args].concat())
}

#[test]
fn the_written_config_trains_on_the_default_model_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::repo();
    let (model, data) = (repo.join("data/default-model"), repo.join("data/default/train.jsonl"));
    let out = dir.path().join("run.yaml");
    let (model_arg, data_arg, out_arg) =
        (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let written = init(dir.path(), &["--model", model_arg, "--data", data_arg, "--out", out_arg]);
    assert!(written.status.success(), "{}", stderr(&written));

    let config = Config::load(&out, &[]).unwrap();
    assert_eq!(config.model.path, model);
    assert_eq!(config.data.format, DataFormat::Alpaca);
    let run = common::lorafit(
        dir.path(),
        &["train", out_arg, "--set", "train.max_steps=1", "--set", "output.run_name=first"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(dir.path().join("checkpoints/first/adapter/adapter_model.safetensors").exists());

    // The targets are the layers PEFT's `all-linear` picks on this model.
    let Some(python) = common::python() else { return };
    let script = "import sys, torch\nfrom transformers import AutoModelForCausalLM\n\
                  from peft import LoraConfig, get_peft_model\n\
                  m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), \
                  LoraConfig(target_modules='all-linear'))\n\
                  names = []\n\
                  for name, module in m.named_modules():\n    \
                  leaf = name.rsplit('.', 1)[-1]\n    \
                  if hasattr(module, 'lora_A') and leaf not in names: names.append(leaf)\n\
                  print(' '.join(names))\n";
    let peft = std::process::Command::new(python).args(["-c", script, model_arg]).output().unwrap();
    assert!(peft.status.success(), "{}", stderr(&peft));
    let mut theirs: Vec<String> =
        String::from_utf8_lossy(&peft.stdout).split_whitespace().map(String::from).collect();
    let mut ours = match config.lora.target_modules {
        TargetModules::List(names) => names,
        other => panic!("expected the model's layer names, got {other:?}"),
    };
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn an_existing_file_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.yaml");
    std::fs::write(&out, "mine\n").unwrap();
    let refused = init(dir.path(), &["--preset", "llama", "--out", "run.yaml"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("run.yaml exists; pass --force"), "{}", stderr(&refused));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine\n");
    let forced = init(dir.path(), &["--preset", "llama", "--out", "run.yaml", "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    Config::load(&out, &[]).unwrap();
}

/// The presets hold the numbers of the files they name, as scripts/fixtures/make_preset_sources.py
/// read them out of those files.
#[test]
fn every_preset_has_the_values_of_the_file_its_source_names() {
    let path = common::repo().join("tests/fixtures/preset_sources.json");
    let sources: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let sources = sources.as_object().unwrap();
    assert_eq!(sources.len(), PRESETS.len(), "a preset without a source, or a source without a preset");
    for preset in PRESETS {
        let source = &sources[preset.name];
        let (repo, file) = (source["repo"].as_str().unwrap(), source["path"].as_str().unwrap());
        assert!(
            preset.source.contains(repo) && preset.source.contains(file),
            "{}: the source should name {repo} {file}, not `{}`",
            preset.name,
            preset.source
        );
        let number = |key: &str| source[key].as_f64().unwrap();
        // A model's learned positions bound the length where the source's is longer.
        let length = source["position_limit"]
            .as_f64()
            .map_or(number("max_seq_len"), |limit| number("max_seq_len").min(limit));
        assert_eq!(
            (preset.r as f64, preset.alpha, preset.dropout, preset.lr, preset.max_seq_len as f64),
            (number("r"), number("alpha"), number("dropout"), number("lr"), length),
            "{}: (r, alpha, dropout, lr, max_seq_len) against {repo} {file}",
            preset.name
        );
    }
}

#[test]
fn every_preset_alone_writes_a_config_that_loads_with_its_values() {
    let dir = tempfile::tempdir().unwrap();
    for preset in PRESETS {
        let file = format!("{}.yaml", preset.name);
        let written = init(dir.path(), &["--preset", preset.name, "--out", &file]);
        assert!(written.status.success(), "{}: {}", preset.name, stderr(&written));
        let text = std::fs::read_to_string(dir.path().join(&file)).unwrap();
        let config = Config::load(&dir.path().join(&file), &[]).unwrap();
        assert_eq!(
            (config.lora.r, config.lora.alpha, config.lora.dropout),
            (preset.r, preset.alpha, preset.dropout)
        );
        assert_eq!((config.train.lr, config.data.max_seq_len), (preset.lr, preset.max_seq_len));
        assert_eq!(config.lora.target_modules, TargetModules::AllLinear);
        assert!(text.contains(preset.source), "{}: the source is not named", preset.name);
    }
    let unknown = init(dir.path(), &["--preset", "llama4", "--out", "x.yaml"]);
    assert!(stderr(&unknown).contains("unknown preset `llama4`; the presets are: llama, mistral"));
    let nothing = init(dir.path(), &["--out", "y.yaml"]);
    assert!(stderr(&nothing).contains("give --model DIR, --preset NAME or both"), "{}", stderr(&nothing));
}

#[test]
fn the_record_layout_is_detected_from_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("chat.jsonl", r#"{"messages": [{"role": "user", "content": "hi"}]}"#, Some(DataFormat::Chat)),
        (
            "sharegpt.jsonl",
            r#"{"conversations": [{"from": "human", "value": "hi"}]}"#,
            Some(DataFormat::Chat),
        ),
        ("text.jsonl", r#"{"text": "once upon a time"}"#, Some(DataFormat::Completion)),
        ("segments.jsonl", r#"{"segments": [{"text": "a", "label": true}]}"#, Some(DataFormat::InputOutput)),
        ("odd.jsonl", r#"{"question": "q", "answer": "a"}"#, None),
    ];
    for (name, line, expected) in cases {
        std::fs::write(dir.path().join(name), format!("{line}\n")).unwrap();
        let out = format!("{name}.yaml");
        let written = init(dir.path(), &["--preset", "qwen2", "--data", name, "--out", &out]);
        match expected {
            Some(format) => {
                assert!(written.status.success(), "{name}: {}", stderr(&written));
                assert_eq!(Config::load(&dir.path().join(&out), &[]).unwrap().data.format, format, "{name}");
            }
            None => {
                let message = stderr(&written);
                assert!(
                    message.contains("odd.jsonl row 1")
                        && message.contains("question")
                        && message.contains("answer"),
                    "{message}"
                );
                assert!(!dir.path().join(&out).exists());
            }
        }
    }
}
