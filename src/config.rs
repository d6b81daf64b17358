//! The run configuration: one YAML file, `--set key.path=value` overrides, defaults and
//! validation.
//!
//! `configs/reference.yaml` documents every key. Loading happens in four steps, each with its
//! own kind of error, and every error is a single paragraph that names where it came from:
//!
//! 1. The file is parsed as YAML (syntax errors: file, line and column).
//! 2. The file text is deserialized into [`Config`] directly, so serde_yaml's positions
//!    survive: unknown keys and values (with a "did you mean" suggestion) and wrong types are
//!    reported with the dotted key, file, line and column.
//! 3. Each `--set` override is applied to a [`serde_yaml::Value`] of the file and the result is
//!    deserialized again, one override at a time, so an error names the override that caused it.
//! 4. [`Config::validate`] refuses out-of-range values and missing required keys, naming the
//!    override that set the key last, or else the file (with the key's line when it can be found).
//!
//! Relative paths are kept exactly as written; the caller resolves them against the current
//! directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// A whole run: what to fine-tune, how the adapter looks, which data, how to train, where to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "ModelConfig::unset")]
    pub model: ModelConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default = "DataConfig::unset")]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub output: OutputConfig,
}

/// The base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`). Required.
    // Deserialized with an empty default so that a `--set model.path=...` can supply it; an empty
    // path is reported as a missing required key by `validate`.
    #[serde(default, serialize_with = "serialize_path", deserialize_with = "deserialize_path")]
    pub path: PathBuf,
    /// The dtype the frozen base weights are held in.
    #[serde(default)]
    pub dtype: WeightDtype,
}

/// The dtype of the frozen base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// bf16 when the run's (resolved) precision is `bf16-mixed`, else fp32.
    #[default]
    Auto,
    Fp32,
    Bf16,
}

impl WeightDtype {
    /// The concrete dtype for a run with the resolved `precision`: never [`WeightDtype::Auto`].
    pub fn resolve(self, precision: Precision) -> WeightDtype {
        match (self, precision) {
            (WeightDtype::Auto, Precision::Bf16Mixed) => WeightDtype::Bf16,
            (WeightDtype::Auto, Precision::Fp32) => WeightDtype::Fp32,
            (WeightDtype::Auto, Precision::Auto) => {
                unreachable!("train.precision auto is resolved when a run starts")
            }
            (dtype, _) => dtype,
        }
    }
}

/// The adapter: rank, scaling, dropout, where it goes and how it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Modules never adapted even when `target_modules` selects them (a list of names or a regex).
    pub exclude_modules: Option<TargetModules>,
    /// Adapt only these decoder layers (by index); `None` for all. Applies to a list of targets.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank: regex (matched against the end of the module path) → r.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha: regex (matched against the end of the module path) → alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub init: LoraInit,
    /// Start from this PEFT adapter directory instead of a fresh adapter; its own
    /// adapter_config.json then decides r, alpha, targets and patterns (dropout stays ours).
    #[serde(default, serialize_with = "serialize_opt_path")]
    pub init_from: Option<PathBuf>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            target_modules: TargetModules::default(),
            exclude_modules: None,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init: LoraInit::default(),
            init_from: None,
        }
    }
}

/// Which linear layers get an adapter, with PEFT's rules. YAML: the string `all-linear`, a list
/// of names (a module matches when its path ends with `.name`), or any other string, a regex
/// that must match the whole module path (`model.layers.0.self_attn.q_proj`).
///
/// Serialize and Deserialize are written by hand: the YAML form is either a string or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Every linear layer of the decoder blocks (never `lm_head`).
    AllLinear,
    /// Leaf module names such as `q_proj`.
    List(Vec<String>),
    /// A regex that must match a module's whole path.
    Regex(String),
}

const ALL_LINEAR: &str = "all-linear";

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(
            ["q_proj", "k_proj", "v_proj", "o_proj"].iter().map(|name| name.to_string()).collect(),
        )
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            TargetModules::AllLinear => f.write_str(ALL_LINEAR),
            TargetModules::List(names) => write!(f, "[{}]", names.join(", ")),
            TargetModules::Regex(pattern) => write!(f, "regex `{pattern}`"),
        }
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::AllLinear => serializer.serialize_str(ALL_LINEAR),
            TargetModules::List(names) => names.serialize(serializer),
            TargetModules::Regex(pattern) => serializer.serialize_str(pattern),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TargetVisitor;

        impl<'de> Visitor<'de> for TargetVisitor {
            type Value = TargetModules;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "`all-linear`, a list of module names such as [q_proj, v_proj], \
                     or a regex over module paths",
                )
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<TargetModules, E> {
                if value == ALL_LINEAR {
                    return Ok(TargetModules::AllLinear);
                }
                // A string with regex syntax is PEFT's full-match regex; a bare name is almost
                // always a list written without brackets, which would match nothing.
                let bare_name =
                    value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ' '));
                if !bare_name && !value.is_empty() {
                    return match regex::Regex::new(&format!("^(?:{value})$")) {
                        Ok(_) => Ok(TargetModules::Regex(value.to_string())),
                        Err(e) => Err(E::custom(format!("`{value}` is not a valid regex: {e}"))),
                    };
                }
                let message = match suggest(value, &[ALL_LINEAR]) {
                    Some(_) => format!(
                        "unknown value `{value}`; did you mean `{ALL_LINEAR}`? (or give a list \
                         of module names such as [q_proj, v_proj])"
                    ),
                    None => format!(
                        "module names must be a list even when there is one, e.g. `[{value}]` \
                         (or `{ALL_LINEAR}` for every linear layer, or a regex over module \
                         paths such as `.*\\.{value}`)"
                    ),
                };
                Err(E::custom(message))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TargetModules, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(TargetModules::List(names))
            }
        }

        deserializer.deserialize_any(TargetVisitor)
    }
}

/// How the adapter matrices start (B is zero in both, so training starts from the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// A ~ Kaiming-uniform(a = sqrt(5)), as PEFT's default.
    #[default]
    Kaiming,
    /// A ~ Normal(0, 1/r), as PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// The training (and optional validation) data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training records. Required (an empty default lets `--set data.train=...` supply it).
    #[serde(default, serialize_with = "serialize_path", deserialize_with = "deserialize_path")]
    pub train: PathBuf,
    #[serde(default, serialize_with = "serialize_opt_path")]
    pub validation: Option<PathBuf>,
    /// Hold out this share of the training records (seeded) when there is no validation file.
    #[serde(default)]
    pub val_split: Option<f64>,
    /// The split to read from a `datasets` DatasetDict folder (`save_to_disk`).
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default)]
    pub format: DataFormat,
    /// Column renames: the name lorafit expects → the name in the user's files.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Alpaca prompt for rows with an `input`, with `{instruction}` and `{input}`; null for
    /// the Stanford Alpaca prompt.
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// Alpaca prompt for rows without `input`, with `{instruction}`; null for Stanford Alpaca's.
    #[serde(default)]
    pub prompt_template_no_input: Option<String>,
    /// Chat rendering: `auto` (the model's own template), `chatml`, `llama3`, a `.jinja` file,
    /// or the Jinja text.
    #[serde(default = "default_chat_template")]
    pub chat_template: String,
    /// Which chat tokens carry loss.
    #[serde(default)]
    pub train_on: TrainOn,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub train_on_inputs: bool,
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Several examples per row of max_seq_len tokens (attention kept within each example).
    #[serde(default = "default_true")]
    pub packing: bool,
    /// What to do with a row that cannot be used (malformed, missing column, unknown role...).
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// What to do with an example longer than max_seq_len.
    #[serde(default)]
    pub too_long: TooLong,
}

/// Which tokens of a chat carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Every assistant turn (content and end-of-turn token).
    #[default]
    Assistant,
    /// Only the last assistant turn.
    Last,
    /// Every token, prompts included.
    All,
}

/// Bad rows stop the run, or are skipped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    #[default]
    Error,
    Skip,
}

/// Examples longer than max_seq_len are cut at the end, skipped, or stop the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    #[default]
    Truncate,
    Skip,
    Error,
}

/// The record layout of the data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `{"text": ...}`: every token is trained.
    Completion,
    /// `{"instruction", "input", "output"}`: the prompt is masked unless `train_on_inputs`.
    #[default]
    Alpaca,
    /// `{"segments": [{"text", "label"}]}`: exactly the segments with `label: true` are trained.
    #[serde(rename = "input_output")]
    InputOutput,
    /// `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`,
    /// rendered with the chat template.
    Chat,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Completion => "completion",
            DataFormat::Alpaca => "alpaca",
            DataFormat::InputOutput => "input_output",
            DataFormat::Chat => "chat",
        })
    }
}

/// The optimisation: schedule, optimizer, precision, device, logging and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    pub epochs: usize,
    /// Optimizer steps to run; `None` runs `epochs` full passes.
    pub max_steps: Option<usize>,
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    pub lr: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Gradient-norm clipping threshold; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    pub precision: Precision,
    /// Activation checkpointing: keep only each block's input during the forward pass and run
    /// the block again in the backward pass (less memory, about a third more compute).
    pub gradient_checkpointing: bool,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads; `None` uses all cores.
    pub threads: Option<usize>,
    pub log_every: usize,
    /// Save a resumable checkpoint every N optimizer steps (into `step-N/`); `None`: only at
    /// the end.
    pub save_every: Option<usize>,
    /// Keep only the newest K step checkpoints; `None` keeps all.
    pub keep_last: Option<usize>,
    /// Evaluate on the validation data every N steps (and at the end); `None`: only at the end.
    pub eval_every: Option<usize>,
    /// Also keep the adapter with the lowest validation loss, in `best/`.
    pub save_best: bool,
    /// Stop after this many evaluations without a new best validation loss; `None` never stops.
    pub early_stopping_patience: Option<usize>,
    /// On a non-finite loss or gradient: stop the run, or skip the step.
    pub on_nonfinite: OnNonFinite,
}

/// What a non-finite loss or gradient does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop, naming the step and the last good checkpoint.
    #[default]
    Stop,
    /// Skip the update and go on (counted and logged).
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 42,
            epochs: 1,
            max_steps: None,
            micro_batch_size: 4,
            grad_accum_steps: 1,
            lr: 2e-4,
            lr_scheduler: LrScheduler::default(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: Some(1.0),
            precision: Precision::default(),
            gradient_checkpointing: false,
            device: "auto".to_string(),
            threads: None,
            log_every: 1,
            save_every: None,
            keep_last: None,
            eval_every: None,
            save_best: false,
            early_stopping_patience: None,
            on_nonfinite: OnNonFinite::default(),
        }
    }
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// The arithmetic of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// bf16-mixed where bf16 is native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32; resolved
    /// when a run starts (`train::precision::choose`), so the model never sees it.
    #[default]
    Auto,
    Fp32,
    /// bf16 compute with fp32 adapter weights and optimizer state.
    Bf16Mixed,
}

/// A device as `train.device` names it; whether it exists here is checked when a run starts
/// (`model::load::resolve_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// CUDA when available, else the CPU.
    Auto,
    Cpu,
    /// `cuda` (GPU 0) or `cuda:N`.
    Cuda(usize),
}

impl DeviceName {
    /// `auto`, `cpu`, `cuda` or `cuda:N` (N in decimal digits only); `None` for anything else.
    pub fn parse(name: &str) -> Option<DeviceName> {
        match name {
            "auto" => Some(DeviceName::Auto),
            "cpu" => Some(DeviceName::Cpu),
            "cuda" => Some(DeviceName::Cuda(0)),
            _ => {
                let index = name.strip_prefix("cuda:")?;
                // `usize::from_str` would also take a leading `+`.
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                index.parse().ok().map(DeviceName::Cuda)
            }
        }
    }
}

/// Where the run directory goes and what is generated into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    #[serde(serialize_with = "serialize_path", deserialize_with = "deserialize_path")]
    pub dir: PathBuf,
    /// Name of the run directory under `dir`; `None` lets the caller generate one.
    pub run_name: Option<String>,
    /// Prompts generated greedily before and after training.
    pub sample_prompts: Vec<String>,
    pub sample_max_new_tokens: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::from("checkpoints"),
            run_name: None,
            sample_prompts: Vec::new(),
            sample_max_new_tokens: 32,
        }
    }
}

impl ModelConfig {
    fn unset() -> Self {
        ModelConfig { path: PathBuf::new(), dtype: WeightDtype::default() }
    }
}

impl DataConfig {
    fn unset() -> Self {
        DataConfig {
            train: PathBuf::new(),
            validation: None,
            val_split: None,
            split: default_split(),
            format: DataFormat::default(),
            columns: BTreeMap::new(),
            prompt_template: None,
            prompt_template_no_input: None,
            chat_template: default_chat_template(),
            train_on: TrainOn::default(),
            max_seq_len: default_max_seq_len(),
            train_on_inputs: false,
            shuffle: true,
            packing: true,
            on_bad_row: OnBadRow::default(),
            too_long: TooLong::default(),
        }
    }
}

fn default_split() -> String {
    "train".to_string()
}

fn default_chat_template() -> String {
    "auto".to_string()
}

fn default_max_seq_len() -> usize {
    512
}

fn default_true() -> bool {
    true
}

// Paths come from YAML strings, so they are UTF-8; a lossy conversion keeps serialization
// infallible for paths built in code.
fn serialize_path<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

// serde_yaml hands a plain `null` to a string field as the text "null"; a path is never null.
// The error is raised inside the visitor so that serde_yaml reports it at the key's own path
// and position.
fn deserialize_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    struct PathVisitor;

    impl<'de> Visitor<'de> for PathVisitor {
        type Value = PathBuf;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a path")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<PathBuf, E> {
            match value {
                "null" | "Null" | "NULL" | "~" => Err(E::invalid_type(de::Unexpected::Unit, &self)),
                _ => Ok(PathBuf::from(value)),
            }
        }

        fn visit_unit<E: de::Error>(self) -> Result<PathBuf, E> {
            Err(E::invalid_type(de::Unexpected::Unit, &self))
        }
    }

    deserializer.deserialize_str(PathVisitor)
}

fn serialize_opt_path<S: Serializer>(path: &Option<PathBuf>, serializer: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => serializer.serialize_some(&path.to_string_lossy()),
        None => serializer.serialize_none(),
    }
}

impl Config {
    /// The default configuration with the two required paths filled in.
    pub fn new(model_path: impl Into<PathBuf>, train_path: impl Into<PathBuf>) -> Config {
        let mut model = ModelConfig::unset();
        model.path = model_path.into();
        let mut data = DataConfig::unset();
        data.train = train_path.into();
        Config {
            model,
            lora: LoraConfig::default(),
            data,
            train: TrainConfig::default(),
            output: OutputConfig::default(),
        }
    }

    /// Reads CONFIG, applies `--set` overrides ("a.b.c=value", value parsed as a YAML
    /// scalar/flow value), validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read config file {}: {e}", path.display()))?;
        Config::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    /// The config of a command given a model directory and a data file instead of a config
    /// file: the data serves as training and validation set; `overrides` as for [`Config::load`].
    pub fn for_model_and_data(model: &Path, data: &Path, overrides: &[String]) -> Result<Config> {
        let doc = serde_json::json!({"model": {"path": model}, "data": {"train": data, "validation": data}});
        Config::from_yaml_str(&serde_yaml::to_string(&doc)?, "the command line", overrides)
    }

    /// Like [`Config::load`] for YAML text; `source_name` names the text in error messages.
    pub fn from_yaml_str(yaml: &str, source_name: &str, overrides: &[String]) -> Result<Config> {
        let file = Origin::File(source_name);
        let mut doc: Value = serde_yaml::from_str(yaml).map_err(|e| {
            let location = e.location().map(|l| (l.line(), l.column()));
            let text = strip_location(&e);
            let (path, message) = split_path(&text);
            let body = match message.strip_prefix("duplicate entry with key ") {
                Some(key) => {
                    format!("key `{}` is given twice; keep one", join_key(path, key.trim_matches('"')))
                }
                None => format!("invalid YAML: {text}"),
            };
            anyhow!("{}{body}", file.prefix(location))
        })?;
        match &doc {
            Value::Mapping(_) => {}
            Value::Null => {
                return Err(anyhow!(
                    "{source_name} is empty: a config needs at least `model.path` and \
                     `data.train`, e.g. `model: {{path: models/SmolLM2-135M}}` and \
                     `data: {{train: data/train.jsonl}}`; configs/reference.yaml lists every key"
                ))
            }
            other => {
                return Err(anyhow!(
                    "{source_name}: the top level must be a mapping of sections ({}), found {}",
                    SECTIONS.join(", "),
                    value_kind(other)
                ))
            }
        }

        let mut config: Config = serde_yaml::from_str(yaml).map_err(|e| explain(&e, &file))?;

        let mut applied: Vec<(String, &str)> = Vec::new();
        for set in overrides {
            let origin = Origin::Override(set);
            let (key, value) = parse_override(set)?;
            apply_override(&mut doc, &key, value).map_err(|msg| anyhow!("{}{msg}", origin.prefix(None)))?;
            // Re-serializing keeps serde_yaml's dotted paths in the errors; the positions refer
            // to the generated text, so `explain` drops them for overrides.
            let text = serde_yaml::to_string(&doc).map_err(|e| anyhow!("{}{e}", origin.prefix(None)))?;
            config = serde_yaml::from_str(&text).map_err(|e| explain(&e, &origin))?;
            applied.push((key.join("."), set.as_str()));
        }

        if let Err(invalid) = config.check() {
            let by_override = applied.iter().rev().find(|(key, _)| keys_overlap(key, invalid.key));
            let prefix = match by_override {
                Some((_, set)) => Origin::Override(set).prefix(None),
                None => {
                    let section = invalid.key.split('.').next().unwrap_or(invalid.key);
                    let location = locate(yaml, invalid.key).or_else(|| locate(yaml, section));
                    file.prefix(location)
                }
            };
            return Err(anyhow!("{prefix}{}", invalid.message));
        }
        Ok(config)
    }

    /// Refuses missing required paths and out-of-range values, naming the key and the allowed
    /// range. [`Config::load`] and [`Config::from_yaml_str`] call it already.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|invalid| anyhow!("{}", invalid.message))
    }

    /// The resolved config as YAML (every key, defaults filled in), to be written into the run
    /// directory. `Config::from_yaml_str(&config.to_yaml(), ..)` gives `config` back.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes to YAML")
    }

    fn check(&self) -> std::result::Result<(), Invalid> {
        let Config { model, lora, data, train, output } = self;

        required_path(
            "model.path",
            &model.path,
            "the Hugging Face model directory to fine-tune",
            "path: models/SmolLM2-135M",
        )?;

        at_least("lora.r", lora.r, 1)?;
        positive("lora.alpha", lora.alpha)?;
        fraction("lora.dropout", lora.dropout)?;
        if let TargetModules::List(names) = &lora.target_modules {
            if names.is_empty() {
                return Err(Invalid::new(
                    "lora.target_modules",
                    "`lora.target_modules` is empty; list at least one module name \
                     (e.g. [q_proj, v_proj]) or write `all-linear`"
                        .to_string(),
                ));
            }
            if let Some(index) = names.iter().position(|name| name.trim().is_empty()) {
                return Err(Invalid::new(
                    "lora.target_modules",
                    format!(
                        "`lora.target_modules[{index}]` is an empty name; every entry must be \
                         a module name such as `q_proj`"
                    ),
                ));
            }
        }

        if lora.exclude_modules == Some(TargetModules::AllLinear) {
            return Err(Invalid::new(
                "lora.exclude_modules",
                "`lora.exclude_modules` cannot be `all-linear`; give a list of module names or a regex"
                    .to_string(),
            ));
        }
        for (pattern, &r) in &lora.rank_pattern {
            valid_pattern("lora.rank_pattern", pattern)?;
            at_least("lora.rank_pattern", r, 1)?;
        }
        for (pattern, &alpha) in &lora.alpha_pattern {
            valid_pattern("lora.alpha_pattern", pattern)?;
            positive("lora.alpha_pattern", alpha)?;
        }

        required_path("data.train", &data.train, "the training data file", "train: data/train.jsonl")?;
        if let Some(validation) = &data.validation {
            if validation.as_os_str().is_empty() {
                return Err(Invalid::new(
                    "data.validation",
                    "`data.validation` is an empty path; give a file or null for no validation".to_string(),
                ));
            }
        }
        at_least("data.max_seq_len", data.max_seq_len, 2)?;
        if let Some(share) = data.val_split {
            if !(share > 0.0 && share < 1.0) {
                return Err(Invalid::new(
                    "data.val_split",
                    format!("`data.val_split` must be between 0 and 1 (e.g. 0.05), got {share}"),
                ));
            }
            if data.validation.is_some() {
                return Err(Invalid::new(
                    "data.val_split",
                    "give either `data.validation` (a file) or `data.val_split` (a share of the \
                     training records), not both"
                        .to_string(),
                ));
            }
        }
        if data.chat_template.trim().is_empty() {
            return Err(Invalid::new(
                "data.chat_template",
                "`data.chat_template` is empty; use auto, chatml, llama3 or a Jinja template".to_string(),
            ));
        }

        match train.max_steps {
            Some(0) => {
                return Err(Invalid::new(
                    "train.max_steps",
                    "`train.max_steps` must be at least 1 (got 0), or null to run \
                     `train.epochs` epochs"
                        .to_string(),
                ))
            }
            Some(_) => {}
            None if train.epochs == 0 => {
                return Err(Invalid::new(
                    "train.epochs",
                    "`train.epochs` must be at least 1 (got 0), or set `train.max_steps`".to_string(),
                ))
            }
            None => {}
        }
        at_least("train.micro_batch_size", train.micro_batch_size, 1)?;
        at_least("train.grad_accum_steps", train.grad_accum_steps, 1)?;
        positive("train.lr", train.lr)?;
        if !(train.weight_decay >= 0.0 && train.weight_decay.is_finite()) {
            return Err(Invalid::new(
                "train.weight_decay",
                format!("`train.weight_decay` must be a finite number >= 0, got {}", train.weight_decay),
            ));
        }
        fraction("train.adam_beta1", train.adam_beta1)?;
        fraction("train.adam_beta2", train.adam_beta2)?;
        positive("train.adam_eps", train.adam_eps)?;
        if let Some(norm) = train.max_grad_norm {
            if !(norm > 0.0 && norm.is_finite()) {
                return Err(Invalid::new(
                    "train.max_grad_norm",
                    format!(
                        "`train.max_grad_norm` must be a finite number > 0, got {norm}; \
                         use null to disable clipping"
                    ),
                ));
            }
        }
        if DeviceName::parse(&train.device).is_none() {
            return Err(Invalid::new(
                "train.device",
                format!(
                    "`train.device` must be `auto`, `cpu`, `cuda` or `cuda:N` (N = GPU index), \
                     got `{}`",
                    train.device
                ),
            ));
        }
        if train.threads == Some(0) {
            return Err(Invalid::new(
                "train.threads",
                "`train.threads` must be at least 1 (got 0), or null to use all cores".to_string(),
            ));
        }
        at_least("train.log_every", train.log_every, 1)?;
        if train.save_every == Some(0) {
            return Err(Invalid::new(
                "train.save_every",
                "`train.save_every` must be at least 1 (got 0), or null to save only at the end".to_string(),
            ));
        }
        for (key, value) in [
            ("train.keep_last", train.keep_last),
            ("train.eval_every", train.eval_every),
            ("train.early_stopping_patience", train.early_stopping_patience),
        ] {
            if value == Some(0) {
                return Err(Invalid::new(key, format!("`{key}` must be at least 1 (got 0), or null")));
            }
        }

        if output.dir.as_os_str().is_empty() {
            return Err(Invalid::new(
                "output.dir",
                "`output.dir` is empty; give a directory such as `checkpoints`".to_string(),
            ));
        }
        if let Some(name) = &output.run_name {
            let problem = if name.is_empty() {
                Some("must not be empty")
            } else if name.contains('/') || name.contains('\\') {
                Some("must not contain a path separator")
            } else if name.starts_with('.') {
                Some("must not start with '.'")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(Invalid::new(
                    "output.run_name",
                    format!(
                        "`output.run_name` {problem} (got `{name}`); it names one directory \
                         under `output.dir`, or null to generate a name"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A value refused by validation: the dotted key and a message that names it.
struct Invalid {
    key: &'static str,
    message: String,
}

impl Invalid {
    fn new(key: &'static str, message: String) -> Self {
        Invalid { key, message }
    }
}

fn required_path(
    key: &'static str,
    path: &Path,
    what: &str,
    example: &str,
) -> std::result::Result<(), Invalid> {
    if !path.as_os_str().is_empty() {
        return Ok(());
    }
    let (section, _) = key.split_once('.').unwrap_or((key, ""));
    Err(Invalid::new(
        key,
        format!(
            "missing required key `{key}` ({what}); add a line such as `{example}` under \
             `{section}:`, or pass `--set {key}=...`"
        ),
    ))
}

fn at_least(key: &'static str, value: usize, min: usize) -> std::result::Result<(), Invalid> {
    if value >= min {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be at least {min}, got {value}")))
}

fn positive(key: &'static str, value: f64) -> std::result::Result<(), Invalid> {
    if value > 0.0 && value.is_finite() {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be a finite number > 0, got {value}")))
}

/// In [0, 1).
fn fraction(key: &'static str, value: f64) -> std::result::Result<(), Invalid> {
    if (0.0..1.0).contains(&value) {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be in [0, 1) (at least 0 and below 1), got {value}")))
}

/// A rank/alpha pattern key must be a valid regex.
fn valid_pattern(key: &'static str, pattern: &str) -> std::result::Result<(), Invalid> {
    match regex::Regex::new(pattern) {
        Ok(_) => Ok(()),
        Err(e) => Err(Invalid::new(key, format!("`{key}` key `{pattern}` is not a valid regex: {e}"))),
    }
}

/// True when setting `set` may have produced the value at `key` (same key, or one contains the
/// other).
fn keys_overlap(set: &str, key: &str) -> bool {
    set == key
        || key.strip_prefix(set).is_some_and(|rest| rest.starts_with('.'))
        || set.strip_prefix(key).is_some_and(|rest| rest.starts_with('.'))
}

const SECTIONS: [&str; 5] = ["model", "lora", "data", "train", "output"];

/// Where a piece of configuration came from, for the start of an error message.
enum Origin<'a> {
    File(&'a str),
    Override(&'a str),
}

impl Origin<'_> {
    fn prefix(&self, location: Option<(usize, usize)>) -> String {
        match (self, location) {
            (Origin::File(name), Some((line, column))) => format!("{name}:{line}:{column}: "),
            (Origin::File(name), None) => format!("{name}: "),
            (Origin::Override(set), _) => format!("in --set {set}: "),
        }
    }
}

/// Splits `--set key.path=value` into the key's segments and the value parsed as YAML.
fn parse_override(set: &str) -> Result<(Vec<String>, Value)> {
    let prefix = Origin::Override(set).prefix(None);
    let Some((key, value)) = set.split_once('=') else {
        return Err(anyhow!("{prefix}expected `key.path=value`, e.g. `--set train.lr=1e-4`"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(anyhow!(
            "{prefix}the key is empty; expected `key.path=value`, e.g. `--set train.lr=1e-4`"
        ));
    }
    let segments: Vec<String> = key.split('.').map(|s| s.trim().to_string()).collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(anyhow!("{prefix}`{key}` has an empty part; keys are written like `train.lr`"));
    }
    let value: Value = serde_yaml::from_str(value).map_err(|e| {
        anyhow!(
            "{prefix}cannot read `{value}` as a YAML value ({}); quote text that starts with a \
             special character, e.g. '\"@text\"'",
            strip_location(&e)
        )
    })?;
    Ok((segments, value))
}

/// Sets `key` (segments) in `doc` to `value`, creating sections that are absent or null.
fn apply_override(doc: &mut Value, key: &[String], value: Value) -> std::result::Result<(), String> {
    let (leaf, parents) = key.split_last().expect("parse_override returns at least one segment");
    let mut current = doc;
    for (depth, segment) in parents.iter().enumerate() {
        let Value::Mapping(map) = current else { unreachable!("only mappings are descended into") };
        let entry = map.entry(Value::String(segment.clone())).or_insert(Value::Null);
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        if !entry.is_mapping() {
            return Err(format!(
                "`{}` is a single value, not a section, so `{}` cannot be set",
                key[..=depth].join("."),
                key.join(".")
            ));
        }
        current = entry;
    }
    let Value::Mapping(map) = current else { unreachable!("only mappings are descended into") };
    map.insert(Value::String(leaf.clone()), value);
    Ok(())
}

/// serde_yaml's message without its trailing " at line L column C" (the caller prints the
/// position in front).
fn strip_location(error: &serde_yaml::Error) -> String {
    let text = error.to_string();
    match error.location() {
        Some(l) => text.replacen(&format!(" at line {} column {}", l.line(), l.column()), "", 1),
        None => text,
    }
}

/// Turns a serde_yaml deserialization error into a message for the user.
fn explain(error: &serde_yaml::Error, origin: &Origin) -> anyhow::Error {
    let location = match origin {
        Origin::File(_) => error.location().map(|l| (l.line(), l.column())),
        Origin::Override(_) => None,
    };
    let text = strip_location(error);
    let (path, message) = split_path(&text);
    anyhow!("{}{}", origin.prefix(location), describe(path, message))
}

/// serde_yaml writes "dotted.path: message" (no path at the top level).
fn split_path(text: &str) -> (Option<&str>, &str) {
    if let Some((path, rest)) = text.split_once(": ") {
        let is_path =
            !path.is_empty() && path.chars().all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c));
        if is_path {
            return (Some(path), rest);
        }
    }
    (None, text)
}

/// The names between backticks, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn join_key(path: Option<&str>, name: &str) -> String {
    match path {
        Some(path) => format!("{path}.{name}"),
        None => name.to_string(),
    }
}

fn describe(path: Option<&str>, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((unknown, valid)) = names.split_first() {
            return unknown_key(path, unknown, valid);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        if let Some((unknown, valid)) = names.split_first() {
            return unknown_value(path, unknown, valid);
        }
    }
    if let Some(rest) = message.strip_prefix("duplicate field ") {
        if let Some(name) = backticked(rest).first() {
            return format!("key `{}` is given twice; keep one", join_key(path, name));
        }
    }
    let mismatch = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "));
    if let Some((found, expected)) = mismatch.and_then(|rest| rest.rsplit_once(", expected ")) {
        let expected = match (expected, path.and_then(allowed_values)) {
            ("a YAML tag starting with '!'", Some(values)) => {
                format!("one of {}", values.join(", "))
            }
            _ => plain_expected(expected),
        };
        let found = plain_found(found);
        return match path {
            Some(path) => format!("`{path}` must be {expected}, found {found}"),
            None => format!("expected {expected}, found {found}"),
        };
    }
    match path {
        Some(path) => format!("`{path}`: {message}"),
        None => message.to_string(),
    }
}

fn unknown_key(path: Option<&str>, unknown: &str, valid: &[&str]) -> String {
    let full = join_key(path, unknown);
    let kind = if path.is_some() { "key" } else { "section" };
    if let Some(close) = suggest(unknown, valid) {
        return format!("unknown {kind} `{full}`; did you mean `{close}`?");
    }
    match path {
        Some(path) => format!("unknown key `{full}`; the keys of `{path}` are: {}", valid.join(", ")),
        None => format!("unknown section `{full}`; the sections are: {}", valid.join(", ")),
    }
}

fn unknown_value(path: Option<&str>, unknown: &str, valid: &[&str]) -> String {
    let key = path.unwrap_or("value");
    let allowed = valid.join(", ");
    match suggest(unknown, valid) {
        Some(close) => {
            format!("unknown value `{unknown}` for `{key}`; did you mean `{close}`? (allowed: {allowed})")
        }
        None => format!("unknown value `{unknown}` for `{key}`; allowed: {allowed}"),
    }
}

/// The YAML spellings of the enum-valued keys.
fn allowed_values(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "model.dtype" => &["auto", "fp32", "bf16"],
        "lora.init" => &["kaiming", "gaussian"],
        "data.format" => &["completion", "alpaca", "input_output", "chat"],
        "data.train_on" => &["assistant", "last", "all"],
        "data.on_bad_row" => &["error", "skip"],
        "data.too_long" => &["truncate", "skip", "error"],
        "train.on_nonfinite" => &["stop", "skip"],
        "train.lr_scheduler" => &["constant", "linear", "cosine"],
        "train.precision" => &["auto", "fp32", "bf16-mixed"],
        _ => return None,
    })
}

/// serde's "expected" wording in the words of the YAML file.
fn plain_expected(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number >= 0".to_string(),
        "i64" | "i32" => "a whole number".to_string(),
        "f64" | "f32" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "path string" => "a path".to_string(),
        "a sequence" => "a list".to_string(),
        "field identifier" => "a key name".to_string(),
        other if other.starts_with("struct ") => "a section of `key: value` lines".to_string(),
        other => other.to_string(),
    }
}

/// serde's description of the value found, in the words of the YAML file.
fn plain_found(found: &str) -> String {
    match found {
        "unit value" => "null".to_string(),
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        other => other.to_string(),
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Names other tools use for our keys.
const SYNONYMS: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("rank", "r"),
    ("lora_r", "r"),
    ("lora_alpha", "alpha"),
    ("lora_dropout", "dropout"),
    ("batch_size", "micro_batch_size"),
    ("per_device_train_batch_size", "micro_batch_size"),
    ("gradient_accumulation_steps", "grad_accum_steps"),
    ("num_epochs", "epochs"),
    ("num_train_epochs", "epochs"),
    ("max_length", "max_seq_len"),
    ("seq_len", "max_seq_len"),
    ("cutoff_len", "max_seq_len"),
    ("scheduler", "lr_scheduler"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("clip_grad_norm", "max_grad_norm"),
    ("activation_checkpointing", "gradient_checkpointing"),
    ("enable_activation_checkpointing", "gradient_checkpointing"),
    ("output_dir", "dir"),
    ("model_name_or_path", "path"),
    ("eval", "validation"),
];

/// The candidate the user most likely meant by `input`: a known synonym, the same name up to
/// case and `-`/`_`, a name containing it (or contained in it), or one within a small edit
/// distance.
fn suggest<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normalize = |s: &str| s.trim().to_lowercase().replace('-', "_");
    let wanted = normalize(input);
    if wanted.is_empty() {
        return None;
    }
    for (from, to) in SYNONYMS {
        if *from == wanted {
            if let Some(found) = candidates.iter().find(|c| *c == to) {
                return Some(found);
            }
        }
    }
    let wanted_len = wanted.chars().count();
    let limit = wanted_len.max(3) / 3;
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let name = normalize(candidate);
        let distance = edit_distance(&wanted, &name);
        let related = (wanted_len >= 3 && name.contains(&wanted))
            || (name.chars().count() >= 3 && wanted.contains(&name));
        if (distance <= limit || related) && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// The 1-based line and column of `key` (dotted) in block-style YAML, if it can be found.
fn locate(yaml: &str, key: &str) -> Option<(usize, usize)> {
    let mut segments = key.split('.');
    let mut wanted = segments.next()?;
    // The indentation of the last matched key; lines must be deeper to belong to it.
    let mut parent_indent: Option<usize> = None;
    for (index, line) in yaml.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        match parent_indent {
            Some(parent) if indent <= parent => return None,
            None if indent > 0 => continue,
            _ => {}
        }
        let is_key =
            content.strip_prefix(wanted).is_some_and(|rest| rest.trim_start_matches(' ').starts_with(':'));
        if is_key {
            match segments.next() {
                Some(next) => {
                    wanted = next;
                    parent_indent = Some(indent);
                }
                None => return Some((index + 1, indent + 1)),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_swaps_once() {
        assert_eq!(edit_distance("train", "trian"), 1);
        assert_eq!(edit_distance("lr_sheduler", "lr_scheduler"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        let train = ["seed", "epochs", "lr", "lr_scheduler", "warmup_steps", "max_steps"];
        assert_eq!(suggest("lr_sheduler", &train), Some("lr_scheduler"));
        assert_eq!(suggest("learning_rate", &train), Some("lr"));
        assert_eq!(suggest("warmup", &train), Some("warmup_steps"));
        assert_eq!(suggest("epoch", &train), Some("epochs"));
        assert_eq!(suggest("zzzzzz", &train), None);
        assert_eq!(suggest("bf16", &["fp32", "bf16-mixed"]), Some("bf16-mixed"));
        assert_eq!(suggest("BF16_MIXED", &["fp32", "bf16-mixed"]), Some("bf16-mixed"));
        assert_eq!(suggest("trian", &SECTIONS), Some("train"));
        assert_eq!(suggest("all_linear", &[ALL_LINEAR]), Some(ALL_LINEAR));
        assert_eq!(suggest("q_proj", &[ALL_LINEAR]), None);
        // Synonyms only point at keys of the section in question.
        assert_eq!(suggest("learning_rate", &["r", "alpha"]), None);
    }

    #[test]
    fn locate_finds_nested_block_keys() {
        let yaml = "# top\nmodel:\n  path: x\ntrain:\n  # lr below\n  lr: 0\n  epochs: 0\nlr: 1\n";
        assert_eq!(locate(yaml, "model"), Some((2, 1)));
        assert_eq!(locate(yaml, "train.lr"), Some((6, 3)));
        assert_eq!(locate(yaml, "train.epochs"), Some((7, 3)));
        assert_eq!(locate(yaml, "model.lr"), None);
        assert_eq!(locate(yaml, "lora.r"), None);
        assert_eq!(locate("train: {lr: 0}\n", "train.lr"), None);
    }

    #[test]
    fn split_path_recognises_dotted_prefixes() {
        assert_eq!(
            split_path("train.lr: invalid type: string \"x\", expected f64"),
            (Some("train.lr"), "invalid type: string \"x\", expected f64")
        );
        assert_eq!(
            split_path("lora.target_modules[1]: invalid type: map, expected a string"),
            (Some("lora.target_modules[1]"), "invalid type: map, expected a string")
        );
        assert_eq!(
            split_path("invalid type: sequence, expected struct Config"),
            (None, "invalid type: sequence, expected struct Config")
        );
    }

    #[test]
    fn override_application() {
        let mut doc: Value = serde_yaml::from_str("train:\n  lr: 1\nlora:\n").unwrap();
        let key = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        apply_override(&mut doc, &key("train.epochs"), Value::from(3)).unwrap();
        apply_override(&mut doc, &key("lora.r"), Value::from(4)).unwrap();
        apply_override(&mut doc, &key("output.dir"), Value::from("out")).unwrap();
        assert_eq!(doc["train"]["lr"], Value::from(1));
        assert_eq!(doc["train"]["epochs"], Value::from(3));
        assert_eq!(doc["lora"]["r"], Value::from(4));
        assert_eq!(doc["output"]["dir"], Value::from("out"));
        let err = apply_override(&mut doc, &key("train.lr.x"), Value::from(1)).unwrap_err();
        assert!(err.contains("`train.lr` is a single value"), "{err}");
    }

    #[test]
    fn device_names() {
        let cuda = DeviceName::Cuda;
        for (ok, device) in [
            ("auto", DeviceName::Auto),
            ("cpu", DeviceName::Cpu),
            ("cuda", cuda(0)),
            ("cuda:0", cuda(0)),
            ("cuda:12", cuda(12)),
        ] {
            assert_eq!(DeviceName::parse(ok), Some(device), "{ok}");
        }
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda: 1",
            "cuda:99999999999999999999",
            "CPU",
            "mps",
        ] {
            assert_eq!(DeviceName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn allowed_values_match_the_enums() {
        fn check<T: serde::de::DeserializeOwned + fmt::Debug>(key: &str) {
            let values = allowed_values(key).unwrap();
            for value in values {
                serde_yaml::from_str::<T>(value).unwrap_or_else(|e| panic!("{key}: {value}: {e}"));
            }
            // serde lists the variants in its error for an unknown one: the same set.
            let error = serde_yaml::from_str::<T>("nonsense").unwrap_err().to_string();
            assert_eq!(&backticked(&error)[1..], values, "{key}");
        }
        check::<WeightDtype>("model.dtype");
        check::<LoraInit>("lora.init");
        check::<DataFormat>("data.format");
        check::<TrainOn>("data.train_on");
        check::<OnBadRow>("data.on_bad_row");
        check::<TooLong>("data.too_long");
        check::<OnNonFinite>("train.on_nonfinite");
        check::<LrScheduler>("train.lr_scheduler");
        check::<Precision>("train.precision");
    }

    #[test]
    fn weight_dtype_resolution() {
        use Precision::*;
        assert_eq!(WeightDtype::Auto.resolve(Bf16Mixed), WeightDtype::Bf16);
        assert_eq!(WeightDtype::Auto.resolve(Fp32), WeightDtype::Fp32);
        assert_eq!(WeightDtype::Fp32.resolve(Bf16Mixed), WeightDtype::Fp32);
        assert_eq!(WeightDtype::Bf16.resolve(Fp32), WeightDtype::Bf16);
    }
}
