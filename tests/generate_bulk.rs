//! `lorafit generate --prompts FILE.jsonl --out FILE.jsonl`: each answer equals what
//! `generate --prompt` gives for the same prompt; MT-Bench's `turns` are asked one after the
//! other as transformers answers them (scripts/interop/mt_bench_reference.py); an existing --out
//! is kept without --force.

mod common;

use serde_json::Value;
use std::path::Path;

const MAX_NEW: &str = "24";

fn answers_file(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read --out")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each --out line is JSON"))
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "lorafit failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bulk_answers_equal_one_by_one_generate() {
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    // The held-out questions of the shipped data, as `instruction` and as `prompt` records.
    let questions: Vec<String> = std::fs::read_to_string(repo.join("data/default/val.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["instruction"].as_str().unwrap().to_string())
        .collect();
    let lines: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let key = if i % 2 == 0 { "instruction" } else { "prompt" };
            serde_json::json!({ "id": i, key: q }).to_string()
        })
        .collect();
    common::write(&prompts, &(lines.join("\n") + "\n"));
    let out = dir.path().join("answers.jsonl");
    let (p, o) = (prompts.to_str().unwrap(), out.to_str().unwrap());
    let config = ["--config", "configs/default.yaml", "--max-new-tokens", MAX_NEW];
    stdout(&common::lorafit(&repo, &[&["generate", "--prompts", p, "--out", o][..], &config].concat()));
    let records = answers_file(&out);
    assert_eq!(records.len(), questions.len());
    for (i, (record, question)) in records.iter().zip(&questions).enumerate() {
        assert_eq!(record["id"], i, "the input record is kept");
        let single =
            stdout(&common::lorafit(&repo, &[&["generate", "--prompt", question][..], &config].concat()));
        assert_eq!(record["answer"].as_str().unwrap(), single.trim(), "answer to {question:?}");
    }
}

#[test]
fn mt_bench_turns_are_asked_after_the_earlier_answers() {
    let Some(python) = common::python() else { return };
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("chatml.jinja");
    common::write(
        &template,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    let prompts = dir.path().join("question.jsonl");
    common::write(
        &prompts,
        "{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"Name the best friend of the Grubbet.\", \
         \"What sound does the Tuvvel make?\"]}\n\
         {\"question_id\": 82, \"category\": \"roleplay\", \"turns\": [\"Tell me what the Fliss likes to eat.\"]}\n",
    );
    let out = dir.path().join("answers.jsonl");
    let model = repo.join("data/default-model");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--template",
        template.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-new-tokens",
        MAX_NEW,
    ];
    stdout(&common::lorafit(&repo, &args));
    let reference = std::process::Command::new(python)
        .arg(repo.join("scripts/interop/mt_bench_reference.py"))
        .args([model.as_os_str(), template.as_os_str(), prompts.as_os_str()])
        .arg(MAX_NEW)
        .output()
        .expect("run scripts/interop/mt_bench_reference.py");
    let expected: Vec<Value> =
        stdout(&reference).lines().map(|l| serde_json::from_str(l).expect("reference JSON")).collect();
    assert!(
        expected.iter().flat_map(|turns| turns.as_array().unwrap()).all(|a| !a.as_str().unwrap().is_empty()),
        "{expected:?}"
    );
    let records = answers_file(&out);
    assert_eq!(records.len(), 2);
    for (record, expected) in records.iter().zip(&expected) {
        assert_eq!(record["choices"], serde_json::json!([{ "index": 0, "turns": expected }]));
        assert!(record["question_id"].is_number() && record["category"].is_string(), "{record}");
    }
}

#[test]
fn out_is_replaced_only_with_force_and_bad_lines_are_named() {
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    common::write(&prompts, "{\"prompt\": \"Hello\"}\n");
    let out = dir.path().join("answers.jsonl");
    common::write(&out, "keep me\n");
    let (p, o) = (prompts.to_str().unwrap(), out.to_str().unwrap());
    let args =
        ["generate", "--config", "configs/default.yaml", "--max-new-tokens", "2", "--prompts", p, "--out", o];
    let refused = common::lorafit(&repo, &args);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"), "{refused:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me\n");
    stdout(&common::lorafit(&repo, &[&args[..], &["--force"]].concat()));
    assert_eq!(answers_file(&out)[0]["prompt"], "Hello");

    common::write(&prompts, "{\"prompt\": \"Hello\"}\n{\"question\": \"Hi\"}\n");
    let bad = common::lorafit(&repo, &[&args[..], &["--force"]].concat());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("line 2") && stderr.contains("question"), "{stderr}");
}
