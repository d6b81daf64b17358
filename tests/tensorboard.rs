//! The event files a run writes are read by TensorBoard's own reader (`EventAccumulator`) with
//! exactly the scalars `metrics.jsonl` holds, and the run's text entry shows in the Text plugin.

mod common;

use lorafit::observe::{MetricsLog, METRICS_FILE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Prints `{"scalars": {tag: [[step, value], ...]}, "text": {tag: [[step, text, rank]]},
/// "html": {tag: the Text tab's rendering}, "text_plugin_tags": [...]}` for the run directory in
/// `argv[1]`, keeping every event.
const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
acc.Reload()
tags = acc.Tags()
scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags[ea.SCALARS]}
text, html = {}, {}
for t in tags[ea.TENSORS]:
    rows = []
    for e in acc.Tensors(t):
        arr = tensor_util.make_ndarray(e.tensor_proto)
        rows.append([e.step, arr.item().decode("utf-8"), arr.ndim])
        html[t] = text_plugin.text_array_to_html(arr, True)
    text[t] = rows
try:
    plugin = sorted(acc.PluginTagToContent("text"))
except KeyError:
    plugin = []
print(json.dumps({"scalars": scalars, "text": text, "html": html, "text_plugin_tags": plugin}))
"#;

fn read_events(python: &Path, run_dir: &Path) -> Value {
    let out = Command::new(python).arg("-c").arg(READ_EVENTS).arg(run_dir).output().expect("run python");
    assert!(out.status.success(), "the event reader failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the reader prints JSON")
}

/// tag → [(step, value as f32)] from metrics.jsonl, leaving out `null`s.
fn jsonl_scalars(run_dir: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let text = std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap();
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for line in text.lines() {
        let Value::Object(record) = serde_json::from_str(line).unwrap() else {
            panic!("not an object: {line}")
        };
        let step = record["step"].as_i64().unwrap();
        for (tag, v) in &record {
            if let (false, Some(v)) = (tag == "step", v.as_f64()) {
                out.entry(tag.clone()).or_default().push((step, v as f32));
            }
        }
    }
    out
}

/// tag → [(step, value)] from the reader's output; the values are `f32`s widened, so exact.
fn tensorboard_scalars(events: &Value) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out = BTreeMap::new();
    for (tag, rows) in events["scalars"].as_object().unwrap() {
        let rows =
            rows.as_array().unwrap().iter().map(|r| (r[0].as_i64().unwrap(), r[1].as_f64().unwrap() as f32));
        out.insert(tag.clone(), rows.collect());
    }
    out
}

const HPARAMS: &str = "| key | value |\n|---|---|\n| lr | 0.0002 |\n| lora.r | 16 |\n\nüñí©ødé ✓";

#[test]
fn tensorboard_reads_the_same_scalars_as_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("checkpoints/run-a");
    let mut log = MetricsLog::create(&run_dir).unwrap();
    log.text("hparams", HPARAMS).unwrap();
    let extremes = [1e-30, 3.0e38, 1.4e-45, -2.5e-20, 1e30, 0.0, -0.0, 123_456_789.125, f64::MIN_POSITIVE];
    for step in 1..=20u64 {
        let s = step as f64;
        let mut values = vec![
            ("train/loss", 4.0 / s.sqrt() + 0.1234567890123),
            ("train/lr", 2e-4 * (s / 20.0)),
            ("train/grad_norm", extremes[step as usize % extremes.len()]),
        ];
        if step % 5 == 0 {
            values.push(("eval/loss", 3.0 - s / 10.0));
        }
        if step == 7 {
            values.push(("train/odd", f64::NAN));
        }
        if step == 8 {
            values.push(("train/odd", f64::INFINITY));
        }
        if step == 9 {
            values.push(("train/odd", 1e300)); // finite, but not an f32
        }
        log.log(step, &values).unwrap();
    }
    drop(log);

    let expected = jsonl_scalars(&run_dir);
    assert_eq!(expected["train/loss"].len(), 20);
    assert_eq!(expected["eval/loss"].iter().map(|r| r.0).collect::<Vec<_>>(), [5, 10, 15, 20]);
    let lines = std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap();
    assert!(lines.lines().nth(6).unwrap().ends_with("\"train/odd\": null}"), "NaN is written as null");
    assert!(lines.lines().nth(7).unwrap().ends_with("\"train/odd\": null}"), "inf is written as null");

    let Some(python) = common::python() else {
        return;
    };
    let events = read_events(&python, &run_dir);
    let mut tensorboard = tensorboard_scalars(&events);
    // The one value JSON has and TensorBoard cannot: 1e300 overflows f32.
    let mut expected = expected;
    assert_eq!(expected.remove("train/odd").unwrap(), [(9, f32::INFINITY)]);
    assert_eq!(tensorboard.remove("train/odd"), None);
    assert_eq!(tensorboard, expected);
    assert_eq!(events["text"], serde_json::json!({"hparams": [[0, HPARAMS, 0]]}));
    assert_eq!(events["text_plugin_tags"], serde_json::json!(["hparams"]));
    let html = events["html"]["hparams"].as_str().unwrap();
    assert!(html.contains("<td>lora.r</td>") && html.contains("✓"), "the Text tab shows a table: {html}");
}

#[test]
fn a_resumed_log_continues_after_a_partial_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run-b");
    let mut log = MetricsLog::create(&run_dir).unwrap();
    log.text("hparams", "first start").unwrap();
    for step in 1..=3u64 {
        log.log(step, &[("train/loss", 1.0 / step as f64)]).unwrap();
    }
    let first_events = log.event_file().to_path_buf();
    drop(log);
    // A crash in the middle of writing step 4.
    let mut file = std::fs::OpenOptions::new().append(true).open(run_dir.join(METRICS_FILE)).unwrap();
    std::io::Write::write_all(&mut file, b"{\"step\": 4, \"train/lo").unwrap();
    drop(file);

    let mut log = MetricsLog::open_append(&run_dir, 3).unwrap();
    assert_ne!(log.event_file(), first_events, "a resumed run starts a new event file");
    for step in 4..=6u64 {
        log.log(step, &[("train/loss", 1.0 / step as f64)]).unwrap();
    }
    drop(log);

    let text = std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap();
    assert!(text.ends_with('\n'));
    let steps: Vec<i64> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line is JSON")["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    let expected = jsonl_scalars(&run_dir);
    assert_eq!(expected["train/loss"].len(), 6);

    let Some(python) = common::python() else {
        return;
    };
    let events = read_events(&python, &run_dir);
    assert_eq!(tensorboard_scalars(&events), expected, "both event files are read as one run");
    assert_eq!(events["text"]["hparams"][0][1], "first start");
}

#[test]
fn a_training_run_logs_the_same_scalars_to_tensorboard_and_metrics_jsonl() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    common::write(&tmp.path().join("stories.jsonl"), common::STORY_ROWS);
    common::write(
        &tmp.path().join("run.yaml"),
        &format!(
            "model: {{path: {}}}\ndata: {{train: stories.jsonl, validation: stories.jsonl, format: completion}}\n\
             train: {{max_steps: 6, eval_every: 2, micro_batch_size: 2}}\noutput: {{run_name: logged}}\n",
            common::stories260k(&assets).display()
        ),
    );
    let out = common::lorafit(tmp.path(), &["train", "run.yaml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = tmp.path().join("checkpoints/logged");
    let events = read_events(&python, &run);
    let logged = jsonl_scalars(&run);
    assert_eq!(tensorboard_scalars(&events), logged);
    assert_eq!(logged["train/loss"].len(), 6);
    assert_eq!(logged["eval/loss"].iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 4, 6]);
    let hparams = events["text"]["hparams"][0][1].as_str().unwrap();
    assert!(hparams.contains("max_steps: 6"), "{hparams}");
}

#[test]
fn after_a_kill_and_resume_tensorboard_shows_one_point_per_step_as_metrics_jsonl() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    common::write(&tmp.path().join("stories.jsonl"), common::STORY_ROWS);
    common::write(
        &tmp.path().join("run.yaml"),
        &format!(
            "model: {{path: {}}}\ndata: {{train: stories.jsonl, validation: stories.jsonl, format: completion}}\n\
             train: {{max_steps: 12, eval_every: 2, save_every: 5, micro_batch_size: 2, threads: 1}}\n\
             output: {{run_name: killed}}\n",
            common::stories260k(&assets).display()
        ),
    );
    let run = tmp.path().join("checkpoints/killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", "run.yaml"])
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(run.join(METRICS_FILE)).unwrap_or_default().contains("\"step\": 7,") {
        assert!(started.elapsed().as_secs() < 120, "step 7 was never logged");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whenever the kill landed, the run resumes from step 5 having logged steps after it: what a
    // kill between two checkpoints leaves.
    for k in 6..=12 {
        let _ = std::fs::remove_dir_all(run.join(format!("step-{k}")));
    }
    let out = common::lorafit(tmp.path(), &["train", "run.yaml", "--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let events = read_events(&python, &run);
    let logged = jsonl_scalars(&run);
    assert_eq!(
        logged["train/loss"].iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(tensorboard_scalars(&events), logged);
    assert_eq!(events["text"]["hparams"].as_array().unwrap().len(), 1, "the hparams text survives the purge");
}

/// Prints one `{"name", "status", "hparams", "metrics"}` per session (run) that TensorBoard's
/// HParams plugin lists for the log directory in `argv[1]`, as its dashboard asks for them.
const READ_HPARAMS: &str = r#"
import json, sys
from google.protobuf import json_format
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
logdir = sys.argv[1]
mux = plugin_event_multiplexer.EventMultiplexer()
mux.AddRunsFromDirectory(logdir)
mux.Reload()
provider = data_provider.MultiplexerDataProvider(mux, logdir)
tb = base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider)
request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[0, 1, 2, 3])
handler = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request)
rows = []
for group in handler.run().session_groups:
    for session in group.sessions:
        rows.append({
            "name": session.name,
            "status": api_pb2.Status.Name(session.status),
            "hparams": {k: json_format.MessageToDict(v) for k, v in group.hparams.items()},
            "metrics": {m.name.tag: m.value for m in session.metric_values},
        })
print(json.dumps(sorted(rows, key=lambda r: r["name"])))
"#;

#[test]
fn each_run_is_one_row_of_the_hparams_dashboard_with_its_settings_and_results() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    common::write(&tmp.path().join("stories.jsonl"), common::STORY_ROWS);
    let examples = common::STORY_ROWS.lines().count();
    common::write(
        &tmp.path().join("run.yaml"),
        &format!(
            "model: {{path: {}}}\nlora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}\n\
             data: {{train: stories.jsonl, validation: stories.jsonl, format: completion, packing: false, \
             max_seq_len: 64}}\ntrain: {{max_steps: 4, eval_every: 2, micro_batch_size: 2, seed: 7}}\n",
            common::stories260k(&assets).display()
        ),
    );
    for (name, lr) in [("a", "0.0002"), ("b", "0.001")] {
        let args = [
            "train",
            "run.yaml",
            "--set",
            &format!("output.run_name={name}"),
            "--set",
            &format!("train.lr={lr}"),
        ];
        let out = common::lorafit(tmp.path(), &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let checkpoints = tmp.path().join("checkpoints");
    let out = Command::new(&python).arg("-c").arg(READ_HPARAMS).arg(&checkpoints).output().unwrap();
    assert!(out.status.success(), "the hparams reader failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["name"].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b"]);
    for (row, lr) in rows.iter().zip([2e-4, 1e-3]) {
        assert_eq!(row["status"], "STATUS_SUCCESS");
        let hparams = &row["hparams"];
        assert_eq!(hparams["lr"], lr);
        assert_eq!(hparams["lora.r"], 4.0);
        assert_eq!(hparams["lora.alpha"], 8.0);
        assert_eq!(hparams["lora.target_modules"], "[q_proj, v_proj]");
        assert_eq!(hparams["data.max_seq_len"], 64.0);
        assert_eq!(hparams["data.train"], "stories.jsonl");
        assert_eq!(hparams["seed"], 7.0);
        assert_eq!(hparams["batch_size"], 2.0);
        assert!(hparams["precision"] == "fp32" || hparams["precision"] == "bf16-mixed", "{hparams}");

        // The metrics are the runs' own logged values: the last eval loss, the best, the throughput.
        let logged = jsonl_scalars(&checkpoints.join(row["name"].as_str().unwrap()));
        let evals: Vec<f32> = logged["eval/loss"].iter().map(|r| r.1).collect();
        let metrics = &row["metrics"];
        assert_eq!(metrics["eval/loss"].as_f64().unwrap() as f32, *evals.last().unwrap());
        let best = evals.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(metrics["eval/best_loss"].as_f64().unwrap() as f32, best);
        let tokens_per_s = logged["train/tokens_per_s"].last().unwrap().1;
        assert_eq!(metrics["train/tokens_per_s"].as_f64().unwrap() as f32, tokens_per_s);

        // `train/epoch` is the share of the data seen: two examples a step.
        for &(step, epoch) in &logged["train/epoch"] {
            assert_eq!(epoch, (step as f64 * 2.0 / examples as f64) as f32, "step {step}");
        }
    }
}
