//! A config that leaves out `data.format` has it detected from the data, per set of a
//! `data.train` list, as `init` and `eval --data` detect it; an explicit format is kept. The data
//! commands and runs then read each set, warn about its losses and put prompts in the format that
//! set has.

mod common;

use lorafit::config::{Config, DataFormat, DataSet, TrainData};
use lorafit::data::format::{detect_data_format, ChatFormat, PromptFormat};
use lorafit::data::TextTokenizer;
use lorafit::model::ModelSpec;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// Two short conversations (OpenAI `messages`).
const CHAT_ROWS: &str = r#"{"messages": [{"role": "user", "content": "What does the Grubbet eat?"}, {"role": "assistant", "content": "The Grubbet eats blue moss."}]}
{"messages": [{"role": "user", "content": "Where does the Fliss live?"}, {"role": "assistant", "content": "The Fliss lives by the river."}]}
"#;

/// A config of the shipped default model on `data` (YAML of the `data:` section's other keys
/// follows `train:`), writing into `dir`.
fn write_config(dir: &Path, name: &str, data: &str) -> std::path::PathBuf {
    let model = common::repo().join("data/default-model");
    let yaml = format!(
        "model:\n  path: {}\ndata:\n  chat_template: chatml\n  packing: false\n{data}\ntrain:\n  max_steps: 1\n  \
         micro_batch_size: 2\n  precision: fp32\noutput:\n  dir: {}\n  run_name: {name}\n  sample_prompts: []\n",
        model.display(),
        dir.join(format!("out-{name}")).display()
    );
    let path = dir.join(format!("{name}.yaml"));
    common::write(&path, &yaml);
    path
}

fn run_ok(args: &[&str]) -> Output {
    let out = common::lorafit(&common::repo(), args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn each_set_without_a_format_is_read_in_the_format_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    common::write(&tmp.path().join("chat.jsonl"), CHAT_ROWS);
    common::write(&tmp.path().join("story.jsonl"), common::STORY_ROWS);
    let (chat, story) = (tmp.path().join("chat.jsonl"), tmp.path().join("story.jsonl"));
    let sets = |chat_format: &str, story_format: &str| {
        format!(
            "  train:\n    - {{path: {}{chat_format}}}\n    - {{path: {}{story_format}}}",
            chat.display(),
            story.display()
        )
    };
    let detected = write_config(tmp.path(), "detected", &sets("", ""));
    let named = write_config(tmp.path(), "named", &sets(", format: chat", ", format: completion"));

    let preview = |config: &Path| {
        let out = run_ok(&["data", "preview", config.to_str().unwrap(), "-n", "6"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (from_data, from_config) = (preview(&detected), preview(&named));
    let (said, shown) = from_data.split_at(from_data.find("chat template").unwrap_or(0));
    assert_eq!(shown, from_config, "detected formats must prepare the data as the named ones do");
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [
            format!(
                "data.train[0].format: chat (detected from {}; set data.train[0].format to choose)",
                chat.display()
            ),
            format!(
                "data.train[1].format: completion (detected from {}; set data.train[1].format to choose)",
                story.display()
            ),
        ]
    );
}

#[test]
fn a_run_without_a_format_detects_it_and_saves_it_in_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let story = tmp.path().join("story.jsonl");
    common::write(&story, common::STORY_ROWS);
    let config = write_config(tmp.path(), "plain", &format!("  train: {}", story.display()));
    let config = config.to_str().unwrap();

    for run in [&["train", config, "--dry-run"][..], &["train", config]] {
        let said = String::from_utf8_lossy(&run_ok(run).stdout).into_owned();
        assert!(said.starts_with("data.format: completion (detected from"), "{run:?}: {said}");
    }
    let saved = Config::load(&tmp.path().join("out-plain/plain/config.yaml"), &[]).unwrap();
    assert_eq!(saved.data.format, DataFormat::Completion);
    assert!(!saved.data.format_unset, "the saved config names its format");
}

#[test]
fn an_explicit_format_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    // Rows a detection would read as chats; the config says they are completions.
    let rows: String = CHAT_ROWS
        .lines()
        .map(|line| line.replacen('{', "{\"text\": \"Once upon a time there was a cat.\", ", 1) + "\n")
        .collect();
    common::write(&tmp.path().join("both.jsonl"), &rows);
    let train = format!("  train: {}\n  format: completion", tmp.path().join("both.jsonl").display());
    let config = write_config(tmp.path(), "explicit", &train);
    let out = run_ok(&["data", "preview", config.to_str().unwrap(), "-n", "1"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains("detected"), "{shown}");
    assert!(
        shown.contains("Once upon a time there was a cat.") && !shown.contains("chat template"),
        "{shown}"
    );
}

#[test]
fn detection_follows_the_column_renames() {
    let Some(assets) = common::assets() else { return };
    let dolly = assets.join("datasets/dolly/dolly_prompt_answer_151.jsonl");
    let columns: BTreeMap<String, String> =
        [("instruction", "prompt"), ("output", "answer")].map(|(a, b)| (a.into(), b.into())).into();
    assert_eq!(detect_data_format(&dolly, "train", &columns).unwrap(), DataFormat::Alpaca);
    let err = detect_data_format(&dolly, "train", &BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("dolly_prompt_answer_151.jsonl row 1") && err.contains("data.columns"), "{err}");
}

#[test]
fn the_data_loss_warning_advises_on_each_sets_own_format() {
    let tmp = tempfile::tempdir().unwrap();
    // A third conversation opens with a question longer than max_seq_len, so its answer is cut
    // away and it has no trainable token left.
    let long = "Tell me again, slowly and with every detail, ".repeat(20);
    let first = CHAT_ROWS.lines().next().unwrap_or_default();
    let rows = format!("{CHAT_ROWS}{}\n", first.replacen("\"What", &format!("\"{long}What"), 1));
    common::write(&tmp.path().join("chat.jsonl"), &rows);
    common::write(&tmp.path().join("story.jsonl"), common::STORY_ROWS);
    let data = format!(
        "  train:\n    - {{path: {}, format: chat}}\n    - {{path: {}, format: completion}}\n  train_on: last\n  \
         max_seq_len: 96",
        tmp.path().join("chat.jsonl").display(),
        tmp.path().join("story.jsonl").display()
    );
    let config = write_config(tmp.path(), "lossy", &data);
    let said = stderr(&run_ok(&["data", "preview", config.to_str().unwrap(), "-n", "1"]));
    let line =
        said.lines().find(|l| l.starts_with("warning: training data")).unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains("for chat data, data.train_on (now last)"), "{line}");
    assert!(!line.contains("train_on_inputs"), "no set is alpaca: {line}");
}

#[test]
fn prompts_take_the_format_the_sets_were_trained_in() {
    let model = common::repo().join("data/default-model");
    let tok =
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap();
    let chat = ChatFormat::resolve("chatml", &model).unwrap();
    let set = |format| DataSet { path: "x.jsonl".into(), format: Some(format), columns: None, weight: 1.0 };
    // data.format keeps its placeholder (alpaca): no set is read with it.
    let mut cfg = Config::new(&model, "unused");
    cfg.data.train = TrainData::Sets(vec![set(DataFormat::Completion)]);
    let prompt = "Name the best friend of the Grubbet.";
    let text = PromptFormat::of_data(&cfg.data, Some(&chat));
    assert_eq!(text.ids(&tok, prompt).unwrap(), tok.encode(prompt, true).unwrap());

    cfg.data.train = TrainData::Sets(vec![set(DataFormat::Completion), set(DataFormat::Chat)]);
    assert!(matches!(PromptFormat::of_data(&cfg.data, Some(&chat)), PromptFormat::Chat(_)));
}
