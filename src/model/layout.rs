//! Each family's Hugging Face module names: where a tensor lives in the checkpoint and which
//! module path a PEFT adapter key names. Data only; the decoder reads it.

use super::spec::Family;

/// The query/key/value projections: three modules, or one fused (`[q; k; v]` rows).
#[derive(Debug, Clone, Copy)]
pub enum AttnProjections {
    Separate { q: &'static str, k: &'static str, v: &'static str },
    Fused(&'static str),
}

/// The MLP: gated (`down(act(gate(x)) · up(x))`, gate and up possibly fused as `[gate; up]`),
/// or plain (`proj(act(fc(x)))`).
#[derive(Debug, Clone, Copy)]
pub enum MlpProjections {
    Gated { gate: &'static str, up: &'static str, down: &'static str },
    GatedFused { gate_up: &'static str, down: &'static str },
    Plain { fc: &'static str, proj: &'static str },
}

#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Prefix some checkpoints omit (GPT-2's `transformer.`); loading accepts names without it.
    pub optional_prefix: Option<&'static str>,
    pub embed_tokens: &'static str,
    pub embed_positions: Option<&'static str>,
    pub layers: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub attn: &'static str,
    pub mlp: &'static str,
    pub attn_projections: AttnProjections,
    pub o_proj: &'static str,
    pub mlp_projections: MlpProjections,
    /// Norm before attention; before the MLP; Gemma's after attention and after the MLP.
    pub attn_norm: &'static str,
    pub mlp_norm: &'static str,
    pub post_attn_norm: &'static str,
    pub post_mlp_norm: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    /// Linear weights stored `[in, out]` (GPT-2's Conv1D): PEFT's `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
}

const LLAMA: Layout = Layout {
    optional_prefix: None,
    embed_tokens: "model.embed_tokens",
    embed_positions: None,
    layers: "model.layers",
    final_norm: "model.norm",
    lm_head: "lm_head",
    attn: "self_attn",
    mlp: "mlp",
    attn_projections: AttnProjections::Separate { q: "q_proj", k: "k_proj", v: "v_proj" },
    o_proj: "o_proj",
    mlp_projections: MlpProjections::Gated { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    attn_norm: "input_layernorm",
    mlp_norm: "post_attention_layernorm",
    post_attn_norm: "",
    post_mlp_norm: "",
    q_norm: "q_norm",
    k_norm: "k_norm",
    fan_in_fan_out: false,
};

/// Gemma 2/3 name the four norms differently: `post_attention_layernorm` follows attention.
const GEMMA: Layout = Layout {
    mlp_norm: "pre_feedforward_layernorm",
    post_attn_norm: "post_attention_layernorm",
    post_mlp_norm: "post_feedforward_layernorm",
    ..LLAMA
};

const PHI3: Layout = Layout {
    attn_projections: AttnProjections::Fused("qkv_proj"),
    mlp_projections: MlpProjections::GatedFused { gate_up: "gate_up_proj", down: "down_proj" },
    ..LLAMA
};

const GPT2: Layout = Layout {
    optional_prefix: Some("transformer."),
    embed_tokens: "transformer.wte",
    embed_positions: Some("transformer.wpe"),
    layers: "transformer.h",
    final_norm: "transformer.ln_f",
    lm_head: "lm_head",
    attn: "attn",
    mlp: "mlp",
    attn_projections: AttnProjections::Fused("c_attn"),
    o_proj: "c_proj",
    mlp_projections: MlpProjections::Plain { fc: "c_fc", proj: "c_proj" },
    attn_norm: "ln_1",
    mlp_norm: "ln_2",
    post_attn_norm: "",
    post_mlp_norm: "",
    q_norm: "",
    k_norm: "",
    fan_in_fan_out: true,
};

impl Layout {
    pub fn of(family: Family) -> Layout {
        match family {
            Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3 => LLAMA,
            Family::Gemma2 | Family::Gemma3 => GEMMA,
            Family::Phi3 => PHI3,
            Family::Gpt2 => GPT2,
        }
    }
}
