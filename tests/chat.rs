//! Chat records → rendered text → trainable segments, checked against transformers'
//! `apply_chat_template` (tests/fixtures/chat_reference.json, made by
//! scripts/fixtures/make_chat_reference.py with the real Qwen3 tokenizer config) and against the
//! built-in templates' known formats.

mod common;

use lorafit::config::TrainOn;
use lorafit::data::chat::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn qwen3(assets: &Path) -> ChatTemplate {
    ChatTemplate::from_model_dir(&assets.join("tokenizers/qwen3"))
        .unwrap()
        .expect("qwen3 has a chat template")
}

fn object(v: &Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

fn parse(fields: Value) -> anyhow::Result<Vec<Message>> {
    parse_messages(Path::new("data/train.jsonl"), 7, &object(&fields), None)
}

/// The messages of a record (the tools column is `tools`).
fn parse_messages(
    file: &Path,
    row: usize,
    fields: &Map<String, Value>,
    messages_field: Option<&str>,
) -> anyhow::Result<Vec<Message>> {
    Ok(parse_conversation(file, row, fields, messages_field, TOOLS_FIELD)?.messages)
}

fn conv(messages: &[Message]) -> Conversation {
    messages.to_vec().into()
}

fn err(fields: Value) -> String {
    format!("{:#}", parse(fields).unwrap_err())
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
    pairs.iter().map(|(r, c)| Message::new(r, c)).collect()
}

/// Byte range → character range (the fixture counts Python string indices).
fn chars(text: &str, r: &std::ops::Range<usize>) -> (usize, usize) {
    (text[..r.start].chars().count(), text[..r.end].chars().count())
}

fn trained(segs: &[(String, bool)]) -> Vec<&str> {
    segs.iter().filter(|(_, t)| *t).map(|(s, _)| s.as_str()).collect()
}

fn joined(segs: &[(String, bool)]) -> String {
    segs.iter().map(|(s, _)| s.as_str()).collect()
}

fn assert_alternating(segs: &[(String, bool)]) {
    for pair in segs.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "adjacent segments share a flag");
    }
    assert!(segs.iter().all(|(s, _)| !s.is_empty()), "empty segment");
}

#[test]
fn qwen3_renders_like_transformers_with_the_same_spans() {
    let Some(assets) = common::assets() else {
        return;
    };
    let template = qwen3(&assets);
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let messages = parse_messages(Path::new("fixture"), i + 1, &object(&case["record"]), None).unwrap();
        let expected: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(messages, expected, "{name}: parsed messages");

        let text = template.render(&messages, false).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}: rendered text");

        let (spans_text, spans) = assistant_spans(&template, &conv(&messages)).unwrap();
        assert_eq!(spans_text, text);
        let got: Vec<(usize, usize)> = spans.iter().map(|r| chars(&text, r)).collect();
        let want: Vec<(usize, usize)> = serde_json::from_value(case["spans"].clone()).unwrap();
        assert_eq!(got, want, "{name}: assistant spans");
        let want_texts: Vec<String> = serde_json::from_value(case["span_texts"].clone()).unwrap();

        let segs = render_segments(&template, &conv(&messages), TrainOn::Assistant).unwrap();
        assert_eq!(joined(&segs), text, "{name}");
        assert_alternating(&segs);
        assert_eq!(trained(&segs), want_texts, "{name}: assistant turns");

        let segs = render_segments(&template, &conv(&messages), TrainOn::Last).unwrap();
        assert_eq!(joined(&segs), text, "{name}");
        assert_alternating(&segs);
        assert_eq!(trained(&segs), [want_texts.last().unwrap().as_str()], "{name}: last");
        assert!(!segs.last().unwrap().1, "{name}: the newline after the last turn");

        let segs = render_segments(&template, &conv(&messages), TrainOn::All).unwrap();
        assert_eq!(segs, vec![(text.clone(), true)], "{name}: all");
    }
}

#[test]
fn qwen3_generation_prompt_and_tokens() {
    let Some(assets) = common::assets() else {
        return;
    };
    let template = qwen3(&assets);
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
    assert_eq!(template.bos_token(), None);
    assert_eq!(template.end_of_turn().unwrap(), "<|im_end|>");
    let text = template.render(&msgs(&[("user", "Hi")]), true).unwrap();
    assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn builtin_chatml() {
    let t = ChatTemplate::builtin("chatml").unwrap();
    let m = msgs(&[
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
        ("assistant", "Bye!"),
    ]);
    let text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
                <|im_start|>assistant\nBye!<|im_end|>\n";
    assert_eq!(t.render(&m, false).unwrap(), text);
    assert_eq!(
        t.render(&m[..2], true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(t.bos_token(), None);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    let segs = render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap();
    assert_eq!(
        segs,
        vec![
            (
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                 <|im_start|>assistant\n"
                    .to_string(),
                false
            ),
            ("Hello!<|im_end|>".to_string(), true),
            ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n".to_string(), false),
            ("Bye!<|im_end|>".to_string(), true),
            ("\n".to_string(), false),
        ]
    );
}

#[test]
fn builtin_llama3() {
    let t = ChatTemplate::builtin("llama3").unwrap();
    let m = msgs(&[("system", "Be brief."), ("user", " Hi \n"), ("assistant", "Hello!\n")]);
    let text = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>";
    assert_eq!(t.render(&m, false).unwrap(), text);
    assert_eq!(
        t.render(&m[1..2], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(t.eos_token(), Some("<|eot_id|>"));
    assert_eq!(t.end_of_turn().unwrap(), "<|eot_id|>");

    let segs = render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap();
    assert_eq!(joined(&segs), text);
    assert_eq!(trained(&segs), ["Hello!<|eot_id|>"]);

    let err = ChatTemplate::builtin("vicuna").unwrap_err().to_string();
    assert!(err.contains("chatml") && err.contains("llama3"), "{err}");
}

#[test]
fn train_on_variants_with_three_turns() {
    let t = ChatTemplate::builtin("chatml").unwrap();
    let m = msgs(&[
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
        ("assistant", "d"),
        ("user", "e"),
        ("assistant", "f"),
    ]);
    let all = render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap();
    assert_eq!(trained(&all), ["b<|im_end|>", "d<|im_end|>", "f<|im_end|>"]);
    let last = render_segments(&t, &conv(&m), TrainOn::Last).unwrap();
    assert_eq!(last.len(), 3);
    assert_eq!(trained(&last), ["f<|im_end|>"]);
    assert_eq!(joined(&last), joined(&all));
}

#[test]
fn spans_survive_content_that_looks_like_markers() {
    let t = ChatTemplate::builtin("chatml").unwrap();
    // The reply mentions the end-of-turn marker and repeats the question's text.
    let m = msgs(&[
        ("user", "What ends a turn?"),
        ("assistant", "The text <|im_end|> ends a turn. What ends a turn?"),
    ]);
    let segs = render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap();
    assert_eq!(trained(&segs), ["The text <|im_end|> ends a turn. What ends a turn?<|im_end|>"]);
}

#[test]
fn templates_without_generation_prompt_keep_the_header_untrained() {
    // Vicuna-like: the assistant header is written only inside the conversation.
    let src = "{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} \
               {% else %}ASSISTANT: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";
    let t = ChatTemplate::from_source(src.into(), "t".into(), None, Some("</s>".into())).unwrap();
    assert_eq!(t.end_of_turn().unwrap(), "</s>");
    let m = msgs(&[("user", "a"), ("assistant", "ASSISTANT"), ("user", "b"), ("assistant", "t")]);
    let segs = render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap();
    assert_eq!(joined(&segs), "USER: a ASSISTANT: ASSISTANT</s>USER: b ASSISTANT: t</s>");
    assert_eq!(trained(&segs), [" ASSISTANT</s>", " t</s>"]);
}

#[test]
fn templates_that_change_the_text_fail_clearly() {
    // Rewrites one word of assistant text: that message's span cannot be found.
    let src = "{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{{ m.content | replace('secret', '***') }}\
               {% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}";
    let t = ChatTemplate::from_source(src.into(), "test template".into(), None, None).unwrap();
    let m = msgs(&[("user", "q"), ("assistant", "fine"), ("user", "q2"), ("assistant", "a secret")]);
    let e = format!("{:#}", render_segments(&t, &conv(&m), TrainOn::Assistant).unwrap_err());
    assert!(e.contains("assistant message 4") && e.contains("test template"), "{e}");
    // Drops all assistant text: even the end-of-turn probe fails, naming the template.
    let src = "{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}[redacted]{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}";
    let t = ChatTemplate::from_source(src.into(), "test template".into(), None, None).unwrap();
    let e = format!(
        "{:#}",
        render_segments(&t, &conv(&msgs(&[("user", "q"), ("assistant", "secret")])), TrainOn::Assistant)
            .unwrap_err()
    );
    assert!(e.contains("end-of-turn marker") && e.contains("test template"), "{e}");
    // raise_exception surfaces the template's message.
    let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok";
    let t = ChatTemplate::from_source(src.into(), "test template".into(), None, None).unwrap();
    let e = format!("{:#}", t.render(&msgs(&[("assistant", "x")]), false).unwrap_err());
    assert!(e.contains("must start with a user message"), "{e}");
    // A syntax error names where the template came from.
    let e =
        ChatTemplate::from_source("{% for %}".into(), "my.jinja".into(), None, None).unwrap_err().to_string();
    assert!(e.contains("my.jinja"), "{e}");
}

#[test]
fn python_string_methods_and_helpers() {
    let src = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}|\
               {{ m.content.split(',')[-1] }}|{{ m.content.replace('a', 'b') }}{% endfor %}|\
               {{ strftime_now('%Y')|length }}|{{ bos_token }}|{{ eos_token }}|{{ tools is none }}";
    let t =
        ChatTemplate::from_source(src.into(), "t".into(), Some("<s>".into()), Some("</s>".into())).unwrap();
    let out = t.render(&msgs(&[("user", " a,b ")]), false).unwrap();
    // What transformers' jinja2 environment renders for the same template and inputs.
    assert_eq!(out, "A,B|True|b | b,b |4|<s>|</s>|True");
}

#[test]
fn trim_and_lstrip_blocks_like_transformers() {
    // transformers compiles templates with trim_blocks and lstrip_blocks; this one relies on it.
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<u>{{ m.content }}</u>\n    {% else %}\n<a>{{ m.content }}</a>\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::from_source(src.into(), "t".into(), None, None).unwrap();
    let out = t.render(&msgs(&[("user", "q"), ("assistant", "r")]), false).unwrap();
    assert_eq!(out, "<u>q</u>\n<a>r</a>\n");
}

#[test]
fn model_dir_loading() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tokenizer_config.json");
    // No template.
    std::fs::write(&cfg, r#"{"bos_token": "<s>"}"#).unwrap();
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
    // A list of named templates, tokens as AddedToken objects.
    std::fs::write(
        &cfg,
        json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
            ],
            "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
            "eos_token": {"content": "</s>", "lstrip": false, "__type": "AddedToken"}
        })
        .to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<s>"));
    assert_eq!(t.eos_token(), Some("</s>"));
    assert_eq!(t.render(&msgs(&[("user", "q"), ("assistant", "r")]), false).unwrap(), "<s>q</s>r</s>");
    // A list without `default`.
    std::fs::write(&cfg, r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#).unwrap();
    let e = ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("default") && e.contains("rag"), "{e}");
    // chat_template.jinja wins over the config's template, as in transformers.
    std::fs::write(&cfg, r#"{"chat_template": "config", "eos_token": "<e>"}"#).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "file {{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&msgs(&[("user", "q")]), false).unwrap(), "file <e>");
    // Tokens missing from the config come from special_tokens_map.json.
    std::fs::write(&cfg, r#"{"chat_template": "{{ bos_token }}"}"#).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::write(dir.path().join("special_tokens_map.json"), r#"{"bos_token": {"content": "<|bos|>"}}"#)
        .unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&msgs(&[("user", "q")]), false).unwrap(), "<|bos|>");
}

#[test]
fn sharegpt_roles_system_field_and_content_parts() {
    let m = parse(json!({
        "system": "Sys",
        "conversations": [
            {"from": "human", "value": "h"},
            {"from": "gpt", "value": "g"},
            {"from": "USER", "value": "u"},
            {"from": "chatgpt", "value": "c"},
            {"from": "function_call", "value": "{\"name\": \"fc\", \"arguments\": {}}"},
            {"from": "observation", "value": "o"},
            {"from": "bing", "value": "b"},
            {"from": "function", "value": "f"},
            {"from": "bard", "value": "d"},
            {"role": "tool", "content": "t"},
            {"role": "assistant", "content": "a"}
        ]
    }))
    .unwrap();
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    assert_eq!(m[0].content, "Sys");
    assert_eq!(m[1].content, "h");

    // OpenAI layout with content parts (`text`, or `value` as LLaMA-Factory writes them).
    let m = parse(json!({
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "three"}], "loss_weight": 1.0}
        ],
        "system": ""
    }))
    .unwrap();
    assert_eq!(m, msgs(&[("user", "one\ntwo"), ("assistant", "three")]));

    // `messages` is tried before `conversations`; a named column is used alone.
    let both = json!({
        "messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "M"}],
        "conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "C"}],
        "chat": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "X"}]
    });
    assert_eq!(parse(both.clone()).unwrap()[0].content, "m");
    let m = parse_messages(Path::new("f"), 1, &object(&both), Some("chat")).unwrap();
    assert_eq!(m[1].content, "X");
    let m = parse_messages(Path::new("f"), 1, &object(&both), Some("conversations")).unwrap();
    assert_eq!(m[0].content, "c");
    assert_eq!(map_role("GPT"), Some("assistant"));
    assert_eq!(map_role("narrator"), None);
}

#[test]
fn parse_errors_name_file_and_row() {
    let at = "data/train.jsonl:7:";
    let cases = [
        (json!({"text": "x", "id": 1}), vec!["`messages`", "`conversations`", "it has: id, text"]),
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}]}),
            vec!["message 2", "unknown role `narrator`", "accepted: user, human, assistant, gpt"],
        ),
        (json!({"messages": []}), vec!["empty conversation"]),
        (
            json!({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}),
            vec!["message 1", "must be a string or a list of content parts", "a number"],
        ),
        (
            json!({"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}),
            vec!["message 1", "null"],
        ),
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            vec!["no assistant turn"],
        ),
        (
            json!({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": [{"type": "image_url", "image_url": "u"}]}]}),
            vec!["message 2", "only text, reasoning and tool_call parts"],
        ),
        (json!({"messages": "hello"}), vec!["`messages` must be a list", "a string"]),
        (json!({"messages": [{"content": "a"}]}), vec!["message 1", "neither a `role` nor a `from`"]),
        (
            json!({"system": "s", "messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            vec!["both a `system` field and a system message"],
        ),
        (
            json!({"system": 5, "messages": [{"role": "assistant", "content": "b"}]}),
            vec!["`system` field must be a string"],
        ),
    ];
    for (record, needles) in cases {
        let e = err(record.clone());
        assert!(e.starts_with(at), "{record}: {e}");
        for needle in needles {
            assert!(e.contains(needle), "{record}: `{needle}` missing from: {e}");
        }
    }
    let e = format!(
        "{:#}",
        parse_messages(Path::new("d.json"), 2, &object(&json!({"messages": []})), Some("dialog"))
            .unwrap_err()
    );
    assert!(e.starts_with("d.json:2:") && e.contains("`dialog`") && e.contains("it has: messages"), "{e}");
}

/// Records of a JSON array or JSON Lines file, with their 1-based row.
fn records(path: &Path) -> Vec<(usize, Map<String, Value>)> {
    let text = std::fs::read_to_string(path).unwrap();
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text).unwrap();
        values.iter().enumerate().map(|(i, v)| (i + 1, object(v))).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, object(&serde_json::from_str(l).unwrap())))
            .collect()
    }
}

#[test]
fn real_chat_datasets_render_with_qwen3() {
    let Some(assets) = common::assets() else {
        return;
    };
    let template = qwen3(&assets);
    let dir: PathBuf = assets.join("datasets/sharegpt");
    for name in
        ["dummy_conversation_fastchat.json", "chat_tiny_torchtune.json", "v1_sft_demo_llamafactory.jsonl"]
    {
        let path = dir.join(name);
        let rows = records(&path);
        let (mut ok, mut no_assistant, mut turns) = (0, 0, 0);
        for (row, fields) in &rows {
            let messages = match parse_messages(&path, *row, fields, None) {
                Ok(m) => m,
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(
                        e.contains("no assistant turn") && e.contains(&format!("{}:{row}:", path.display())),
                        "{name}:{row}: {e}"
                    );
                    no_assistant += 1;
                    continue;
                }
            };
            let n_assistant = messages.iter().filter(|m| m.role == "assistant").count();
            let segs = render_segments(&template, &conv(&messages), TrainOn::Assistant)
                .unwrap_or_else(|e| panic!("{name}:{row}: {e:#}"));
            let text = template.render(&messages, false).unwrap();
            assert_eq!(joined(&segs), text, "{name}:{row}");
            let spans = trained(&segs);
            assert_eq!(spans.len(), n_assistant, "{name}:{row}");
            assert!(spans.iter().all(|s| s.ends_with("<|im_end|>")), "{name}:{row}");
            let last = render_segments(&template, &conv(&messages), TrainOn::Last).unwrap();
            assert_eq!(trained(&last).len(), 1, "{name}:{row}");
            ok += 1;
            turns += n_assistant;
        }
        eprintln!(
            "{name}: {} rows, {ok} rendered ({turns} assistant turns), {no_assistant} without an assistant turn",
            rows.len()
        );
        assert!(ok > 0, "{name}");
    }
}

#[test]
fn messages_look_like_python_dicts() {
    // What transformers' jinja2 renders for the same template (a dict keeps its key order).
    let src = "{% for m in messages %}{{ m | tojson }}|{{ m is mapping }}|{{ 'tool_calls' in m }}|\
               {{ m.tool_calls is defined }}|{{ m.get('role') }}|{{ m.items() | list | length }}{% endfor %}";
    let t = ChatTemplate::from_source(src.into(), "t".into(), None, None).unwrap();
    let out = t.render(&msgs(&[("user", "<b>\"q\"</b>")]), false).unwrap();
    assert_eq!(out, r#"{"role": "user", "content": "<b>\"q\"</b>"}|True|False|False|user|2"#);
}
