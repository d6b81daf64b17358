//! A run's metrics log: every `log` call writes one line to `<run_dir>/metrics.jsonl` and the same
//! values as TensorBoard scalars to an event file in `<run_dir>`, so the two never disagree.
//!
//! A line is `{"step": N, "<tag>": value, ...}` with tags like `train/loss`, `train/lr` and
//! `eval/loss`, in the order given. JSON keeps the full `f64`; TensorBoard stores `f32`, so the two
//! agree to float32 precision. Both files are handed to the operating system at the end of every
//! call, so a crash of the process loses nothing already logged.

use super::hparams::{self, HParam};
use super::tensorboard::{unix_time, EventWriter, FILE_PREFIX};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metrics file's name inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Writes `metrics.jsonl` and TensorBoard events for one run directory.
pub struct MetricsLog {
    jsonl: File,
    path: PathBuf,
    events: EventWriter,
}

impl MetricsLog {
    /// Starts a fresh log in `run_dir` (created if needed). A `metrics.jsonl` and event files
    /// already there, from an earlier run of the same name, are removed so that TensorBoard and
    /// the JSON lines describe the same run.
    pub fn create(run_dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
        for entry in
            std::fs::read_dir(run_dir).with_context(|| format!("cannot read {}", run_dir.display()))?
        {
            let entry = entry?;
            let stale = entry.file_name().to_str().is_some_and(|name| name.starts_with(FILE_PREFIX));
            if stale && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            }
        }
        let path = run_dir.join(METRICS_FILE);
        let jsonl = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(MetricsLog { jsonl, path, events: EventWriter::create(run_dir)? })
    }

    /// Continues the log of a resumed run: appends to `metrics.jsonl` (created if missing) after
    /// cutting off a partial last line a crash may have left, and starts a new event file beside
    /// the earlier ones (TensorBoard reads them all as one run). `resumed_step` is the last step
    /// the run keeps: the new file starts with a purge marker at the step after it, so TensorBoard
    /// forgets the points logged after it, as `metrics.jsonl` has (the caller cuts those lines).
    pub fn open_append(run_dir: &Path, resumed_step: u64) -> Result<MetricsLog> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
        let path = run_dir.join(METRICS_FILE);
        let complete = match std::fs::read(&path) {
            Ok(bytes) => bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        jsonl.set_len(complete).with_context(|| format!("cannot truncate {}", path.display()))?;
        let mut events = EventWriter::create(run_dir)?;
        events.purge_from(resumed_step as i64 + 1)?;
        Ok(MetricsLog { jsonl, path, events })
    }

    /// The `metrics.jsonl` being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The event file being written.
    pub fn event_file(&self) -> &Path {
        self.events.path()
    }

    /// Logs `values` at `step`: one JSON line and the same values as TensorBoard scalars.
    ///
    /// A non-finite value (NaN, ±inf) is written as JSON `null` (JSON has no NaN or infinity)
    /// and no scalar is written for it, so both files show a gap at that step rather than
    /// TensorBoard alone showing a spike. A finite value too large for `f32` is kept in JSON
    /// and likewise left out of TensorBoard.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let tb_step = i64::try_from(step).context("step does not fit an int64")?;
        let line = json_line(step, values)?;
        self.jsonl
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        let scalars: Vec<(&str, f32)> =
            values.iter().map(|&(tag, v)| (tag, v as f32)).filter(|&(_, v)| v.is_finite()).collect();
        self.events.add_scalars(&scalars, tb_step, unix_time())?;
        self.events.flush()
    }

    /// A text entry (Markdown) in TensorBoard's Text tab at step 0, such as the run's
    /// hyper-parameters; written once at the start of a run.
    pub fn text(&mut self, tag: &str, text: &str) -> Result<()> {
        self.events.add_text(tag, text, 0)?;
        self.events.flush()
    }

    /// Opens this run's row in TensorBoard's HParams dashboard: its `hparams`, and the scalar
    /// tags whose last values are the row's metrics. Written once, at step 0, when a run starts.
    pub fn hparams_start(&mut self, hparams: &[(&str, HParam)], metric_tags: &[&str]) -> Result<()> {
        let experiment = hparams::experiment(hparams, metric_tags);
        self.events.add_plugin_content(hparams::EXPERIMENT_TAG, hparams::PLUGIN_NAME, &experiment, 0)?;
        let start = hparams::session_start(hparams, unix_time());
        self.events.add_plugin_content(hparams::SESSION_START_TAG, hparams::PLUGIN_NAME, &start, 0)?;
        self.events.flush()
    }

    /// Marks the run's HParams row as finished successfully.
    pub fn hparams_end(&mut self) -> Result<()> {
        let end = hparams::session_end(unix_time());
        self.events.add_plugin_content(hparams::SESSION_END_TAG, hparams::PLUGIN_NAME, &end, 0)?;
        self.events.flush()
    }
}

/// `{"step": N, "<tag>": value, ...}` and a newline; non-finite values become `null`.
fn json_line(step: u64, values: &[(&str, f64)]) -> Result<String> {
    let mut line = format!("{{\"step\": {step}");
    for (i, &(tag, value)) in values.iter().enumerate() {
        if tag == "step" || values[..i].iter().any(|&(t, _)| t == tag) {
            bail!("metric tag `{tag}` is reserved or given twice");
        }
        line.push_str(", ");
        line.push_str(&serde_json::to_string(tag)?);
        line.push_str(": ");
        if value.is_finite() {
            line.push_str(&serde_json::to_string(&value)?);
        } else {
            line.push_str("null");
        }
    }
    line.push_str("}\n");
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        let line = json_line(7, &[("train/loss", 2.5), ("train/lr", 1e-4), ("x\"y", f64::NAN)]).unwrap();
        assert_eq!(line, "{\"step\": 7, \"train/loss\": 2.5, \"train/lr\": 0.0001, \"x\\\"y\": null}\n");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["train/lr"], 1e-4);
        assert_eq!(json_line(1, &[]).unwrap(), "{\"step\": 1}\n");
        assert!(json_line(1, &[("step", 1.0)]).is_err());
        assert!(json_line(1, &[("a", 1.0), ("a", 2.0)]).is_err());
        assert_eq!(json_line(1, &[("a", f64::INFINITY)]).unwrap(), "{\"step\": 1, \"a\": null}\n");
    }

    #[test]
    fn open_append_cuts_a_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\": 1, \"a\": 1.0}\n{\"step\": 2, \"a\"").unwrap();
        let mut log = MetricsLog::open_append(dir.path(), 1).unwrap();
        log.log(2, &[("a", 2.0)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\": 1, \"a\": 1.0}\n{\"step\": 2, \"a\": 2.0}\n"
        );

        // No complete line at all, and no file at all.
        std::fs::write(&path, "{\"st").unwrap();
        MetricsLog::open_append(dir.path(), 0).unwrap().log(1, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\": 1}\n");
        let fresh = dir.path().join("fresh");
        MetricsLog::open_append(&fresh, 2).unwrap().log(3, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(fresh.join(METRICS_FILE)).unwrap(), "{\"step\": 3}\n");
    }

    #[test]
    fn create_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        MetricsLog::create(dir.path()).unwrap().log(1, &[("a", 1.0)]).unwrap();
        MetricsLog::open_append(dir.path(), 1).unwrap().log(2, &[("a", 2.0)]).unwrap();
        let events = |dir: &Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().starts_with(FILE_PREFIX))
                .count()
        };
        assert_eq!(events(dir.path()), 2);
        let log = MetricsLog::create(dir.path()).unwrap();
        assert_eq!(events(dir.path()), 1);
        assert!(log.event_file().exists());
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "");
    }
}
