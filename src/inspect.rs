//! `lorafit inspect MODEL_DIR`: what a model is, its linear layers, and what an adapter on them
//! would cost, so users can choose `target_modules` and `r` before training.

use crate::config::{LoraConfig, TargetModules};
use crate::lora::select_targets;
use crate::model::quantized::{model_bytes, quantized_sites};
use crate::model::spec::AttentionSpan;
use crate::model::{LinearSites, ModelSpec};
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;
use tch::Kind;

/// The report as text, from config.json (and the weight files' headers, for their dtype).
/// `targets`/`r` choose the adapter whose size is estimated.
pub fn inspect(dir: &Path, targets: &TargetModules, r: usize) -> Result<String> {
    let s = ModelSpec::from_dir(dir)?;
    let sites = LinearSites::of(&s);
    let stored = stored_dtypes(dir)?;
    let mut out = String::new();
    let count = s.parameter_count();
    writeln!(out, "model: {}", dir.display())?;
    writeln!(out, "family: {:?} (model_type {})", s.family, s.model_type)?;
    writeln!(out, "parameters: {count} ({:.2}M)", count as f64 / 1e6)?;
    writeln!(out, "stored dtype: {stored}")?;
    let params = count as u64;
    writeln!(
        out,
        "weights: {} in fp32, {} in bf16; {} with model.quantize (nf4 or fp4, double_quant): \
         {} linear modules in 4 bits, the rest in bf16",
        size(params * 4),
        size(params * 2),
        size(model_bytes(params, Kind::BFloat16, &sites, true)),
        quantized_sites(&sites).count()
    )?;
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
    writeln!(out, "linear modules ({}):", sites.sites.len())?;
    for site in &sites.sites {
        writeln!(out, "  {} [{}, {}]", site.path, site.out_features, site.in_features)?;
    }
    let cfg = LoraConfig { r, target_modules: targets.clone(), ..LoraConfig::default() };
    let selected = select_targets(&sites, &cfg)?;
    let trainable: i64 = selected
        .iter()
        .map(|t| {
            let site = sites.get(&t.path).expect("selected from these sites");
            t.r as i64 * (site.in_features + site.out_features)
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

/// `bytes` in kB, MB or GB, whichever reads best.
pub fn size(bytes: u64) -> String {
    match bytes as f64 {
        b if b < 1e6 => format!("{:.1} kB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.2} GB", b / 1e9),
    }
}

/// The dtypes the weight files hold, read from the safetensors headers; `none` for a directory
/// with config.json alone.
fn stored_dtypes(dir: &Path) -> Result<String> {
    let Some(files) = crate::model::weights::safetensors_files_if_any(dir)? else {
        return Ok("none (no weight files)".into());
    };
    let mut dtypes = std::collections::BTreeSet::new();
    for file in files {
        dtypes.extend(crate::files::safetensors_dtypes(&file)?);
    }
    Ok(dtypes.into_iter().collect::<Vec<_>>().join(", "))
}
