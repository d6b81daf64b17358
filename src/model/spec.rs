//! `config.json` → [`ModelSpec`]: the sizes and switches the one decoder needs, for every
//! supported family. Families differ here, as data, and in [`super::names::ModuleNames`] (their tensor names);
//! `decoder.rs` has no per-family code paths.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The model families lorafit knows, by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
    Gpt2,
}

const SUPPORTED: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("phi3", Family::Phi3),
    ("gpt2", Family::Gpt2),
];

impl Family {
    /// Every supported family.
    pub fn all() -> impl Iterator<Item = Family> {
        SUPPORTED.iter().map(|(_, family)| *family)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// `x / rms(x) · w`
    Rms,
    /// Gemma: `x / rms(x) · (1 + w)`
    RmsPlusOne,
    /// `LayerNorm` with weight and bias (GPT-2).
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, GPT-2's `gelu_new`).
    GeluTanh,
    Gelu,
}

/// How rotary frequencies are derived (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Phi-3: per-dimension factors, `long` once a sequence exceeds the original context.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: i64,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Leading dimensions of each head that rotate (`head_dim · partial_rotary_factor`).
    pub rotary_dim: i64,
}

impl Rope {
    /// Whether a sequence growing from `from` to `to` tokens changes the frequencies of every
    /// position: longrope's, once it outgrows the original context.
    pub fn switches_factors(&self, from: i64, to: i64) -> bool {
        match self.scaling {
            RopeScaling::LongRope { original_max_position_embeddings: original, .. } => {
                from <= original && to > original
            }
            _ => false,
        }
    }
}

/// Dropout probabilities the model itself applies in training, where transformers applies them
/// in train mode. Zero for the families whose configs carry none that lorafit reads.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Dropout {
    /// On the embeddings entering the first block (GPT-2's `embd_pdrop`).
    pub embeddings: f64,
    /// On the attention probabilities (GPT-2's `attn_pdrop`).
    pub attention: f64,
    /// On the output of each attention and MLP before the residual add (GPT-2's `resid_pdrop`).
    pub residual: f64,
}

impl Dropout {
    pub fn any(&self) -> bool {
        self.embeddings > 0.0 || self.attention > 0.0 || self.residual > 0.0
    }

    /// These probabilities in training, none otherwise.
    pub fn in_training(self, train: bool) -> Dropout {
        if train {
            self
        } else {
            Dropout::default()
        }
    }
}

/// Which keys a layer's queries see besides the causal rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionSpan {
    Global,
    /// Only the last `n` positions, the query's own included.
    Sliding(i64),
}

/// Everything the decoder needs to know about an architecture, read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub family: Family,
    pub model_type: String,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub activation: Activation,
    /// `None` for learned absolute positions (GPT-2).
    pub rope: Option<Rope>,
    /// Gemma 3's separate rotary base for sliding-window layers.
    pub local_rope: Option<Rope>,
    pub layer_spans: Vec<AttentionSpan>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma 2/3: norms after attention and after the MLP as well as before.
    pub sandwich_norms: bool,
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma: embeddings × √hidden_size.
    pub embed_scale: Option<f64>,
    pub dropout: Dropout,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
}

/// Typed access to config.json with errors that name the key.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| anyhow!("config.json: `{key}` must be an integer, found {v}")))
            .transpose()
    }
    /// A size or count: a zero or negative one would only fail later, far from its key.
    fn positive(&self, key: &str) -> Result<i64> {
        self.opt_positive(key)?.ok_or_else(|| anyhow!("config.json has no `{key}`"))
    }
    fn opt_positive(&self, key: &str) -> Result<Option<i64>> {
        match self.opt_int(key)? {
            Some(n) if n <= 0 => bail!("config.json: `{key}` must be a positive integer, found {n}"),
            n => Ok(n),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| anyhow!("config.json: `{key}` must be a number, found {v}")))
            .transpose()
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }
    fn probability_or(&self, key: &str, default: f64) -> Result<f64> {
        let p = self.f64_or(key, default)?;
        if !(0.0..=1.0).contains(&p) {
            bail!("config.json: `{key}` is a dropout probability and must be within 0..1, found {p}");
        }
        Ok(p)
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

impl ModelSpec {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelSpec> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: model.path must be a Hugging Face model directory \
                 (config.json, model.safetensors, tokenizer.json)",
                path.display()
            )
        })?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<ModelSpec> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let map = value.as_object().ok_or_else(|| anyhow!("config.json must be a JSON object"))?;
        let f = Fields(map);
        let model_type = f.str("model_type").unwrap_or("llama").to_string();
        let family = match SUPPORTED.iter().find(|(name, _)| *name == model_type) {
            Some((_, family)) => *family,
            None if model_type == "gemma3" => bail!(
                "model_type `gemma3` is the multimodal Gemma 3; fine-tune its text model \
                 (a checkpoint with model_type `gemma3_text`, e.g. gemma-3-1b)"
            ),
            None => bail!(
                "model_type `{model_type}` is not supported (supported: {})",
                SUPPORTED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        };
        if family == Family::Gpt2 {
            return gpt2(&f, model_type);
        }

        let hidden_size = f.positive("hidden_size")?;
        let num_heads = f.positive("num_attention_heads")?;
        let num_kv_heads = f.opt_positive("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_positive("head_dim")? {
            Some(head_dim) => head_dim,
            None => heads_divide("hidden_size", hidden_size, "num_attention_heads", num_heads)?,
        };
        check_kv_heads(num_heads, num_kv_heads)?;
        let num_layers = f.positive("num_hidden_layers")? as usize;
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        let act_name = f.str("hidden_activation").or(f.str("hidden_act")).unwrap_or("silu");
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => bail!("activation `{other}` is not supported (silu, gelu, gelu_pytorch_tanh)"),
        };
        let (rope, local_rope) = ropes(&f, family, head_dim)?;
        let layer_spans = layer_spans(&f, family, num_layers)?;
        let attn_scale = match f.opt_f64("query_pre_attn_scalar")? {
            Some(s) if gemma => 1.0 / s.sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        Ok(ModelSpec {
            family,
            model_type,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.positive("vocab_size")?,
            max_position_embeddings: f.opt_positive("max_position_embeddings")?.unwrap_or(2048),
            norm: if gemma { NormKind::RmsPlusOne } else { NormKind::Rms },
            norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            activation,
            rope: Some(rope),
            local_rope,
            layer_spans,
            qkv_bias: family == Family::Qwen2 || f.bool_or("attention_bias", false),
            o_bias: family != Family::Qwen2 && f.bool_or("attention_bias", false),
            mlp_bias: f.bool_or("mlp_bias", false),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sandwich_norms: gemma,
            attn_scale,
            attn_softcap: if gemma { f.opt_f64("attn_logit_softcapping")? } else { None },
            final_softcap: if gemma { f.opt_f64("final_logit_softcapping")? } else { None },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            dropout: Dropout::default(),
            // transformers' per-family default when the key is absent: Gemma ties, the rest do not.
            tie_word_embeddings: f.bool_or("tie_word_embeddings", gemma),
            bos_token_id: f.opt_int("bos_token_id")?,
            eos_token_ids: eos_ids(&f),
        })
    }

    /// The longest sequence the model's positions cover: `max_position_embeddings`, stretched by
    /// linear RoPE scaling (the configs of the other scalings give the stretched length already).
    pub fn positions(&self) -> i64 {
        match &self.rope {
            Some(Rope { scaling: RopeScaling::Linear { factor }, .. }) => {
                (self.max_position_embeddings as f64 * factor) as i64
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Parameter count of the base model (embeddings counted once when tied).
    pub fn parameter_count(&self) -> i64 {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let bias = |on: bool, n: i64| if on { n } else { 0 };
        let norm_params = if self.norm == NormKind::Layer { 2 * h } else { h };
        let attn = h * q
            + 2 * h * kv
            + q * h
            + bias(self.qkv_bias, q + 2 * kv)
            + bias(self.o_bias, h)
            + bias(self.qk_norm, 2 * hd);
        let mlp = match self.family {
            Family::Gpt2 => 2 * h * f + bias(self.mlp_bias, f + h),
            _ => 3 * h * f + bias(self.mlp_bias, 2 * f + h),
        };
        let norms_per_layer = if self.sandwich_norms { 4 } else { 2 };
        let per_layer = attn + mlp + norms_per_layer * norm_params;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let positions = if self.rope.is_none() { self.max_position_embeddings * h } else { 0 };
        embed + positions + head + norm_params + per_layer * self.num_layers as i64
    }
}

/// The head size when config.json derives it as `hidden / heads`.
fn heads_divide(hidden_key: &str, hidden: i64, heads_key: &str, heads: i64) -> Result<i64> {
    if hidden % heads != 0 {
        bail!("config.json: `{hidden_key}` {hidden} is not a multiple of `{heads_key}` {heads}");
    }
    Ok(hidden / heads)
}

fn check_kv_heads(heads: i64, kv_heads: i64) -> Result<()> {
    if heads % kv_heads != 0 {
        bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
    }
    Ok(())
}

fn eos_ids(f: &Fields) -> Vec<i64> {
    match f.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
        Some(v) => v.as_i64().into_iter().collect(),
        None => vec![],
    }
}

/// GPT-2's own config names (`n_embd`, `n_layer`, ...), learned positions, LayerNorm.
fn gpt2(f: &Fields, model_type: String) -> Result<ModelSpec> {
    let hidden_size = f.positive("n_embd")?;
    let num_heads = f.positive("n_head")?;
    let head_dim = heads_divide("n_embd", hidden_size, "n_head", num_heads)?;
    if f.bool_or("scale_attn_by_inverse_layer_idx", false) || f.bool_or("reorder_and_upcast_attn", false) {
        bail!("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported");
    }
    let activation = match f.str("activation_function").unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        other => bail!("activation_function `{other}` is not supported (gelu_new, gelu)"),
    };
    let num_layers = f.positive("n_layer")? as usize;
    Ok(ModelSpec {
        family: Family::Gpt2,
        model_type,
        hidden_size,
        intermediate_size: f.opt_positive("n_inner")?.unwrap_or(4 * hidden_size),
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        vocab_size: f.positive("vocab_size")?,
        max_position_embeddings: f.positive("n_positions")?,
        norm: NormKind::Layer,
        norm_eps: f.f64_or("layer_norm_epsilon", 1e-5)?,
        activation,
        rope: None,
        local_rope: None,
        layer_spans: vec![AttentionSpan::Global; num_layers],
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        qk_norm: false,
        sandwich_norms: false,
        attn_scale: if f.bool_or("scale_attn_weights", true) { 1.0 / (head_dim as f64).sqrt() } else { 1.0 },
        attn_softcap: None,
        final_softcap: None,
        embed_scale: None,
        // GPT2Config's defaults.
        dropout: Dropout {
            embeddings: f.probability_or("embd_pdrop", 0.1)?,
            attention: f.probability_or("attn_pdrop", 0.1)?,
            residual: f.probability_or("resid_pdrop", 0.1)?,
        },
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true),
        bos_token_id: f.opt_int("bos_token_id")?,
        eos_token_ids: eos_ids(f),
    })
}

/// The global rope and, for Gemma 3, the one of sliding layers. Reads both the newer
/// `rope_parameters` (possibly keyed by layer type) and the legacy `rope_theta` + `rope_scaling`.
fn ropes(f: &Fields, family: Family, head_dim: i64) -> Result<(Rope, Option<Rope>)> {
    let partial = f.f64_or("partial_rotary_factor", 1.0)?;
    let default_theta = if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 };
    let legacy_theta = f.f64_or("rope_theta", default_theta)?;
    let original_max = f.opt_positive("original_max_position_embeddings")?;
    let max_pos = f.opt_positive("max_position_embeddings")?.unwrap_or(2048);
    let parse = |params: Option<&Map<String, Value>>, theta: f64| -> Result<Rope> {
        let p = Fields(params.unwrap_or(&EMPTY));
        let theta = p.f64_or("rope_theta", theta)?;
        let partial = p.f64_or("partial_rotary_factor", partial)?;
        let rotary_dim = (head_dim as f64 * partial) as i64;
        let kind = p.str("rope_type").or(p.str("type")).unwrap_or("default");
        let original = p.opt_positive("original_max_position_embeddings")?.or(original_max);
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: p.f64_or("factor", 1.0)? },
            "llama3" => RopeScaling::Llama3 {
                factor: p.f64_or("factor", 8.0)?,
                low_freq_factor: p.f64_or("low_freq_factor", 1.0)?,
                high_freq_factor: p.f64_or("high_freq_factor", 4.0)?,
                original_max_position_embeddings: original.unwrap_or(8192) as f64,
            },
            "longrope" => {
                let floats = |key: &str| -> Result<Vec<f64>> {
                    p.get(key)
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
                        .filter(|v| v.len() as i64 == rotary_dim / 2)
                        .ok_or_else(|| anyhow!("rope `{key}` must be a list of {} numbers", rotary_dim / 2))
                };
                let original =
                    original.ok_or_else(|| anyhow!("longrope needs original_max_position_embeddings"))?;
                let factor = p.f64_or("factor", max_pos as f64 / original as f64)?;
                let default_attention =
                    if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (original as f64).ln()).sqrt() };
                RopeScaling::LongRope {
                    short_factor: floats("short_factor")?,
                    long_factor: floats("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor: p.f64_or("attention_factor", default_attention)?,
                }
            }
            other => {
                bail!("rope type `{other}` is not supported (default, linear, llama3, longrope)")
            }
        };
        Ok(Rope { theta, scaling, rotary_dim })
    };
    match object(f.get("rope_parameters")) {
        // Per layer type, as transformers 5 writes Gemma 3's.
        Some(params) if params.contains_key("full_attention") => {
            let global = parse(object(params.get("full_attention")), legacy_theta)?;
            let local =
                object(params.get("sliding_attention")).map(|p| parse(Some(p), 10_000.0)).transpose()?;
            Ok((global, local))
        }
        Some(params) => Ok((parse(Some(params), legacy_theta)?, None)),
        None => {
            let global = parse(object(f.get("rope_scaling")), legacy_theta)?;
            let local = match (family, f.opt_f64("rope_local_base_freq")?) {
                (Family::Gemma3, base) => Some(Rope {
                    theta: base.unwrap_or(10_000.0),
                    scaling: RopeScaling::None,
                    rotary_dim: global.rotary_dim,
                }),
                _ => None,
            };
            Ok((global, local))
        }
    }
}

fn object(v: Option<&Value>) -> Option<&Map<String, Value>> {
    v.and_then(Value::as_object)
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// Global or sliding attention per layer: `layer_types` when given, else each family's rule.
fn layer_spans(f: &Fields, family: Family, num_layers: usize) -> Result<Vec<AttentionSpan>> {
    let window = f.opt_positive("sliding_window")?;
    let gemma3_pattern = f.opt_positive("sliding_window_pattern")?.unwrap_or(6) as usize;
    let sliding = |on: bool| match (on, window) {
        (true, Some(w)) => AttentionSpan::Sliding(w),
        _ => AttentionSpan::Global,
    };
    if let Some(types) = f.get("layer_types").and_then(Value::as_array) {
        if types.len() != num_layers {
            bail!("config.json: `layer_types` has {} entries for {num_layers} layers", types.len());
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(AttentionSpan::Global),
                Some("sliding_attention") => Ok(sliding(true)),
                _ => {
                    bail!("config.json: layer type {t} is not supported (full_attention, sliding_attention)")
                }
            })
            .collect();
    }
    Ok((0..num_layers)
        .map(|i| match family {
            Family::Mistral | Family::Phi3 => sliding(true),
            Family::Qwen2 | Family::Qwen3 => sliding(
                f.bool_or("use_sliding_window", false)
                    && i as i64 >= f.opt_int("max_window_layers").ok().flatten().unwrap_or(0),
            ),
            Family::Gemma2 => sliding(i % 2 == 0),
            Family::Gemma3 => sliding((i + 1) % gemma3_pattern != 0),
            _ => AttentionSpan::Global,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_config_with_gqa_and_defaults() {
        let spec = ModelSpec::from_json(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":172,"num_hidden_layers":5,
                "num_attention_heads":8,"num_key_value_heads":4,"vocab_size":512,"tie_word_embeddings":true,
                "eos_token_id":2}"#,
        )
        .unwrap();
        assert_eq!(spec.head_dim, 8);
        assert_eq!(spec.num_kv_heads, 4);
        assert_eq!(spec.eos_token_ids, vec![2]);
        assert_eq!(spec.norm_eps, 1e-6);
        assert_eq!(spec.rope.as_ref().unwrap().theta, 10_000.0);
        // stories260K: 260,032 parameters with tied embeddings (its model card).
        assert_eq!(spec.parameter_count(), 260_032);
    }

    #[test]
    fn legacy_and_new_rope_layouts_agree() {
        let base = r#""model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
                      "num_attention_heads":4,"vocab_size":32"#;
        let legacy = ModelSpec::from_json(&format!(
            r#"{{{base},"rope_theta":500000.0,"rope_scaling":{{"type":"linear","factor":2.0}}}}"#
        ))
        .unwrap();
        let new = ModelSpec::from_json(&format!(
            r#"{{{base},"rope_parameters":{{"rope_type":"linear","rope_theta":500000.0,"factor":2.0}}}}"#
        ))
        .unwrap();
        assert_eq!(legacy.rope, new.rope);
        assert_eq!(new.rope.unwrap().scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn refuses_unknown_architectures_by_name() {
        let err = ModelSpec::from_json(
            r#"{"model_type":"gpt_neox","hidden_size":64,"intermediate_size":172,"num_hidden_layers":1,
                "num_attention_heads":8,"vocab_size":512}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("gpt_neox"), "{err:#}");
    }
}
