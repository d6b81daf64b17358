//! Which runtimes will load an adapter as it is, and what would make the others refuse it:
//! vLLM, mistral.rs and llama.cpp each check different parts of a PEFT adapter.

use crate::config::TargetModules;
use crate::lora::peft::AdapterConfig;
use crate::model::sites::head_and_embedding_leaves;
use anyhow::Result;
use std::path::Path;

/// Ranks vLLM accepts as `max_lora_rank`; its default is 16.
const VLLM_RANKS: &[u64] = &[1, 8, 16, 32, 64, 128, 256, 320, 512];
const VLLM_DEFAULT_MAX_RANK: u64 = 16;
/// mistral.rs's default `--lora-max-rank`.
const MISTRALRS_DEFAULT_MAX_RANK: u64 = 256;

/// The verdict for one adapter directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compatibility {
    /// Runtimes that load the adapter with their default settings.
    pub loads_in: Vec<&'static str>,
    /// Why others refuse it, or what they need to be told.
    pub warnings: Vec<String>,
}

impl Compatibility {
    /// Lines for a run's summary.
    pub fn describe(&self) -> String {
        let mut out = format!("loads as it is in: {}", self.loads_in.join(", "));
        for w in &self.warnings {
            out.push_str(&format!("\n    warning: {w}"));
        }
        out
    }
}

/// Checks the `adapter_config.json` in `dir`.
pub fn check(dir: &Path) -> Result<Compatibility> {
    Ok(assess(&AdapterConfig::read(dir)?))
}

/// The verdict for a read `adapter_config.json`.
pub fn assess(cfg: &AdapterConfig) -> Compatibility {
    let max_rank = cfg.rank_pattern.values().copied().chain([cfg.r]).max().unwrap_or(cfg.r) as u64;
    let (mut vllm, mut mistralrs, mut llama_cpp) = (true, true, true);
    let mut warnings = Vec::new();

    let dora = cfg.use_dora;
    let bias = cfg.bias != "none" || cfg.lora_bias;
    let saved = !cfg.modules_to_save.is_empty();
    let leaves = head_and_embedding_leaves();
    let targets_embeddings = match &cfg.target_modules {
        Some(TargetModules::List(names)) => {
            names.iter().any(|n| leaves.contains(&n.rsplit('.').next().unwrap_or(n)))
        }
        Some(TargetModules::Regex(regex)) => leaves.iter().any(|leaf| regex.contains(leaf)),
        _ => false,
    };
    if dora {
        (vllm, mistralrs, llama_cpp) = (false, false, false);
        warnings.push(
            "DoRA (use_dora) is refused by vLLM and mistral.rs, and llama.cpp's converter stops on it".into(),
        );
    }
    if bias {
        (vllm, mistralrs) = (false, false);
        warnings.push("trained biases are refused by vLLM and mistral.rs".into());
    }
    if saved {
        (vllm, mistralrs, llama_cpp) = (false, false, false);
        warnings.push(
            "modules_to_save (full copies of layers) are refused by vLLM and mistral.rs; llama.cpp's converter \
             stops on full embed_tokens/lm_head copies"
                .into(),
        );
    }
    if targets_embeddings {
        mistralrs = false;
        warnings.push(
            "adapters on embed_tokens/lm_head are refused by mistral.rs and need extra settings in vLLM"
                .into(),
        );
    }
    if !VLLM_RANKS.contains(&max_rank) {
        vllm = false;
        warnings.push(format!(
            "rank {max_rank} is not one vLLM accepts as max_lora_rank ({}); use r in 8, 16, 32, 64, ...",
            VLLM_RANKS.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ));
    } else if max_rank > VLLM_DEFAULT_MAX_RANK {
        warnings.push(format!(
            "rank {max_rank} is above vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_RANK}: start vLLM with \
             --max-lora-rank {max_rank}"
        ));
    }
    if max_rank > MISTRALRS_DEFAULT_MAX_RANK {
        warnings.push(format!(
            "rank {max_rank} is above mistral.rs's default --lora-max-rank {MISTRALRS_DEFAULT_MAX_RANK}"
        ));
    }
    let rslora = cfg.use_rslora;
    let patterns = !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty();
    if llama_cpp && (rslora || patterns) {
        warnings.push(
            "llama.cpp ignores use_rslora and rank/alpha patterns (scale = alpha/rank): export with \
             `lorafit export --format gguf`, which folds them in, rather than llama.cpp's converter"
                .into(),
        );
    }
    let loads_in =
        [("PEFT", true), ("vLLM", vllm), ("mistral.rs", mistralrs), ("llama.cpp (GGUF export)", llama_cpp)]
            .into_iter()
            .filter_map(|(name, ok)| ok.then_some(name))
            .collect();
    Compatibility { loads_in, warnings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assess(value: serde_json::Value) -> Compatibility {
        let cfg = AdapterConfig::from_value(Path::new("adapter_config.json"), value).unwrap();
        super::assess(&cfg)
    }

    #[test]
    fn a_plain_rank_16_adapter_loads_everywhere() {
        let c = assess(json!({"r": 16, "lora_alpha": 32, "bias": "none", "target_modules": ["q_proj"]}));
        assert_eq!(c.loads_in, vec!["PEFT", "vLLM", "mistral.rs", "llama.cpp (GGUF export)"]);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn ranks_and_features_that_runtimes_refuse_are_named() {
        let c = assess(json!({"r": 12, "target_modules": ["q_proj"]}));
        assert!(!c.loads_in.contains(&"vLLM") && c.warnings[0].contains("rank 12"), "{c:?}");
        let c = assess(json!({"r": 64, "target_modules": ["q_proj"]}));
        assert!(c.loads_in.contains(&"vLLM") && c.warnings[0].contains("--max-lora-rank 64"), "{c:?}");
        let c = assess(json!({"r": 8, "rank_pattern": {"q_proj": 32}, "target_modules": ["q_proj"]}));
        assert!(c.warnings.iter().any(|w| w.contains("rank 32")), "{c:?}");
        let c = assess(json!({"r": 8, "modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}));
        assert_eq!(c.loads_in, vec!["PEFT"]);
        let c = assess(json!({"r": 8, "use_rslora": true, "target_modules": ["q_proj"]}));
        assert!(c.warnings.iter().any(|w| w.contains("use_rslora")), "{c:?}");
    }

    #[test]
    fn a_rank_of_the_wrong_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"r": "64", "lora_alpha": 16, "target_modules": ["q_proj"]});
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let err = check(dir.path()).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json") && err.contains("`r` must be"), "{err}");
    }
}
