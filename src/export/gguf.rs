//! llama.cpp LoRA adapters: a PEFT adapter directory → one GGUF v3 file, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it and `llama_adapter_lora_init` reads it.
//!
//! The file holds the KV pairs `general.architecture` (llama.cpp's name of the base's
//! architecture, which the runtime checks against the model), `general.type = "adapter"`,
//! `adapter.type = "lora"`, `general.name`, `adapter.lora.alpha` (f32) and
//! `general.quantization_version`, then per adapted layer `blk.N.<tensor>.weight.lora_a`
//! (`[r, in]`, ggml `ne = [in, r]`) and `.lora_b` (`[out, r]`, `ne = [r, out]`).
//!
//! What the converter does and this module repeats:
//! - Llama and Mistral: llama.cpp stores q/k projections with the rows of each head
//!   interleaved for its RoPE (`LlamaModel.permute`); the rows of B of `q_proj`/`k_proj` are
//!   reordered the same way (A is unchanged).
//! - Tensors in the order of the adapter file's keys, data aligned to 32 bytes.
//!
//! Where lorafit differs on purpose:
//! - llama.cpp scales every tensor by `adapter.lora.alpha / rank` (rank from the tensor's
//!   shape); the converter writes `lora_alpha` and ignores `use_rslora`, `alpha_pattern` and
//!   `rank_pattern`. lorafit keeps PEFT's scale: with rsLoRA the stored alpha is
//!   `lora_alpha · √r` (so `alpha / r = lora_alpha / √r`), and a module whose scale still
//!   differs (its own alpha or rank by pattern) has its B multiplied by the ratio. Each such
//!   fold is reported as a warning.
//! - GPT-2 (`fan_in_fan_out`): PEFT's A and B already have the `[r, in]` / `[out, r]` layout
//!   of a linear layer; the converter transposes them as it does GPT-2's `Conv1D` weights,
//!   which gives tensors llama.cpp's loader rejects. lorafit writes them untransposed.

use super::merge::all_finite;
use crate::config::LoraConfig;
use crate::files::{read_safetensors, write_atomic};
use crate::lora::peft::{self, AdapterConfig, Halves, WEIGHTS_FILE};
use crate::lora::{pattern_value, scale};
use crate::model::names::ModuleNames;
use crate::model::sites::Role;
use crate::model::{LinearSite, LinearSites, ModelSpec};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// The element type of the exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
}

impl GgufDtype {
    /// ggml's type id.
    fn ggml_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Bf16 => 30,
        }
    }

    fn kind(self) -> Kind {
        match self {
            GgufDtype::F32 => Kind::Float,
            GgufDtype::F16 => Kind::Half,
            GgufDtype::Bf16 => Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for GgufDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<GgufDtype> {
        Ok(match s {
            "f32" => GgufDtype::F32,
            "f16" => GgufDtype::F16,
            "bf16" => GgufDtype::Bf16,
            _ => bail!("unknown tensor type `{s}`: use f32, f16 or bf16"),
        })
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// Tensors in the file (two per adapted layer).
    pub tensors: usize,
    /// Size of the file.
    pub bytes: u64,
    /// Scales lorafit folded because llama.cpp's `alpha / rank` rule alone would not give PEFT's.
    pub warnings: Vec<String>,
}

/// GGUF's data alignment (`general.alignment` is not written, so readers use this default).
const ALIGNMENT: usize = 32;
/// `GGML_QUANT_VERSION`, which llama.cpp's converter writes into every file.
const QUANT_VERSION: u32 = 2;

/// `lorafit export`: [`export`] in `format` (only `gguf`) to `out`, which must not exist unless
/// `force`, and which runtimes load the adapter as it is, as text for stdout. Without
/// `model_dir`, the base model is the one the adapter names.
pub fn export_command(
    adapter_dir: &Path,
    format: &str,
    model_dir: Option<&Path>,
    out: &Path,
    dtype: GgufDtype,
    force: bool,
) -> Result<String> {
    if format != "gguf" {
        bail!("--format {format}: only gguf is supported (the adapter itself is already in PEFT format)");
    }
    // As `merge` does, never replace a file the user did not say to replace.
    if out.exists() && !force {
        bail!("{} already exists; pass --force to replace it, or choose another --out", out.display());
    }
    let model_dir = peft::base_model_dir(adapter_dir, model_dir)?;
    let report = export(adapter_dir, &model_dir, out, dtype)?;
    let mut text = format!(
        "wrote {} ({} tensors, {:.1} MB)\n",
        out.display(),
        report.tensors,
        report.bytes as f64 / 1e6
    );
    for w in &report.warnings {
        text += &format!("  note: {w}\n");
    }
    text += &format!("  {}\n", super::compat::check(adapter_dir)?.describe());
    Ok(text)
}

/// Writes the PEFT adapter in `adapter_dir`, trained on the model in `model_dir`, to `out` as a
/// llama.cpp LoRA adapter (atomically: a temporary file, then a rename).
pub fn export(adapter_dir: &Path, model_dir: &Path, out: &Path, dtype: GgufDtype) -> Result<ExportReport> {
    let adapter = AdapterConfig::read(adapter_dir)?;
    // aLoRA adapters need `adapter.alora.invocation_tokens` and an activation rule lorafit does
    // not implement.
    if let Some(key) = adapter.activated_lora {
        bail!("{}: activated LoRA (`{key}`) adapters are not supported", adapter.path.display());
    }
    let cfg = adapter.lora_config()?;
    let spec = ModelSpec::from_dir(model_dir)?;
    let sites = LinearSites::of(&spec);
    let weights_path = adapter_dir.join(WEIGHTS_FILE);
    let halves = peft::pair_halves(
        &weights_path,
        read_safetensors(&weights_path)?,
        "llama.cpp adapters hold only LoRA A and B matrices",
    )?;
    if halves.is_empty() {
        bail!("{}: the adapter has no tensors", weights_path.display());
    }
    let mut scaling = Scaling::new(&cfg);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    // BTreeMap order is the order of the adapter file's keys, which the converter keeps.
    for (path, pair) in halves {
        let site = sites.find(&path).with_context(|| {
            format!(
                "{}: tensor `{}` does not fit the model in {}",
                weights_path.display(),
                peft::key(&path, "lora_A"),
                model_dir.display()
            )
        })?;
        let (a, b) = checked_pair(&weights_path, site, pair)?;
        let mut b = scaling.fold(&cfg, &path, b)?;
        if let Some(heads) = site.gguf_permuted_heads {
            b = permute_rows(&b, heads);
        }
        let (a, b) = (a.to_kind(dtype.kind()), b.to_kind(dtype.kind()));
        if !all_finite(&a) || !all_finite(&b) {
            bail!(
                "{}: `{path}`'s adapter (scaled for llama.cpp) overflows {dtype:?}; export with --dtype f32",
                weights_path.display()
            );
        }
        let name = gguf_name(site);
        tensors.push((format!("{name}.weight.lora_a"), a));
        tensors.push((format!("{name}.weight.lora_b"), b));
    }

    let kvs = [
        ("general.architecture", Kv::Str(ModuleNames::of(spec.family).llama_cpp.arch.to_string())),
        ("general.type", Kv::Str("adapter".into())),
        ("adapter.type", Kv::Str("lora".into())),
        ("general.name", Kv::Str(display_name(adapter_dir, model_dir))),
        ("adapter.lora.alpha", Kv::F32(scaling.alpha)),
        ("general.quantization_version", Kv::U32(QUANT_VERSION)),
    ];
    let bytes = gguf_bytes(&kvs, &tensors, dtype)?;
    write_atomic(out, &bytes)?;
    Ok(ExportReport { tensors: tensors.len(), bytes: bytes.len() as u64, warnings: scaling.warnings })
}

/// A and B of the linear layer `site` from the adapter file `file`: both present, of shapes
/// that fit the layer, and finite.
fn checked_pair(file: &Path, site: &LinearSite, pair: Halves) -> Result<(Tensor, Tensor)> {
    let (path, in_features, out_features) = (&site.path, site.in_features, site.out_features);
    let (key_a, key_b) = (peft::key(path, "lora_A"), peft::key(path, "lora_B"));
    let a = pair.a.ok_or_else(|| anyhow!("{}: `{key_b}` has no `{key_a}`", file.display()))?;
    let b = pair.b.ok_or_else(|| anyhow!("{}: `{key_a}` has no `{key_b}`", file.display()))?;
    let (sa, sb) = (a.size(), b.size());
    let r = *sa.first().unwrap_or(&0);
    if sa != [r, in_features] || r == 0 {
        bail!(
            "{}: `{key_a}` has shape {sa:?}; the model's `{path}` takes {in_features} inputs, so A must be \
             [r, {in_features}]",
            file.display()
        );
    }
    if sb != [out_features, r] {
        bail!(
            "{}: `{key_b}` has shape {sb:?}; the model's `{path}` has {out_features} outputs and A has rank \
             {r}, so B must be [{out_features}, {r}]",
            file.display()
        );
    }
    for (key, t) in [(&key_a, &a), (&key_b, &b)] {
        if !all_finite(t) {
            bail!(
                "{}: `{key}` holds NaN or infinite values, so the adapter is broken (training \
                 diverged?); export an earlier checkpoint (step-N/ or best/) instead",
                file.display()
            );
        }
    }
    Ok((a, b))
}

/// llama.cpp's one scale rule, `adapter.lora.alpha / rank`, made to give PEFT's scale of every
/// module, with a warning for each fold that takes.
struct Scaling {
    /// PEFT's scale at the adapter's base rank times that rank.
    alpha: f32,
    warnings: Vec<String>,
}

impl Scaling {
    fn new(cfg: &LoraConfig) -> Scaling {
        let alpha = if cfg.use_rslora { cfg.alpha * (cfg.r as f64).sqrt() } else { cfg.alpha } as f32;
        let mut warnings = Vec::new();
        if cfg.use_rslora {
            warnings.push(format!(
                "rsLoRA: adapter.lora.alpha is lora_alpha·√r = {}·√{} = {alpha}, so that llama.cpp's alpha / \
                 rank equals PEFT's lora_alpha / √r",
                cfg.alpha, cfg.r
            ));
        }
        Scaling { alpha, warnings }
    }

    /// `b` (`[out, r]`) of module `path` as fp32, multiplied where PEFT's scale of the module
    /// differs from llama.cpp's.
    fn fold(&mut self, cfg: &LoraConfig, path: &str, b: Tensor) -> Result<Tensor> {
        let r = b.size()[1];
        let alpha = self.alpha;
        let module_alpha = pattern_value("alpha_pattern", &cfg.alpha_pattern, path)?.unwrap_or(cfg.alpha);
        let peft_scale = scale(module_alpha, r as usize, cfg.use_rslora);
        let factor = peft_scale * r as f64 / alpha as f64;
        let b = b.to_kind(Kind::Float);
        if (factor - 1.0).abs() <= 1e-6 {
            return Ok(b);
        }
        self.warnings.push(format!(
            "{path}: PEFT scales it by {peft_scale} (alpha {module_alpha}, rank {r}{}), llama.cpp by \
             {alpha}/{r}; its B is multiplied by {factor}",
            if cfg.use_rslora { ", rsLoRA" } else { "" }
        ));
        Ok((b.to_kind(Kind::Double) * factor).to_kind(Kind::Float))
    }
}

/// The llama.cpp tensor (`blk.3.attn_q`, `output`) of a linear layer.
fn gguf_name(site: &LinearSite) -> String {
    let name = match site.role {
        Role::Query => "attn_q",
        Role::Key => "attn_k",
        Role::Value => "attn_v",
        Role::QueryKeyValue => "attn_qkv",
        Role::AttnOutput => "attn_output",
        Role::Gate => "ffn_gate",
        // llama.cpp's `ffn_up` of Phi-3 holds gate and up, as its `gate_up_proj` does.
        Role::Up | Role::GateUp => "ffn_up",
        Role::Down => "ffn_down",
        Role::LmHead => return "output".into(),
    };
    match site.layer {
        Some(layer) => format!("blk.{layer}.{name}"),
        None => name.into(),
    }
}

/// `LlamaModel.permute` of llama.cpp's converter on the rows of `[heads · head_dim, r]`: each
/// head's two rotary halves interleaved.
fn permute_rows(b: &Tensor, heads: i64) -> Tensor {
    let (rows, r) = b.size2().expect("B is a matrix");
    b.reshape([heads, 2, rows / heads / 2, r]).transpose(1, 2).reshape([rows, r]).contiguous()
}

/// `general.name` as the converter derives it from the adapter directory's name (gguf-py's
/// `Metadata.id_to_title`), for a directory without a model card.
fn display_name(adapter_dir: &Path, model_dir: &Path) -> String {
    let dir_name = |p: &Path| {
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let name = dir_name(adapter_dir);
    let name = if name.is_empty() { dir_name(model_dir) } else { name };
    id_to_title(&name)
}

fn id_to_title(id: &str) -> String {
    static VERSIONISH: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"^(?:v\d+(?:\.\d+)*|\d.*)$").expect("static regex"));
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| if is_lower(w) && !VERSIONISH.is_match(w) { python_title(w) } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `str.islower`: some cased character, none uppercase.
fn is_lower(w: &str) -> bool {
    w.chars().any(char::is_lowercase) && !w.chars().any(char::is_uppercase)
}

/// Python's `str.title`: a letter after a non-letter is uppercased, the others lowercased.
fn python_title(w: &str) -> String {
    let mut out = String::new();
    let mut after_letter = false;
    for c in w.chars() {
        if after_letter {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        after_letter = c.is_alphabetic();
    }
    out
}

/// A GGUF metadata value.
enum Kv {
    Str(String),
    U32(u32),
    F32(f32),
}

const GGUF_TYPE_UINT32: u32 = 4;
const GGUF_TYPE_FLOAT32: u32 = 6;
const GGUF_TYPE_STRING: u32 = 8;

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn pad_to(buf: &mut Vec<u8>, alignment: usize) {
    buf.resize(buf.len().div_ceil(alignment) * alignment, 0);
}

/// A GGUF v3 file: header, KV pairs, tensor infos (ggml dimension order: torch's reversed),
/// padding, then each tensor's data padded to [`ALIGNMENT`].
fn gguf_bytes(kvs: &[(&str, Kv)], tensors: &[(String, Tensor)], dtype: GgufDtype) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        put_str(&mut buf, key);
        match value {
            Kv::Str(s) => {
                buf.extend_from_slice(&GGUF_TYPE_STRING.to_le_bytes());
                put_str(&mut buf, s);
            }
            Kv::U32(v) => {
                buf.extend_from_slice(&GGUF_TYPE_UINT32.to_le_bytes());
                buf.extend_from_slice(&v.to_le_bytes());
            }
            Kv::F32(v) => {
                buf.extend_from_slice(&GGUF_TYPE_FLOAT32.to_le_bytes());
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let mut data = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        if t.kind() != dtype.kind() {
            bail!("tensor `{name}` is {:?}, expected {:?}", t.kind(), dtype.kind());
        }
        put_str(&mut buf, name);
        let dims = t.size();
        buf.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&dtype.ggml_type().to_le_bytes());
        buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
        let start = data.len();
        data.resize(start + t.numel() * t.kind().elt_size_in_bytes(), 0);
        t.f_copy_data_u8(&mut data[start..], t.numel())?;
        if cfg!(target_endian = "big") {
            bail!("GGUF export writes little-endian files and needs a little-endian host");
        }
        pad_to(&mut data, ALIGNMENT);
    }
    pad_to(&mut buf, ALIGNMENT);
    buf.extend_from_slice(&data);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_spec() -> ModelSpec {
        ModelSpec::from_json(
            r#"{"model_type":"llama","hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,
                "num_attention_heads":2,"num_key_value_heads":1,"head_dim":16,"vocab_size":256,
                "tie_word_embeddings":true}"#,
        )
        .unwrap()
    }

    #[test]
    fn maps_hf_modules_to_llama_cpp_tensors() {
        let sites = LinearSites::of(&llama_spec());
        let name = |path: &str| gguf_name(sites.find(path).unwrap());
        assert_eq!(name("model.layers.1.self_attn.q_proj"), "blk.1.attn_q");
        assert_eq!(name("model.layers.0.mlp.down_proj"), "blk.0.ffn_down");
        let q = sites.find("model.layers.1.self_attn.q_proj").unwrap();
        assert_eq!(q.gguf_permuted_heads, Some(2));
        let k = sites.find("model.layers.0.self_attn.k_proj").unwrap();
        assert_eq!((k.gguf_permuted_heads, k.out_features, k.in_features), (Some(1), 16, 32));
        assert!(sites.find("lm_head").is_err(), "tied lm_head has no llama.cpp tensor");
    }

    #[test]
    fn permutes_rows_like_the_converter() {
        // 2 heads of 4 rows: [h0: 0 1 2 3, h1: 4 5 6 7] → halves interleaved per head.
        let b = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).reshape([8, 1]);
        let p = permute_rows(&b, 2);
        let rows: Vec<f32> = Vec::try_from(p.reshape([-1])).unwrap();
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn titles_names_like_gguf_py() {
        assert_eq!(id_to_title("adapter"), "Adapter");
        assert_eq!(id_to_title("my-lora_run v2"), "My Lora_Run v2");
        assert_eq!(id_to_title("Llama-3-8B"), "Llama 3 8B");
    }

    #[test]
    fn header_and_alignment() {
        let t = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
        let bytes =
            gguf_bytes(&[("general.type", Kv::Str("adapter".into()))], &[("x".into(), t)], GgufDtype::F32)
                .unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(bytes.len() % ALIGNMENT, 0);
    }
}
