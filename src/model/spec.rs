//! `config.json` → [`ModelSpec`]: the sizes and switches the decoder needs.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Everything the decoder needs to know about an architecture, read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub model_type: String,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
}

/// The subset of a Hugging Face `config.json` that Llama-architecture models use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: usize,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: i64,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}

/// Model types whose decoder is the Llama block (RMSNorm, RoPE, GQA, SiLU-GLU MLP).
const LLAMA_LIKE: &[&str] = &["llama", "mistral"];

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
        let hf: HfConfig = serde_json::from_str(text).context("not a valid model config.json")?;
        let model_type = hf.model_type.unwrap_or_else(|| "llama".to_string());
        if !LLAMA_LIKE.contains(&model_type.as_str()) {
            bail!(
                "model_type `{model_type}` is not supported yet (supported: {})",
                LLAMA_LIKE.join(", ")
            );
        }
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (the Llama MLP uses `silu`)");
            }
        }
        if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            bail!("rope_scaling {scaling} is not supported yet; only plain RoPE (rope_theta)");
        }
        if hf.num_attention_heads <= 0
            || hf.hidden_size % hf.num_attention_heads != 0 && hf.head_dim.is_none()
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {} and no head_dim is given",
                hf.hidden_size,
                hf.num_attention_heads
            );
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads <= 0 || hf.num_attention_heads % num_kv_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                hf.num_attention_heads
            );
        }
        let eos_token_ids = match hf.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(ids)) => ids.iter().filter_map(|v| v.as_i64()).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };
        Ok(ModelSpec {
            model_type,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias,
            mlp_bias: hf.mlp_bias,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        })
    }

    /// Parameter count of the base model (embeddings counted once when tied).
    pub fn parameter_count(&self) -> i64 {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.attention_bias {
                q + 2 * kv + h
            } else {
                0
            };
        let mlp = 3 * h * f + if self.mlp_bias { 2 * f + h } else { 0 };
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_layers as i64
    }
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
        assert_eq!(spec.rms_norm_eps, 1e-6);
        // stories260K: 260,032 parameters with tied embeddings (its model card).
        assert_eq!(spec.parameter_count(), 260_032);
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
