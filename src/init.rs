//! `lorafit init`: a commented starting config for a model and a data file, from what they say
//! about themselves (family and linear layers from config.json, record layout from the data's
//! columns) and from the settings the community uses for the family (the presets).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{Config, DataFormat};
use crate::data::format::detect_data_format;
use crate::model::spec::Family;
use crate::model::{LinearSites, ModelSpec};

/// The usual LoRA settings for one family, as the fine-tuning tools' own examples set them.
pub struct Preset {
    pub name: &'static str,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub lr: f64,
    pub max_seq_len: usize,
    /// Where the values come from, written into the config.
    pub source: &'static str,
}

/// A file of Unsloth's notebooks, by name.
macro_rules! unsloth_notebook {
    ($file:literal) => {
        concat!("Unsloth's notebook https://github.com/unslothai/notebooks/blob/main/python_scripts/", $file)
    };
}

/// One per supported family, plus SmolLM2 (a llama) as Hugging Face's course trains it. Each
/// `source` names the file its numbers are taken from; tests/fixtures/preset_sources.json holds
/// the numbers read out of those files (scripts/fixtures/make_preset_sources.py), and a test
/// holds the presets to them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "llama",
        r: 16,
        alpha: 16.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Llama3.1_(8B)-Alpaca.py"),
    },
    Preset {
        name: "mistral",
        r: 16,
        alpha: 16.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Mistral_v0.3_(7B)-Conversational.py"),
    },
    Preset {
        name: "qwen2",
        r: 16,
        alpha: 16.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Qwen2.5_(7B)-Alpaca.py"),
    },
    Preset {
        name: "qwen3",
        r: 32,
        alpha: 32.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Qwen3_(14B).py"),
    },
    Preset {
        name: "gemma2",
        r: 16,
        alpha: 16.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Gemma2_(9B)-Alpaca.py"),
    },
    Preset {
        name: "gemma3",
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Gemma3_(4B).py"),
    },
    Preset {
        name: "phi3",
        r: 16,
        alpha: 16.0,
        dropout: 0.0,
        lr: 2e-4,
        max_seq_len: 2048,
        source: unsloth_notebook!("Phi_3.5_Mini-Conversational.py"),
    },
    Preset {
        name: "gpt2",
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        lr: 1e-4,
        // The example's cutoff_len is 2048, but GPT-2 has 1024 learned positions.
        max_seq_len: 1024,
        source: "LLaMA-Factory's example \
                 https://github.com/hiyouga/LLaMA-Factory/blob/main/examples/train_lora/qwen3_lora_sft.yaml \
                 (lora_alpha and lora_dropout at LLaMA-Factory's defaults, 2 r and 0)",
    },
    Preset {
        name: "smollm2",
        r: 6,
        alpha: 8.0,
        dropout: 0.05,
        lr: 2e-4,
        max_seq_len: 1512,
        source: "Hugging Face's smol-course notebook \
                 https://github.com/huggingface/smol-course/blob/main/v1/3_parameter_efficient_finetuning/notebooks/finetune_sft_peft.ipynb",
    },
];

/// What `lorafit init` was given.
pub struct InitOptions {
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub preset: Option<String>,
    pub out: PathBuf,
    pub force: bool,
}

/// Writes the config and returns a line saying what it is based on.
pub fn init_command(opts: &InitOptions) -> Result<String> {
    if opts.out.exists() && !opts.force {
        bail!("{} exists; pass --force to replace it, or --out another file", opts.out.display());
    }
    let model = opts.model.as_deref().map(read_model).transpose()?;
    let preset = match (&opts.preset, &model) {
        (Some(name), _) => find_preset(name)?,
        (None, Some(model)) => family_preset(model.spec.family),
        (None, None) => bail!("give --model DIR, --preset NAME or both (presets: {})", preset_names()),
    };
    let format = opts
        .data
        .as_deref()
        .map(|data| detect_data_format(data, "train", &Default::default()))
        .transpose()?;
    let text = render(opts, preset, model.as_ref(), format);
    // What is written must load: a mistake here is ours, not the user's.
    Config::from_yaml_str(&text, &opts.out.display().to_string(), &[])
        .context("the generated config does not load")?;
    std::fs::write(&opts.out, &text).map_err(|e| anyhow!("cannot write {}: {e}", opts.out.display()))?;
    Ok(format!("wrote {} (preset {})", opts.out.display(), preset.name))
}

/// What the config needs from the model directory.
struct ModelFacts {
    spec: ModelSpec,
    /// The linear layers' names (`q_proj`, ...), output head excluded, in model order.
    targets: Vec<String>,
}

fn read_model(dir: &Path) -> Result<ModelFacts> {
    let spec = ModelSpec::from_dir(dir)?;
    let sites = LinearSites::of(&spec);
    let mut targets: Vec<String> = Vec::new();
    for site in sites.layer(0) {
        let leaf = site.path.rsplit('.').next().unwrap_or(&site.path).to_string();
        if !targets.contains(&leaf) {
            targets.push(leaf);
        }
    }
    Ok(ModelFacts { spec, targets })
}

fn find_preset(name: &str) -> Result<&'static Preset> {
    let wanted = name.trim().to_lowercase();
    PRESETS
        .iter()
        .find(|p| p.name == wanted)
        .ok_or_else(|| anyhow!("unknown preset `{name}`; the presets are: {}", preset_names()))
}

fn preset_names() -> String {
    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

fn family_preset(family: Family) -> &'static Preset {
    let name = match family {
        Family::Llama => "llama",
        Family::Mistral => "mistral",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
        Family::Phi3 => "phi3",
        Family::Gpt2 => "gpt2",
    };
    PRESETS.iter().find(|p| p.name == name).expect("every family has a preset")
}

/// Micro-batch and accumulation: no memory is measured, so a conservative default by model size
/// (4 × 2 below a billion parameters, 1 × 8 above), the same 8 sequences per step.
fn batch_for(model: Option<&ModelFacts>) -> (usize, usize) {
    match model {
        Some(m) if m.spec.parameter_count() >= 1_000_000_000 => (1, 8),
        _ => (4, 2),
    }
}

/// A YAML scalar for a path, quoted when YAML needs it.
fn yaml_path(path: &Path) -> String {
    let text = serde_yaml::to_string(&path.to_string_lossy()).unwrap_or_default();
    text.trim_end().to_string()
}

fn render(
    opts: &InitOptions,
    preset: &Preset,
    model: Option<&ModelFacts>,
    format: Option<DataFormat>,
) -> String {
    let model_path = opts.model.as_deref().map_or("path/to/model-directory".to_string(), yaml_path);
    let data_path = opts.data.as_deref().map_or("path/to/train.jsonl".to_string(), yaml_path);
    let (targets, targets_note) = match model {
        Some(m) => {
            (format!("[{}]", m.targets.join(", ")), "this model's linear layers, as all-linear picks them")
        }
        None => ("all-linear".to_string(), "every linear layer but the output head"),
    };
    let (max_seq_len, length_note) = match model {
        Some(m) if (m.spec.positions() as usize) < preset.max_seq_len => {
            (m.spec.positions() as usize, "the model's position")
        }
        _ => (preset.max_seq_len, "the preset's"),
    };
    let format_note = match format {
        Some(_) => "Record layout, detected from the data's columns",
        None => "Record layout: completion | alpaca | input_output | chat",
    };
    let format = format.unwrap_or_default();
    let (micro, accum) = batch_for(model);
    format!(
        "# Written by `lorafit init`; configs/reference.yaml documents every key.\n\
         # LoRA settings of the `{name}` preset, after {source}.\n\
         model:\n  \
           # A Hugging Face model directory (config.json, safetensors, tokenizer.json).\n  \
           path: {model_path}\n\
         lora:\n  \
           r: {r}\n  \
           alpha: {alpha:?}\n  \
           dropout: {dropout:?}\n  \
           # Adapted layers: {targets_note}; a shorter list trains fewer weights.\n  \
           target_modules: {targets}\n\
         data:\n  \
           train: {data_path}\n  \
           # A held-out file (validation: val.jsonl) or share (val_split: 0.05) adds an eval loss.\n  \
           # {format_note}\n  \
           format: {format}\n  \
           # Tokens per example: {length_note} length. Longer examples are truncated.\n  \
           max_seq_len: {max_seq_len}\n\
         train:\n  \
           epochs: 1\n  \
           # {micro} x {accum} sequences per optimizer step: a conservative default for the model's\n  \
           # size, not measured here; raise micro_batch_size if memory allows.\n  \
           micro_batch_size: {micro}\n  \
           grad_accum_steps: {accum}\n  \
           lr: {lr:?}\n  \
           lr_scheduler: cosine\n  \
           warmup_ratio: 0.03\n  \
           # bf16-mixed where bf16 is native, else fp32.\n  \
           precision: auto\n\
         output:\n  \
           dir: checkpoints\n",
        name = preset.name,
        source = preset.source,
        r = preset.r,
        alpha = preset.alpha,
        dropout = preset.dropout,
        lr = preset.lr,
    )
}
