//! Data sources: every real data file in `$LORAFIT_ASSETS/datasets` (JSON, JSON Lines, text,
//! Parquet, Arrow IPC stream and file, `save_to_disk` folders) and small files written here for
//! the error cases, patterns and split selection.

use arrow2::array::{
    Array, BinaryArray, BooleanArray, DictionaryArray, FixedSizeListArray, Float32Array, Float64Array,
    Int32Array, Int64Array, Int8Array, ListArray, MutableDictionaryArray, MutableUtf8Array, NullArray,
    StructArray, TryExtend, UInt64Array, Utf8Array,
};
use arrow2::chunk::Chunk;
use arrow2::datatypes::{DataType, Field, Schema};
use lorafit::data::source::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

mod common;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `$LORAFIT_ASSETS/datasets`, or `None` when the test is skipped.
fn datasets() -> Option<PathBuf> {
    let dir = common::assets()?.join("datasets");
    assert!(dir.is_dir(), "LORAFIT_ASSETS is set but {} is missing", dir.display());
    Some(dir)
}

/// Every record of `path`, the `train` split of a `DatasetDict`: what a run reads by default.
fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    read_split(path, "train")
}

fn str_of<'a>(r: &'a Record, key: &str) -> &'a str {
    r.fields[key].as_str().unwrap_or_else(|| panic!("row {}: `{key}` is not a string", r.row))
}

fn keys(r: &Record) -> Vec<&str> {
    let mut k: Vec<&str> = r.fields.keys().map(String::as_str).collect();
    k.sort();
    k
}

fn fields(records: &[Record]) -> Vec<&Map<String, Value>> {
    records.iter().map(|r| &r.fields).collect()
}

fn rows(records: &[Record]) -> Vec<usize> {
    records.iter().map(|r| r.row).collect()
}

fn err_text(result: anyhow::Result<Vec<Record>>) -> String {
    match result {
        Ok(records) => panic!("expected an error, got {} records", records.len()),
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!("error: {text}");
            text
        }
    }
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

type Columns = Vec<(&'static str, Box<dyn Array>)>;

fn schema_chunk(columns: Columns) -> (Schema, Chunk<Box<dyn Array>>) {
    let fields =
        columns.iter().map(|(name, a)| Field::new(*name, a.data_type().clone(), true)).collect::<Vec<_>>();
    let arrays = columns.into_iter().map(|(_, a)| a).collect();
    (Schema::from(fields), Chunk::new(arrays))
}

fn write_parquet(path: &Path, columns: Columns) {
    write_parquet_groups(path, vec![columns]);
}

/// A Parquet file with one row group per chunk (zstd pages).
fn write_parquet_groups(path: &Path, groups: Vec<Columns>) {
    use arrow2::io::parquet::write::*;
    let mut schema = None;
    let chunks: Vec<_> = groups
        .into_iter()
        .map(|columns| {
            let (s, chunk) = schema_chunk(columns);
            schema = Some(s);
            Ok(chunk)
        })
        .collect();
    let schema = schema.unwrap();
    let options = WriteOptions {
        write_statistics: true,
        compression: CompressionOptions::Zstd(None),
        version: Version::V2,
        data_pagesize_limit: None,
    };
    let encodings = schema.fields.iter().map(|f| transverse(&f.data_type, |_| Encoding::Plain)).collect();
    let groups = RowGroupIterator::try_new(chunks.into_iter(), &schema, options, encodings).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = FileWriter::try_new(file, schema, options).unwrap();
    for group in groups {
        writer.write(group.unwrap()).unwrap();
    }
    writer.end(None).unwrap();
}

/// An Arrow IPC stream (the `save_to_disk` layout), one record batch per chunk.
fn write_ipc_stream(path: &Path, chunks: Vec<Columns>) {
    use arrow2::io::ipc::write::*;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let file = std::fs::File::create(path).unwrap();
    let mut writer = StreamWriter::new(file, WriteOptions { compression: None });
    let mut started = false;
    for columns in chunks {
        let (schema, chunk) = schema_chunk(columns);
        if !started {
            writer.start(&schema, None).unwrap();
            started = true;
        }
        writer.write(&chunk, None).unwrap();
    }
    writer.finish().unwrap();
}

fn write_ipc_file(path: &Path, columns: Columns) {
    use arrow2::io::ipc::write::*;
    let (schema, chunk) = schema_chunk(columns);
    let file = std::fs::File::create(path).unwrap();
    let mut writer = FileWriter::try_new(file, schema, None, WriteOptions { compression: None }).unwrap();
    writer.write(&chunk, None).unwrap();
    writer.finish().unwrap();
}

fn texts(values: &[&str]) -> Box<dyn Array> {
    Utf8Array::<i32>::from_slice(values).boxed()
}

/// `conversations: list<struct<from: string, value: string>>`, ShareGPT's layout.
fn conversations(rows: &[&[(&str, &str)]]) -> Box<dyn Array> {
    let from: Vec<&str> = rows.iter().flat_map(|r| r.iter().map(|t| t.0)).collect();
    let value: Vec<&str> = rows.iter().flat_map(|r| r.iter().map(|t| t.1)).collect();
    let turn_type = DataType::Struct(vec![
        Field::new("from", DataType::Utf8, true),
        Field::new("value", DataType::Utf8, true),
    ]);
    let turns = StructArray::new(turn_type.clone(), vec![texts(&from), texts(&value)], None);
    let mut offsets = vec![0i32];
    for r in rows {
        offsets.push(offsets.last().unwrap() + r.len() as i32);
    }
    ListArray::<i32>::new(
        DataType::List(Box::new(Field::new("item", turn_type, true))),
        offsets.try_into().unwrap(),
        turns.boxed(),
        None,
    )
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// The real data sets: JSON, JSON Lines, text.

#[test]
fn alpaca_tiny_json_array() {
    let Some(dir) = datasets() else { return };
    let path = dir.join("alpaca/alpaca_tiny_torchtune.json");
    let records = read_records(&path).unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(rows(&records), (1..=100).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.file == path));
    assert!(records.iter().all(|r| keys(r) == ["input", "instruction", "output", "text"]));
    let first = &records[0];
    assert_eq!(str_of(first, "instruction"), "Give three tips for staying healthy.");
    assert_eq!(str_of(first, "input"), "");
    assert!(str_of(first, "output").starts_with("1.Eat a balanced diet and make sure"));
    assert_eq!(str_of(&records[5], "input"), "Twitter, Instagram, Telegram");
    assert_eq!(str_of(&records[99], "instruction"), "Classify the following statement as true or false.");
}

#[test]
fn alpaca_seed_tasks_jsonl() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("alpaca/seed_tasks.jsonl")).unwrap();
    assert_eq!(records.len(), 175);
    assert_eq!(rows(&records), (1..=175).collect::<Vec<_>>());
    let first = &records[0];
    assert_eq!(keys(first), ["id", "instances", "instruction", "is_classification", "name"]);
    assert_eq!(str_of(first, "id"), "seed_task_0");
    assert_eq!(str_of(first, "name"), "breakfast_suggestion");
    assert!(str_of(first, "instruction").starts_with("Is there anything I can eat for a breakfast"));
    assert_eq!(first.fields["is_classification"], json!(false));
    assert_eq!(first.fields["instances"][0]["input"], json!(""));
    assert!(first.fields["instances"][0]["output"]
        .as_str()
        .unwrap()
        .starts_with("Yes, you can have 1 oatmeal banana protein shake"));
    assert_eq!(str_of(&records[174], "id"), "seed_task_174");
    assert_eq!(str_of(&records[174], "name"), "fact_checking");
}

#[test]
fn alpaca_identity_json() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("alpaca/identity_llamafactory.json")).unwrap();
    assert_eq!(records.len(), 91);
    assert!(records.iter().all(|r| keys(r) == ["input", "instruction", "output"]));
    assert_eq!(str_of(&records[0], "instruction"), "hi");
    assert_eq!(
        str_of(&records[0], "output"),
        "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"
    );
    assert_eq!(str_of(&records[90], "instruction"), "你是OpenAI开发的ChatGPT吗？");
    assert_eq!(records[90].row, 91);
}

#[test]
fn dolly_jsonl() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("dolly/dolly_prompt_answer_151.jsonl")).unwrap();
    assert_eq!(records.len(), 151);
    assert!(records.iter().all(|r| keys(r) == ["answer", "prompt"]));
    let first = &records[0];
    assert!(str_of(first, "prompt").starts_with("Below is an instruction that describes a task."));
    assert!(str_of(first, "prompt")
        .ends_with("### Instruction:\nWhy is Citizen Kane considered the Best Film?\n\n### Response:"));
    assert!(str_of(first, "answer").starts_with("The American Film Institute and the British"));
}

#[test]
fn sharegpt_fastchat_json() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("sharegpt/dummy_conversation_fastchat.json")).unwrap();
    assert_eq!(records.len(), 500);
    assert!(records.iter().all(|r| keys(r) == ["conversations", "id"]));
    assert_eq!(str_of(&records[0], "id"), "identity_0");
    assert_eq!(
        records[0].fields["conversations"],
        json!([
            {"from": "human", "value": "Who are you?"},
            {"from": "gpt", "value": "I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS)."},
            {"from": "human", "value": "Have a nice day!"},
            {"from": "gpt", "value": "You too!"}
        ])
    );
    assert_eq!(str_of(&records[499], "id"), "identity_499");
    assert_eq!(records[499].fields["conversations"].as_array().unwrap().len(), 2);
}

#[test]
fn sharegpt_chat_tiny_json() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("sharegpt/chat_tiny_torchtune.json")).unwrap();
    assert_eq!(records.len(), 1);
    let turns = records[0].fields["conversations"].as_array().unwrap();
    assert_eq!(turns.len(), 5);
    assert_eq!(turns[0], json!({"from": "system", "value": "You are an AI assistant."}));
    assert_eq!(turns[4], json!({"from": "gpt", "value": "I agree."}));
}

#[test]
fn sharegpt_openai_messages_jsonl() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("sharegpt/v1_sft_demo_llamafactory.jsonl")).unwrap();
    assert_eq!(records.len(), 500);
    assert!(records.iter().all(|r| keys(r) == ["messages"]));
    let messages = &records[0].fields["messages"];
    assert_eq!(
        messages[0],
        json!({"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0})
    );
    assert_eq!(messages[1]["role"], json!("assistant"));
    assert_eq!(messages[1]["loss_weight"], json!(1.0));
}

#[test]
fn c4_text_jsonl() {
    let Some(dir) = datasets() else { return };
    let records = read_records(&dir.join("sharegpt/c4_demo_llamafactory.jsonl")).unwrap();
    assert_eq!(records.len(), 300);
    assert!(records.iter().all(|r| keys(r) == ["text"]));
    assert!(str_of(&records[0], "text")
        .starts_with("Don’t think you need all the bells and whistles? No problem."));
}

#[test]
fn tinyshakespeare_paragraphs() {
    let Some(dir) = datasets() else { return };
    let path = dir.join("tinyshakespeare/input.txt");
    let records = read_records(&path).unwrap();
    assert_eq!(records.len(), 7222);
    assert!(records.iter().all(|r| keys(r) == ["text"] && r.file == path));
    assert_eq!(records[0].row, 1);
    assert_eq!(str_of(&records[0], "text"), "First Citizen:\nBefore we proceed any further, hear me speak.");
    assert_eq!(records[1].row, 4);
    assert_eq!(str_of(&records[1], "text"), "All:\nSpeak, speak.");
    let last = &records[7221];
    assert_eq!(last.row, 39997);
    assert_eq!(
        str_of(last, "text"),
        "ANTONIO:\nNoble Sebastian,\nThou let'st thy fortune sleep--die, rather; wink'st\nWhiles thou art waking."
    );
    // Every non-blank line lands in exactly one paragraph.
    let text = std::fs::read_to_string(&path).unwrap();
    let non_blank = text.lines().filter(|l| !l.trim().is_empty()).count();
    let kept: usize = records.iter().map(|r| str_of(r, "text").lines().count()).sum();
    assert_eq!(kept, non_blank);
}

// ---------------------------------------------------------------------------------------------
// The real data sets as Hugging Face `datasets` wrote them.

#[test]
fn alpaca_save_to_disk_equals_json_source() {
    let Some(dir) = datasets() else { return };
    let json = read_records(&dir.join("alpaca/alpaca_tiny_torchtune.json")).unwrap();
    let saved = dir.join("hf-arrow-parquet/alpaca_tiny_save_to_disk");
    let records = read_records(&saved).unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(str_of(&records[0], "instruction"), "Give three tips for staying healthy.");
    assert_eq!(fields(&records), fields(&json));
    assert_eq!(rows(&records), (1..=100).collect::<Vec<_>>());
    let shard = saved.join("train/data-00000-of-00001.arrow");
    assert!(records.iter().all(|r| r.file == shard));
    // The same split by name, the Dataset folder itself, and the shard file alone.
    assert_eq!(read_split(&saved, "train").unwrap(), records);
    assert_eq!(read_split(&saved.join("train"), "ignored").unwrap(), records);
    assert_eq!(read_records(&shard).unwrap(), records);
    let e = err_text(read_split(&saved, "test"));
    assert!(e.contains("alpaca_tiny_save_to_disk") && e.contains("`test`") && e.contains("train"), "{e}");
}

#[test]
fn sharegpt_save_to_disk_equals_json_source() {
    let Some(dir) = datasets() else { return };
    let json = read_records(&dir.join("sharegpt/dummy_conversation_fastchat.json")).unwrap();
    let records = read_records(&dir.join("hf-arrow-parquet/sharegpt_dummy_save_to_disk")).unwrap();
    assert_eq!(records.len(), 500);
    assert_eq!(str_of(&records[0], "id"), "identity_0");
    assert_eq!(records[0].fields["conversations"][0], json!({"from": "human", "value": "Who are you?"}));
    assert_eq!(fields(&records), fields(&json));
}

#[test]
fn alpaca_parquet_equals_json_source() {
    let Some(dir) = datasets() else { return };
    let json = read_records(&dir.join("alpaca/alpaca_tiny_torchtune.json")).unwrap();
    let path = dir.join("hf-arrow-parquet/alpaca_tiny_parquet/data/train-00000-of-00001.parquet");
    let records = read_records(&path).unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(str_of(&records[99], "instruction"), "Classify the following statement as true or false.");
    assert_eq!(fields(&records), fields(&json));
    assert_eq!(rows(&records), (1..=100).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.file == path));
}

#[test]
fn sharegpt_parquet_equals_json_source() {
    let Some(dir) = datasets() else { return };
    let json = read_records(&dir.join("sharegpt/dummy_conversation_fastchat.json")).unwrap();
    let path = dir.join("hf-arrow-parquet/sharegpt_dummy_parquet/data/train-00000-of-00001.parquet");
    let records = read_records(&path).unwrap();
    assert_eq!(records.len(), 500);
    // list<struct<from, value>> comes out as a list of {from, value} objects.
    let turns = records[0].fields["conversations"].as_array().unwrap();
    assert_eq!(turns.len(), 4);
    assert!(turns.iter().all(|t| t.as_object().unwrap().keys().collect::<Vec<_>>() == ["from", "value"]));
    assert_eq!(turns[3], json!({"from": "gpt", "value": "You too!"}));
    assert_eq!(fields(&records), fields(&json));
}

#[test]
fn alpaca_ipc_file_equals_json_source() {
    let Some(dir) = datasets() else { return };
    let json = read_records(&dir.join("alpaca/alpaca_tiny_torchtune.json")).unwrap();
    let records = read_records(&dir.join("hf-arrow-parquet/alpaca_tiny.ipc_file.arrow")).unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(str_of(&records[0], "input"), "");
    assert_eq!(fields(&records), fields(&json));
}

#[test]
fn pattern_over_the_hub_style_parquet_folders() {
    let Some(dir) = datasets() else { return };
    let pattern = dir.join("hf-arrow-parquet/*_parquet/data/*.parquet");
    let paths = expand_paths(&pattern).unwrap();
    assert_eq!(
        paths,
        [
            dir.join("hf-arrow-parquet/alpaca_tiny_parquet/data/train-00000-of-00001.parquet"),
            dir.join("hf-arrow-parquet/sharegpt_dummy_parquet/data/train-00000-of-00001.parquet"),
        ]
    );
    let records = read_records(&pattern).unwrap();
    assert_eq!(records.len(), 600);
    assert_eq!(records[0].file, paths[0]);
    assert_eq!(records[100].file, paths[1]);
    assert_eq!(records[100].row, 1);
    assert_eq!(str_of(&records[100], "id"), "identity_0");
    // The Hub-style folder itself is not a save_to_disk dataset; the error suggests a pattern.
    let e = err_text(read_records(&dir.join("hf-arrow-parquet/alpaca_tiny_parquet")));
    assert!(e.contains("neither") && e.contains("data/*.parquet"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// JSON shapes and sniffing, with small files.

#[test]
fn json_object_holding_one_list() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "wrapped.json", r#"{"data": [{"text": "a"}, {"text": "b"}]}"#);
    let records = read_records(&p).unwrap();
    assert_eq!(rows(&records), [1, 2]);
    assert_eq!(str_of(&records[1], "text"), "b");

    // Any single key works, and pretty-printing does not matter.
    let p = write(tmp.path(), "rows.json", "{\n  \"rows\": [\n    {\"text\": \"x\"}\n  ]\n}\n");
    assert_eq!(str_of(&read_records(&p).unwrap()[0], "text"), "x");

    // Any other single object is one record.
    let p = write(tmp.path(), "one.json", r#"{"text": "solo", "n": 1}"#);
    let records = read_records(&p).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].fields["n"], json!(1));

    // In a .jsonl file the same shape is one record per line.
    let p = write(tmp.path(), "lines.jsonl", "{\"data\": [{\"text\": \"a\"}]}\n");
    let records = read_records(&p).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(keys(&records[0]), ["data"]);

    // The list's elements must be objects.
    let p = write(tmp.path(), "bad_list.json", r#"{"data": [{"text": "a"}, 7]}"#);
    let e = err_text(read_records(&p));
    assert!(e.contains("bad_list.json:2:") && e.contains("`data`") && e.contains("a number"), "{e}");
}

#[test]
fn json_lines_without_extension_and_datasets_to_json() {
    let tmp = tempfile::tempdir().unwrap();
    // `Dataset.to_json` writes JSON Lines into a .json file.
    let p = write(tmp.path(), "to_json.json", "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n");
    let records = read_records(&p).unwrap();
    assert_eq!(rows(&records), [1, 3]);
    let p = write(tmp.path(), "noext", "\u{FEFF}{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n");
    assert_eq!(read_records(&p).unwrap().len(), 2);
}

#[test]
fn plain_text_is_sniffed_and_txt_breaks_ties() {
    let tmp = tempfile::tempdir().unwrap();
    // A .txt file is text even when it starts like JSON.
    let p = write(tmp.path(), "notes.txt", "{not json}\nsecond line\n\n\n  \nnext\n");
    let records = read_records(&p).unwrap();
    assert_eq!(
        records.iter().map(|r| str_of(r, "text")).collect::<Vec<_>>(),
        ["{not json}\nsecond line", "next"]
    );
    assert_eq!(rows(&records), [1, 6]);
    // Any UTF-8 file that does not start with `{` or `[` is text.
    let p = write(tmp.path(), "story.data", "Once upon a time.\n\nThe end.");
    let records = read_records(&p).unwrap();
    assert_eq!(str_of(&records[1], "text"), "The end.");
    // A .json file that does not start like JSON is an error, not text.
    let p = write(tmp.path(), "prose.json", "Once upon a time.");
    let e = err_text(read_records(&p));
    assert!(e.contains("prose.json:1:") && e.contains(".txt"), "{e}");
}

#[test]
fn binary_formats_are_sniffed_from_bytes_not_names() {
    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("parquet.bin");
    write_parquet(&parquet, vec![("text", texts(&["p"]))]);
    assert_eq!(str_of(&read_records(&parquet).unwrap()[0], "text"), "p");
    let stream = tmp.path().join("stream.dat");
    write_ipc_stream(&stream, vec![vec![("text", texts(&["s"]))]]);
    assert_eq!(str_of(&read_records(&stream).unwrap()[0], "text"), "s");
    let file = tmp.path().join("file.data");
    write_ipc_file(&file, vec![("text", texts(&["f"]))]);
    assert_eq!(str_of(&read_records(&file).unwrap()[0], "text"), "f");
}

// ---------------------------------------------------------------------------------------------
// Arrow → JSON values, through files written with arrow2.

#[test]
fn parquet_zstd_nested_and_null_values() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("chat.parquet");
    let ids = Int64Array::from([Some(1), None, Some(3)]).boxed();
    let score = Float64Array::from([Some(0.5), Some(-2.0), None]).boxed();
    let ok = BooleanArray::from([Some(true), Some(false), None]).boxed();
    let note = Utf8Array::<i32>::from([Some("x"), None, Some("z")]).boxed();
    let conv = conversations(&[&[("human", "hi"), ("gpt", "hello")], &[], &[("human", "bye")]]);
    write_parquet(
        &path,
        vec![("id", ids), ("score", score), ("ok", ok), ("note", note), ("conversations", conv)],
    );
    let records = read_records(&path).unwrap();
    assert_eq!(
        fields(&records).into_iter().map(|f| Value::Object(f.clone())).collect::<Vec<_>>(),
        [
            json!({"id": 1, "score": 0.5, "ok": true, "note": "x",
                   "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}),
            json!({"id": null, "score": -2.0, "ok": false, "note": null, "conversations": []}),
            json!({"id": 3, "score": null, "ok": null, "note": "z",
                   "conversations": [{"from": "human", "value": "bye"}]}),
        ]
    );
}

#[test]
fn parquet_row_groups_keep_their_order() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("groups.parquet");
    write_parquet_groups(
        &path,
        vec![
            vec![("text", texts(&["a", "b"]))],
            vec![("text", texts(&["c"]))],
            vec![("text", texts(&["d", "e"]))],
        ],
    );
    let records = read_records(&path).unwrap();
    assert_eq!(records.iter().map(|r| str_of(r, "text")).collect::<Vec<_>>(), ["a", "b", "c", "d", "e"]);
    assert_eq!(rows(&records), [1, 2, 3, 4, 5]);
}

#[test]
fn ipc_stream_large_fixed_and_null_types() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("types.arrow");
    let large_text = Utf8Array::<i64>::from([Some("big"), None]).boxed();
    let item = |t: DataType| Box::new(Field::new("item", t, true));
    let large_list = ListArray::<i64>::new(
        DataType::LargeList(item(DataType::Int32)),
        vec![0i64, 3, 3].try_into().unwrap(),
        Int32Array::from_slice([1, 2, 3]).boxed(),
        Some(vec![true, false].into()),
    )
    .boxed();
    let pair = FixedSizeListArray::new(
        DataType::FixedSizeList(item(DataType::Float32), 2),
        Float32Array::from_slice([0.5, 0.25, -1.0, 8.0]).boxed(),
        None,
    )
    .boxed();
    let big = UInt64Array::from_slice([u64::MAX, 0]).boxed();
    let small = Int8Array::from_slice([-128, 127]).boxed();
    let nothing = NullArray::new(DataType::Null, 2).boxed();
    write_ipc_stream(
        &path,
        vec![vec![
            ("large_text", large_text),
            ("large_list", large_list),
            ("pair", pair),
            ("big", big),
            ("small", small),
            ("nothing", nothing),
        ]],
    );
    let records = read_records(&path).unwrap();
    let values: Vec<Value> = records.iter().map(|r| Value::Object(r.fields.clone())).collect();
    assert_eq!(
        values,
        [
            json!({"large_text": "big", "large_list": [1, 2, 3], "pair": [0.5, 0.25],
                   "big": u64::MAX, "small": -128, "nothing": null}),
            json!({"large_text": null, "large_list": null, "pair": [-1.0, 8.0],
                   "big": 0, "small": 127, "nothing": null}),
        ]
    );
}

#[test]
fn ipc_file_dictionary_strings_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dict.arrow");
    let mut dict = MutableDictionaryArray::<i32, MutableUtf8Array<i32>>::new();
    dict.try_extend([Some("human"), Some("gpt"), None, Some("human")]).unwrap();
    let dict: DictionaryArray<i32> = dict.into();
    write_ipc_file(&path, vec![("role", dict.boxed()), ("text", texts(&["a", "b", "c", "d"]))]);
    let records = read_records(&path).unwrap();
    let roles: Vec<&Value> = records.iter().map(|r| &r.fields["role"]).collect();
    assert_eq!(roles, [&json!("human"), &json!("gpt"), &Value::Null, &json!("human")]);
}

#[test]
fn unsupported_arrow_type_names_file_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("images.parquet");
    write_parquet(
        &path,
        vec![("text", texts(&["a"])), ("pixels", BinaryArray::<i32>::from_slice([b"\x89PNG"]).boxed())],
    );
    let e = err_text(read_records(&path));
    assert!(e.contains("images.parquet") && e.contains("`pixels`") && e.contains("Binary"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// save_to_disk folders written here: split selection, shard order.

fn save_to_disk_dict(root: &Path) {
    write(root, "dataset_dict.json", r#"{"splits": ["train", "test"]}"#);
    // Two train shards; state.json's order, not the names' order, is the row order.
    write_ipc_stream(
        &root.join("train/data-00001-of-00002.arrow"),
        vec![vec![("text", texts(&["t1", "t2"]))]],
    );
    write_ipc_stream(
        &root.join("train/data-00000-of-00002.arrow"),
        vec![vec![("text", texts(&["t3"]))], vec![("text", texts(&["t4", "t5"]))]],
    );
    write(
        root,
        "train/state.json",
        r#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"},
                             {"filename": "data-00000-of-00002.arrow"}],
            "_fingerprint": "x", "_split": null}"#,
    );
    write(root, "train/dataset_info.json", "{}");
    write_ipc_stream(&root.join("test/data-00000-of-00001.arrow"), vec![vec![("text", texts(&["e1"]))]]);
    write(root, "test/state.json", r#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}"#);
    write(root, "test/dataset_info.json", "{}");
}

#[test]
fn dataset_dict_split_selection() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("saved");
    save_to_disk_dict(&root);

    let train = read_records(&root).unwrap();
    assert_eq!(train.iter().map(|r| str_of(r, "text")).collect::<Vec<_>>(), ["t1", "t2", "t3", "t4", "t5"]);
    // Rows count within each shard (across its record batches), and name the shard.
    assert_eq!(rows(&train), [1, 2, 1, 2, 3]);
    assert_eq!(train[0].file, root.join("train/data-00001-of-00002.arrow"));
    assert_eq!(train[4].file, root.join("train/data-00000-of-00002.arrow"));

    let test = read_split(&root, "test").unwrap();
    assert_eq!(str_of(&test[0], "text"), "e1");
    // A Dataset folder ignores the split name.
    assert_eq!(read_split(&root.join("test"), "train").unwrap(), test);

    let e = err_text(read_split(&root, "validation"));
    assert!(e.contains("saved") && e.contains("`validation`") && e.contains("train, test"), "{e}");
}

#[test]
fn broken_save_to_disk_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("saved");
    save_to_disk_dict(&root);
    std::fs::remove_file(root.join("train/data-00000-of-00002.arrow")).unwrap();
    let e = err_text(read_records(&root));
    assert!(e.contains("state.json") && e.contains("data-00000-of-00002.arrow"), "{e}");

    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    write(&plain, "notes.md", "x");
    let e = err_text(read_records(&plain));
    assert!(e.contains("plain") && e.contains("neither") && e.contains("DatasetDict"), "{e}");

    write(&plain, "state.json", "{\"_data_files\": 3}");
    let e = err_text(read_records(&plain));
    assert!(e.contains("state.json") && e.contains("_data_files"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Patterns.

#[test]
fn patterns_expand_sorted_per_component() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    write(t, "b/3.jsonl", "{\"text\": \"3\"}\n");
    write(t, "a/2.jsonl", "{\"text\": \"2\"}\n");
    write(t, "a/1.jsonl", "{\"text\": \"1\"}\n{\"text\": \"1b\"}\n");
    write(t, "a/10.jsonl", "{\"text\": \"10\"}\n");
    write(t, "a/.9.jsonl", "{\"text\": \"hidden\"}\n");
    write(t, "b/skip.txt", "no");

    let paths = expand_paths(&t.join("*/?.jsonl")).unwrap();
    assert_eq!(paths, [t.join("a/1.jsonl"), t.join("a/2.jsonl"), t.join("b/3.jsonl")]);
    let paths = expand_paths(&t.join("a/*")).unwrap();
    assert_eq!(paths, [t.join("a/1.jsonl"), t.join("a/10.jsonl"), t.join("a/2.jsonl")]);
    assert_eq!(expand_paths(&t.join("a/.*")).unwrap(), [t.join("a/.9.jsonl")]);
    // Without wildcards: the path itself.
    assert_eq!(expand_paths(&t.join("b")).unwrap(), [t.join("b")]);

    let records = read_records(&t.join("*/?.jsonl")).unwrap();
    assert_eq!(records.iter().map(|r| str_of(r, "text")).collect::<Vec<_>>(), ["1", "1b", "2", "3"]);
    assert_eq!(rows(&records), [1, 2, 1, 1]);
    assert_eq!(records[3].file, t.join("b/3.jsonl"));

    let e = format!("{:#}", expand_paths(&t.join("c*/*.jsonl")).unwrap_err());
    assert!(e.contains("no file matches") && e.contains("c*/*.jsonl"), "{e}");
    let e = err_text(read_records(&t.join("a/*.parquet")));
    assert!(e.contains("a/*.parquet"), "{e}");
    let e = format!("{:#}", expand_paths(&t.join("missing.jsonl")).unwrap_err());
    assert!(e.contains("missing.jsonl") && e.contains("does not exist"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Errors: each names the file, the row where there is one, and what to do.

#[test]
fn error_missing_and_unreadable_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err_text(read_records(&tmp.path().join("nope.jsonl")));
    assert!(e.contains("nope.jsonl") && e.contains("does not exist"), "{e}");

    // Without read permission (where permissions apply: not for root).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = write(tmp.path(), "locked.jsonl", "{\"text\": \"a\"}\n");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::File::open(&p).is_err() {
            let e = err_text(read_records(&p));
            assert!(e.contains("locked.jsonl") && e.contains("cannot read"), "{e}");
        } else {
            eprintln!("permission check skipped: this user reads any file");
        }
    }
}

#[test]
fn error_empty_files() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("empty.jsonl", ""),
        ("blank.txt", "\n  \n\n"),
        ("empty_array.json", "[]"),
        ("empty_list.json", "{\"data\": []}"),
    ] {
        let p = write(tmp.path(), name, body);
        let e = err_text(read_records(&p));
        assert!(e.contains(name) && (e.contains("empty") || e.contains("no records")), "{e}");
    }
    let p = write(tmp.path(), "zero.parquet", "");
    let e = err_text(read_records(&p));
    assert!(e.contains("zero.parquet") && e.contains("empty"), "{e}");
    // A Parquet file with no rows is empty too.
    let p = tmp.path().join("none.parquet");
    write_parquet(&p, vec![("text", texts(&[]))]);
    let e = err_text(read_records(&p));
    assert!(e.contains("none.parquet") && e.contains("no records"), "{e}");
}

#[test]
fn error_json_array_element_not_an_object() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "mixed.json", "[\n{\"text\": \"a\"},\n{\"text\": \"b\"},\n\"c\"\n]");
    let e = err_text(read_records(&p));
    assert!(
        e.contains("mixed.json:3:") && e.contains("element 3 of the JSON array") && e.contains("a string"),
        "{e}"
    );
    // A syntax error in an array names the line.
    let p = write(tmp.path(), "broken.json", "[\n{\"text\": \"a\"},\n{\"text\": }\n]");
    let e = err_text(read_records(&p));
    assert!(e.contains("broken.json:3:"), "{e}");
}

#[test]
fn error_malformed_json_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "data.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("data.jsonl:3:") && e.contains("line 3") && e.contains("one JSON object"), "{e}");
    // A line that is valid JSON but not an object.
    let p = write(tmp.path(), "nums.jsonl", "{\"text\": \"a\"}\n42\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("nums.jsonl:2:") && e.contains("a number"), "{e}");
    // A pretty-printed document in a .jsonl file gets a hint.
    let p = write(tmp.path(), "pretty.jsonl", "{\n  \"text\": \"a\"\n}\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("pretty.jsonl:1:") && e.contains(".json"), "{e}");
    // A broken pretty-printed .json document names the line of the mistake.
    let p = write(tmp.path(), "pretty.json", "{\n  \"data\": [\n    {\"text\": \"a\",}\n  ]\n}\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("pretty.json:3:"), "{e}");
}

#[test]
fn error_non_utf8_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "latin1.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"caf\xE9\"}\n");
    let e = err_text(read_records(&p));
    // Line 1 is 14 bytes plus its newline; `{"text": "caf` is 13 more.
    assert!(e.contains("latin1.jsonl:2:") && e.contains("0xE9") && e.contains("byte offset 28"), "{e}");
    let p = write(tmp.path(), "utf16.txt", b"\xFF\xFEh\x00i\x00");
    let e = err_text(read_records(&p));
    assert!(e.contains("utf16.txt") && e.contains("UTF-16"), "{e}");
    let p = write(tmp.path(), "latin1.txt", b"abc\n\nna\xEFve\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("latin1.txt:3:") && e.contains("byte offset 7"), "{e}");
}

#[test]
fn error_compressed_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "data.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00");
    let e = err_text(read_records(&p));
    assert!(e.contains("data.jsonl.gz") && e.contains("gzip") && e.contains("decompress"), "{e}");
}

#[test]
fn error_corrupt_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.parquet");
    write_parquet(&good, vec![("text", texts(&["alpha", "beta", "gamma", "delta", "epsilon"]))]);
    let bytes = std::fs::read(&good).unwrap();

    let p = write(tmp.path(), "truncated.parquet", &bytes[..bytes.len() - 10]);
    let e = err_text(read_records(&p));
    assert!(e.contains("truncated.parquet") && e.contains("Parquet"), "{e}");

    let p = write(tmp.path(), "headonly.parquet", b"PAR1");
    let e = err_text(read_records(&p));
    assert!(e.contains("headonly.parquet") && e.contains("Parquet"), "{e}");

    let p = write(tmp.path(), "text.parquet", "{\"text\": \"a\"}\n");
    let e = err_text(read_records(&p));
    assert!(e.contains("text.parquet") && e.contains("PAR1"), "{e}");

    // Damage anywhere in the file is an error (or, where the damage hits only string bytes,
    // still a result), never a panic.
    for i in (4..bytes.len() - 4).step_by(7) {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x5A;
        let p = write(tmp.path(), "damaged.parquet", &damaged);
        if let Err(e) = read_records(&p) {
            assert!(format!("{e:#}").contains("damaged.parquet"));
        }
    }
}

#[test]
fn error_corrupt_arrow() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.arrow");
    write_ipc_stream(&good, vec![vec![("text", texts(&["alpha", "beta", "gamma"]))]]);
    let bytes = std::fs::read(&good).unwrap();

    let p = write(tmp.path(), "cut.arrow", &bytes[..bytes.len() / 2 + 8]);
    let e = err_text(read_records(&p));
    assert!(e.contains("cut.arrow") && e.contains("Arrow"), "{e}");

    let p = write(tmp.path(), "garbage.arrow", b"\xff\xff\xff\xff\x10\x00\x00\x00junkjunkjunkjunk");
    let e = err_text(read_records(&p));
    assert!(e.contains("garbage.arrow") && e.contains("Arrow"), "{e}");

    let p = write(tmp.path(), "notarrow.arrow", "hello");
    let e = err_text(read_records(&p));
    assert!(e.contains("notarrow.arrow") && e.contains("ARROW1"), "{e}");

    let file = tmp.path().join("file.arrow");
    write_ipc_file(&file, vec![("text", texts(&["a", "b"]))]);
    let fbytes = std::fs::read(&file).unwrap();
    let p = write(tmp.path(), "cutfile.arrow", &fbytes[..fbytes.len() - 12]);
    let e = err_text(read_records(&p));
    assert!(e.contains("cutfile.arrow") && e.contains("Arrow"), "{e}");

    for (name, data) in [("stream", &bytes), ("file", &fbytes)] {
        for i in (0..data.len()).step_by(5) {
            let mut damaged = data.clone();
            damaged[i] ^= 0xA5;
            let p = write(tmp.path(), &format!("damaged_{name}.arrow"), &damaged);
            if let Err(e) = read_records(&p) {
                assert!(format!("{e:#}").contains(&format!("damaged_{name}.arrow")));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files written by pyarrow (scripts/interop/write_arrow_files.py): every page and buffer
// compression, and view-typed columns.

/// Runs the writer script into a fresh folder: the folder, the rows pyarrow reads back, and the
/// list of files written.
fn pyarrow_files() -> Option<(tempfile::TempDir, Vec<Value>, Vec<Value>)> {
    let python = common::python()?;
    let dir = tempfile::tempdir().unwrap();
    let script = common::repo().join("scripts/interop/write_arrow_files.py");
    let out = std::process::Command::new(&python).arg(&script).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let read = |name: &str| -> Vec<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
    };
    let (records, files) = (read("records.json"), read("files.json"));
    Some((dir, records, files))
}

#[test]
fn compressed_parquet_and_ipc_written_by_pyarrow_read_to_the_same_records() {
    let Some((dir, want, files)) = pyarrow_files() else { return };
    let mut codecs = Vec::new();
    for file in files.iter().filter(|f| f.get("compression").is_some()) {
        let name = file["name"].as_str().unwrap();
        let records = read_records(&dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let got: Vec<Value> = records.into_iter().map(|r| Value::Object(r.fields)).collect();
        let want = if name == "default.feather" { &want[..10] } else { &want[..] };
        assert_eq!(got.len(), want.len(), "{name}: rows");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g, w, "{name}: row {}", i + 1);
        }
        if name.ends_with(".parquet") {
            codecs.push(parquet_codec(&dir.path().join(name)));
        }
    }
    // The codecs in the files' footers, so that each one was really exercised. pyarrow writes
    // LZ4_RAW for both `lz4` and `lz4_raw`; it no longer writes the hadoop-framed LZ4 codec.
    for codec in ["Gzip", "Brotli", "Lz4Raw", "Zstd", "Snappy"] {
        assert!(codecs.iter().any(|c| c == codec), "no file compressed with {codec}: {codecs:?}");
    }
}

/// The codec of the first column chunk of a Parquet file, as its footer records it.
fn parquet_codec(path: &Path) -> String {
    use arrow2::io::parquet::read::read_metadata;
    let metadata = read_metadata(&mut std::fs::File::open(path).unwrap()).unwrap();
    format!("{:?}", metadata.row_groups[0].columns()[0].compression())
}

#[test]
fn view_typed_columns_are_named_with_a_way_to_convert() {
    let Some((dir, _, files)) = pyarrow_files() else { return };
    for file in files.iter().filter(|f| f.get("view").is_some()) {
        let name = file["name"].as_str().unwrap();
        match read_records(&dir.path().join(name)) {
            // A reader that can decode views must give their values.
            Ok(records) => assert_eq!(records[0].fields["text"], json!("a"), "{name}"),
            Err(e) => {
                let text = format!("{e:#}");
                assert!(text.contains("view") && text.contains("cast(pa.string())"), "{name}: {text}");
                assert!(!text.contains("corrupt"), "{name}: {text}");
            }
        }
    }
}

#[test]
fn nested_column_paths_pick_fields_of_arrow_structs_and_json_objects() {
    use lorafit::config::{Config, DataFormat};
    use lorafit::data::format::prepare_records;
    use lorafit::data::TextTokenizer;
    use lorafit::model::ModelSpec;
    let Some((dir, want, _)) = pyarrow_files() else { return };
    let model = common::repo().join("data/default-model");
    let tok =
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap();
    // The same rows with the nested fields moved to the columns alpaca reads by default.
    let flat: Vec<Record> = want
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let fields = json!({"instruction": w["prompt"]["text"], "input": w["prompt"]["lang"], "output": w["text"]});
            Record { file: "flat".into(), row: i + 1, fields: fields.as_object().unwrap().clone() }
        })
        .collect();
    let mut cfg = Config::new(&model, "unused");
    cfg.data.format = DataFormat::Alpaca;
    let expected = prepare_records(&flat.into(), &cfg.data, &tok, None).unwrap().examples;
    let jsonl: String = want.iter().map(|w| format!("{w}\n")).collect();
    let jsonl = write(dir.path(), "nested.jsonl", jsonl);
    for (field, path) in [("instruction", "prompt.text"), ("input", "prompt.lang"), ("output", "text")] {
        cfg.data.columns.insert(field.into(), path.into());
    }
    for path in [dir.path().join("zstd.parquet"), dir.path().join("lz4.feather"), jsonl] {
        let rows = read_rows(&path, "train").unwrap();
        let prepared =
            prepare_records(&rows, &cfg.data, &tok, None).unwrap_or_else(|e| panic!("{path:?}: {e:#}"));
        assert!(prepared.examples == expected, "{}: examples differ from the flat rows'", path.display());
        // `prompt` is read through its fields, so it is not among the ignored columns.
        let notes = prepared.notes.join("\n");
        assert!(notes.contains("score") && !notes.contains("prompt"), "{notes}");
    }
}

#[test]
fn several_data_sets_mix_by_weight_each_with_its_own_format_and_columns() {
    use lorafit::config::Config;
    use lorafit::data::format::{prepare, prepare_splits, Examples};
    use lorafit::data::TextTokenizer;
    use lorafit::model::ModelSpec;
    let dir = tempfile::tempdir().unwrap();
    let stories: String =
        (0..12).map(|i| format!("{{\"text\": \"Story {i}: a dog ran to the park.\"}}\n")).collect();
    let qa: String =
        (0..10).map(|i| format!("{{\"q\": \"What is {i} plus one?\", \"a\": \"{}\"}}\n", i + 1)).collect();
    let (a, b) = (write(dir.path(), "stories.jsonl", stories), write(dir.path(), "qa.jsonl", &qa));
    let model = common::repo().join("data/default-model");
    let yaml = format!(
        "model: {{path: {}}}\ndata:\n  format: alpaca\n  train:\n    - {{path: {}, format: completion, weight: 2}}\n    \
         - {{path: {}, columns: {{instruction: q, output: a}}, weight: 0.5}}\n",
        model.display(),
        a.display(),
        b.display()
    );
    let cfg = Config::from_yaml_str(&yaml, "run.yaml", &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let tok =
        TextTokenizer::from_model_dir(&model, &ModelSpec::from_dir(&model).unwrap().eos_token_ids).unwrap();
    let (train, _) = prepare_splits(&cfg.data, cfg.train.seed, &tok, None, Examples::Single).unwrap();
    // Each set prepared on its own, as a one-set run reads it.
    let alone = |path: &Path, yaml_data: &str| {
        let yaml = format!(
            "model: {{path: {}}}\ndata: {{train: {}, {yaml_data}}}\n",
            model.display(),
            path.display()
        );
        let cfg = Config::from_yaml_str(&yaml, "run.yaml", &[]).unwrap();
        prepare(path, &cfg.data, &tok, None).unwrap().examples
    };
    let stories = alone(&a, "format: completion");
    let answers = alone(&b, "format: alpaca, columns: {instruction: q, output: a}");
    assert_eq!(train.examples.len(), 2 * stories.len() + answers.len() / 2);
    for ex in &stories {
        assert_eq!(train.examples.iter().filter(|e| *e == ex).count(), 2, "weight 2 trains a story twice");
    }
    let kept = answers.iter().filter(|ex| train.examples.contains(ex)).count();
    assert_eq!(kept, answers.len() / 2, "weight 0.5 keeps half of the answers");
    assert!(answers.iter().all(|ex| train.examples.iter().filter(|e| *e == ex).count() <= 1));
    // Every set's file is in the data cache key.
    let key = |cfg: &Config| lorafit::data::cache::key_for(cfg, tok.eos_id, None).unwrap().hex();
    let before = key(&cfg);
    std::fs::write(&b, qa.replace("plus one", "and one")).unwrap();
    assert_ne!(key(&cfg), before, "changing the second set's file must change the cache key");
}
