//! Bad rows stop preparation with the file, row and reason, or with `on_bad_row: skip` are
//! counted and reported; over-long examples follow `too_long`. Never a panic.

mod common;

use lorafit::config::{Config, DataFormat, OnBadRow, TooLong};
use lorafit::data::format::{prepare, ChatFormat};
use lorafit::data::TextTokenizer;
use lorafit::model::ModelSpec;
use std::path::Path;

fn setup(dir: &Path, name: &str, body: &[u8], format: DataFormat) -> (Config, TextTokenizer) {
    let model = common::repo().join("data/default-model");
    std::fs::write(dir.join(name), body).unwrap();
    let mut cfg = Config::new(&model, dir.join(name));
    cfg.data.format = format;
    cfg.data.chat_template = "chatml".into();
    let tok =
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap();
    (cfg, tok)
}

fn prepare_with(cfg: &Config, tok: &TextTokenizer) -> anyhow::Result<lorafit::data::Prepared> {
    let chat = match cfg.data.format {
        DataFormat::Chat => Some(ChatFormat::resolve(&cfg.data.chat_template, &cfg.model.path).unwrap()),
        _ => None,
    };
    prepare(cfg.data.train.paths()[0], &cfg.data, tok, chat.as_ref())
}

/// A data file that must fail: its name and contents, the format, the row the message must
/// name and words it must hold.
type Case = (&'static str, &'static [u8], DataFormat, usize, &'static [&'static str]);

const CASES: &[Case] = &[
    ("missing.jsonl", b"{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n", DataFormat::Completion, 2, &["`text`", "body"]),
    ("malformed.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": broken\n", DataFormat::Completion, 3, &["JSON"]),
    ("role.jsonl", b"{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n", DataFormat::Chat, 1, &["wizard"]),
    ("empty_chat.jsonl", b"{\"messages\": []}\n", DataFormat::Chat, 1, &["empty"]),
    ("utf8.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n", DataFormat::Completion, 2, &["UTF-8"]),
    ("segments.jsonl", b"{\"segments\": [{\"text\": \"a\", \"label\": \"yes\"}]}\n", DataFormat::InputOutput, 1, &["label"]),
];

#[test]
fn each_bad_row_is_named_with_file_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, body, format, row, words) in CASES {
        let (cfg, tok) = setup(tmp.path(), name, body, *format);
        let err =
            format!("{:#}", prepare_with(&cfg, &tok).err().unwrap_or_else(|| panic!("{name} should fail")));
        assert!(err.contains(&format!("{name}:{row}")), "{name}: {err}");
        for w in *words {
            assert!(err.contains(w), "{name}: missing {w:?} in {err}");
        }
    }
}

#[test]
fn skip_mode_counts_bad_rows_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let body = b"{\"text\": \"one\"}\n{\"body\": \"no text\"}\n{\"text\": 5}\n{\"text\": \"two\"}\n";
    let (mut cfg, tok) = setup(tmp.path(), "mixed.jsonl", body, DataFormat::Completion);
    cfg.data.on_bad_row = OnBadRow::Skip;
    let prepared = prepare_with(&cfg, &tok).unwrap();
    assert_eq!((prepared.examples.len(), prepared.skipped_bad_rows), (2, 2));
    assert!(
        prepared.report().contains("2 bad rows skipped") && prepared.report().contains("mixed.jsonl:2"),
        "{}",
        prepared.report()
    );
}

#[test]
fn too_long_examples_are_cut_skipped_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let long = format!(
        "{{\"text\": \"{}\"}}\n{{\"text\": \"short\"}}\n",
        "The Blimbo lives in Mossvale. ".repeat(40)
    );
    let (mut cfg, tok) = setup(tmp.path(), "long.jsonl", long.as_bytes(), DataFormat::Completion);
    cfg.data.max_seq_len = 32;
    let cut = prepare_with(&cfg, &tok).unwrap();
    assert_eq!((cut.examples.len(), cut.truncated), (2, 1));
    assert!(cut.examples.iter().all(|e| e.input_ids.len() <= 32));
    cfg.data.too_long = TooLong::Skip;
    let skipped = prepare_with(&cfg, &tok).unwrap();
    assert_eq!((skipped.examples.len(), skipped.skipped_too_long), (1, 1));
    cfg.data.too_long = TooLong::Error;
    let err = format!("{:#}", prepare_with(&cfg, &tok).err().unwrap());
    assert!(err.contains("long.jsonl:1") && err.contains("max_seq_len"), "{err}");
}

#[test]
fn skip_mode_skips_malformed_json_and_non_utf8_rows() {
    let tmp = tempfile::tempdir().unwrap();
    // Line 2 is broken JSON, line 3 holds a Latin-1 byte, line 4 is not an object.
    let body = b"{\"text\": \"one\"}\n{\"text\": broken\n{\"text\": \"caf\xe9\"}\n42\n{\"text\": \"two\"}\n";
    let (mut cfg, tok) = setup(tmp.path(), "rows.jsonl", body, DataFormat::Completion);
    // `error` stops at the first, naming file and line.
    let err = format!("{:#}", prepare_with(&cfg, &tok).err().expect("error mode fails"));
    assert!(err.contains("rows.jsonl:2") && err.contains("JSON") && err.contains("on_bad_row"), "{err}");
    cfg.data.on_bad_row = OnBadRow::Skip;
    let prepared = prepare_with(&cfg, &tok).unwrap();
    assert_eq!((prepared.examples.len(), prepared.skipped_bad_rows), (2, 3));
    let report = prepared.report();
    assert!(report.contains("3 bad rows skipped") && report.contains("rows.jsonl:2"), "{report}");
    let samples = prepared.bad_row_samples.join("\n");
    for named in ["rows.jsonl:2: line 2 is not valid JSON", "rows.jsonl:3: byte 0xE9", "rows.jsonl:4:"] {
        assert!(samples.contains(named), "missing {named:?} in {samples}");
    }

    // Plain text: a paragraph with a byte that is not UTF-8 is one bad row.
    let (mut cfg, tok) = setup(
        tmp.path(),
        "story.txt",
        b"Once upon a time.\n\nna\xefve\nrow\n\nThe end.\n",
        DataFormat::Completion,
    );
    let err = format!("{:#}", prepare_with(&cfg, &tok).err().expect("error mode fails"));
    assert!(err.contains("story.txt:3") && err.contains("UTF-8"), "{err}");
    cfg.data.on_bad_row = OnBadRow::Skip;
    let prepared = prepare_with(&cfg, &tok).unwrap();
    assert_eq!((prepared.examples.len(), prepared.skipped_bad_rows), (2, 1));
    assert!(prepared.report().contains("story.txt:3"), "{}", prepared.report());

    // Every row bad: no usable example, and the report says why.
    let (mut cfg, tok) = setup(tmp.path(), "all_bad.jsonl", b"{broken\n\xff\n", DataFormat::Completion);
    cfg.data.on_bad_row = OnBadRow::Skip;
    let err = format!("{:#}", prepare_with(&cfg, &tok).err().expect("nothing usable"));
    assert!(err.contains("2 bad rows skipped") && err.contains("all_bad.jsonl:1"), "{err}");
}

/// `lorafit data preview` on the shipped default config with `--set` overrides; its stderr.
fn preview_stderr(sets: &[&str]) -> String {
    let mut args = vec!["data", "preview", "configs/default.yaml", "-n", "1"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("output.dir={}", tmp.path().display());
    args.extend(["--set", &out_dir]);
    let out = common::lorafit(&common::repo(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?}: {stderr}");
    stderr
}

#[test]
fn losing_more_than_a_twentieth_of_the_rows_is_warned_with_the_setting_to_change() {
    // The shipped run loses nothing, so it says nothing.
    let quiet = preview_stderr(&[]);
    assert!(!quiet.contains("warning"), "{quiet}");
    // Prompts longer than 48 tokens leave their answers past max_seq_len: those rows have no
    // trainable token, and the rest are cut.
    let (cfg, tok) = {
        let model = common::repo().join("data/default-model");
        let mut cfg = Config::new(&model, common::repo().join("data/default/train.jsonl"));
        cfg.data.max_seq_len = 48;
        let eos = ModelSpec::from_dir(&model).unwrap().eos_token_ids;
        (cfg, TextTokenizer::from_model_dir(&model, &eos).unwrap())
    };
    let prepared = prepare_with(&cfg, &tok).unwrap();
    let rows = prepared.examples.len() + prepared.dropped_no_labels;
    assert!(prepared.dropped_no_labels * 20 > rows, "the case must lose rows");
    let warned = preview_stderr(&["data.max_seq_len=48"]);
    let line = warned
        .lines()
        .find(|l| l.starts_with("warning: training data"))
        .unwrap_or_else(|| panic!("{warned}"));
    let counts = format!("of {rows} rows, {} (", prepared.dropped_no_labels);
    assert!(line.contains(&counts) && line.contains(&format!("and {} (", prepared.truncated)), "{line}");
    assert!(line.contains("data.max_seq_len (now 48)") && line.contains("train_on_inputs"), "{line}");
}

#[test]
fn nothing_trainable_left_is_refused_naming_the_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let body = b"{\"instruction\": \"a long question that fills every position\", \"output\": \"x\"}\n";
    let (mut cfg, tok) = setup(tmp.path(), "short.jsonl", body, DataFormat::Alpaca);
    cfg.data.max_seq_len = 8;
    let err = format!("{:#}", prepare_with(&cfg, &tok).err().expect("nothing trainable must be refused"));
    assert!(err.contains("no usable example") && err.contains("1 dropped with no trainable token"), "{err}");
}
