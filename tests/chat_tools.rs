//! Tool-calling chats: ShareGPT `function_call` / `observation` turns, OpenAI `tool_calls` and
//! role `tool`, LLaMA-Factory `reasoning` / `tool_call` content parts and a `tools` column.
//! LLaMA-Factory's two tool data sets render with the real Qwen3 template exactly as
//! transformers' `apply_chat_template(messages, tools=tools)` does
//! (scripts/interop/tool_chat_reference.py, run through LORAFIT_INTEROP_PYTHON), and exactly their
//! assistant turns, tool calls included, are trained; tool results are not.

mod common;

use lorafit::config::{Config, DataFormat, TrainOn};
use lorafit::data::chat::*;
use lorafit::data::format::{prepare, segments, ChatFormat};
use lorafit::data::source::read_split;
use lorafit::data::TextTokenizer;
use lorafit::model::ModelSpec;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const TOOL_DATASETS: [&str; 2] =
    ["glaive_toolcall_zh_demo_llamafactory.json", "reason_tool_use_demo_50_llamafactory.jsonl"];

fn qwen3(assets: &Path) -> ChatTemplate {
    ChatTemplate::from_model_dir(&assets.join("tokenizers/qwen3"))
        .unwrap()
        .expect("qwen3 has a chat template")
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

fn parse(fields: Value) -> anyhow::Result<Conversation> {
    parse_conversation(Path::new("data/tools.jsonl"), 3, &object(fields), None, TOOLS_FIELD)
}

fn err(fields: Value) -> String {
    format!("{:#}", parse(fields).unwrap_err())
}

/// Character ranges of the trainable segments.
fn trained_ranges(segs: &[(String, bool)]) -> Vec<(usize, usize)> {
    let (mut out, mut pos) = (Vec::new(), 0);
    for (text, trainable) in segs {
        let len = text.chars().count();
        if *trainable {
            out.push((pos, pos + len));
        }
        pos += len;
    }
    out
}

/// Renders `src` for a single message, to see how the template receives it.
fn seen_by_template(src: &str, conversation: &Conversation) -> String {
    let t = ChatTemplate::from_source(src.into(), "probe".into(), None, None).unwrap();
    t.render_with_tools(&conversation.messages, conversation.tools.as_deref(), false).unwrap()
}

/// The reference rendering of every row of `data`: row → {text, spans, tool_results}.
fn reference(python: &Path, tokenizer: &Path, data: &Path) -> BTreeMap<usize, Value> {
    let out = Command::new(python)
        .arg(common::repo().join("scripts/interop/tool_chat_reference.py"))
        .args([tokenizer, data])
        .output()
        .expect("run scripts/interop/tool_chat_reference.py");
    assert!(out.status.success(), "tool_chat_reference.py failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            (v["row"].as_u64().unwrap() as usize, v)
        })
        .collect()
}

fn pairs(v: &Value) -> Vec<(usize, usize)> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn tool_datasets_render_like_transformers_and_train_exactly_the_assistant_turns() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let tokenizer = assets.join("tokenizers/qwen3");
    // Rows go through the data pipeline's own entry point, as in training.
    let model = common::repo().join("data/default-model");
    let mut cfg = Config::new(&model, "unused");
    cfg.data.format = DataFormat::Chat;
    let chat = ChatFormat { template: qwen3(&assets), described: "qwen3".into() };
    for name in TOOL_DATASETS {
        let path = assets.join("datasets/sharegpt").join(name);
        let want = reference(&python, &tokenizer, &path);
        let records = read_split(&path, "train").unwrap();
        assert_eq!(records.len(), want.len(), "{name}");
        let (mut calls, mut results, mut turns) = (0, 0, 0);
        for record in &records {
            let at = format!("{name}:{}", record.row);
            let want = &want[&record.row];
            let segs = segments(record, &cfg.data, Some(&chat)).unwrap_or_else(|e| panic!("{at}: {e:#}"));
            let text: String = segs.iter().map(|(s, _)| s.as_str()).collect();
            assert_eq!(text, want["text"].as_str().unwrap(), "{at}: rendered text");
            let trained = trained_ranges(&segs);
            assert_eq!(trained, pairs(&want["spans"]), "{at}: trained spans");
            for (s, e) in pairs(&want["tool_results"]) {
                assert!(trained.iter().all(|&(ts, te)| e <= ts || te <= s), "{at}: a tool result is trained");
            }

            let conversation =
                parse_conversation(&record.file, record.row, &record.fields, None, TOOLS_FIELD).unwrap();
            let assistant = conversation.messages.iter().filter(|m| m.role == "assistant");
            calls += assistant.clone().map(|m| m.tool_calls.len()).sum::<usize>();
            turns += assistant.count();
            results += pairs(&want["tool_results"]).len();
            // Only the final turn trained.
            let last = render_segments(&chat.template, &conversation, TrainOn::Last).unwrap();
            assert_eq!(
                trained_ranges(&last),
                pairs(&want["spans"]).split_off(trained.len() - 1),
                "{at}: last"
            );
        }
        eprintln!(
            "{name}: {} rows, {turns} assistant turns with {calls} tool calls, {results} tool results",
            records.len()
        );
        assert!(calls > 0 && results > 0, "{name}: no tool calls found");
    }
}

#[test]
fn sharegpt_function_calls_are_assistant_turns_with_tool_calls() {
    let args = r#"{"zeta": 1, "alpha": [1.5, "x"], "mid": {"b": true, "a": null}}"#;
    let c = parse(json!({
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": format!(r#"{{"name": "lookup", "arguments": {args}}}"#)},
            {"from": "observation", "value": "{\"found\": 2}"},
            {"from": "function_call", "value": r#"[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\"k\": 2}"}]"#},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "done"}
        ],
        "tools": r#"[{"name": "lookup", "description": "d", "parameters": {"type": "object"}}, {"type": "function", "function": {"name": "a"}}]"#
    }))
    .unwrap();
    let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant", "tool", "assistant"]);
    assert_eq!(c.messages[1].content, "");
    let names: Vec<&str> = c.messages[3].tool_calls.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(c.messages[2].content, "{\"found\": 2}");

    // The template sees OpenAI-shaped calls, arguments as a mapping in the order written (a
    // JSON-text `arguments` is parsed), and the tools with bare schemas wrapped.
    let src = "{% for m in messages %}{% for c in m.tool_calls %}{{ c | tojson }}\n{% endfor %}{% endfor %}\
               {% for t in tools %}{{ t | tojson }}\n{% endfor %}";
    let seen = seen_by_template(src, &c);
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines[0],
        format!(r#"{{"type": "function", "function": {{"name": "lookup", "arguments": {args}}}}}"#)
    );
    assert_eq!(lines[2], r#"{"type": "function", "function": {"name": "b", "arguments": {"k": 2}}}"#);
    assert_eq!(
        lines[3],
        r#"{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {"type": "object"}}}"#
    );
    assert_eq!(lines[4], r#"{"type": "function", "function": {"name": "a"}}"#);
}

#[test]
fn openai_tool_calls_reasoning_and_the_tools_column() {
    let c = parse(json!({
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": null, "reasoning_content": "think",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": "7"},
            {"role": "assistant", "content": [
                {"type": "reasoning", "value": "r1"},
                {"type": "text", "value": "so"},
                {"type": "tool_call", "value": "{\"name\": \"g\", \"arguments\": {}}"}
            ]}
        ],
        "tools": [{"name": "f"}]
    }))
    .unwrap();
    let m = &c.messages;
    assert_eq!((m[1].content.as_str(), m[1].reasoning_content.as_deref()), ("", Some("think")));
    assert_eq!(m[1].tool_calls[0].name, "f");
    assert_eq!((m[3].content.as_str(), m[3].reasoning_content.as_deref()), ("so", Some("r1")));
    assert_eq!(m[3].tool_calls[0].name, "g");
    assert_eq!(c.tools.as_ref().map(Vec::len), Some(1));
    // Keys in the order of transformers' message dicts.
    let seen = seen_by_template("{{ messages[1] | tojson }}", &c);
    assert_eq!(
        seen,
        r#"{"role": "assistant", "content": "", "reasoning_content": "think", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}"#
    );

    // No tools column, or an empty one: no tools; an empty list stays an empty list.
    let base = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
    assert_eq!(parse(json!({"messages": base})).unwrap().tools, None);
    assert_eq!(parse(json!({"messages": base, "tools": ""})).unwrap().tools, None);
    assert_eq!(parse(json!({"messages": base, "tools": null})).unwrap().tools, None);
    assert_eq!(parse(json!({"messages": base, "tools": "[]"})).unwrap().tools, Some(vec![]));
    // A renamed tools column.
    let renamed = object(json!({"messages": base, "functions": "[{\"name\": \"f\"}]"}));
    let c = parse_conversation(Path::new("f"), 1, &renamed, None, "functions").unwrap();
    assert_eq!(c.tools.map(|t| t.len()), Some(1));
}

#[test]
fn bad_tool_json_names_file_row_and_message() {
    let user = json!({"from": "human", "value": "q"});
    let call = |value: Value| json!({"conversations": [user, {"from": "function_call", "value": value}]});
    let cases = [
        (
            call(json!("{\"name\": \"f\", \"arguments\": {")),
            vec!["message 2", "function_call", "not valid JSON"],
        ),
        (call(json!("{\"arguments\": {}}")), vec!["message 2", "has no `name`"]),
        (call(json!("{\"name\": \"f\"}")), vec!["message 2", "`f` has no `arguments`"]),
        (call(json!("{\"name\": \"f\", \"arguments\": [1]}")), vec!["`f` has arguments that are a list"]),
        (
            call(json!("{\"name\": \"f\", \"arguments\": \"{oops\"}")),
            vec!["`f` has arguments that are not valid JSON"],
        ),
        (call(json!("[{\"name\": \"f\", \"arguments\": {}}, 5]")), vec!["tool call 2 must be an object"]),
        (call(json!("[]")), vec!["list of tool calls is empty"]),
        (
            json!({"conversations": [user, {"from": "gpt", "value": "a"}], "tools": "[{\"name\": "}),
            vec!["`tools`", "not valid JSON"],
        ),
        (
            json!({"conversations": [user, {"from": "gpt", "value": "a"}], "tools": "{\"name\": \"f\"}"}),
            vec!["`tools`", "must be a list of function schemas", "an object"],
        ),
        (
            json!({"conversations": [user, {"from": "gpt", "value": "a"}], "tools": "[1]"}),
            vec!["tool 1 must be an object"],
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "tool_call", "value": "{\"name\": \"f\", \"arguments\": {}}"}]},
                                {"role": "assistant", "content": "a"}]}),
            vec!["message 1", "only assistant messages"],
        ),
        (
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}]}),
            vec!["message 2", "`reasoning_content` must be a string"],
        ),
        (
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": "nope"}]}),
            vec!["message 2", "`tool_calls`", "not valid JSON"],
        ),
    ];
    for (record, needles) in cases {
        let e = err(record.clone());
        assert!(e.starts_with("data/tools.jsonl:3:"), "{record}: {e}");
        for needle in needles {
            assert!(e.contains(needle), "{record}: `{needle}` missing from: {e}");
        }
    }
}

#[test]
fn templates_without_tool_support_are_refused_naming_template_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("data/default-model");
    let tok =
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap();
    let ok = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let cases = [
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{\"name\": \"f\"}]"}"#,
            "ignores `tools`",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"}]}"#,
            "does not render `tool_calls`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "reasoning", "value": "hmm"}, {"type": "text", "value": "a"}]}]}"#,
            "never reads `reasoning_content`",
        ),
    ];
    for (row, needle) in cases {
        let path = tmp.path().join("tools.jsonl");
        std::fs::write(&path, format!("{ok}\n{row}\n")).unwrap();
        let mut cfg = Config::new(&model, path.clone());
        cfg.data.format = DataFormat::Chat;
        let chat = ChatFormat::resolve("chatml", &model).expect("chatml is built in");
        let e = format!("{:#}", prepare(&path, &cfg.data, &tok, Some(&chat)).err().expect("must fail"));
        assert!(e.contains(needle) && e.contains("built-in `chatml`"), "{needle}: {e}");
        assert!(e.contains(&format!("{}:2", path.display())), "the row is named: {e}");
    }
}

#[test]
fn tool_call_turns_are_located_in_qwen3() {
    let Some(assets) = common::assets() else {
        return;
    };
    let template = qwen3(&assets);
    // A call beside text, a call whose arguments hold the end-of-turn marker and the
    // function's name, and reasoning dropped from earlier turns once the user speaks again.
    let c = parse(json!({
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "reasoning", "value": "call f"},
                {"type": "text", "value": "Checking."},
                {"type": "tool_call", "value": "{\"name\": \"f\", \"arguments\": {\"s\": \"f <|im_end|> f\"}}"}
            ]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "content": [{"type": "reasoning", "value": "r"}, {"type": "text", "value": "One."}]},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "Done."}
        ],
        "tools": "[{\"name\": \"f\"}]"
    }))
    .unwrap();
    let (text, spans) = assistant_spans(&template, &c).unwrap();
    assert_eq!(spans.len(), 3);
    // In Qwen3's ChatML layout a turn starts after an assistant header and ends with the
    // `<|im_end|>` after which the next message starts (or the text ends).
    for span in &spans {
        let turn = &text[span.clone()];
        assert!(text[..span.start].ends_with("<|im_start|>assistant\n"), "{turn}");
        assert!(turn.ends_with("<|im_end|>"), "{turn}");
        let after = &text[span.end..];
        assert!(after == "\n" || after.starts_with("\n<|im_start|>"), "{turn} is followed by {after:?}");
    }
    let first = &text[spans[0].clone()];
    assert!(
        first.starts_with("Checking.\n<tool_call>") && first.ends_with("</tool_call><|im_end|>"),
        "{first}"
    );
}
