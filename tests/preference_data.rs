//! Preference data layouts: ShareGPT / LLaMA-Factory pairs and KTO's unpaired answers give the
//! very token ids and masks the TRL layout of the same data gives; bad KTO rows are refused
//! naming file, row and column.

mod common;

use serde_json::{json, Value};
use std::path::Path;

/// A prompt of one or more turns, a chosen and a rejected answer.
struct Pair {
    prompt: Vec<Value>,
    chosen: &'static str,
    rejected: &'static str,
}

fn msg(role: &str, content: &str) -> Value {
    json!({"role": role, "content": content})
}

/// ShareGPT's form of a message (`from`/`value`).
fn sharegpt(m: &Value) -> Value {
    let from = match m["role"].as_str().unwrap() {
        "user" => "human",
        "assistant" => "gpt",
        other => other,
    };
    json!({"from": from, "value": m["content"]})
}

fn pairs() -> Vec<Pair> {
    vec![
        Pair {
            prompt: vec![msg("user", "Describe the sound of the Pindle.")],
            chosen: "The Pindle clicks.",
            rejected: "The Grubbet is black.",
        },
        Pair {
            prompt: vec![
                msg("system", "Answer briefly."),
                msg("user", "How does the Dorrel sound?"),
                msg("assistant", "It growls."),
                msg("user", "And the Pindle?"),
            ],
            chosen: "The Pindle clicks.",
            rejected: "The Dorrel growls.",
        },
    ]
}

/// `lorafit data export` of `rows` with `objective`, chats rendered with ChatML: one JSON value
/// per line (a pair, or an answer for KTO).
fn export(dir: &Path, name: &str, objective: &str, rows: &[Value]) -> Vec<Value> {
    let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    common::write(&dir.join(format!("{name}.jsonl")), &(lines.join("\n") + "\n"));
    let yaml = format!(
        "model: {{path: {}}}\n\
         data: {{train: {name}.jsonl, format: chat, chat_template: chatml, packing: false}}\n\
         train: {{objective: {objective}}}\n",
        common::repo().join("data/default-model").display()
    );
    common::write(&dir.join(format!("{name}.yaml")), &yaml);
    let out_file = format!("{name}-out.jsonl");
    let out = common::lorafit(dir, &["data", "export", &format!("{name}.yaml"), "--out", &out_file]);
    assert!(out.status.success(), "{name}: export failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(dir.join(out_file)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The same pairs as TRL's conversational layout, ShareGPT `conversations` with a single
/// `chosen`/`rejected` message (LLaMA-Factory's sharegpt preference format), and LLaMA-Factory's
/// whole `chosen_messages`/`rejected_messages` conversations give the same ids and labels; and
/// KTO's unpaired layout gives each answer as TRL's layout of the pair unpaired does.
#[test]
fn pair_layouts_and_unpaired_answers_give_the_trl_layouts_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pairs = pairs();
    let trl: Vec<Value> = pairs
        .iter()
        .map(|p| json!({"prompt": p.prompt, "chosen": [msg("assistant", p.chosen)], "rejected": [msg("assistant", p.rejected)]}))
        .collect();
    let conversations: Vec<Value> = pairs
        .iter()
        .map(|p| {
            json!({
                "conversations": p.prompt.iter().map(sharegpt).collect::<Vec<_>>(),
                "chosen": sharegpt(&msg("assistant", p.chosen)),
                "rejected": sharegpt(&msg("assistant", p.rejected)),
            })
        })
        .collect();
    let whole = |answer: &str, p: &Pair| {
        let mut m = p.prompt.clone();
        m.push(msg("assistant", answer));
        m
    };
    let messages: Vec<Value> = pairs
        .iter()
        .map(|p| json!({"chosen_messages": whole(p.chosen, p), "rejected_messages": whole(p.rejected, p)}))
        .collect();
    let expected = export(dir, "trl", "dpo", &trl);
    assert_eq!(expected.len(), pairs.len());
    for (name, rows) in [("conversations", &conversations), ("messages", &messages)] {
        let got = export(dir, name, "dpo", rows);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            for side in ["chosen", "rejected"] {
                for key in ["input_ids", "labels"] {
                    assert_eq!(g[side][key], e[side][key], "{name} pair {i}: {side} {key}");
                }
            }
        }
    }

    // KTO: the pairs unpaired by hand (TRL's unpair_preference_dataset) and the TRL pairs read by
    // kto give the same answers, in the same order, with the same labels.
    let unpaired: Vec<Value> = pairs
        .iter()
        .flat_map(|p| {
            [(p.chosen, true), (p.rejected, false)].map(
                |(a, label)| json!({"prompt": p.prompt, "completion": [msg("assistant", a)], "label": label}),
            )
        })
        .collect();
    let from_pairs = export(dir, "trl-kto", "kto", &trl);
    let answers = export(dir, "unpaired", "kto", &unpaired);
    assert_eq!(answers.len(), 2 * pairs.len());
    assert_eq!(answers, from_pairs, "unpaired answers and unpaired pairs give the same examples");
    for (i, answer) in answers.iter().enumerate() {
        let pair = &expected[i / 2][if i % 2 == 0 { "chosen" } else { "rejected" }];
        assert_eq!(answer["input_ids"], pair["input_ids"], "answer {i}");
        assert_eq!(answer["labels"], pair["labels"], "answer {i}");
        assert_eq!(answer["label"], json!(i % 2 == 0), "answer {i}: its label");
    }
}

/// Bad KTO rows are refused naming the file, the row and the column; a KTO file given to dpo
/// says to use kto; a pair file given to kto trains as its answers.
#[test]
fn bad_unpaired_rows_name_file_row_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = json!({"prompt": "Describe the Pindle.", "completion": "It clicks.", "label": true});
    let cases: [(&str, &str, Value, &[&str]); 5] = [
        (
            "no-label",
            "kto",
            json!({"prompt": "Q", "completion": "A"}),
            &["no `label` column", "true for a desirable"],
        ),
        (
            "string-label",
            "kto",
            json!({"prompt": "Q", "completion": "A", "label": "yes"}),
            &["`label` must be true or false", "\"yes\""],
        ),
        (
            "empty-completion",
            "kto",
            json!({"prompt": "Q", "completion": "", "label": false}),
            &["`completion` is empty"],
        ),
        (
            "empty-messages",
            "kto",
            json!({"prompt": [msg("user", "Q")], "completion": [], "label": false}),
            &["`completion` is empty"],
        ),
        (
            "kto-to-dpo",
            "dpo",
            json!({"prompt": "Q", "completion": "A", "label": true}),
            &["unpaired answer", "train.objective: kto"],
        ),
    ];
    for (name, objective, bad, wanted) in cases {
        let file = format!("{name}.jsonl");
        common::write(&dir.join(&file), &format!("{good}\n{bad}\n"));
        let format = if bad["completion"].is_array() { "chat, chat_template: chatml" } else { "alpaca" };
        let yaml = format!(
            "model: {{path: {}}}\ndata: {{train: {file}, format: {format}, packing: false}}\ntrain: {{objective: {objective}}}\n",
            common::repo().join("data/default-model").display()
        );
        common::write(&dir.join("run.yaml"), &yaml);
        let out = common::lorafit(dir, &["data", "preview", "run.yaml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted:\n{}", String::from_utf8_lossy(&out.stdout));
        // The second line of the file, whichever objective reads it (dpo refuses the first too).
        let row = if objective == "dpo" { 1 } else { 2 };
        for want in [format!("{file}:{row}").as_str()].into_iter().chain(wanted.iter().copied()) {
            assert!(stderr.contains(want), "{name}: no {want:?} in: {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }

    common::write_pairs(&dir.join("pairs.jsonl"), 2);
    let yaml = format!(
        "model: {{path: {}}}\ndata: {{train: pairs.jsonl, format: alpaca, packing: false}}\ntrain: {{objective: kto}}\n",
        common::repo().join("data/default-model").display()
    );
    common::write(&dir.join("run.yaml"), &yaml);
    let out = common::lorafit(dir, &["data", "preview", "run.yaml", "-n", "4"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kto on pairs: {}", String::from_utf8_lossy(&out.stderr));
    for (i, label) in ["desirable", "undesirable", "desirable", "undesirable"].iter().enumerate() {
        assert!(shown.contains(&format!("── example {}, {label} (", i + 1)), "answer {}: {shown}", i + 1);
    }
}
