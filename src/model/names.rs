//! Each family's Hugging Face module names: where a tensor lives in the checkpoint and which
//! module path a PEFT adapter key names, plus the few facts about the family that other
//! runtimes need. Data only; [`super::sites`] turns it into the table of linear layers.

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

/// How llama.cpp runs the family.
#[derive(Debug, Clone, Copy)]
pub struct LlamaCpp {
    /// Its architecture name (`LLM_ARCH_NAMES`), as its converter writes it.
    pub arch: &'static str,
    /// It rotates interleaved pairs where Hugging Face rotates halves, so its converter
    /// (`LlamaModel.permute`) reorders the rows of the q/k projections.
    pub interleaved_rope: bool,
}

/// A family's module and tensor names.
#[derive(Debug, Clone, Copy)]
pub struct ModuleNames {
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
    /// Name endings of tensors some checkpoints carry that are precomputed buffers, not weights.
    pub buffers: &'static [&'static str],
    pub llama_cpp: LlamaCpp,
}

const LLAMA: ModuleNames = ModuleNames {
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
    buffers: &["rotary_emb.inv_freq"],
    llama_cpp: LlamaCpp { arch: "llama", interleaved_rope: true },
};

/// llama.cpp's own architectures for these rotate halves, as Hugging Face does.
const QWEN2: ModuleNames =
    ModuleNames { llama_cpp: LlamaCpp { arch: "qwen2", interleaved_rope: false }, ..LLAMA };
const QWEN3: ModuleNames =
    ModuleNames { llama_cpp: LlamaCpp { arch: "qwen3", interleaved_rope: false }, ..LLAMA };

/// Gemma 2/3 name the four norms differently: `post_attention_layernorm` follows attention.
const GEMMA2: ModuleNames = ModuleNames {
    mlp_norm: "pre_feedforward_layernorm",
    post_attn_norm: "post_attention_layernorm",
    post_mlp_norm: "post_feedforward_layernorm",
    llama_cpp: LlamaCpp { arch: "gemma2", interleaved_rope: false },
    ..LLAMA
};

const GEMMA3: ModuleNames =
    ModuleNames { llama_cpp: LlamaCpp { arch: "gemma3", interleaved_rope: false }, ..GEMMA2 };

const PHI3: ModuleNames = ModuleNames {
    attn_projections: AttnProjections::Fused("qkv_proj"),
    mlp_projections: MlpProjections::GatedFused { gate_up: "gate_up_proj", down: "down_proj" },
    llama_cpp: LlamaCpp { arch: "phi3", interleaved_rope: false },
    ..LLAMA
};

const GPT2: ModuleNames = ModuleNames {
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
    buffers: &[".attn.bias", ".attn.masked_bias"],
    llama_cpp: LlamaCpp { arch: "gpt2", interleaved_rope: false },
};

impl ModuleNames {
    pub fn of(family: Family) -> ModuleNames {
        match family {
            Family::Llama | Family::Mistral => LLAMA,
            Family::Qwen2 => QWEN2,
            Family::Qwen3 => QWEN3,
            Family::Gemma2 => GEMMA2,
            Family::Gemma3 => GEMMA3,
            Family::Phi3 => PHI3,
            Family::Gpt2 => GPT2,
        }
    }

    /// Whether tensor `name` is one of the family's buffers rather than a weight.
    pub fn is_buffer(&self, name: &str) -> bool {
        self.buffers.iter().any(|suffix| name.ends_with(suffix))
    }
}
