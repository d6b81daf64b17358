//! One decoder-only transformer (Llama block: RMSNorm, RoPE, grouped-query attention through
//! `scaled_dot_product_attention`, SiLU-gated MLP), parameterised by [`ModelSpec`].
//!
//! Activations stay in fp32; frozen weights may be held in bf16, in which case each frozen
//! matmul runs in bf16 and its result is cast back (what `torch.autocast` does for PEFT users).

use super::{ModelSpec, Weights};
use crate::lora::Adapter;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// A frozen linear layer `y = x Wᵀ (+ b)` with an optional trainable LoRA adapter beside it.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    fn load(w: &mut Weights, name: &str, out: i64, inp: i64, bias: bool) -> Result<Linear> {
        let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            adapter: None,
        })
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = self.weight.kind();
        let base = x
            .to_kind(kind)
            .linear(&self.weight, self.bias.as_ref())
            .to_kind(x.kind());
        match &self.adapter {
            Some(adapter) => base + adapter.forward(x, train),
            None => base,
        }
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let variance = x.square().mean_dim(-1, true, Kind::Float);
    x * (variance + eps).rsqrt() * weight
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// The base model. Only LoRA adapters inside its [`Linear`] layers are trainable.
pub struct Decoder {
    pub spec: ModelSpec,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    /// `None` when the output projection is tied to `embed_tokens`.
    lm_head: Option<Linear>,
}

impl Decoder {
    /// Builds the decoder from Hugging Face tensor names, checking every shape.
    pub fn load(spec: ModelSpec, mut w: Weights) -> Result<Decoder> {
        let s = &spec;
        let (h, hd) = (s.hidden_size, s.head_dim);
        let (q_dim, kv_dim) = (s.num_heads * hd, s.num_kv_heads * hd);
        // Norm weights are tiny: keep them in fp32 whatever the storage dtype.
        let norm = |w: &mut Weights, name: &str| -> Result<Tensor> {
            Ok(w.take(name, &[h])?.to_kind(Kind::Float))
        };
        let embed_tokens = w.take("model.embed_tokens.weight", &[s.vocab_size, h])?;
        let mut layers = Vec::with_capacity(s.num_layers);
        for i in 0..s.num_layers {
            let p = format!("model.layers.{i}");
            let ab = s.attention_bias;
            layers.push(Block {
                input_layernorm: norm(&mut w, &format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: Linear::load(&mut w, &format!("{p}.self_attn.q_proj"), q_dim, h, ab)?,
                    k_proj: Linear::load(&mut w, &format!("{p}.self_attn.k_proj"), kv_dim, h, ab)?,
                    v_proj: Linear::load(&mut w, &format!("{p}.self_attn.v_proj"), kv_dim, h, ab)?,
                    o_proj: Linear::load(
                        &mut w,
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        q_dim,
                        false,
                    )?,
                },
                post_attention_layernorm: norm(
                    &mut w,
                    &format!("{p}.post_attention_layernorm.weight"),
                )?,
                mlp: Mlp {
                    gate_proj: Linear::load(
                        &mut w,
                        &format!("{p}.mlp.gate_proj"),
                        s.intermediate_size,
                        h,
                        s.mlp_bias,
                    )?,
                    up_proj: Linear::load(
                        &mut w,
                        &format!("{p}.mlp.up_proj"),
                        s.intermediate_size,
                        h,
                        s.mlp_bias,
                    )?,
                    down_proj: Linear::load(
                        &mut w,
                        &format!("{p}.mlp.down_proj"),
                        h,
                        s.intermediate_size,
                        s.mlp_bias,
                    )?,
                },
            });
        }
        let final_norm = norm(&mut w, "model.norm.weight")?;
        let lm_head = if s.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the embedding as lm_head.weight.
            let _ = w.take("lm_head.weight", &[s.vocab_size, h]);
            None
        } else {
            Some(Linear::load(&mut w, "lm_head", s.vocab_size, h, false)?)
        };
        let rotary_leftovers = |n: &String| n.ends_with("rotary_emb.inv_freq");
        let unused: Vec<String> = w
            .remaining()
            .into_iter()
            .filter(|n| !rotary_leftovers(n))
            .collect();
        if !unused.is_empty() {
            bail!(
                "the model weights hold tensors a `{}` model does not use: {}",
                s.model_type,
                unused.join(", ")
            );
        }
        Ok(Decoder {
            spec,
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
        })
    }

    /// Every linear layer by its Hugging Face module path (`model.layers.0.self_attn.q_proj`,
    /// ..., `lm_head` when untied), in model order: the names PEFT adapters are keyed by.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter_mut().enumerate() {
            let a = &mut b.self_attn;
            let m = &mut b.mlp;
            for (name, l) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), l));
            }
        }
        if let Some(head) = self.lm_head.as_mut() {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Every frozen tensor, for checks that training leaves the base untouched.
    pub fn frozen_tensors(&mut self) -> Vec<Tensor> {
        let mut out = vec![self.embed_tokens.shallow_clone(), self.norm.shallow_clone()];
        for b in &self.layers {
            out.push(b.input_layernorm.shallow_clone());
            out.push(b.post_attention_layernorm.shallow_clone());
        }
        for (_, l) in self.linear_layers_mut() {
            out.push(l.weight.shallow_clone());
            out.extend(l.bias.as_ref().map(|b| b.shallow_clone()));
        }
        out
    }

    /// Logits `[batch, seq, vocab]` in fp32 for `input_ids` `[batch, seq]`.
    ///
    /// Attention is causal. Right padding needs no mask: a real token never attends to the
    /// padding that follows it, so its logits equal those of the unpadded row.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let s = &self.spec;
        let (batch, seq) = input_ids.size2().expect("input_ids must be [batch, seq]");
        let device = input_ids.device();
        let (cos, sin) = rope_tables(s, seq, device);
        let mut x =
            Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false).to_kind(Kind::Float);
        for block in &self.layers {
            let h = rms_norm(&x, &block.input_layernorm, s.rms_norm_eps);
            let a = &block.self_attn;
            let heads = |t: Tensor, n: i64| t.view([batch, seq, n, s.head_dim]).transpose(1, 2);
            let q = apply_rope(&heads(a.q_proj.forward(&h, train), s.num_heads), &cos, &sin);
            let k = apply_rope(
                &heads(a.k_proj.forward(&h, train), s.num_kv_heads),
                &cos,
                &sin,
            );
            let v = heads(a.v_proj.forward(&h, train), s.num_kv_heads);
            let gqa = s.num_kv_heads != s.num_heads;
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                gqa,
            );
            let attn = attn
                .transpose(1, 2)
                .reshape([batch, seq, s.num_heads * s.head_dim]);
            x = &x + a.o_proj.forward(&attn, train);

            let h = rms_norm(&x, &block.post_attention_layernorm, s.rms_norm_eps);
            let m = &block.mlp;
            let gated = m.gate_proj.forward(&h, train).silu() * m.up_proj.forward(&h, train);
            x = &x + m.down_proj.forward(&gated, train);
        }
        let x = rms_norm(&x, &self.norm, s.rms_norm_eps);
        match &self.lm_head {
            Some(head) => head.forward(&x, train),
            None => x
                .to_kind(self.embed_tokens.kind())
                .matmul(&self.embed_tokens.tr())
                .to_kind(Kind::Float),
        }
    }
}

/// cos/sin tables `[1, 1, seq, head_dim]` for positions `0..seq` (Hugging Face's half-split layout).
fn rope_tables(s: &ModelSpec, seq: i64, device: tch::Device) -> (Tensor, Tensor) {
    let opts = (Kind::Float, device);
    // Computed in fp32 exactly as transformers does, so positions far from 0 rotate identically.
    let exponents = Tensor::arange_start_step(0, s.head_dim, 2, (Kind::Int64, device))
        .to_kind(Kind::Float)
        / s.head_dim as f64;
    let inv_freq = Tensor::pow_scalar(s.rope_theta, &exponents).reciprocal();
    let positions = Tensor::arange(seq, opts);
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (
        emb.cos().view([1, 1, seq, s.head_dim]),
        emb.sin().view([1, 1, seq, s.head_dim]),
    )
}

/// `x·cos + rotate_half(x)·sin` on `[batch, heads, seq, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * cos + rotated * sin
}
