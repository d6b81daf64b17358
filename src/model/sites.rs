//! The table of a model's linear layers, from config.json alone: every projection the decoder
//! holds, by the module path PEFT keys adapters with, with its shape, how the checkpoint stores
//! it and what other runtimes need to know about it. Loading, adapter injection, merging, GGUF
//! export and `inspect` all read this one table, built from [`ModelSpec`] and [`ModuleNames`].

use super::names::{AttnProjections, MlpProjections, ModuleNames};
use super::spec::{Family, ModelSpec};
use anyhow::{anyhow, bail, Result};
use std::ops::Range;

/// What a linear layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Query,
    Key,
    Value,
    /// `[q; k; v]` in one weight.
    QueryKeyValue,
    /// Attention's output projection.
    AttnOutput,
    Gate,
    /// The MLP's widening projection (gated MLPs' `up`, plain ones' `fc`).
    Up,
    /// `[gate; up]` in one weight.
    GateUp,
    /// The MLP's narrowing projection (`down`, GPT-2's `proj`).
    Down,
    /// The projection onto the vocabulary.
    LmHead,
}

/// One projection inside a fused weight: its rows of the `[out, in]` weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedPart {
    pub role: Role,
    pub rows: Range<i64>,
}

/// One linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSite {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// The decoder layer; `None` for the output head.
    pub layer: Option<usize>,
    pub role: Role,
    pub in_features: i64,
    pub out_features: i64,
    pub bias: bool,
    /// The checkpoint stores the weight `[in, out]` (GPT-2's Conv1D): PEFT's `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
    /// The projections this one weight holds, in row order; empty when it holds one.
    pub parts: Vec<FusedPart>,
    /// For q/k projections of a family llama.cpp rotates in interleaved pairs: the head count
    /// whose rows its converter reorders (`LlamaModel.permute`).
    pub gguf_permuted_heads: Option<i64>,
}

/// Every linear layer of a model, in model order (the order transformers and PEFT list them),
/// with the family's names of the output head and the embeddings.
#[derive(Debug, Clone)]
pub struct LinearSites {
    pub sites: Vec<LinearSite>,
    /// The output head's module path; among `sites` only when it is not tied to the embeddings.
    pub lm_head: &'static str,
    pub embed_tokens: &'static str,
    pub embed_positions: Option<&'static str>,
    pub tied_embeddings: bool,
    /// The path prefix some checkpoints omit (GPT-2's `transformer.`).
    pub optional_prefix: Option<&'static str>,
    /// `model_type`, number of layers and their path, for errors about paths that are not here.
    model_type: String,
    num_layers: usize,
    layers_path: &'static str,
}

impl LinearSites {
    pub fn of(spec: &ModelSpec) -> LinearSites {
        let names = ModuleNames::of(spec.family);
        let mut sites = Vec::new();
        for i in 0..spec.num_layers {
            sites.extend(layer_projections(spec, &names).into_iter().map(|p| LinearSite {
                path: format!("{}.{i}.{}.{}", names.layers, p.block, p.leaf),
                layer: Some(i),
                ..p.site
            }));
        }
        if !spec.tie_word_embeddings {
            sites.push(LinearSite {
                path: names.lm_head.to_string(),
                layer: None,
                role: Role::LmHead,
                in_features: spec.hidden_size,
                out_features: spec.vocab_size,
                bias: false,
                fan_in_fan_out: false,
                parts: vec![],
                gguf_permuted_heads: None,
            });
        }
        LinearSites {
            sites,
            lm_head: names.lm_head,
            embed_tokens: names.embed_tokens,
            embed_positions: names.embed_positions,
            tied_embeddings: spec.tie_word_embeddings,
            optional_prefix: names.optional_prefix,
            model_type: spec.model_type.clone(),
            num_layers: spec.num_layers,
            layers_path: names.layers,
        }
    }

    /// Every module path, in model order.
    pub fn paths(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.path.clone()).collect()
    }

    /// The linear layers of decoder layer `i`, in model order.
    pub fn layer(&self, i: usize) -> impl Iterator<Item = &LinearSite> {
        self.sites.iter().filter(move |s| s.layer == Some(i))
    }

    /// The layer at module `path`, which may omit the optional prefix.
    pub fn get(&self, path: &str) -> Option<&LinearSite> {
        let full = match self.optional_prefix {
            Some(prefix) if !path.starts_with(prefix) => format!("{prefix}{path}"),
            _ => path.to_string(),
        };
        self.sites.iter().find(|s| s.path == full)
    }

    /// [`LinearSites::get`], or an error saying why `path` names no linear layer here.
    pub fn find(&self, path: &str) -> Result<&LinearSite> {
        if let Some(site) = self.get(path) {
            return Ok(site);
        }
        if self.tied_embeddings && path == self.lm_head {
            bail!(
                "`{path}` is tied to the input embeddings in this model, so it is no linear layer of \
                 its own to adapt"
            );
        }
        let layer = path
            .split_once(&format!("{}.", self.layers_path))
            .and_then(|(_, rest)| rest.split('.').next()?.parse::<usize>().ok());
        match layer {
            Some(layer) if layer >= self.num_layers => {
                bail!(
                    "module `{path}`: layer {layer} does not exist, the model has {} layers",
                    self.num_layers
                )
            }
            _ => Err(anyhow!("module `{path}` is not a linear layer of this {} model", self.model_type)),
        }
    }

    /// Whether the target name `name` (PEFT's rule: the whole path or its end after a `.`) names
    /// the output head or an embedding: matrices a tied model does not offer as linear layers.
    pub fn names_head_or_embedding(&self, name: &str) -> bool {
        [Some(self.lm_head), Some(self.embed_tokens), self.embed_positions]
            .into_iter()
            .flatten()
            .any(|path| path == name || path.ends_with(&format!(".{name}")))
    }
}

/// The last component of the output head's and embeddings' paths in any supported family
/// (`embed_tokens`, `lm_head`, `wpe`, `wte`), for checks made without a model at hand.
pub fn head_and_embedding_leaves() -> Vec<&'static str> {
    let leaf = |path: &'static str| path.rsplit('.').next().unwrap_or(path);
    let mut leaves: Vec<&str> = Family::all()
        .map(ModuleNames::of)
        .flat_map(|n| [Some(n.lm_head), Some(n.embed_tokens), n.embed_positions])
        .flatten()
        .map(leaf)
        .collect();
    leaves.sort();
    leaves.dedup();
    leaves
}

/// One projection of every decoder layer, before it is placed in a layer.
struct Projection {
    block: &'static str,
    leaf: &'static str,
    /// The site with a placeholder path and layer.
    site: LinearSite,
}

/// The projections of one decoder layer, in model order: attention's, then the MLP's.
fn layer_projections(spec: &ModelSpec, names: &ModuleNames) -> Vec<Projection> {
    let (h, ffn) = (spec.hidden_size, spec.intermediate_size);
    let (q_dim, kv_dim) = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim);
    let project = |block, leaf, role, out_features, in_features, bias, parts: &[(Role, i64)]| {
        let mut start = 0;
        let parts = parts
            .iter()
            .map(|&(role, rows)| {
                start += rows;
                FusedPart { role, rows: start - rows..start }
            })
            .collect();
        let permuted = match role {
            Role::Query => Some(spec.num_heads),
            Role::Key => Some(spec.num_kv_heads),
            _ => None,
        };
        let site = LinearSite {
            path: String::new(),
            layer: None,
            role,
            in_features,
            out_features,
            bias,
            fan_in_fan_out: names.fan_in_fan_out,
            parts,
            gguf_permuted_heads: permuted.filter(|_| names.llama_cpp.interleaved_rope),
        };
        Projection { block, leaf, site }
    };
    let (attn, mlp, qkv_bias, mlp_bias) = (names.attn, names.mlp, spec.qkv_bias, spec.mlp_bias);
    let mut out = match names.attn_projections {
        AttnProjections::Separate { q, k, v } => vec![
            project(attn, q, Role::Query, q_dim, h, qkv_bias, &[]),
            project(attn, k, Role::Key, kv_dim, h, qkv_bias, &[]),
            project(attn, v, Role::Value, kv_dim, h, qkv_bias, &[]),
        ],
        AttnProjections::Fused(qkv) => {
            let parts = [(Role::Query, q_dim), (Role::Key, kv_dim), (Role::Value, kv_dim)];
            vec![project(attn, qkv, Role::QueryKeyValue, q_dim + 2 * kv_dim, h, qkv_bias, &parts)]
        }
    };
    out.push(project(attn, names.o_proj, Role::AttnOutput, h, q_dim, spec.o_bias, &[]));
    let down = match names.mlp_projections {
        MlpProjections::Gated { gate, up, down } => {
            out.push(project(mlp, gate, Role::Gate, ffn, h, mlp_bias, &[]));
            out.push(project(mlp, up, Role::Up, ffn, h, mlp_bias, &[]));
            down
        }
        MlpProjections::GatedFused { gate_up, down } => {
            let parts = [(Role::Gate, ffn), (Role::Up, ffn)];
            out.push(project(mlp, gate_up, Role::GateUp, 2 * ffn, h, mlp_bias, &parts));
            down
        }
        MlpProjections::Plain { fc, proj } => {
            out.push(project(mlp, fc, Role::Up, ffn, h, mlp_bias, &[]));
            proj
        }
    };
    out.push(project(mlp, down, Role::Down, h, ffn, mlp_bias, &[]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(config: &str) -> LinearSites {
        LinearSites::of(&ModelSpec::from_json(config).unwrap())
    }

    const PHI3: &str = r#"{"model_type":"phi3","hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":64,"tie_word_embeddings":false}"#;

    #[test]
    fn fused_parts_tile_their_weight() {
        for site in sites(PHI3).sites.iter().filter(|s| !s.parts.is_empty()) {
            let mut next = 0;
            for part in &site.parts {
                assert_eq!(part.rows.start, next, "{}", site.path);
                next = part.rows.end;
            }
            assert_eq!(next, site.out_features, "{}", site.path);
        }
        let qkv = sites(PHI3).get("model.layers.1.self_attn.qkv_proj").unwrap().clone();
        let roles: Vec<Role> = qkv.parts.iter().map(|p| p.role).collect();
        assert_eq!(roles, [Role::Query, Role::Key, Role::Value]);
    }

    #[test]
    fn paths_that_are_not_linear_layers_say_why() {
        let s = sites(PHI3);
        let err = s.find("model.layers.2.mlp.down_proj").unwrap_err().to_string();
        assert!(err.contains("layer 2 does not exist"), "{err}");
        let err = s.find("model.layers.0.self_attn.rotary").unwrap_err().to_string();
        assert!(err.contains("not a linear layer"), "{err}");
        assert_eq!(s.find("lm_head").unwrap().role, Role::LmHead);
        let tied = sites(&PHI3.replace("false", "true"));
        let err = tied.find("lm_head").unwrap_err().to_string();
        assert!(err.contains("tied"), "{err}");
    }

    #[test]
    fn head_and_embedding_names_cover_every_family() {
        assert_eq!(head_and_embedding_leaves(), ["embed_tokens", "lm_head", "wpe", "wte"]);
    }
}
