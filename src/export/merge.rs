//! A merged Hugging Face model: the base checkpoint with a PEFT LoRA adapter folded into its
//! weights, `W' = W + scale · (B @ A)` (transposed for `[in, out]` Conv1D weights), computed in
//! fp32, cast once to the output dtype and checked for NaN/Inf.
//!
//! The merge streams: it reads the safetensors headers, then one tensor at a time by its byte
//! offset, and writes each output shard tensor by tensor (the shard layout is planned from the
//! headers first). Tensor names stay exactly as in the input, so a tied checkpoint stays tied
//! and GPT-2 keeps or omits its `transformer.` prefix. config.json, generation_config.json and
//! the tokenizer files are copied beside the weights; everything is written under a temporary
//! name and renamed into place once complete.
//!
//! A base saved in 4 bits by transformers + bitsandbytes is merged as PEFT users do with
//! `merge_and_unload()` on a dense copy: each 4-bit weight is dequantized to fp32, the update
//! added, and the sum cast once; the output is a dense model (no `quantization_config`) whose
//! weights carry the quantization error, which [`MergeReport::warning`] says.

use crate::files::{publish_dir, read_safetensors, read_safetensors_header};
use crate::lora::{self, peft};
use crate::model::quantized::{saved_weight, take_saved, FrozenWeight};
use crate::model::{LinearSite, LinearSites, ModelSpec, Weights};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The largest output shard [`merge`] writes (a single tensor larger than this gets a shard of
/// its own).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// Files copied from the model directory when present, besides the weights.
pub(crate) const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// The dtype of the merged model's floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeDtype {
    /// Each tensor keeps the dtype it has in the base checkpoint.
    #[default]
    Same,
    Bf16,
    Fp16,
    Fp32,
}

impl MergeDtype {
    /// The safetensors dtype a stored floating-point tensor of `stored` dtype is written in.
    fn output(self, stored: &str) -> &str {
        match self {
            MergeDtype::Same => stored,
            MergeDtype::Bf16 => "BF16",
            MergeDtype::Fp16 => "F16",
            MergeDtype::Fp32 => "F32",
        }
    }

    /// The name config.json uses (`torch_dtype` / `dtype`), `None` for [`MergeDtype::Same`].
    fn config_name(self) -> Option<&'static str> {
        match self {
            MergeDtype::Same => None,
            MergeDtype::Bf16 => Some("bfloat16"),
            MergeDtype::Fp16 => Some("float16"),
            MergeDtype::Fp32 => Some("float32"),
        }
    }
}

impl std::str::FromStr for MergeDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<MergeDtype> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "same" | "auto" => MergeDtype::Same,
            "bf16" | "bfloat16" => MergeDtype::Bf16,
            "fp16" | "f16" | "float16" | "half" => MergeDtype::Fp16,
            "fp32" | "f32" | "float32" | "float" => MergeDtype::Fp32,
            _ => bail!("unknown dtype `{s}`: use same, bf16, fp16 or fp32"),
        })
    }
}

impl std::fmt::Display for MergeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MergeDtype::Same => "same",
            MergeDtype::Bf16 => "bf16",
            MergeDtype::Fp16 => "fp16",
            MergeDtype::Fp32 => "fp32",
        })
    }
}

/// What [`merge`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Weight tensors that received an adapter's update.
    pub tensors_merged: usize,
    /// Size of the safetensors files written (headers included).
    pub bytes: u64,
    /// Number of safetensors files (1: `model.safetensors`, otherwise sharded with an index).
    pub shards: usize,
    /// Weights the base stores in 4 bits, written dequantized.
    pub dequantized: usize,
}

impl MergeReport {
    /// What a user must know when the base was quantized, as PEFT warns when merging into 4 bits.
    pub fn warning(&self) -> Option<String> {
        (self.dequantized > 0).then(|| {
            format!(
                "the base model stores {} weights in 4 bits: they were dequantized before the adapter \
                 was added, so the merged weights carry the quantization error; merge into the \
                 unquantized model for weights without it",
                self.dequantized
            )
        })
    }
}

/// `lorafit merge`: [`merge`], with the base model the adapter names when `model_dir` is `None`.
pub fn merge_command(
    model_dir: Option<&Path>,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: MergeDtype,
) -> Result<MergeReport> {
    merge(&peft::base_model_dir(adapter_dir, model_dir)?, adapter_dir, out_dir, dtype)
}

/// Merges the PEFT LoRA adapter in `adapter_dir` into the Hugging Face model in `model_dir` and
/// writes the result, a model directory that loads like the original, to `out_dir`, which must
/// not exist or be empty.
pub fn merge(model_dir: &Path, adapter_dir: &Path, out_dir: &Path, dtype: MergeDtype) -> Result<MergeReport> {
    merge_with(model_dir, adapter_dir, out_dir, dtype, DEFAULT_MAX_SHARD_BYTES)
}

/// [`merge`] with output shards of at most `max_shard_bytes` of tensor data each.
pub fn merge_with(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: MergeDtype,
    max_shard_bytes: u64,
) -> Result<MergeReport> {
    check_out_dir(out_dir)?;
    let spec = ModelSpec::from_dir(model_dir)?;
    let mut source = Source::open(model_dir)?;
    let deltas = adapter_deltas(&spec, &source, adapter_dir).with_context(|| {
        format!("the adapter in {} does not fit the model in {}", adapter_dir.display(), model_dir.display())
    })?;
    let shards = plan_shards(&source, dtype, max_shard_bytes.max(1))?;
    let dequantized = source.tensors.iter().filter(|t| t.four_bit).count();
    let mut report =
        MergeReport { tensors_merged: deltas.len(), bytes: 0, shards: shards.len(), dequantized };
    publish_dir(out_dir, |tmp| {
        let count = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for (k, shard) in shards.iter().enumerate() {
            let file_name = if count == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", k + 1)
            };
            report.bytes += write_shard(&tmp.join(&file_name), shard, &mut source, &deltas)?;
            for entry in shard {
                total_size += entry.bytes;
                weight_map.insert(source.tensors[entry.tensor].name.clone(), file_name.clone());
            }
        }
        if count > 1 {
            let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
            std::fs::write(tmp.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
        }
        copy_side_files(model_dir, tmp, dtype, dequantized > 0)
    })
    .with_context(|| format!("writing the merged model to {}", out_dir.display()))?;
    Ok(report)
}

/// Refuses an output directory that holds anything: merge and quantize never overwrite files.
pub(crate) fn check_out_dir(out_dir: &Path) -> Result<()> {
    if !out_dir.exists() {
        return Ok(());
    }
    if !out_dir.is_dir() {
        bail!("--out {}: exists and is not a directory; give a new or empty directory", out_dir.display());
    }
    let mut entries =
        std::fs::read_dir(out_dir).with_context(|| format!("cannot read {}", out_dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "--out {}: already exists and is not empty; give a new or empty directory (nothing is \
             overwritten)",
            out_dir.display()
        );
    }
    Ok(())
}

/// One tensor of the input checkpoint, located by the safetensors headers.
struct StoredTensor {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    /// Index into [`Source::paths`].
    file: usize,
    /// Absolute byte offset of the data in its file.
    start: u64,
    len: u64,
    /// Stored in 4 bits: `dtype` and `shape` are those of the dense weight it stands for.
    four_bit: bool,
}

/// The input checkpoint's tensors (headers only), in file order and by offset within a file.
struct Source {
    paths: Vec<PathBuf>,
    files: Vec<File>,
    tensors: Vec<StoredTensor>,
    by_name: HashMap<String, usize>,
    /// Reads and dequantizes the 4-bit weights, when there are any.
    four_bit: Option<Weights>,
}

impl Source {
    fn open(dir: &Path) -> Result<Source> {
        let paths = crate::model::weights::safetensors_files(dir)?;
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut found = read_header(&mut file, path, i)?;
            found.sort_by_key(|t| t.start);
            tensors.extend(found);
            files.push(file);
        }
        let mut source = Source { paths, files, tensors, by_name: HashMap::new(), four_bit: None };
        source.index(dir)?;
        if source.fold_four_bit()? {
            source.four_bit = Some(Weights::open(dir, Kind::Float, Device::Cpu)?);
            source.index(dir)?;
        }
        Ok(source)
    }

    fn index(&mut self, dir: &Path) -> Result<()> {
        self.by_name.clear();
        for (i, t) in self.tensors.iter().enumerate() {
            if self.by_name.insert(t.name.clone(), i).is_some() {
                bail!("tensor `{}` is stored twice in {}", t.name, dir.display());
            }
        }
        Ok(())
    }

    /// Lists each 4-bit weight (transformers + bitsandbytes' save) as the dense weight it stands
    /// for, and drops its scales, code and quant state from the listing. Whether there were any.
    fn fold_four_bit(&mut self) -> Result<bool> {
        let mut parts = std::collections::HashSet::new();
        for i in 0..self.tensors.len() {
            if !self.tensors[i].name.contains(".quant_state.bitsandbytes__") {
                continue;
            }
            let bytes = self.read(i)?;
            let Some(saved) = saved_weight(&self.tensors[i].name, &bytes)? else { continue };
            let dtype = match saved.dtype.as_str() {
                "bfloat16" => "BF16",
                "float16" => "F16",
                _ => "F32",
            };
            let Some(&w) = self.by_name.get(&saved.name) else {
                bail!("`{}` has a quant state but no packed weight `{}`", self.tensors[i].name, saved.name);
            };
            let t = &mut self.tensors[w];
            (t.dtype, t.shape, t.four_bit) = (dtype.to_string(), saved.shape.to_vec(), true);
            parts.extend(saved.parts);
        }
        self.tensors.retain(|t| !parts.contains(&t.name));
        Ok(!parts.is_empty())
    }

    /// The fp32 dense weight the 4-bit tensor `i` stands for.
    fn dequantized(&mut self, i: usize) -> Result<Tensor> {
        let t = &self.tensors[i];
        let weights = self.four_bit.as_mut().ok_or_else(|| anyhow!("`{}` is not in 4 bits", t.name))?;
        match take_saved(weights, &t.name, [t.shape[0], t.shape[1]])? {
            Some(FrozenWeight::Quantized(q)) => Ok(q.dequantize()),
            _ => bail!("`{}` is not a bitsandbytes 4-bit weight", t.name),
        }
    }

    fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of tensor `i`.
    fn read(&mut self, i: usize) -> Result<Vec<u8>> {
        let t = &self.tensors[i];
        let path = &self.paths[t.file];
        let file = &mut self.files[t.file];
        let mut data = vec![0u8; t.len as usize];
        file.seek(SeekFrom::Start(t.start))
            .and_then(|_| file.read_exact(&mut data))
            .with_context(|| format!("cannot read tensor `{}` from {}", t.name, path.display()))?;
        Ok(data)
    }
}

/// The tensors listed in the header of the safetensors file `path`.
fn read_header(file: &mut File, path: &Path, index: usize) -> Result<Vec<StoredTensor>> {
    let header = read_safetensors_header(file, path)?;
    let mut out = Vec::new();
    for (name, info) in header.metadata.tensors() {
        let dtype = info.dtype.to_string();
        if elt_size(&dtype).is_none() {
            bail!("{}: tensor `{name}` has dtype {dtype}, which merging does not support", path.display());
        }
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        out.push(StoredTensor {
            name,
            dtype,
            shape: info.shape.iter().map(|&d| d as i64).collect(),
            file: index,
            start: header.data_start + begin,
            len: end - begin,
            four_bit: false,
        });
    }
    Ok(out)
}

/// Bytes per element of a safetensors dtype.
fn elt_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// The libtorch kind of a floating-point safetensors dtype that merging can compute with.
fn float_kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        _ => return None,
    })
}

/// One adapted module's update, ready to add to its weight.
struct Delta {
    /// `[r, in]`, fp32.
    a: Tensor,
    /// `[out, r]`, fp32.
    b: Tensor,
    scale: f64,
    /// The weight is stored `[in, out]` (GPT-2's Conv1D).
    fan_in_fan_out: bool,
}

impl Delta {
    /// The update of the stored weight `w` of `site` by the adapter halves `a` and `b` of rank
    /// `r`, once their shapes are checked against the weight.
    fn new(a: &Tensor, b: &Tensor, scale: f64, site: &LinearSite, r: i64, w: &StoredTensor) -> Result<Delta> {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let (a_key, b_key) = (peft::key(&site.path, "lora_A"), peft::key(&site.path, "lora_B"));
        let (name, fan_in_fan_out) = (&w.name, site.fan_in_fan_out);
        let (out_f, in_f) = match w.shape[..] {
            [rows, cols] if fan_in_fan_out => (cols, rows),
            [rows, cols] => (rows, cols),
            _ => bail!(
                "the model's `{name}` has shape {:?}, not a matrix, but the adapter's `{a_key}` adapts it",
                w.shape
            ),
        };
        if float_kind(&w.dtype).is_none() {
            bail!("the model's `{name}` is stored as {}, which cannot be merged into", w.dtype);
        }
        for (key, t, want, what) in [
            (&a_key, &a, [r, in_f], "lora_A must be [r, in_features]"),
            (&b_key, &b, [out_f, r], "lora_B must be [out_features, r]"),
        ] {
            if t.size() != want {
                bail!(
                    "`{key}` has shape {:?} but the model's `{name}` has shape {:?} \
                     ({what} = {want:?}{})",
                    t.size(),
                    w.shape,
                    if fan_in_fan_out { ", the weight being stored [in, out]" } else { "" }
                );
            }
        }
        Ok(Delta { a, b, scale, fan_in_fan_out })
    }

    /// `scale · (B @ A)` in the weight's storage order, fp32.
    fn weight_update(&self) -> Tensor {
        let d = self.b.matmul(&self.a) * self.scale;
        if self.fan_in_fan_out {
            d.tr().contiguous()
        } else {
            d
        }
    }
}

/// The checkpoint's name for the weight of `site` (without the optional prefix when the
/// checkpoint omits it).
fn weight_name(source: &Source, sites: &LinearSites, site: &LinearSite) -> Option<String> {
    let full = format!("{}.weight", site.path);
    if source.get(&full).is_some() {
        return Some(full);
    }
    let short = sites.optional_prefix.and_then(|p| full.strip_prefix(p))?;
    source.get(short).is_some().then(|| short.to_string())
}

/// Reads the adapter and checks it against the model: every adapter tensor must belong to a
/// module its config selects in this model, with shapes that fit the module's weight. Returns
/// the update of each adapted weight, by the weight's tensor name.
fn adapter_deltas(spec: &ModelSpec, source: &Source, adapter_dir: &Path) -> Result<BTreeMap<String, Delta>> {
    let cfg = peft::read_config(adapter_dir)?;
    let file = adapter_dir.join(peft::WEIGHTS_FILE);
    let mut halves =
        peft::pair_halves(&file, read_safetensors(&file)?, "only plain LoRA adapters can be merged")?;

    let sites = LinearSites::of(spec);
    let rank_of = |p: &str| sites.sites.iter().position(|s| s.path == p);
    let mut modules: Vec<&String> = halves.keys().collect();
    modules.sort_by_key(|p| (rank_of(p).unwrap_or(usize::MAX), p.to_string()));
    if let Some(path) = modules.into_iter().find(|p| rank_of(p).is_none()) {
        bail!(
            "{}: tensor `{}` adapts module `{path}`, which this `{}` model does not have \
             (its linear layers are named like `{}`); the adapter was trained on a different base model",
            file.display(),
            present_key(path, &halves[path]),
            spec.model_type,
            sites.sites.first().map(|s| s.path.as_str()).unwrap_or("")
        );
    }

    let targets = lora::select_targets(&sites, &cfg)
        .with_context(|| format!("{}", adapter_dir.join(peft::CONFIG_FILE).display()))?;
    let mut deltas = BTreeMap::new();
    for target in &targets {
        let entry = halves.remove(&target.path).unwrap_or_default();
        let (Some(a), Some(b)) = (&entry.a, &entry.b) else {
            let missing = if entry.a.is_none() { "lora_A" } else { "lora_B" };
            bail!(
                "{}: no tensor `{}` for module `{}`, which adapter_config.json selects",
                file.display(),
                peft::key(&target.path, missing),
                target.path
            );
        };
        let site = sites.get(&target.path).expect("selected from these sites");
        let name = weight_name(source, &sites, site).ok_or_else(|| {
            anyhow!(
                "the model has no tensor `{}.weight` for the adapter's `{}` (shape {:?})",
                target.path,
                peft::key(&target.path, "lora_A"),
                a.size()
            )
        })?;
        let scale = lora::scale(target.alpha, target.r, cfg.use_rslora);
        let delta =
            Delta::new(a, b, scale, site, target.r as i64, source.get(&name).expect("found by name"))?;
        deltas.insert(name, delta);
    }
    if let Some((path, entry)) = halves.into_iter().next() {
        let key = present_key(&path, &entry);
        bail!(
            "{}: tensor `{key}` adapts module `{path}`, which its adapter_config.json does not select",
            file.display()
        );
    }
    Ok(deltas)
}

/// The key of a half the adapter file holds for module `path` (A when it has both).
fn present_key(path: &str, halves: &peft::Halves) -> String {
    peft::key(path, if halves.a.is_some() { "lora_A" } else { "lora_B" })
}

/// One tensor's place in an output shard.
struct Planned {
    /// Index into [`Source::tensors`].
    tensor: usize,
    dtype: String,
    bytes: u64,
}

/// Assigns the tensors, in input order, to shards of at most `max_bytes` of data each.
fn plan_shards(source: &Source, dtype: MergeDtype, max_bytes: u64) -> Result<Vec<Vec<Planned>>> {
    let mut shards: Vec<Vec<Planned>> = vec![];
    let mut current = 0u64;
    for (i, t) in source.tensors.iter().enumerate() {
        let out = if float_kind(&t.dtype).is_some() { dtype.output(&t.dtype) } else { &t.dtype };
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        let bytes = numel * elt_size(out).expect("a known dtype");
        if shards.is_empty() || (current > 0 && current + bytes > max_bytes) {
            shards.push(vec![]);
            current = 0;
        }
        current += bytes;
        shards.last_mut().expect("pushed above").push(Planned { tensor: i, dtype: out.to_string(), bytes });
    }
    if shards.is_empty() {
        bail!("the model has no tensors");
    }
    Ok(shards)
}

/// Writes one safetensors file holding `shard`'s tensors, one tensor in memory at a time.
/// Returns the file's size.
fn write_shard(
    path: &Path,
    shard: &[Planned],
    source: &mut Source,
    deltas: &BTreeMap<String, Delta>,
) -> Result<u64> {
    // Widest elements first, so that every tensor's data stays aligned to its element size.
    let mut order: Vec<&Planned> = shard.iter().collect();
    order.sort_by(|x, y| {
        let size = |p: &Planned| elt_size(&p.dtype).unwrap_or(1);
        size(y).cmp(&size(x)).then_with(|| source.tensors[x.tensor].name.cmp(&source.tensors[y.tensor].name))
    });
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for p in &order {
        let t = &source.tensors[p.tensor];
        header.insert(
            t.name.clone(),
            json!({"dtype": p.dtype, "shape": t.shape, "data_offsets": [offset, offset + p.bytes]}),
        );
        offset += p.bytes;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for p in &order {
        let data = output_bytes(source, p, deltas)?;
        debug_assert_eq!(data.len() as u64, p.bytes);
        out.write_all(&data)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(8 + header.len() as u64 + offset)
}

/// The bytes of one output tensor: the stored bytes when nothing changes, otherwise the
/// (merged and) converted tensor.
fn output_bytes(source: &mut Source, p: &Planned, deltas: &BTreeMap<String, Delta>) -> Result<Vec<u8>> {
    let stored = if source.tensors[p.tensor].four_bit {
        source.dequantized(p.tensor)?
    } else {
        let raw = source.read(p.tensor)?;
        let t = &source.tensors[p.tensor];
        if !deltas.contains_key(&t.name) && p.dtype == t.dtype {
            return Ok(raw);
        }
        let Some(kind_in) = float_kind(&t.dtype) else {
            bail!("tensor `{}` is stored as {}, which cannot be converted to {}", t.name, t.dtype, p.dtype);
        };
        Tensor::f_from_data_size(&raw, &t.shape, kind_in)?
    };
    let t = &source.tensors[p.tensor];
    let delta = deltas.get(&t.name);
    let Some(kind_out) = float_kind(&p.dtype) else {
        bail!("tensor `{}` cannot be converted to {}", t.name, p.dtype);
    };
    let merged = match delta {
        Some(d) => stored.to_kind(Kind::Float) + d.weight_update(),
        None => stored.to_kind(Kind::Float),
    };
    let out = merged.to_kind(kind_out).contiguous();
    if !all_finite(&out) && (delta.is_some() || all_finite(&stored)) {
        let what = if delta.is_some() { "merging the adapter into" } else { "converting" };
        bail!(
            "{what} `{}` gives NaN or infinite values in {}; the merged model would be broken \
             (try another output dtype, or check the adapter)",
            t.name,
            p.dtype
        );
    }
    let mut data = vec![0u8; p.bytes as usize];
    out.f_copy_data_u8(&mut data, out.numel())?;
    Ok(data)
}

/// No NaN or infinity in `t`.
pub(crate) fn all_finite(t: &Tensor) -> bool {
    t.numel() == 0 || t.isfinite().all().int64_value(&[]) != 0
}

/// Copies config.json (with its dtype updated when the merge changes it, and without its
/// `quantization_config` when `dequantized`), generation config and tokenizer files into `out`.
fn copy_side_files(model_dir: &Path, out: &Path, dtype: MergeDtype, dequantized: bool) -> Result<()> {
    for name in SIDE_FILES {
        let from = model_dir.join(name);
        if !from.is_file() {
            continue;
        }
        let to = out.join(name);
        match (*name, dtype.config_name()) {
            ("config.json", dtype_name) if dtype_name.is_some() || dequantized => {
                let config = rewritten_config(&from, dtype_name, dequantized)?;
                std::fs::write(&to, serde_json::to_vec_pretty(&config)?)
                    .with_context(|| format!("cannot write {}", to.display()))?;
            }
            _ => {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            }
        }
    }
    Ok(())
}

/// config.json `from` with its dtype set to `dtype_name` when given, and without its
/// `quantization_config` when the weights were `dequantized`.
fn rewritten_config(from: &Path, dtype_name: Option<&str>, dequantized: bool) -> Result<Value> {
    let text = std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut config: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", from.display()))?;
    let map = config.as_object_mut().ok_or_else(|| anyhow!("{} must be a JSON object", from.display()))?;
    if dequantized {
        map.remove("quantization_config");
    }
    if let Some(dtype_name) = dtype_name {
        let mut updated = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = map.get_mut(key) {
                *v = json!(dtype_name);
                updated = true;
            }
        }
        if !updated {
            map.insert("torch_dtype".into(), json!(dtype_name));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse() {
        assert_eq!("bf16".parse::<MergeDtype>().unwrap(), MergeDtype::Bf16);
        assert_eq!("float16".parse::<MergeDtype>().unwrap(), MergeDtype::Fp16);
        assert_eq!("FP32".parse::<MergeDtype>().unwrap(), MergeDtype::Fp32);
        assert_eq!("same".parse::<MergeDtype>().unwrap(), MergeDtype::Same);
        assert!("int8".parse::<MergeDtype>().unwrap_err().to_string().contains("bf16"));
        assert_eq!(MergeDtype::Bf16.output("F32"), "BF16");
        assert_eq!(MergeDtype::Same.output("F16"), "F16");
    }

    #[test]
    fn a_transposed_update_matches_the_weight_layout() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        let b = Tensor::from_slice(&[1.0f32, -1.0]).view([2, 1]);
        let d = Delta { a: a.shallow_clone(), b: b.shallow_clone(), scale: 2.0, fan_in_fan_out: false };
        assert_eq!(d.weight_update().size(), [2, 3]);
        assert_eq!(
            Vec::<f32>::try_from(d.weight_update().flatten(0, -1)).unwrap(),
            [2.0, 4.0, 6.0, -2.0, -4.0, -6.0]
        );
        let t = Delta { a, b, scale: 2.0, fan_in_fan_out: true };
        assert_eq!(t.weight_update().size(), [3, 2]);
    }

    #[test]
    fn a_non_empty_output_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        check_out_dir(dir.path()).unwrap();
        check_out_dir(&dir.path().join("new")).unwrap();
        std::fs::write(dir.path().join("x"), "x").unwrap();
        let err = check_out_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }
}
