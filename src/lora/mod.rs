//! LoRA with PEFT's semantics: `y = W x + (B (A dropout(x))) · scale`, `scale = alpha / r`
//! (`alpha / √r` with rsLoRA), A Kaiming-uniform (or Gaussian), B zero, only A and B trained.

pub mod peft;

use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::model::{Decoder, LinearAdapter, LinearSites};
use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use std::collections::BTreeMap;
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

impl LinearAdapter for Adapter {
    /// `base + scale · B A dropout(x)` for `x` `[..., in]` and the frozen layer's output `base`
    /// `[..., out]`, computed in `x`'s kind (the fp32 A and B are cast, as `torch.autocast`
    /// does, so gradients still reach them in fp32). The scale is folded into B and the sum
    /// into the second product, so the adapter adds one small and one fused matmul and no pass
    /// over the output.
    fn add_to(&self, base: &Tensor, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let kind = x.kind();
        let (out_features, in_features) = (self.b.size()[0], self.a.size()[1]);
        let down = x.reshape([-1, in_features]).matmul(&self.a.to_kind(kind).tr());
        let up = (&self.b * self.scale).to_kind(kind);
        base.reshape([-1, out_features]).addmm(&down, &up.tr()).view(base.size().as_slice())
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

/// The adapters attached to a model: the adapted module paths and their trainable tensors, in
/// model order.
pub struct AttachedAdapters {
    pub module_paths: Vec<String>,
    pub trainables: Vec<Trainable>,
    /// The adapted layers store their weights `[in, out]` (GPT-2), which PEFT records.
    pub fan_in_fan_out: bool,
}

impl AttachedAdapters {
    pub fn parameter_count(&self) -> i64 {
        self.trainables.iter().map(|t| t.tensor.numel() as i64).sum()
    }

    /// Leaf names (`q_proj`, ...) of the adapted modules, sorted, as PEFT lists them.
    pub fn target_leaf_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.module_paths.iter().map(|p| leaf(p).to_string()).collect();
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

/// A regex that must match the whole of `path` (PEFT's `re.fullmatch`).
fn full_match(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| anyhow!("`{pattern}` is not a valid regex: {e}"))
}

/// Whether a module path is selected.
type PathFilter = Box<dyn Fn(&str) -> bool>;

/// A filter of the paths `modules` selects; `all-linear` leaves out the output head `lm_head`.
fn matcher(modules: &TargetModules, lm_head: &'static str) -> Result<PathFilter> {
    Ok(match modules {
        TargetModules::AllLinear => Box::new(move |path: &str| path != lm_head),
        TargetModules::List(names) => {
            let names = names.clone();
            Box::new(move |path: &str| names.iter().any(|n| matches_name(path, n)))
        }
        TargetModules::Regex(pattern) => {
            let re = full_match(pattern)?;
            Box::new(move |path: &str| re.is_match(path))
        }
    })
}

/// The decoder layer index in a module path (`model.layers.3.mlp.up_proj` → 3), PEFT's rule.
fn layer_index(path: &str) -> Option<usize> {
    static LAYER: std::sync::LazyLock<Regex> =
        std::sync::LazyLock::new(|| Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex"));
    LAYER.captures(path).and_then(|c| c[1].parse().ok())
}

/// The value of the first `pattern → value` whose regex matches the end of `path` (PEFT's
/// `rank_pattern` / `alpha_pattern` rule); two matching patterns are ambiguous and refused.
pub(crate) fn pattern_value<T: Copy>(
    key: &str,
    patterns: &BTreeMap<String, T>,
    path: &str,
) -> Result<Option<T>> {
    let mut found: Option<(&String, T)> = None;
    for (pattern, &value) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| anyhow!("{key}: {e}"))?;
        if re.is_match(path) {
            if let Some((first, _)) = found {
                bail!("{key}: both `{first}` and `{pattern}` match `{path}`; make the patterns exclusive");
            }
            found = Some((pattern, value));
        }
    }
    Ok(found.map(|(_, v)| v))
}

/// One module that gets an adapter, with its rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub path: String,
    pub r: usize,
    pub alpha: f64,
}

/// The modules `cfg` selects among the linear layers of a model, with PEFT's rules:
/// `target_modules` (all-linear takes every linear layer but the output projection), minus
/// `exclude_modules`, restricted to `layers_to_transform`, ranks and alphas by pattern.
pub fn select_targets(sites: &LinearSites, cfg: &LoraConfig) -> Result<Vec<Target>> {
    let paths = &sites.paths();
    let leaves = || {
        let mut leaves: Vec<&str> = paths.iter().map(|p| leaf(p)).collect();
        leaves.sort();
        leaves.dedup();
        leaves.join(", ")
    };
    if let TargetModules::List(names) = &cfg.target_modules {
        for name in names {
            if !paths.iter().any(|p| matches_name(p, name)) {
                let why = if sites.tied_embeddings && sites.names_head_or_embedding(name) {
                    " (this model ties lm_head to its input embeddings, and adapting a tied matrix \
                     breaks merging and loading in other runtimes, so it is not offered)"
                } else {
                    ""
                };
                bail!(
                    "lora.target_modules: `{name}` matches no linear layer of this model{why}; \
                     its linear layers are: {} (or use `all-linear`)",
                    leaves()
                );
            }
        }
    }
    if cfg.layers_to_transform.is_some() && matches!(cfg.target_modules, TargetModules::Regex(_)) {
        bail!("lora.layers_to_transform applies to a list of target modules; with a regex, put the layers in the regex");
    }
    let targeted = matcher(&cfg.target_modules, sites.lm_head)?;
    let excluded = match &cfg.exclude_modules {
        Some(modules) => matcher(modules, sites.lm_head)?,
        None => Box::new(|_: &str| false),
    };
    let mut targets = Vec::new();
    for path in paths {
        let in_layers = match &cfg.layers_to_transform {
            Some(layers) => layer_index(path).is_some_and(|i| layers.contains(&i)),
            None => true,
        };
        if targeted(path) && !excluded(path) && in_layers {
            targets.push(Target {
                path: path.clone(),
                r: pattern_value("lora.rank_pattern", &cfg.rank_pattern, path)?.unwrap_or(cfg.r),
                alpha: pattern_value("lora.alpha_pattern", &cfg.alpha_pattern, path)?.unwrap_or(cfg.alpha),
            });
        }
    }
    if targets.is_empty() {
        bail!(
            "lora.target_modules{}: no linear layer of this model is selected; its linear layers are: {} \
             (module paths look like `{}`)",
            if cfg.exclude_modules.is_some() || cfg.layers_to_transform.is_some() {
                " with exclude_modules / layers_to_transform"
            } else {
                ""
            },
            leaves(),
            paths.first().map(String::as_str).unwrap_or("")
        );
    }
    Ok(targets)
}

/// Attaches freshly initialised adapters to the layers `cfg.target_modules` selects.
/// Uses libtorch's global RNG: seed it first for reproducible initialisation.
pub fn inject(model: &mut Decoder, cfg: &LoraConfig, device: Device) -> Result<AttachedAdapters> {
    let targets = select_targets(&model.sites, cfg)?;
    let mut layers = model.linear_layers_mut();
    let mut trainables = Vec::new();
    let mut fan_in_fan_out = false;
    for target in &targets {
        let (site, linear) =
            layers.iter_mut().find(|(site, _)| site.path == target.path).expect("selected from these layers");
        let path = &site.path;
        // A rank read from an adapter's config may be any number: allocate fallibly so an
        // impossible one is an error naming the layer, not a libtorch panic.
        let too_big = || format!("rank {} is too large for {path}; lower it", target.r);
        let r = i64::try_from(target.r).map_err(|_| anyhow!(too_big()))?;
        let opts = (Kind::Float, device);
        let mut a = Tensor::f_empty([r, linear.in_features()], opts).with_context(too_big)?;
        let a = match cfg.init {
            // kaiming_uniform_(a=√5) on [r, in]: bound = 1/√in.
            LoraInit::Kaiming => {
                let bound = 1.0 / (linear.in_features() as f64).sqrt();
                a.uniform_(-bound, bound)
            }
            LoraInit::Gaussian => a.normal_(0.0, 1.0 / r as f64),
        };
        let b = Tensor::f_zeros([linear.out_features(), r], opts).with_context(too_big)?;
        let adapter = Adapter {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            scale: scale(target.alpha, target.r, cfg.use_rslora),
            dropout: cfg.dropout,
        };
        trainables.push(Trainable { peft_key: peft::key(path, "lora_A"), tensor: adapter.a.shallow_clone() });
        trainables.push(Trainable { peft_key: peft::key(path, "lora_B"), tensor: adapter.b.shallow_clone() });
        fan_in_fan_out |= linear.fan_in_fan_out;
        linear.adapter = Some(Box::new(adapter));
    }
    model.adapter_dropout |= cfg.dropout > 0.0;
    Ok(AttachedAdapters {
        module_paths: targets.into_iter().map(|t| t.path).collect(),
        trainables,
        fan_in_fan_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-layer Llama: `model.layers.{0,1}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`,
    /// and `lm_head` unless `tied`.
    fn llama(tied: bool) -> LinearSites {
        let config = format!(
            r#"{{"model_type":"llama","hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,
                "num_attention_heads":2,"vocab_size":64,"tie_word_embeddings":{tied}}}"#
        );
        LinearSites::of(&crate::model::ModelSpec::from_json(&config).unwrap())
    }

    fn cfg(targets: TargetModules) -> LoraConfig {
        LoraConfig { target_modules: targets, ..LoraConfig::default() }
    }

    fn paths_of(targets: &[Target]) -> Vec<&str> {
        targets.iter().map(|t| t.path.as_str()).collect()
    }

    #[test]
    fn list_targets_match_path_suffixes() {
        let t = TargetModules::List(vec!["q_proj".into(), "mlp.down_proj".into()]);
        let got = select_targets(&llama(false), &cfg(t)).unwrap();
        assert_eq!(
            paths_of(&got),
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        assert!(got.iter().all(|t| t.r == 8 && t.alpha == 16.0));
    }

    #[test]
    fn all_linear_excludes_the_output_layer() {
        let got = select_targets(&llama(false), &cfg(TargetModules::AllLinear)).unwrap();
        assert_eq!(got.len(), 14);
        assert!(!got.iter().any(|t| t.path == "lm_head"));
    }

    #[test]
    fn a_regex_must_match_the_whole_path() {
        let t = TargetModules::Regex(r".*\.1\.self_attn\.(q|v)_proj".into());
        let got = select_targets(&llama(false), &cfg(t)).unwrap();
        assert_eq!(
            paths_of(&got),
            vec!["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
        );
        let err = select_targets(&llama(false), &cfg(TargetModules::Regex("q_pro.".into()))).unwrap_err();
        assert!(err.to_string().contains("no linear layer"), "{err}");
    }

    #[test]
    fn exclusions_layers_and_patterns_follow_peft() {
        let mut c = cfg(TargetModules::AllLinear);
        c.exclude_modules = Some(TargetModules::List(vec!["down_proj".into()]));
        c.layers_to_transform = Some(vec![1]);
        c.rank_pattern = BTreeMap::from([("self_attn\\.(q|k)_proj".to_string(), 4)]);
        c.alpha_pattern = BTreeMap::from([("up_proj".to_string(), 2.0)]);
        let got = select_targets(&llama(false), &c).unwrap();
        assert_eq!(got.len(), 6);
        assert!(got.iter().all(|t| t.path.starts_with("model.layers.1.") && !t.path.ends_with("down_proj")));
        let by_leaf = |leaf: &str| got.iter().find(|t| t.path.ends_with(leaf)).unwrap().clone();
        assert_eq!((by_leaf("q_proj").r, by_leaf("k_proj").r, by_leaf("v_proj").r), (4, 4, 8));
        assert_eq!((by_leaf("up_proj").alpha, by_leaf("gate_proj").alpha), (2.0, 16.0));
    }

    #[test]
    fn overlapping_patterns_are_refused() {
        let mut c = cfg(TargetModules::AllLinear);
        c.rank_pattern = BTreeMap::from([("q_proj".to_string(), 4), ("self_attn\\..*".to_string(), 2)]);
        let err = select_targets(&llama(false), &c).unwrap_err().to_string();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn unknown_target_lists_the_model_linear_names() {
        let t = TargetModules::List(vec!["query".into()]);
        let err = select_targets(&llama(false), &cfg(t)).unwrap_err().to_string();
        assert!(err.contains("`query`") && err.contains("q_proj") && err.contains("down_proj"), "{err}");
    }

    #[test]
    fn tied_lm_head_is_refused_with_the_reason() {
        let t = TargetModules::List(vec!["lm_head".into()]);
        let err = select_targets(&llama(true), &cfg(t)).unwrap_err().to_string();
        assert!(err.contains("ties lm_head"), "{err}");
    }

    #[test]
    fn rslora_scales_by_square_root_of_rank() {
        assert_eq!(scale(16.0, 8, false), 2.0);
        assert_eq!(scale(16.0, 16, true), 4.0);
    }
}
