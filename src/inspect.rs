//! `lorafit inspect MODEL_DIR`: what a model is, its linear layers, and what an adapter on them
//! would cost, so users can choose `target_modules` and `r` before training.

use crate::config::{LoraConfig, TargetModules};
use crate::lora::select_targets;
use crate::model::load_model;
use crate::model::spec::AttentionSpan;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;
use tch::{Device, Kind};

/// The report as text. `targets`/`r` choose the adapter whose size is estimated.
pub fn inspect(dir: &Path, targets: &TargetModules, r: usize) -> Result<String> {
    // Shapes and names are all that is needed: bf16 halves the memory of loading.
    let mut model = load_model(dir, Kind::BFloat16, Device::Cpu)?;
    let stored = stored_dtypes(dir)?;
    let s = model.spec.clone();
    let mut out = String::new();
    let count = s.parameter_count();
    writeln!(out, "model: {}", dir.display())?;
    writeln!(out, "family: {:?} (model_type {})", s.family, s.model_type)?;
    writeln!(out, "parameters: {count} ({:.2}M)", count as f64 / 1e6)?;
    writeln!(out, "stored dtype: {}", stored.join(", "))?;
    writeln!(out, "tied embeddings: {}", if s.tie_word_embeddings { "yes" } else { "no" })?;
    writeln!(
        out,
        "layers: {}, hidden {}, heads {} / kv heads {}, head_dim {}, ffn {}, vocab {}",
        s.num_layers,
        s.hidden_size,
        s.num_heads,
        s.num_kv_heads,
        s.head_dim,
        s.intermediate_size,
        s.vocab_size
    )?;
    let sliding = s.layer_spans.iter().filter(|l| matches!(l, AttentionSpan::Sliding(_))).count();
    if sliding > 0 {
        writeln!(out, "sliding-window attention: {sliding} of {} layers", s.num_layers)?;
    }
    let layers = model.linear_layers_mut();
    writeln!(out, "linear modules ({}):", layers.len())?;
    for (path, linear) in &layers {
        writeln!(out, "  {path} [{}, {}]", linear.out_features(), linear.in_features())?;
    }
    let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
    let cfg = LoraConfig { r, target_modules: targets.clone(), ..LoraConfig::default() };
    let selected = select_targets(&paths, &cfg, s.tie_word_embeddings)?;
    let trainable: i64 = selected
        .iter()
        .map(|t| {
            let (_, l) = layers.iter().find(|(p, _)| *p == t.path).expect("selected from these layers");
            t.r as i64 * (l.in_features() + l.out_features())
        })
        .sum();
    writeln!(
        out,
        "LoRA r={r} on {}: {} modules, {trainable} trainable parameters ({:.3}% of the base)",
        targets,
        selected.len(),
        100.0 * trainable as f64 / count as f64
    )?;
    Ok(out)
}

/// The dtypes the weight files hold, read from the safetensors headers.
fn stored_dtypes(dir: &Path) -> Result<Vec<String>> {
    let mut dtypes = std::collections::BTreeSet::new();
    for file in crate::model::weights::safetensors_files(dir)? {
        dtypes.extend(crate::files::safetensors_dtypes(&file)?);
    }
    Ok(dtypes.into_iter().collect())
}
