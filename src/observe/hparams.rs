//! TensorBoard's HParams dashboard: one row per run, with the run's hyper-parameters in columns
//! and the last value of some of its scalars as metrics, so runs can be sorted and filtered.
//!
//! The plugin reads three summaries, each a `Summary.Value` with no value, only metadata naming
//! the `hparams` plugin, whose `content` is a serialized `HParamsPluginData`. They are encoded
//! here as PyTorch's `torch.utils.tensorboard.summary.hparams` builds them:
//!
//! ```text
//! HParamsPluginData { int32 version = 1; Experiment experiment = 2;
//!                     SessionStartInfo session_start_info = 3; SessionEndInfo session_end_info = 4; }
//! Experiment        { repeated HParamInfo hparam_infos = 4; repeated MetricInfo metric_infos = 5; }
//! HParamInfo        { string name = 1; DataType type = 4; }   (STRING 1, BOOL 2, FLOAT64 3)
//! MetricInfo        { MetricName name = 1; }    MetricName { string tag = 2; }
//! SessionStartInfo  { map<string, google.protobuf.Value> hparams = 1; double start_time_secs = 5; }
//! SessionEndInfo    { Status status = 1; double end_time_secs = 2; }   (SUCCESS 1)
//! google.protobuf.Value { double number_value = 2; string string_value = 3; bool bool_value = 4; }
//! ```
//!
//! A map entry is a message `{ key = 1; value = 2 }`. The version is 0, so it is not written.

use super::tensorboard::{put_bytes, put_f64, put_varint_field};

/// The plugin's name in summary metadata.
pub const PLUGIN_NAME: &str = "hparams";
/// The tags the plugin looks for.
pub const EXPERIMENT_TAG: &str = "_hparams_/experiment";
pub const SESSION_START_TAG: &str = "_hparams_/session_start_info";
pub const SESSION_END_TAG: &str = "_hparams_/session_end_info";

/// One hyper-parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl HParam {
    /// `HParamInfo.type`.
    fn data_type(&self) -> u64 {
        match self {
            HParam::Text(_) => 1,
            HParam::Bool(_) => 2,
            HParam::Number(_) => 3,
        }
    }

    /// A serialized `google.protobuf.Value`.
    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::new();
        match self {
            HParam::Number(n) => put_f64(&mut value, 2, *n),
            HParam::Text(s) => put_bytes(&mut value, 3, s.as_bytes()),
            HParam::Bool(b) => put_varint_field(&mut value, 4, *b as u64),
        }
        value
    }
}

/// The experiment: the names and types of the hyper-parameters and the metrics' scalar tags.
pub fn experiment(hparams: &[(&str, HParam)], metric_tags: &[&str]) -> Vec<u8> {
    let mut experiment = Vec::new();
    for (name, value) in hparams {
        let mut info = Vec::new();
        put_bytes(&mut info, 1, name.as_bytes());
        put_varint_field(&mut info, 4, value.data_type());
        put_bytes(&mut experiment, 4, &info);
    }
    for tag in metric_tags {
        let mut metric_name = Vec::new();
        put_bytes(&mut metric_name, 2, tag.as_bytes());
        let mut info = Vec::new();
        put_bytes(&mut info, 1, &metric_name);
        put_bytes(&mut experiment, 5, &info);
    }
    plugin_data(2, &experiment)
}

/// The start of this run's session, with its hyper-parameters' values.
pub fn session_start(hparams: &[(&str, HParam)], start_time: f64) -> Vec<u8> {
    let mut start = Vec::new();
    for (name, value) in hparams {
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, name.as_bytes());
        put_bytes(&mut entry, 2, &value.encode());
        put_bytes(&mut start, 1, &entry);
    }
    put_f64(&mut start, 5, start_time);
    plugin_data(3, &start)
}

/// The successful end of this run's session.
pub fn session_end(end_time: f64) -> Vec<u8> {
    let mut end = Vec::new();
    put_varint_field(&mut end, 1, 1);
    put_f64(&mut end, 2, end_time);
    plugin_data(4, &end)
}

/// `HParamsPluginData` holding `message` as its `field`.
fn plugin_data(field: u64, message: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    put_bytes(&mut data, field, message);
    data
}
