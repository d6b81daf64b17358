//! Property tests of the parsers that read untrusted files: whatever the bytes, they return an
//! error or a value, never panic. The case counts are bounded so the file runs in seconds.

mod common;

use lorafit::config::{Config, DataFormat, TrainOn};
use lorafit::data::chat::{self, ChatTemplate};
use lorafit::data::format::{prepare, segments, ChatFormat};
use lorafit::data::source::read_rows;
use lorafit::data::TextTokenizer;
use lorafit::files::{read_safetensors, read_safetensors_header, safetensors_dtypes};
use lorafit::lora::peft::{self, AdapterConfig};
use lorafit::model::load::load_model;
use lorafit::model::ModelSpec;
use proptest::prelude::*;
use proptest::test_runner::Config as Cases;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::OnceLock;
use tch::{Device, Kind};

/// Any JSON value, a few levels deep, with the numbers and strings parsers trip on.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..70_000).prop_map(Value::from),
        // Sizes that overflow an i64 or no allocation can hold.
        prop::sample::select(vec![0, 1 << 31, 1 << 40, 1 << 63, u64::MAX]).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "",
            "LORA",
            "all-linear",
            "gaussian",
            "none",
            "all",
            "q_proj",
            "(",
            ".*",
            "user",
            "assistant",
            "{{",
        ])
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One value of a safetensors header: a tensor entry with plausible and implausible fields.
fn tensor_entry() -> impl Strategy<Value = Value> {
    let dtype = prop::sample::select(vec!["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", ""]);
    let dim = prop_oneof![0u64..5, any::<u64>(), Just(u64::MAX), Just(1 << 62)];
    let offset = prop_oneof![0u64..64, any::<u64>(), Just(u64::MAX)];
    (dtype, prop::collection::vec(dim, 0..4), offset.clone(), offset, any_json()).prop_map(
        |(dtype, shape, start, end, noise)| {
            let mut entry = json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]});
            if let Value::Object(extra) = noise {
                entry.as_object_mut().expect("an object").extend(extra);
            }
            entry
        },
    )
}

/// A safetensors file: a length prefix (true or not), a JSON header and some data bytes.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        prop::collection::btree_map("[a-z._0-9]{1,8}", tensor_entry(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        any_json(),
    ];
    let prefix = prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..300).prop_map(Some)];
    (header, prefix, prop::collection::vec(any::<u8>(), 0..96)).prop_map(|(header, prefix, data)| {
        let text = header.to_string().into_bytes();
        let len = prefix.unwrap_or(text.len() as u64);
        [len.to_le_bytes().as_slice(), &text, &data].concat()
    })
}

/// Every reader of a safetensors file, on `bytes`.
fn read_all_ways(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let _ = read_safetensors_header(&mut std::fs::File::open(&path).unwrap(), &path);
    let _ = safetensors_dtypes(&path);
    let _ = read_safetensors(&path);
}

/// The keys of adapter_config.json that lorafit reads.
const ADAPTER_KEYS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "alora_invocation_tokens",
];

/// The llama3 fixture's adapter config with each key kept, dropped or replaced by any value.
fn adapter_config() -> impl Strategy<Value = Value> {
    let base = fixture_adapter_config();
    let edits = prop::collection::vec(
        (prop::sample::select(ADAPTER_KEYS.to_vec()), prop::option::of(any_json())),
        0..5,
    );
    edits.prop_map(move |edits| {
        let mut config = base.clone();
        let map = config.as_object_mut().expect("an object");
        for (key, value) in edits {
            match value {
                Some(v) => map.insert(key.to_string(), v),
                None => map.remove(key),
            };
        }
        config
    })
}

fn fixture_adapter_config() -> Value {
    let path = common::fixture("llama3").join("adapter").join(peft::CONFIG_FILE);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The default model's tokenizer, loaded once.
fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let model = common::repo().join("data/default-model");
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap()
    })
}

/// A row of a data file: mostly objects with the columns the formats read, holding anything.
fn data_row() -> impl Strategy<Value = Value> {
    let column = prop::sample::select(vec![
        "text",
        "instruction",
        "input",
        "output",
        "segments",
        "messages",
        "conversations",
        "system",
        "tools",
        "chosen",
        "label",
    ]);
    prop_oneof![
        3 => prop::collection::btree_map(column, any_json(), 0..4).prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => any_json(),
    ]
}

const FORMATS: [DataFormat; 4] =
    [DataFormat::Completion, DataFormat::Alpaca, DataFormat::InputOutput, DataFormat::Chat];

/// Reads `body` as a data file named `name` and prepares it in every format.
fn prepare_all_ways(name: &str, body: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    let model = common::repo().join("data/default-model");
    let chat = ChatFormat::resolve("chatml", &model).unwrap();
    let rows = read_rows(&path, "train");
    for format in FORMATS {
        let mut cfg = Config::new(&model, &path);
        cfg.data.format = format;
        if let Ok(rows) = &rows {
            for record in &rows.records {
                let _ = segments(record, &cfg.data, Some(&chat));
            }
        }
        let _ = prepare(&path, &cfg.data, tokenizer(), Some(&chat));
    }
}

/// A chat turn: OpenAI or ShareGPT keys, known and unknown roles, content of any shape.
fn turn() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        3 => prop::sample::select(vec![
            "user", "human", "assistant", "gpt", "system", "tool", "function_call", "observation",
        ])
        .prop_map(Value::from),
        1 => any_json(),
    ];
    let content = prop_oneof![
        3 => ".{0,16}".prop_map(Value::String),
        1 => prop::collection::vec(
            (prop::sample::select(vec!["text", "reasoning", "tool_call", "image"]), any_json())
                .prop_map(|(kind, v)| json!({"type": kind, "text": v, "value": v})),
            0..3,
        )
        .prop_map(Value::Array),
        1 => any_json(),
    ];
    let extra = prop::collection::btree_map(
        prop::sample::select(vec!["tool_calls", "reasoning_content", "name", "tool_call_id"]),
        any_json(),
        0..2,
    );
    (any::<bool>(), role, content, extra).prop_map(|(openai, role, content, extra)| {
        let (r, c) = if openai { ("role", "content") } else { ("from", "value") };
        let mut turn: Map<String, Value> = extra.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        turn.insert(r.into(), role);
        turn.insert(c.into(), content);
        Value::Object(turn)
    })
}

/// The templates chat rows are rendered with: the built-ins, and Qwen3's own (which renders
/// tools, tool calls and reasoning) from the shared assets.
fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut templates =
            vec![ChatTemplate::builtin("chatml").unwrap(), ChatTemplate::builtin("llama3").unwrap()];
        if let Some(assets) = common::assets() {
            let qwen3 = ChatTemplate::from_model_dir(&assets.join("tokenizers/qwen3")).unwrap();
            templates.push(qwen3.expect("the qwen3 tokenizer has a chat template"));
        }
        templates
    })
}

proptest! {
    #![proptest_config(Cases { cases: 256, failure_persistence: None, ..Cases::default() })]

    #[test]
    fn safetensors_readers_never_panic_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        read_all_ways(&bytes);
    }

    #[test]
    fn safetensors_readers_never_panic_on_random_headers(bytes in safetensors_file()) {
        read_all_ways(&bytes);
    }

    #[test]
    fn adapter_config_never_panics(config in adapter_config()) {
        let path = Path::new("adapter/adapter_config.json");
        if let Ok(adapter) = AdapterConfig::from_value(path, config) {
            let _ = adapter.lora_config();
        }
    }

    #[test]
    fn chat_input_never_panics(
        turns in prop::collection::vec(turn(), 0..4),
        system in prop::option::of(any_json()),
        tools in prop::option::of(any_json()),
    ) {
        let mut fields = Map::new();
        fields.insert("messages".into(), Value::Array(turns));
        if let Some(s) = system { fields.insert("system".into(), s); }
        if let Some(t) = tools { fields.insert("tools".into(), t); }
        if let Ok(conversation) = chat::parse_conversation(Path::new("chat.jsonl"), 1, &fields, None, "tools") {
            for template in templates() {
                for train_on in [TrainOn::Assistant, TrainOn::Last, TrainOn::All] {
                    let _ = chat::render_segments(template, &conversation, train_on);
                }
            }
        }
    }
}

proptest! {
    // Each case tokenizes its rows in every format: fewer cases.
    #![proptest_config(Cases { cases: 64, failure_persistence: None, ..Cases::default() })]

    #[test]
    fn data_rows_never_panic(rows in prop::collection::vec(data_row(), 1..4)) {
        let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
        prepare_all_ways("rows.jsonl", body.as_bytes());
        let array = Value::Array(rows).to_string();
        prepare_all_ways("rows.json", array.as_bytes());
    }

    #[test]
    fn data_files_never_panic_on_random_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        name in prop::sample::select(vec!["d.jsonl", "d.json", "d.txt", "d.parquet", "d.arrow"]),
        magic in prop::sample::select(vec![&b""[..], b"PAR1", b"ARROW1\0\0", b"\xff\xff\xff\xff", b"{", b"["]),
    ) {
        prepare_all_ways(name, &[magic, &bytes].concat());
    }

    #[test]
    fn adapter_loading_never_panics(
        mut config in adapter_config(),
        // The rank sizes the matrices allocated before the weights are read: try it often.
        r in prop::option::of(prop_oneof![0u64..16, prop::sample::select(vec![1 << 31, 1 << 40, 1 << 63, u64::MAX])]),
    ) {
        if let Some(r) = r {
            config["r"] = r.into();
        }
        let dir = tempfile::tempdir().unwrap();
        let source = common::fixture("llama3").join("adapter");
        std::fs::copy(source.join(peft::WEIGHTS_FILE), dir.path().join(peft::WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.path().join(peft::CONFIG_FILE), config.to_string()).unwrap();
        let mut model = load_model(&common::fixture("llama3"), Kind::Float, Device::Cpu).unwrap();
        let _ = peft::load(dir.path(), &mut model, Device::Cpu);
    }
}
