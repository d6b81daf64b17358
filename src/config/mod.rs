//! The run configuration: one YAML file, `--set key.path=value` overrides, defaults and
//! validation.
//!
//! `configs/reference.yaml` documents every key. Loading happens in four steps, each with its
//! own kind of problem; every problem found is reported at once, one line each (file, line and
//! column first, in the order of the file), and each line names where it came from:
//!
//! 1. The file is parsed as YAML (syntax errors: file, line and column; these stop at once).
//!    Merge keys (`<<: *anchor`) are applied and top-level `x-` sections, which only hold
//!    anchors, are left out.
//! 2. The document is deserialized into [`Config`]: unknown keys and values (with a "did you
//!    mean" suggestion) and wrong types are reported with the dotted key, file, line and column.
//!    Each refused key is removed (its default takes its place) and the rest is read again.
//! 3. Each `--set` override is applied to the document and the result is deserialized again,
//!    one override at a time, so a problem names the override that caused it.
//! 4. [`Config::validate`] refuses out-of-range values and missing required keys, naming the
//!    override that set the key last, or else the file (with the key's line when it can be found).
//!
//! This file holds the schema and its defaults; `load` runs the four steps (doing 1 and 2
//! itself), `overrides` holds step 3, `validate` step 4, and `errors` words the messages of
//! steps 2 to 4.
//!
//! Relative paths are kept exactly as written; the caller resolves them against the current
//! directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

mod errors;
mod load;
mod overrides;
mod validate;

use errors::suggest;

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
    pub distill: DistillConfig,
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
    /// Store the frozen linear weights in 4 bits (QLoRA); `None` keeps them in `dtype`.
    #[serde(default)]
    pub quantize: Option<QuantFormat>,
    /// Quantize the 4-bit blocks' scales to 8 bits too (bitsandbytes' `bnb_4bit_use_double_quant`).
    #[serde(default = "default_true")]
    pub double_quant: bool,
}

/// A 4-bit format of bitsandbytes for the frozen linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// NormalFloat4, the QLoRA default.
    Nf4,
    Fp4,
}

/// The dtype of the frozen base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// bf16 when the run's (resolved) precision is `bf16-mixed`, fp16 when it is `fp16-mixed`,
    /// else fp32.
    #[default]
    Auto,
    Fp32,
    Bf16,
    Fp16,
}

impl WeightDtype {
    /// The concrete dtype for a run with the resolved `precision`: never [`WeightDtype::Auto`].
    pub fn resolve(self, precision: Precision) -> WeightDtype {
        match (self, precision) {
            (WeightDtype::Auto, Precision::Bf16Mixed) => WeightDtype::Bf16,
            (WeightDtype::Auto, Precision::Fp16Mixed) => WeightDtype::Fp16,
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
    #[serde(default)]
    pub train: TrainData,
    #[serde(default, serialize_with = "serialize_opt_path")]
    pub validation: Option<PathBuf>,
    /// Hold out this share of the training records (seeded) when there is no validation file.
    #[serde(default)]
    pub val_split: Option<f64>,
    /// The split to read from a `datasets` DatasetDict folder (`save_to_disk`).
    #[serde(default = "default_split")]
    pub split: String,
    /// The record layout; detected from the data when the YAML names none (see `format_unset`).
    #[serde(default)]
    pub format: DataFormat,
    /// Set by the loader when the loaded YAML has no `data.format`: `format` is then a
    /// placeholder until `data::format::resolve_format` detects it from the data.
    #[serde(skip)]
    pub format_unset: bool,
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

/// `data.train`: one data path (a file, folder or glob read with the data settings), or a list
/// of data sets mixed in one run, each with its own format, columns and weight.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainData {
    Path(PathBuf),
    Sets(Vec<DataSet>),
}

/// One data set of a `data.train` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSet {
    #[serde(default, serialize_with = "serialize_path", deserialize_with = "deserialize_path")]
    pub path: PathBuf,
    /// The set's record layout; `data.format` when absent, detected when neither is given.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// The set's column renames; `data.columns` when absent.
    #[serde(default)]
    pub columns: Option<BTreeMap<String, String>>,
    /// How many times each example counts: 2 repeats every example, 0.5 keeps a seeded half.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

impl TrainData {
    /// Every data path named, in order.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            TrainData::Path(path) => vec![path],
            TrainData::Sets(sets) => sets.iter().map(|s| s.path.as_path()).collect(),
        }
    }
}

impl Default for TrainData {
    fn default() -> TrainData {
        TrainData::Path(PathBuf::new())
    }
}

impl From<PathBuf> for TrainData {
    fn from(path: PathBuf) -> TrainData {
        TrainData::Path(path)
    }
}

/// Lets a plain path compare with the path it was given as.
impl PartialEq<PathBuf> for TrainData {
    fn eq(&self, other: &PathBuf) -> bool {
        matches!(self, TrainData::Path(path) if path == other)
    }
}

impl Serialize for TrainData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TrainData::Path(path) => serialize_path(path, serializer),
            TrainData::Sets(sets) => sets.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for TrainData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<TrainData, D::Error> {
        struct TrainVisitor;

        impl<'de> Visitor<'de> for TrainVisitor {
            type Value = TrainData;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path, or a list of data sets ({path, format, columns, weight})")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<TrainData, E> {
                deserialize_path(de::value::StrDeserializer::<E>::new(value)).map(TrainData::Path)
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<TrainData, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(TrainData::Sets)
            }
        }

        deserializer.deserialize_any(TrainVisitor)
    }
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
    /// Optimizer steps of linear warmup; see [`TrainConfig::warmup_steps_of`].
    pub warmup_steps: usize,
    /// Warmup as a share of the run's optimizer steps (instead of `warmup_steps`).
    pub warmup_ratio: Option<f64>,
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
    /// Seconds a data-parallel rank waits for the others (joining, each collective) before it
    /// ends the run with an error naming itself.
    pub dist_timeout: u64,
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
    /// What the run optimises: next-token loss, or a preference loss on chosen/rejected pairs.
    pub objective: Objective,
    /// Preference objectives: how strongly the adapter is held to the reference model (the
    /// base with the adapters off); TRL's `beta` (IPO's τ).
    pub beta: f64,
    /// `dpo`: the assumed probability that a pair's preference is flipped, as TRL's robust DPO
    /// (`loss_type: robust`) uses it; 0 is plain sigmoid DPO.
    pub label_smoothing: f64,
    /// `kto`: the weight of the desirable (chosen) answers' losses (TRL's `desirable_weight`).
    pub desirable_weight: f64,
    /// `kto`: the weight of the undesirable (rejected) answers' losses.
    pub undesirable_weight: f64,
    /// Preference objectives: compute the reference log-probabilities of every training and
    /// validation pair once before training, instead of a reference pass per micro-batch.
    pub precompute_ref: bool,
}

/// The training objective (`train.objective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning: mean next-token NLL over the trained tokens.
    #[default]
    Sft,
    /// Direct preference optimisation (TRL's sigmoid loss, robust with `label_smoothing`).
    Dpo,
    /// Identity preference optimisation (TRL's `ipo`, log-ratios averaged per token).
    Ipo,
    /// Odds ratio preference optimisation (TRL's ORPOTrainer): reference-free, NLL on the
    /// chosen answers plus the odds ratio of length-averaged log-probabilities.
    Orpo,
    /// Kahneman-Tversky optimisation (TRL's KTOTrainer): answers labelled desirable or not,
    /// each against a batch KL estimate.
    Kto,
    /// Distillation from the teacher of the `distill` section, on the SFT data.
    Distill,
}

impl Objective {
    /// Whether the data are chosen/rejected pairs.
    pub fn is_preference(self) -> bool {
        matches!(self, Objective::Dpo | Objective::Ipo | Objective::Orpo | Objective::Kto)
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Ipo => "ipo",
            Objective::Orpo => "orpo",
            Objective::Kto => "kto",
            Objective::Distill => "distill",
        })
    }
}

/// Distillation (`train.objective: distill`): per label token,
/// `alpha · CE + (1 − alpha) · T² · D(teacher_T ‖ student_T)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// The teacher's model directory, a path as `model.path` takes one; required by the objective
    /// unless `cache` gives the teacher's distributions.
    #[serde(serialize_with = "serialize_opt_path")]
    pub teacher: Option<PathBuf>,
    /// A folder `lorafit distill-cache` wrote: the teacher's top-k log-probabilities, read instead
    /// of loading the teacher.
    #[serde(serialize_with = "serialize_opt_path")]
    pub cache: Option<PathBuf>,
    /// Hold the teacher's linear layers in 4 bits (with double-quantized scales), as
    /// `model.quantize` does the student's: a larger teacher in the same memory.
    pub quantize: Option<QuantFormat>,
    /// The temperature T both distributions are softened by.
    pub temperature: f64,
    /// The weight of the hard-label cross-entropy.
    pub alpha: f64,
    pub loss: Divergence,
    /// `jsd`: the teacher's weight in the mixture the two distributions are compared with.
    pub jsd_beta: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            teacher: None,
            cache: None,
            quantize: None,
            temperature: 1.0,
            alpha: 0.5,
            loss: Divergence::default(),
            jsd_beta: 0.5,
        }
    }
}

/// How the student's distribution is compared with the teacher's (`distill.loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// KL(teacher ‖ student), as torchtune's knowledge-distillation recipe.
    #[default]
    ForwardKl,
    /// KL(student ‖ teacher).
    ReverseKl,
    /// Generalised Jensen-Shannon with the teacher's weight `jsd_beta` (TRL's GKD).
    Jsd,
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
            warmup_ratio: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: Some(1.0),
            precision: Precision::default(),
            gradient_checkpointing: false,
            device: "auto".to_string(),
            threads: None,
            dist_timeout: 300,
            log_every: 1,
            save_every: None,
            keep_last: None,
            eval_every: None,
            save_best: false,
            early_stopping_patience: None,
            on_nonfinite: OnNonFinite::default(),
            objective: Objective::default(),
            beta: 0.1,
            label_smoothing: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            precompute_ref: false,
        }
    }
}

impl TrainConfig {
    /// The warmup steps of a run of `total_steps` optimizer steps: `warmup_steps`, or
    /// `warmup_ratio` of the total rounded up, as the Hugging Face Trainer counts it.
    pub fn warmup_steps_of(&self, total_steps: usize) -> usize {
        match self.warmup_ratio {
            Some(ratio) => (ratio * total_steps as f64).ceil() as usize,
            None => self.warmup_steps,
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
    /// fp16 compute with fp32 adapter weights and optimizer state, and dynamic loss scaling
    /// (`train::scaler`), for GPUs without bf16.
    Fp16Mixed,
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
        ModelConfig {
            path: PathBuf::new(),
            dtype: WeightDtype::default(),
            quantize: None,
            double_quant: true,
        }
    }
}

impl DataConfig {
    fn unset() -> Self {
        DataConfig {
            train: TrainData::default(),
            validation: None,
            val_split: None,
            split: default_split(),
            format: DataFormat::default(),
            format_unset: false,
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

const SECTIONS: [&str; 6] = ["model", "lora", "data", "train", "distill", "output"];

#[cfg(test)]
mod tests {
    use super::*;

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
    fn weight_dtype_resolution() {
        use Precision::*;
        assert_eq!(WeightDtype::Auto.resolve(Bf16Mixed), WeightDtype::Bf16);
        assert_eq!(WeightDtype::Auto.resolve(Fp32), WeightDtype::Fp32);
        assert_eq!(WeightDtype::Auto.resolve(Fp16Mixed), WeightDtype::Fp16);
        assert_eq!(WeightDtype::Fp32.resolve(Bf16Mixed), WeightDtype::Fp32);
        assert_eq!(WeightDtype::Bf16.resolve(Fp32), WeightDtype::Bf16);
    }
}
