//! What a run tells the person or script watching it: human-readable lines, and with
//! `--log-format json` one JSON object per logged step and evaluation on stdout.

/// How progress is reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines on stdout, and a progress bar on a terminal.
    #[default]
    Text,
    /// One JSON object per logged step and evaluation on stdout (the records of
    /// metrics.jsonl, with an `"event"` field), for scripts; human-readable lines go to stderr.
    Json,
    /// Only errors.
    Quiet,
}

/// Where a run's messages go, by [`LogFormat`].
#[derive(Debug, Clone, Copy)]
pub struct Console(pub LogFormat);

impl Console {
    /// A human-readable line.
    pub fn line(&self, text: &str) {
        match self.0 {
            LogFormat::Text => println!("{text}"),
            LogFormat::Json => eprintln!("{text}"),
            LogFormat::Quiet => {}
        }
    }

    /// A machine-readable record of `event` at `step` (only with [`LogFormat::Json`]).
    pub fn record(&self, event: &str, step: usize, values: &[(&str, f64)]) {
        if self.0 == LogFormat::Json {
            let mut record = serde_json::Map::new();
            record.insert("event".into(), event.into());
            record.insert("step".into(), step.into());
            for (k, v) in values {
                record.insert(k.to_string(), serde_json::json!(v));
            }
            println!("{}", serde_json::Value::Object(record));
        }
    }

    /// Progress bars and spinners are drawn only for human-readable output.
    pub fn shows_progress(&self) -> bool {
        self.0 == LogFormat::Text
    }
}

/// `say!(console, "format", args...)`: a formatted [`Console::line`].
macro_rules! say {
    ($console:expr, $($arg:tt)*) => { $console.line(&format!($($arg)*)) };
}
pub(crate) use say;
