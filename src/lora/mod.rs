//! LoRA with PEFT's semantics: `y = W x + (B (A dropout(x))) · scale`, `scale = alpha / r`
//! (`alpha / √r` with rsLoRA), A Kaiming-uniform (or Gaussian), B zero, only A and B trained.

pub mod peft;

use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::model::Decoder;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The trainable pair beside one frozen linear layer.
pub struct Adapter {
    /// `[r, in_features]`, fp32.
    pub a: Tensor,
    /// `[out_features, r]`, fp32.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Adapter {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        x.to_kind(self.a.kind())
            .matmul(&self.a.tr())
            .matmul(&self.b.tr())
            * self.scale
    }
}

/// PEFT's scaling factor.
pub fn scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// One trainable tensor with the name PEFT stores it under.
pub struct Trainable {
    /// e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    pub peft_key: String,
    pub tensor: Tensor,
}

/// The adapted module paths and their trainable tensors, in model order.
pub struct Injected {
    pub module_paths: Vec<String>,
    pub trainables: Vec<Trainable>,
}

impl Injected {
    pub fn parameter_count(&self) -> i64 {
        self.trainables
            .iter()
            .map(|t| t.tensor.numel() as i64)
            .sum()
    }

    /// Leaf names (`q_proj`, ...) of the adapted modules, sorted, as PEFT lists them.
    pub fn target_leaf_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .module_paths
            .iter()
            .map(|p| leaf(p).to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// PEFT's rule for a list of names: a module matches when its path equals the name or ends
/// with `.name`.
fn matches_name(path: &str, name: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

/// The module paths `targets` selects among `paths` (all linear layers of the model).
/// `all-linear` takes every linear layer but the output projection.
pub fn select_targets(
    paths: &[String],
    targets: &TargetModules,
    tied_embeddings: bool,
) -> Result<Vec<String>> {
    let selected: Vec<String> = match targets {
        TargetModules::AllLinear => paths
            .iter()
            .filter(|p| p.as_str() != "lm_head")
            .cloned()
            .collect(),
        TargetModules::List(names) => {
            for name in names {
                if !paths.iter().any(|p| matches_name(p, name)) {
                    let mut leaves: Vec<&str> = paths.iter().map(|p| leaf(p)).collect();
                    leaves.sort();
                    leaves.dedup();
                    let why = if tied_embeddings
                        && matches!(name.as_str(), "lm_head" | "embed_tokens")
                    {
                        " (this model ties lm_head to embed_tokens, and adapting a tied matrix breaks \
                         merging and loading in other runtimes, so it is not offered)"
                    } else {
                        ""
                    };
                    bail!(
                        "lora.target_modules: `{name}` matches no linear layer of this model{why}; \
                         its linear layers are: {} (or use `all-linear`)",
                        leaves.join(", ")
                    );
                }
            }
            paths
                .iter()
                .filter(|p| names.iter().any(|n| matches_name(p, n)))
                .cloned()
                .collect()
        }
    };
    Ok(selected)
}

/// Attaches freshly initialised adapters to the layers `cfg.target_modules` selects.
/// Uses libtorch's global RNG: seed it first for reproducible initialisation.
pub fn inject(model: &mut Decoder, cfg: &LoraConfig, device: Device) -> Result<Injected> {
    let tied = model.spec.tie_word_embeddings;
    let mut layers = model.linear_layers_mut();
    let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
    let selected = select_targets(&paths, &cfg.target_modules, tied)?;
    let r = cfg.r as i64;
    let mut trainables = Vec::new();
    for (path, linear) in layers.iter_mut().filter(|(p, _)| selected.contains(p)) {
        let opts = (Kind::Float, device);
        let a = match cfg.init {
            // kaiming_uniform_(a=√5) on [r, in]: bound = 1/√in.
            LoraInit::Kaiming => {
                let bound = 1.0 / (linear.in_features() as f64).sqrt();
                Tensor::empty([r, linear.in_features()], opts).uniform_(-bound, bound)
            }
            LoraInit::Gaussian => {
                Tensor::empty([r, linear.in_features()], opts).normal_(0.0, 1.0 / r as f64)
            }
        };
        let b = Tensor::zeros([linear.out_features(), r], opts);
        let adapter = Adapter {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            scale: scale(cfg.alpha, cfg.r, cfg.use_rslora),
            dropout: cfg.dropout,
        };
        trainables.push(Trainable {
            peft_key: peft::key(path, "lora_A"),
            tensor: adapter.a.shallow_clone(),
        });
        trainables.push(Trainable {
            peft_key: peft::key(path, "lora_B"),
            tensor: adapter.b.shallow_clone(),
        });
        linear.adapter = Some(adapter);
    }
    Ok(Injected {
        module_paths: selected,
        trainables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_paths() -> Vec<String> {
        let mut p = vec![];
        for i in 0..2 {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                p.push(format!("model.layers.{i}.{m}"));
            }
        }
        p.push("lm_head".into());
        p
    }

    #[test]
    fn list_targets_match_path_suffixes() {
        let t = TargetModules::List(vec!["q_proj".into(), "mlp.down_proj".into()]);
        let got = select_targets(&llama_paths(), &t, false).unwrap();
        assert_eq!(
            got,
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
    }

    #[test]
    fn all_linear_excludes_the_output_layer() {
        let got = select_targets(&llama_paths(), &TargetModules::AllLinear, false).unwrap();
        assert_eq!(got.len(), 14);
        assert!(!got.iter().any(|p| p == "lm_head"));
    }

    #[test]
    fn unknown_target_lists_the_model_linear_names() {
        let t = TargetModules::List(vec!["query".into()]);
        let err = select_targets(&llama_paths(), &t, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`query`") && err.contains("q_proj") && err.contains("down_proj"),
            "{err}"
        );
    }

    #[test]
    fn tied_lm_head_is_refused_with_the_reason() {
        let mut paths = llama_paths();
        paths.pop();
        let t = TargetModules::List(vec!["lm_head".into()]);
        let err = select_targets(&paths, &t, true).unwrap_err().to_string();
        assert!(err.contains("ties lm_head"), "{err}");
    }

    #[test]
    fn rslora_scales_by_square_root_of_rank() {
        assert_eq!(scale(16.0, 8, false), 2.0);
        assert_eq!(scale(16.0, 16, true), 4.0);
    }
}
