//! One decoder-only transformer for every supported family, parameterised by [`ModelSpec`]
//! (sizes and switches), [`ModuleNames`] (tensor names) and [`LinearSites`] (its linear
//! layers): norm → attention → residual,
//! norm → MLP → residual, with the family's variations chosen by data.
//!
//! Precision follows `torch.autocast`, which is what PEFT users train with: the residual stream,
//! norms, rotary tables, softmax statistics and the loss stay in fp32, while everything between
//! a norm and the residual add (projections, adapters, attention, MLP) runs in the decoder's
//! activation kind, bf16 for `bf16-mixed`. Weights held in bf16 under fp32 activations are
//! multiplied in bf16 and their products cast back.

use super::attention::{attention_mask_offset, causal_attention};
use super::names::ModuleNames;
use super::quantized::{self, FrozenWeight, QuantizedWeight};
use super::rope::{apply_rope, rope_tables};
use super::sites::{LinearSite, LinearSites, Role};
use super::spec::{Activation, AttentionSpan, ModelSpec, NormKind};
use super::Weights;
use crate::packing::Packing;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// A trainable term beside a frozen [`Linear`] layer (LoRA's adapter implements it). The model
/// only calls it; what it holds and how it is initialised, saved and loaded is the adapter's.
pub trait LinearAdapter: Send {
    /// `base` (the frozen layer's output `[..., out]` for `x` `[..., in]`) plus the adapter's
    /// term, in `x`'s kind; `train` enables dropout.
    fn add_to(&self, base: &Tensor, x: &Tensor, train: bool) -> Tensor;
}

thread_local! {
    /// Set while [`without_adapters`] runs: every [`Linear`] then computes its frozen layer
    /// alone, as PEFT's `disable_adapter()` context does.
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every adapter switched off: the base model, as preference objectives use it
/// for the reference log-probabilities (no second copy of the model needed).
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    /// Switches the adapters back on when `f` returns or panics.
    struct On;
    impl Drop for On {
        fn drop(&mut self) {
            ADAPTERS_OFF.with(|off| off.set(false));
        }
    }
    ADAPTERS_OFF.with(|off| off.set(true));
    let _on = On;
    f()
}

/// A frozen linear layer `y = x Wᵀ (+ b)` with an optional trainable adapter beside it.
pub struct Linear {
    /// `[out, in]`, whatever the checkpoint's storage order.
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub adapter: Option<Box<dyn LinearAdapter>>,
    /// The checkpoint stores this weight `[in, out]` (GPT-2's Conv1D).
    pub fan_in_fan_out: bool,
}

impl Linear {
    /// Takes the weight (and bias) of `site` out of `w`, in `[out, in]` order, quantized when
    /// `w` asks for it.
    fn load(w: &mut Weights, site: &LinearSite) -> Result<Linear> {
        let (name, out, inp) = (&site.path, site.out_features, site.in_features);
        let bias = |w: &mut Weights| match site.bias {
            true => w.take(&format!("{name}.bias"), &[out]).map(Some),
            false => Ok(None),
        };
        if let Some(weight) = quantized::take_saved(w, &format!("{name}.weight"), [out, inp])? {
            if site.fan_in_fan_out {
                bail!("`{name}.weight` is stored in 4 bits, which lorafit reads for [out, in] weights only");
            }
            return Ok(Linear { weight, bias: bias(w)?, adapter: None, fan_in_fan_out: false });
        }
        let weight = if site.fan_in_fan_out {
            w.take(&format!("{name}.weight"), &[inp, out])?.tr().contiguous()
        } else {
            w.take(&format!("{name}.weight"), &[out, inp])?
        };
        let weight = match w.quantization() {
            Some((format, nested)) if weight.numel() > 0 => {
                FrozenWeight::Quantized(Box::new(QuantizedWeight::quantize(&weight, format, nested)))
            }
            _ => FrozenWeight::Dense(weight),
        };
        Ok(Linear { weight, bias: bias(w)?, adapter: None, fan_in_fan_out: site.fan_in_fan_out })
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x Wᵀ (+ b)` plus the adapter's term, in `x`'s kind.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let base = match &self.weight {
            FrozenWeight::Dense(weight) => dense_linear(x, weight, self.bias.as_ref()),
            // Dequantized here and again in the backward pass: autograd keeps no dense copy.
            FrozenWeight::Quantized(q) => {
                q.linear(&x.to_kind(q.compute), self.bias.as_ref()).to_kind(x.kind())
            }
        };
        self.with_adapter(base, x, train)
    }

    /// `base`, this layer's frozen output for `x`, plus the adapter's term when it is on.
    fn with_adapter(&self, base: Tensor, x: &Tensor, train: bool) -> Tensor {
        match &self.adapter {
            Some(adapter) if !ADAPTERS_OFF.with(|off| off.get()) => adapter.add_to(&base, x, train),
            _ => base,
        }
    }
}

/// `x Wᵀ (+ b)` for a dense frozen weight, multiplied in the weight's kind, in `x`'s kind.
fn dense_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    x.to_kind(weight.kind()).linear(weight, bias).to_kind(x.kind())
}

/// Dense frozen layers that read the same input (q/k/v, gate/up) with their weights stored as
/// one `[Σ out, in]` tensor, each layer's weight a view of its rows: one GEMM instead of
/// several in the forward pass, and in the backward pass one instead of several plus their sum.
/// On the CPU that is faster for narrow layers (about 15% on SmolLM2's q/k/v and gate/up in
/// fp32) and holds no extra memory.
struct SharedInput {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The view each layer was given, to check that it still holds it.
    views: Vec<Tensor>,
}

impl SharedInput {
    /// Moves the layers' weights (and biases) into one tensor that they then view; `None` when
    /// one is quantized or stored `[in, out]`, or the kinds or bias presence differ.
    fn join(linears: &mut [&mut Linear]) -> Option<SharedInput> {
        let dense: Vec<&Tensor> = linears
            .iter()
            .map(|l| match &l.weight {
                FrozenWeight::Dense(w) if !l.fan_in_fan_out && w.numel() > 0 => Some(w),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let kind = dense[0].kind();
        let with_bias = linears[0].bias.is_some();
        let alike = dense.iter().all(|w| w.kind() == kind && w.device() == dense[0].device());
        if !alike || linears.iter().any(|l| l.bias.is_some() != with_bias) {
            return None;
        }
        let weight = Tensor::cat(&dense, 0);
        let bias = with_bias
            .then(|| Tensor::cat(&linears.iter().flat_map(|l| l.bias.as_ref()).collect::<Vec<_>>(), 0));
        let mut views = Vec::with_capacity(linears.len());
        let mut row = 0;
        for linear in linears.iter_mut() {
            let rows = linear.out_features();
            let view = weight.narrow(0, row, rows);
            linear.weight = FrozenWeight::Dense(view.shallow_clone());
            linear.bias = bias.as_ref().map(|b| b.narrow(0, row, rows));
            views.push(view);
            row += rows;
        }
        Some(SharedInput { weight, bias, views })
    }

    /// Whether each of `linears` still holds the view [`SharedInput::join`] gave it (a weight
    /// replaced since then is multiplied on its own).
    fn still_viewed(&self, linears: &[&Linear]) -> bool {
        linears.len() == self.views.len()
            && linears.iter().zip(&self.views).all(|(l, view)| match &l.weight {
                FrozenWeight::Dense(w) => w.is_set_to(view),
                FrozenWeight::Quantized(_) => false,
            })
    }

    /// Each layer's output for `x`, adapters included: through the joined weight while every
    /// layer still views it, else layer by layer.
    fn forward<const N: usize>(
        shared: Option<&SharedInput>,
        linears: [&Linear; N],
        x: &Tensor,
        train: bool,
    ) -> [Tensor; N] {
        let Some(shared) = shared.filter(|s| s.still_viewed(&linears)) else {
            return linears.map(|l| l.forward(x, train));
        };
        let sizes: Vec<i64> = linears.iter().map(|l| l.out_features()).collect();
        let bases = dense_linear(x, &shared.weight, shared.bias.as_ref()).split_with_sizes(sizes, -1);
        let mut bases = bases.into_iter();
        linears.map(|l| l.with_adapter(bases.next().expect("one part per layer"), x, train))
    }
}

/// RMSNorm (plain or Gemma's `1 + w`) or LayerNorm, computed in fp32; the result has the
/// input's kind.
struct Norm {
    /// Already `1 + w` for Gemma.
    weight: Tensor,
    bias: Option<Tensor>,
    kind: NormKind,
    eps: f64,
}

impl Norm {
    fn load(w: &mut Weights, name: &str, dim: i64, spec: &ModelSpec) -> Result<Norm> {
        let weight = w.take(&format!("{name}.weight"), &[dim])?.to_kind(Kind::Float);
        let bias = match spec.norm {
            NormKind::Layer => Some(w.take(&format!("{name}.bias"), &[dim])?.to_kind(Kind::Float)),
            _ => None,
        };
        let weight = if spec.norm == NormKind::RmsPlusOne { weight + 1.0 } else { weight };
        Ok(Norm { weight, bias, kind: spec.norm, eps: spec.norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let out = match self.kind {
            NormKind::Layer => {
                let dim = self.weight.size()[0];
                x32.layer_norm([dim], Some(&self.weight), self.bias.as_ref(), self.eps, false)
            }
            // libtorch's fused kernel: one pass instead of five over the activations.
            NormKind::Rms | NormKind::RmsPlusOne => {
                x32.rms_norm([self.weight.size()[0]], Some(&self.weight), self.eps)
            }
        };
        out.to_kind(x.kind())
    }
}

enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

enum Mlp {
    Gated { gate: Linear, up: Linear, down: Linear },
    GatedFused { gate_up: Linear, down: Linear },
    Plain { fc: Linear, proj: Linear },
}

struct Block {
    attn_norm: Norm,
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    mlp_norm: Norm,
    mlp: Mlp,
    post_mlp_norm: Option<Norm>,
    span: AttentionSpan,
    /// Separate q/k/v, and gate/up, joined for one GEMM each where their weights allow it.
    qkv_shared: Option<SharedInput>,
    mlp_shared: Option<SharedInput>,
}

/// The base model. Only LoRA adapters inside its [`Linear`] layers are trainable.
pub struct Decoder {
    pub spec: ModelSpec,
    /// Its linear layers, in the order [`Decoder::linear_layers_mut`] gives them.
    pub sites: LinearSites,
    embed_tokens: Tensor,
    embed_positions: Option<Tensor>,
    layers: Vec<Block>,
    norm: Norm,
    /// `None` when the output projection is tied to `embed_tokens`.
    lm_head: Option<Linear>,
    /// The kind of the activations inside each block (see the module docs): the weights' kind
    /// when loaded; set it to fp32 to multiply bf16-held weights with fp32 activations.
    pub activations: Kind,
    /// Some adapter applies dropout in training (set when adapters are attached).
    pub adapter_dropout: bool,
}

impl Block {
    /// Decoder layer `i`: its norms, taken from `w`, around `linears`, its linear layers (taken
    /// from `w` before).
    fn load(
        w: &mut Weights,
        spec: &ModelSpec,
        names: &ModuleNames,
        i: usize,
        mut linears: ByRole,
    ) -> Result<Block> {
        let p = format!("{}.{i}", names.layers);
        let attn = format!("{p}.{}", names.attn);
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let mut norm = |path: String, dim: i64| Norm::load(w, &path, dim, spec);
        let attn_norm = norm(format!("{p}.{}", names.attn_norm), h)?;
        let q_norm = spec.qk_norm.then(|| norm(format!("{attn}.{}", names.q_norm), hd)).transpose()?;
        let k_norm = spec.qk_norm.then(|| norm(format!("{attn}.{}", names.k_norm), hd)).transpose()?;
        let sandwich = spec.sandwich_norms;
        let post_attn_norm =
            sandwich.then(|| norm(format!("{p}.{}", names.post_attn_norm), h)).transpose()?;
        let mlp_norm = norm(format!("{p}.{}", names.mlp_norm), h)?;
        let post_mlp_norm = sandwich.then(|| norm(format!("{p}.{}", names.post_mlp_norm), h)).transpose()?;
        let mut qkv = match linears.take(Role::QueryKeyValue) {
            Some(qkv) => Qkv::Fused(qkv),
            None => Qkv::Separate {
                q: linears.get(Role::Query),
                k: linears.get(Role::Key),
                v: linears.get(Role::Value),
            },
        };
        let o_proj = linears.get(Role::AttnOutput);
        let mut mlp = match (linears.take(Role::GateUp), linears.take(Role::Gate)) {
            (Some(gate_up), _) => Mlp::GatedFused { gate_up, down: linears.get(Role::Down) },
            (None, Some(gate)) => {
                Mlp::Gated { gate, up: linears.get(Role::Up), down: linears.get(Role::Down) }
            }
            (None, None) => Mlp::Plain { fc: linears.get(Role::Up), proj: linears.get(Role::Down) },
        };
        let qkv_shared = match &mut qkv {
            Qkv::Separate { q, k, v } => SharedInput::join(&mut [q, k, v]),
            Qkv::Fused(_) => None,
        };
        let mlp_shared = match &mut mlp {
            Mlp::Gated { gate, up, .. } => SharedInput::join(&mut [gate, up]),
            _ => None,
        };
        Ok(Block {
            attn_norm,
            qkv,
            o_proj,
            q_norm,
            k_norm,
            post_attn_norm,
            mlp_norm,
            mlp,
            post_mlp_norm,
            span: spec.layer_spans[i],
            qkv_shared,
            mlp_shared,
        })
    }

    /// The linear layers, in the order of the site table.
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = match &mut self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&mut self.o_proj);
        match &mut self.mlp {
            Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
            Mlp::GatedFused { gate_up, down } => out.extend([gate_up, down]),
            Mlp::Plain { fc, proj } => out.extend([fc, proj]),
        }
        out
    }
}

/// One layer's linear layers by role, as the block takes them apart.
struct ByRole(Vec<(Role, Linear)>);

impl ByRole {
    fn take(&mut self, role: Role) -> Option<Linear> {
        let i = self.0.iter().position(|(r, _)| *r == role)?;
        Some(self.0.remove(i).1)
    }

    /// A role the family's names always give a layer.
    fn get(&mut self, role: Role) -> Linear {
        self.take(role)
            .unwrap_or_else(|| unreachable!("the site table gives every layer a {role:?} projection"))
    }
}

impl Decoder {
    /// Builds the decoder from the checkpoint's tensors, checking every name and shape.
    pub fn load(spec: ModelSpec, mut w: Weights) -> Result<Decoder> {
        let names = ModuleNames::of(spec.family);
        let sites = LinearSites::of(&spec);
        w.set_optional_prefix(names.optional_prefix);
        let (h, vocab) = (spec.hidden_size, spec.vocab_size);
        let embed_tokens = w.take(&format!("{}.weight", names.embed_tokens), &[vocab, h])?;
        let embed_positions = match names.embed_positions {
            Some(name) => Some(w.take(&format!("{name}.weight"), &[spec.max_position_embeddings, h])?),
            None => None,
        };
        let mut layers = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let linears = sites.layer(i).map(|site| Ok((site.role, Linear::load(&mut w, site)?)));
            let linears = ByRole(linears.collect::<Result<_>>()?);
            layers.push(Block::load(&mut w, &spec, &names, i, linears)?);
        }
        let final_norm = Norm::load(&mut w, names.final_norm, h, &spec)?;
        let lm_head = match sites.get(sites.lm_head) {
            Some(site) => {
                // bitsandbytes keeps the output head in the compute dtype, as transformers does.
                let quantization = w.quantization();
                w.set_quantization(None);
                let head = Linear::load(&mut w, site);
                w.set_quantization(quantization);
                Some(head?)
            }
            None => {
                // Some tied checkpoints still carry a copy of the embedding as lm_head.weight.
                let copy = format!("{}.weight", sites.lm_head);
                if w.contains(&copy) {
                    let _ = w.take(&copy, &[vocab, h])?;
                }
                None
            }
        };
        let unused: Vec<String> = w.remaining().into_iter().filter(|n| !names.is_buffer(n)).collect();
        if !unused.is_empty() {
            bail!(
                "the model weights hold tensors a `{}` model does not use: {}",
                spec.model_type,
                unused.join(", ")
            );
        }
        let activations = embed_tokens.kind();
        Ok(Decoder {
            spec,
            sites,
            embed_tokens,
            embed_positions,
            layers,
            norm: final_norm,
            lm_head,
            activations,
            adapter_dropout: false,
        })
    }

    /// Every linear layer with its site (`model.layers.0.self_attn.q_proj`, ..., `lm_head` when
    /// untied), in model order: the names PEFT adapters are keyed by.
    pub fn linear_layers_mut(&mut self) -> Vec<(&LinearSite, &mut Linear)> {
        let linears = self.layers.iter_mut().flat_map(Block::linears_mut).chain(self.lm_head.as_mut());
        let out: Vec<_> = self.sites.sites.iter().zip(linears).collect();
        debug_assert_eq!(out.len(), self.sites.sites.len(), "one linear layer per site");
        out
    }

    /// Every frozen tensor, for checks that training leaves the base untouched.
    pub fn frozen_tensors(&mut self) -> Vec<Tensor> {
        let norms = |n: &Norm| [Some(n.weight.shallow_clone()), n.bias.as_ref().map(Tensor::shallow_clone)];
        let mut out = vec![self.embed_tokens.shallow_clone()];
        out.extend(self.embed_positions.as_ref().map(Tensor::shallow_clone));
        out.extend(norms(&self.norm).into_iter().flatten());
        for b in &self.layers {
            for n in [
                Some(&b.attn_norm),
                Some(&b.mlp_norm),
                b.post_attn_norm.as_ref(),
                b.post_mlp_norm.as_ref(),
                b.q_norm.as_ref(),
                b.k_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                out.extend(norms(n).into_iter().flatten());
            }
        }
        for (_, l) in self.linear_layers_mut() {
            out.extend(l.weight.tensors());
            out.extend(l.bias.as_ref().map(Tensor::shallow_clone));
        }
        out
    }

    /// Logits `[batch, seq, vocab]` in fp32 for `input_ids` `[batch, seq]`, positions `0..seq`.
    ///
    /// Attention is causal. Right padding needs no mask: a real token never attends to the
    /// padding that follows it, so its logits equal those of the unpadded row.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        self.forward_packed(input_ids, None, train)
    }

    /// Like [`Decoder::forward`], for rows that may hold several examples: `packing` gives each
    /// token's position within its example and the example's index within the row, so that
    /// positions restart per example and attention never crosses from one example to another.
    pub fn forward_packed(&self, input_ids: &Tensor, packing: Option<&Packing>, train: bool) -> Tensor {
        self.forward_inner(input_ids, packing, None, train)
    }

    /// Logits of `input_ids` `[1, n]` continuing the sequence whose keys and values `cache`
    /// holds (empty for a prompt), which it then extends: decoding costs one token's work per
    /// step instead of the whole sequence's.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let new = input_ids.size()[1];
        let (held, total) = (cache.len, cache.len + new);
        let stale = [&self.spec.rope, &self.spec.local_rope]
            .iter()
            .any(|rope| rope.as_ref().is_some_and(|r| r.switches_factors(held, total)));
        if let Some(tokens) = cache.tokens.as_ref().filter(|_| stale) {
            // Longrope's factors changed for every position, so the cached keys are stale:
            // transformers (Phi-3) then drops the cache and encodes the whole sequence again.
            let all = Tensor::cat(&[tokens, input_ids], 1);
            *cache = KvCache::new(self);
            let logits = self.forward_inner(&all, None, Some(cache), false);
            return logits.narrow(1, cache.len - new, new);
        }
        self.forward_inner(input_ids, None, Some(cache), false)
    }

    /// Whether training applies dropout anywhere: in adapters or in the model itself.
    pub fn has_dropout(&self) -> bool {
        self.adapter_dropout || self.spec.dropout.any()
    }

    fn forward_inner(
        &self,
        input_ids: &Tensor,
        packing: Option<&Packing>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let (mut x, pass) = self.embed(input_ids, packing, offset, train);
        for i in 0..self.layers.len() {
            x = self.block(i, &x, &pass, cache.as_deref_mut(), train);
        }
        if let Some(cache) = cache {
            cache.push_tokens(input_ids);
        }
        self.logits(&self.final_norm(&x), train)
    }

    /// fp32 logits `[..., vocab]` of final-normed hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Tensor {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden, train),
            None => hidden.to_kind(self.embed_tokens.kind()).matmul(&self.embed_tokens.tr()),
        }
        .to_kind(Kind::Float);
        match self.spec.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// The residual stream `[batch, seq, hidden]` (fp32) entering the first block, and what every
    /// block of the pass shares. `offset` is the position of the first token (cached decoding).
    pub fn embed<'a>(
        &self,
        input_ids: &Tensor,
        packing: Option<&'a Packing>,
        offset: i64,
        train: bool,
    ) -> (Tensor, TokenPositions<'a>) {
        let s = &self.spec;
        let (batch, seq) = input_ids.size2().expect("input_ids must be [batch, seq]");
        let device = input_ids.device();
        let positions = match packing {
            Some(p) => p.positions.shallow_clone(),
            None => Tensor::arange_start(offset, offset + seq, (Kind::Int64, device))
                .unsqueeze(0)
                .expand([batch, seq], false),
        };
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false).to_kind(Kind::Float);
        if let Some(scale) = s.embed_scale {
            // transformers multiplies by the fp32 scale cast to the embeddings' kind: under bf16
            // weights Gemma 2 9B's √3584 = 59.87 is 59.75.
            x *= Tensor::from(scale as f32).to_kind(self.embed_tokens.kind()).double_value(&[]);
        }
        if let Some(table) = &self.embed_positions {
            x = &x + Tensor::embedding(table, &positions, -1, false, false).to_kind(Kind::Float);
        }
        let x = dropout(x, s.dropout.in_training(train).embeddings);
        let pass = TokenPositions {
            global_rope: s.rope.as_ref().map(|r| rope_tables(r, &positions)),
            local_rope: s.local_rope.as_ref().map(|r| rope_tables(r, &positions)),
            packing,
        };
        (x, pass)
    }

    /// Block `i` on the residual stream `x`: `x + attention(norm(x))`, then `+ mlp(norm(..))`.
    pub fn block(
        &self,
        i: usize,
        x: &Tensor,
        pass: &TokenPositions<'_>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let s = &self.spec;
        let block = &self.layers[i];
        let (batch, seq, _) = x.size3().expect("the residual stream is [batch, seq, hidden]");
        let act = self.activations;
        let drop = s.dropout.in_training(train);
        let h = block.attn_norm.forward(x).to_kind(act);
        let (q, k, v) = match &block.qkv {
            Qkv::Separate { q, k, v } => {
                let [q, k, v] = SharedInput::forward(block.qkv_shared.as_ref(), [q, k, v], &h, train);
                (q, k, v)
            }
            Qkv::Fused(qkv) => {
                let (q_dim, kv_dim) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
                let parts = qkv.forward(&h, train).split_with_sizes([q_dim, kv_dim, kv_dim], -1);
                let [q, k, v]: [Tensor; 3] = parts.try_into().expect("three parts");
                (q, k, v)
            }
        };
        let heads = |t: Tensor, n: i64, norm: Option<&Norm>| {
            let t = t.view([batch, seq, n, s.head_dim]);
            norm.map_or(t.shallow_clone(), |nm| nm.forward(&t)).transpose(1, 2)
        };
        let mut q = heads(q, s.num_heads, block.q_norm.as_ref());
        let mut k = heads(k, s.num_kv_heads, block.k_norm.as_ref());
        let v = heads(v, s.num_kv_heads, None);
        let sliding = matches!(block.span, AttentionSpan::Sliding(_));
        if let Some((cos, sin)) = if sliding {
            pass.local_rope.as_ref().or(pass.global_rope.as_ref())
        } else {
            pass.global_rope.as_ref()
        } {
            q = apply_rope(&q, cos, sin);
            k = apply_rope(&k, cos, sin);
        }
        let (k, v) = match cache {
            Some(cache) => cache.extend(i, k, v),
            None => (k, v),
        };
        let attn = self.attention(&q, &k, &v, block.span, pass.packing, drop.attention);
        let attn = attn.transpose(1, 2).reshape([batch, seq, s.num_heads * s.head_dim]);
        let mut out = dropout(block.o_proj.forward(&attn, train), drop.residual);
        if let Some(norm) = &block.post_attn_norm {
            out = norm.forward(&out);
        }
        let x = x + out;

        let h = block.mlp_norm.forward(&x).to_kind(act);
        let mut out = dropout(self.mlp(block, &h, train), drop.residual);
        if let Some(norm) = &block.post_mlp_norm {
            out = norm.forward(&out);
        }
        x + out
    }

    /// The final norm of the residual stream: the hidden states [`Decoder::logits`] projects.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// How many groups of projections (q/k/v, gate/up) run as one GEMM: those joined at load
    /// whose layers all still view the joined weight.
    pub fn joined_projections(&self) -> usize {
        let holds = |shared: &Option<SharedInput>, linears: Vec<&Linear>| {
            shared.as_ref().is_some_and(|s| s.still_viewed(&linears))
        };
        self.layers
            .iter()
            .map(|b| {
                let qkv = match &b.qkv {
                    Qkv::Separate { q, k, v } => holds(&b.qkv_shared, vec![q, k, v]),
                    Qkv::Fused(_) => false,
                };
                let mlp = match &b.mlp {
                    Mlp::Gated { gate, up, .. } => holds(&b.mlp_shared, vec![gate, up]),
                    _ => false,
                };
                usize::from(qkv) + usize::from(mlp)
            })
            .sum()
    }

    /// How many blocks [`Decoder::block`] takes.
    pub fn num_blocks(&self) -> usize {
        self.layers.len()
    }

    fn mlp(&self, block: &Block, h: &Tensor, train: bool) -> Tensor {
        let act = |t: Tensor| match self.spec.activation {
            Activation::Silu => t.silu(),
            Activation::GeluTanh => t.gelu("tanh"),
            Activation::Gelu => t.gelu("none"),
        };
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let [gate, up] = SharedInput::forward(block.mlp_shared.as_ref(), [gate, up], h, train);
                down.forward(&(act(gate) * up), train)
            }
            Mlp::GatedFused { gate_up, down } => {
                let both = gate_up.forward(h, train);
                let ffn = self.spec.intermediate_size;
                down.forward(&(act(both.narrow(-1, 0, ffn)) * both.narrow(-1, ffn, ffn)), train)
            }
            Mlp::Plain { fc, proj } => proj.forward(&act(fc.forward(h, train)), train),
        }
    }

    /// Causal attention over `[batch, heads, seq, head_dim]`, restricted to a sliding window
    /// where the layer has one and to each token's own example in packed rows, with Gemma 2's
    /// score soft-capping where configured and dropout `dropout_p` on the probabilities.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        span: AttentionSpan,
        packing: Option<&Packing>,
        dropout_p: f64,
    ) -> Tensor {
        let s = &self.spec;
        let documents = packing.map(|p| &p.documents);
        let (q_len, k_len) = (q.size()[2], k.size()[2]);
        let gqa = s.num_kv_heads != s.num_heads;
        let window = match span {
            AttentionSpan::Sliding(w) if w < k_len => Some(w),
            _ => None,
        };
        // One new query after cached keys sees all of them: no mask at all.
        let sees_all = window.is_none() && documents.is_none() && q_len == 1;
        let allowed = || attention_mask_offset(q_len, k_len, window, documents, q.device());
        let sdpa = |mask: Option<Tensor>| {
            Tensor::scaled_dot_product_attention(q, k, v, mask, dropout_p, false, s.attn_scale, gqa)
        };
        match s.attn_softcap {
            None if q_len == k_len => causal_attention(q, k, v, s.attn_scale, window, packing, dropout_p),
            None if sees_all => sdpa(None),
            None => sdpa(Some(allowed())),
            Some(cap) => {
                let groups = s.num_heads / s.num_kv_heads;
                let (k, v) = (
                    k.repeat_interleave_self_int(groups, 1, None),
                    v.repeat_interleave_self_int(groups, 1, None),
                );
                let scores = q.matmul(&k.transpose(-2, -1)) * s.attn_scale;
                let scores = (scores / cap).tanh() * cap;
                let scores = scores.masked_fill(&allowed().logical_not(), f64::NEG_INFINITY);
                dropout(scores.softmax(-1, Kind::Float).to_kind(q.kind()), dropout_p).matmul(&v)
            }
        }
    }
}

/// Where the tokens of one forward pass are, which every block reads: the rotary tables of
/// their positions and, in packed rows, where each example lies.
pub struct TokenPositions<'a> {
    global_rope: Option<(Tensor, Tensor)>,
    local_rope: Option<(Tensor, Tensor)>,
    packing: Option<&'a Packing>,
}

/// `x` with dropout of probability `p` (callers pass 0 outside training).
pub(super) fn dropout(x: Tensor, p: f64) -> Tensor {
    if p > 0.0 {
        x.dropout(p, true)
    } else {
        x
    }
}

/// Keys and values of every layer for the tokens decoded so far.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The tokens held `[batch, len]`, to encode them again when the keys go stale (longrope).
    tokens: Option<Tensor>,
    /// Tokens held.
    pub len: i64,
}

impl KvCache {
    pub fn new(model: &Decoder) -> KvCache {
        KvCache { layers: (0..model.spec.num_layers).map(|_| None).collect(), tokens: None, len: 0 }
    }

    /// Records the tokens `[batch, n]` whose keys and values every layer has just appended.
    fn push_tokens(&mut self, ids: &Tensor) {
        self.len += ids.size()[1];
        self.tokens = Some(match self.tokens.take() {
            Some(held) => Tensor::cat(&[&held, ids], 1),
            None => ids.shallow_clone(),
        });
    }

    /// Appends a layer's new keys and values `[batch, kv_heads, n, head_dim]` and returns all.
    fn extend(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
        (k, v)
    }
}
