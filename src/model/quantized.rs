//! Frozen linear weights stored in 4 bits (QLoRA): NF4 or FP4 codes in blocks of 64 values, each
//! block scaled by its absolute maximum, the scales themselves quantized to 8 bits in blocks of
//! 256 ("double quantization"). The layout and every rounding step follow bitsandbytes'
//! `quantize_4bit(w, blocksize=64, compress_statistics=True)` on CPU, so that codes and scales
//! are bit-identical to what PEFT + bitsandbytes users train on and save.
//!
//! A layer's weight is dequantized to the compute dtype when the layer runs, and again when the
//! backward pass reaches it (src/model/quant_kernels.cpp: a CPU kernel and an autograd node that
//! keeps only the 4-bit weight): memory holds the 4-bit codes plus one layer's dense copy, with
//! or without activation checkpointing.

use super::{LinearSite, LinearSites, Weights};
use crate::config::QuantFormat;
use anyhow::{bail, Context, Result};
use std::ffi::c_int;
use tch::{Device, Kind, Tensor};

/// Values per 4-bit block (bitsandbytes' default `blocksize`).
pub const BLOCK: i64 = 64;
/// Scales per 8-bit block of the double-quantized scales.
pub const NESTED_BLOCK: i64 = 256;

/// bitsandbytes' NF4 code: quantiles of N(0, 1) scaled to [-1, 1], by 4-bit value.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code (1 sign, 2 exponent, 1 mantissa bit), by 4-bit value.
const FP4: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

impl QuantFormat {
    /// The 16 values a 4-bit code stands for, fp32 on the CPU.
    pub fn code(self) -> Tensor {
        Tensor::from_slice(match self {
            QuantFormat::Nf4 => &NF4,
            QuantFormat::Fp4 => &FP4,
        })
    }

    /// bitsandbytes' name (`quant_type`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Fp4 => "fp4",
        }
    }
}

/// How a 4-bit weight is dequantized (src/model/quant_kernels.cpp numbers them the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dequantizer {
    /// The fastest CPU kernel this CPU runs, chosen at run time; libtorch ops on other devices.
    Best = 0,
    /// libtorch ops on any device.
    Ops = 1,
    /// The scalar CPU kernel, the reference of the vector ones.
    Scalar = 2,
    /// AVX2 + F16C.
    Avx2 = 3,
    /// AVX-512 F/BW/VL, bf16 rounded with integer instructions.
    Avx512 = 4,
    /// AVX-512 with AVX512-BF16's conversion.
    Avx512Bf16 = 5,
}

impl Dequantizer {
    /// The CPU kernels, slowest first.
    pub const CPU_KERNELS: [Dequantizer; 4] =
        [Dequantizer::Scalar, Dequantizer::Avx2, Dequantizer::Avx512, Dequantizer::Avx512Bf16];

    /// Whether this machine runs it (the CPU's instructions, checked at run time).
    pub fn supported(self) -> bool {
        unsafe { ffi::lorafit_quant_kernel_supported(self as c_int) != 0 }
    }
}

/// The block scales of a quantized weight.
pub enum Scales {
    /// fp32, one per block.
    Plain(Tensor),
    /// Double quantization: `scale = nested_code[codes] · nested_absmax[block / 256] + offset`.
    Nested { codes: Tensor, offset: f32, nested_absmax: Tensor, nested_code: Tensor },
}

/// A frozen `[out, in]` weight in 4 bits.
pub struct QuantizedWeight {
    pub format: QuantFormat,
    pub shape: [i64; 2],
    /// The codes, two per byte (the first value in the high nibble), `[numel / 2, 1]` uint8.
    pub packed: Tensor,
    pub scales: Scales,
    /// The dtype the weight is dequantized to (the model's weight dtype).
    pub compute: Kind,
}

impl QuantizedWeight {
    /// Quantizes `w` (`[out, in]`, any floating kind) as bitsandbytes' `quantize_4bit` does on
    /// CPU, with double quantization of the scales when `nested`.
    pub fn quantize(w: &Tensor, format: QuantFormat, nested: bool) -> QuantizedWeight {
        let size = w.size();
        let (packed, absmax) = quantize_4bit(&w.to_device(Device::Cpu), format);
        let scales = if nested {
            let offset = absmax.mean(Kind::Float);
            let (codes, nested_absmax) = quantize_blockwise(&(&absmax - &offset), &dynamic_map());
            Scales::Nested {
                codes,
                offset: offset.double_value(&[]) as f32,
                nested_absmax,
                nested_code: dynamic_map(),
            }
        } else {
            Scales::Plain(absmax)
        };
        let device = w.device();
        QuantizedWeight {
            format,
            shape: [size[0], size[1]],
            packed: packed.to_device(device),
            scales: scales.moved_to(device),
            compute: w.kind(),
        }
    }

    /// The dense weight `[out, in]` in the compute dtype: `code[q] · absmax[block]` in fp32, cast
    /// once, as bitsandbytes' `dequantize_4bit`. On the CPU the fastest kernel this CPU runs,
    /// elsewhere libtorch ops.
    pub fn dequantize(&self) -> Tensor {
        self.dequantize_with(Dequantizer::Best)
    }

    /// [`Self::dequantize`] by a given path, all bit-identical: what the kernels are checked and
    /// measured against. A CPU kernel needs a CPU weight and a CPU that runs it
    /// ([`Dequantizer::supported`]); otherwise this panics as tch does on a libtorch error.
    pub fn dequantize_with(&self, how: Dequantizer) -> Tensor {
        self.with_c(|q| ffi::tensor(unsafe { ffi::lorafit_quant_dequantize(q, how as c_int) }))
    }

    /// `x Wᵀ (+ bias)`, `x` in the compute dtype, differentiable in `x` and `bias`. The weight is
    /// dequantized for the forward pass and again for the backward pass, so autograd keeps no
    /// dense copy of it between the two.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
        self.with_c(|q| ffi::tensor(unsafe { ffi::lorafit_quant_linear(q, x.as_ptr().cast(), bias) }))
    }

    /// Calls `f` with this weight as the C++ side reads it.
    fn with_c<T>(&self, f: impl FnOnce(&ffi::Quant) -> T) -> T {
        let code = self.format.code();
        let ptr = |t: &Tensor| t.as_ptr().cast::<std::ffi::c_void>();
        let (absmax, nested_absmax, nested_code, offset) = match &self.scales {
            Scales::Plain(absmax) => (ptr(absmax), std::ptr::null(), std::ptr::null(), 0.0),
            Scales::Nested { codes, offset, nested_absmax, nested_code } => {
                (ptr(codes), ptr(nested_absmax), ptr(nested_code), *offset)
            }
        };
        f(&ffi::Quant {
            packed: ptr(&self.packed),
            absmax,
            nested_absmax,
            nested_code,
            code: ptr(&code),
            offset,
            rows: self.shape[0],
            cols: self.shape[1],
            compute: ffi::scalar_type(self.compute),
        })
    }

    /// Bytes held: the codes and the scales.
    pub fn bytes(&self) -> i64 {
        let size = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        size(&self.packed)
            + match &self.scales {
                Scales::Plain(absmax) => size(absmax),
                Scales::Nested { codes, nested_absmax, nested_code, .. } => {
                    size(codes) + size(nested_absmax) + size(nested_code) + 4
                }
            }
    }
}

impl Scales {
    fn moved_to(self, device: Device) -> Scales {
        match self {
            Scales::Plain(absmax) => Scales::Plain(absmax.to_device(device)),
            Scales::Nested { codes, offset, nested_absmax, nested_code } => Scales::Nested {
                codes: codes.to_device(device),
                offset,
                nested_absmax: nested_absmax.to_device(device),
                nested_code: nested_code.to_device(device),
            },
        }
    }
}

/// The linear layers a quantized load stores in 4 bits: all but the output head, which stays in
/// the compute dtype as bitsandbytes keeps it.
pub fn quantized_sites(sites: &LinearSites) -> impl Iterator<Item = &LinearSite> {
    sites.sites.iter().filter(|site| site.path != sites.lm_head)
}

/// The bytes a 4-bit `[out, in]` weight holds, as [`QuantizedWeight::bytes`] counts them: the
/// packed codes, and fp32 scales, or when `nested` 8-bit scales with their fp32 absmax, code
/// and offset.
pub fn quantized_bytes(shape: [i64; 2], nested: bool) -> u64 {
    let numel = (shape[0] * shape[1]) as u64;
    let blocks = numel.div_ceil(BLOCK as u64);
    let scales = match nested {
        true => blocks + blocks.div_ceil(NESTED_BLOCK as u64) * 4 + 256 * 4 + 4,
        false => blocks * 4,
    };
    numel.div_ceil(2) + scales
}

/// The bytes of all frozen weights of a model whose parameters number `parameters`, held in
/// `kind` but for the linear layers of `sites` in 4 bits.
pub fn model_bytes(parameters: u64, kind: Kind, sites: &LinearSites, nested: bool) -> u64 {
    let (mut four_bit, mut dense) = (0u64, parameters);
    for site in quantized_sites(sites) {
        four_bit += quantized_bytes([site.out_features, site.in_features], nested);
        dense -= (site.out_features * site.in_features) as u64;
    }
    four_bit + dense * kind.elt_size_in_bytes() as u64
}

/// A frozen linear weight as a layer holds it: dense, or 4-bit and dequantized when used.
pub enum FrozenWeight {
    Dense(Tensor),
    /// Boxed: a layer holding it stays as small as a dense one.
    Quantized(Box<QuantizedWeight>),
}

impl FrozenWeight {
    /// `[out, in]`.
    pub fn size(&self) -> [i64; 2] {
        match self {
            FrozenWeight::Dense(w) => {
                let s = w.size();
                [s[0], s[1]]
            }
            FrozenWeight::Quantized(q) => q.shape,
        }
    }

    /// The dense weight: the tensor itself, or a fresh dequantized copy that lives as long as
    /// the caller keeps it.
    pub fn dense(&self) -> Tensor {
        match self {
            FrozenWeight::Dense(w) => w.shallow_clone(),
            FrozenWeight::Quantized(q) => q.dequantize(),
        }
    }

    /// The tensors held, for checks that training leaves the base untouched.
    pub fn tensors(&self) -> Vec<Tensor> {
        match self {
            FrozenWeight::Dense(w) => vec![w.shallow_clone()],
            FrozenWeight::Quantized(q) => {
                let mut held = vec![q.packed.shallow_clone()];
                match &q.scales {
                    Scales::Plain(absmax) => held.push(absmax.shallow_clone()),
                    Scales::Nested { codes, nested_absmax, .. } => {
                        held.extend([codes.shallow_clone(), nested_absmax.shallow_clone()])
                    }
                }
                held
            }
        }
    }
}

/// The suffix of the quant state bitsandbytes saves beside a 4-bit weight, by format.
fn state_suffix(format: QuantFormat) -> String {
    format!("quant_state.bitsandbytes__{}", format.name())
}

/// bitsandbytes' quant state as transformers' 4-bit save writes it: JSON in a uint8 tensor.
#[derive(serde::Deserialize)]
struct SavedState {
    quant_type: String,
    blocksize: i64,
    shape: Vec<i64>,
    /// The torch name of the dtype the weight was quantized from.
    dtype: Option<String>,
    nested_blocksize: Option<i64>,
    nested_offset: Option<f32>,
}

/// Takes the 4-bit weight `name` (`[out, in]`) of a checkpoint saved by transformers +
/// bitsandbytes (packed uint8 `name`, with `name.absmax`, `name.quant_map`, `name.quant_state.*`
/// and, when double-quantized, `name.nested_absmax` and `name.nested_quant_map`), or `None` when
/// the checkpoint stores `name` unquantized. While `w` checks headers only, the parts are
/// checked by name, dtype and shape and an empty placeholder is returned.
pub fn take_saved(w: &mut Weights, name: &str, shape: [i64; 2]) -> Result<Option<FrozenWeight>> {
    let Some(format) = [QuantFormat::Nf4, QuantFormat::Fp4]
        .into_iter()
        .find(|f| w.contains(&format!("{name}.{}", state_suffix(*f))))
    else {
        return Ok(None);
    };
    let state_name = format!("{name}.{}", state_suffix(format));
    let state_bytes = w.take_stored(&state_name, Kind::Uint8, None)?;
    let numel = shape[0] * shape[1];
    let blocks = (numel + BLOCK - 1) / BLOCK;
    let packed = w.take_stored(name, Kind::Uint8, Some(&[(numel + 1) / 2, 1]))?;
    let nested = w.contains(&format!("{name}.nested_absmax"));
    let part = |w: &mut Weights, part: &str, kind: Kind, len: i64| {
        w.take_stored(&format!("{name}.{part}"), kind, Some(&[len]))
    };
    let absmax = part(w, "absmax", if nested { Kind::Uint8 } else { Kind::Float }, blocks)?;
    let quant_map = part(w, "quant_map", Kind::Float, 16)?;
    let nested_parts = if nested {
        let nested_blocks = (blocks + NESTED_BLOCK - 1) / NESTED_BLOCK;
        Some((
            part(w, "nested_absmax", Kind::Float, nested_blocks)?,
            part(w, "nested_quant_map", Kind::Float, 256)?,
        ))
    } else {
        None
    };
    let Some((compute, device)) = w.target() else {
        return Ok(Some(FrozenWeight::Dense(Tensor::empty([0], (Kind::Float, Device::Cpu)))));
    };
    let state = saved_state(&state_bytes, &state_name, format, shape, nested)?;
    if !quant_map.equal(&format.code()) {
        bail!("`{name}.quant_map` is not bitsandbytes' {} code; the checkpoint is damaged", format.name());
    }
    let scales = match nested_parts {
        Some((nested_absmax, nested_code)) => Scales::Nested {
            codes: absmax,
            offset: state.nested_offset.unwrap_or(0.0),
            nested_absmax,
            nested_code,
        },
        None => Scales::Plain(absmax),
    };
    Ok(Some(FrozenWeight::Quantized(Box::new(QuantizedWeight {
        format,
        shape,
        packed: packed.to_device(device),
        scales: scales.moved_to(device),
        compute,
    }))))
}

/// The 4-bit weight whose quant state tensor is `state_name`, and the parts stored beside it.
pub struct SavedWeight {
    /// The packed codes' tensor name.
    pub name: String,
    /// `[out, in]`, from the quant state.
    pub shape: [i64; 2],
    /// The torch name of the dtype the weight was quantized from (`float32` when not recorded).
    pub dtype: String,
    /// The tensor names of its scales, code and quant state.
    pub parts: Vec<String>,
}

/// The 4-bit weight `state_name` (`NAME.quant_state.bitsandbytes__nf4` or `__fp4`) describes,
/// from the quant state's JSON `bytes`; `None` when `state_name` is not a quant state.
pub fn saved_weight(state_name: &str, bytes: &[u8]) -> Result<Option<SavedWeight>> {
    let Some(name) = [QuantFormat::Nf4, QuantFormat::Fp4]
        .into_iter()
        .find_map(|f| state_name.strip_suffix(&format!(".{}", state_suffix(f))))
    else {
        return Ok(None);
    };
    let state: SavedState = serde_json::from_slice(bytes).with_context(|| {
        format!("`{state_name}` is not bitsandbytes' quant state (JSON); the checkpoint is damaged")
    })?;
    let [rows, cols] = state.shape[..] else {
        bail!("`{state_name}`: shape {:?}; a 4-bit linear weight is [out, in]", state.shape);
    };
    let parts = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"]
        .iter()
        .map(|part| format!("{name}.{part}"))
        .chain([state_name.to_string()])
        .collect();
    let dtype = state.dtype.unwrap_or_else(|| "float32".into());
    Ok(Some(SavedWeight { name: name.to_string(), shape: [rows, cols], dtype, parts }))
}

impl QuantizedWeight {
    /// The tensors transformers' 4-bit save writes for this weight under `name` (the names
    /// [`take_saved`] reads), `dtype` being the torch name of the weight's original dtype.
    pub fn saved_parts(&self, name: &str, dtype: &str) -> Vec<(String, Tensor)> {
        let mut state = serde_json::json!({
            "quant_type": self.format.name(), "blocksize": BLOCK, "dtype": dtype, "shape": self.shape,
        });
        let mut parts = vec![(name.to_string(), self.packed.shallow_clone())];
        match &self.scales {
            Scales::Plain(absmax) => parts.push((format!("{name}.absmax"), absmax.shallow_clone())),
            Scales::Nested { codes, offset, nested_absmax, nested_code } => {
                state["nested_blocksize"] = NESTED_BLOCK.into();
                state["nested_dtype"] = "float32".into();
                state["nested_offset"] = (*offset).into();
                parts.push((format!("{name}.absmax"), codes.shallow_clone()));
                parts.push((format!("{name}.nested_absmax"), nested_absmax.shallow_clone()));
                parts.push((format!("{name}.nested_quant_map"), nested_code.shallow_clone()));
            }
        }
        parts.push((format!("{name}.quant_map"), self.format.code()));
        let state = Tensor::from_slice(state.to_string().as_bytes());
        parts.push((format!("{name}.{}", state_suffix(self.format)), state));
        parts
    }
}

/// The `quantization_config` of config.json for a checkpoint of `format` weights, as
/// transformers writes it with `BitsAndBytesConfig(load_in_4bit=True, ...)`.
pub fn quantization_config(format: QuantFormat, nested: bool, compute_dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": format.name(),
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
    })
}

/// Parses and checks the quant state `name`: the layout lorafit reads (blocks of 64, nested
/// blocks of 256) and the shape config.json implies.
fn saved_state(
    bytes: &Tensor,
    name: &str,
    format: QuantFormat,
    shape: [i64; 2],
    nested: bool,
) -> Result<SavedState> {
    let bytes = Vec::<u8>::try_from(bytes).context("reading a quant state")?;
    let state: SavedState = serde_json::from_slice(&bytes).with_context(|| {
        format!("`{name}` is not bitsandbytes' quant state (JSON); the checkpoint is damaged")
    })?;
    if state.quant_type != format.name() {
        bail!("`{name}` says quant_type `{}`; its name says {}", state.quant_type, format.name());
    }
    if state.blocksize != BLOCK || (nested && state.nested_blocksize != Some(NESTED_BLOCK)) {
        bail!(
            "`{name}`: blocksize {} (nested {:?}); lorafit reads bitsandbytes' default blocks of {BLOCK} \
             (nested {NESTED_BLOCK}): quantize the model again with the defaults, or load it unquantized",
            state.blocksize,
            state.nested_blocksize
        );
    }
    if state.shape != shape {
        bail!("`{name}`: shape {:?}, but config.json implies {shape:?}", state.shape);
    }
    if nested && state.nested_offset.is_none() {
        bail!("`{name}` has double-quantized scales but no nested_offset; the checkpoint is damaged");
    }
    Ok(state)
}

/// 4-bit codes `[numel / 2, 1]` and fp32 absmax per block of [`BLOCK`] values: bitsandbytes'
/// CPU `quantize_4bit` (scale by the reciprocal of the block's absmax, clamp to [-1, 1], bucket
/// between the midpoints of the sorted code).
fn quantize_4bit(w: &Tensor, format: QuantFormat) -> (Tensor, Tensor) {
    let a = w.to_kind(Kind::Float).reshape([-1]);
    let n = a.size()[0];
    let full = n - n % BLOCK;
    let whole = a.narrow(0, 0, full).view([-1, BLOCK]);
    let mut absmax = whole.abs().amax([1], false);
    let mut scaled =
        (&whole * absmax.clamp_min(1e-38).reciprocal().view([-1, 1])).clamp(-1.0, 1.0).view([-1]);
    if full < n {
        let tail = a.narrow(0, full, n - full);
        let am = tail.abs().max().clamp_min(1e-38);
        absmax = Tensor::cat(&[absmax, am.view([1])], 0);
        scaled = Tensor::cat(&[scaled, (&tail / &am).clamp(-1.0, 1.0)], 0);
    }
    if scaled.size()[0] % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1]);
    }
    let code = format.code();
    let order = code.argsort(0, false);
    let sorted = code.index_select(0, &order);
    let k = sorted.size()[0];
    let bounds = (sorted.narrow(0, 0, k - 1) + sorted.narrow(0, 1, k - 1)) / 2.0;
    let q = scaled.bucketize(&bounds, true, false).to_kind(Kind::Int64);
    let q = match format {
        QuantFormat::Nf4 => q,
        QuantFormat::Fp4 => order.index_select(0, &q),
    }
    .to_kind(Kind::Uint8);
    let high = q.slice(0, 0, None, 2);
    let low = q.slice(0, 1, None, 2);
    ((high * 16 + low).unsqueeze(1), absmax)
}

/// 8-bit codes and fp32 absmax per block of [`NESTED_BLOCK`] values of `x`, as bitsandbytes'
/// CPU `quantize_blockwise`: the value times the reciprocal of its block's absmax is rounded to
/// one of 65536 steps of [-1, 1], and a table maps each step to the code value nearest to it.
fn quantize_blockwise(x: &Tensor, code: &Tensor) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let blocks = (n + NESTED_BLOCK - 1) / NESTED_BLOCK;
    let padded = x.constant_pad_nd([0, blocks * NESTED_BLOCK - n]).view([blocks, NESTED_BLOCK]);
    let absmax = padded.abs().amax([1], false);
    // A block of zeros has no scale to divide by (all scales equal to their mean make one): it
    // is scaled by 0 rather than by 1/0, which would make NaN steps, and its codes are 0, as
    // bitsandbytes writes.
    let zero = absmax.eq(0.0);
    let inverse = absmax.reciprocal().masked_fill(&zero, 0.0);
    let normed = (&padded * inverse.view([-1, 1])).clamp(-1.0, 1.0);
    let step = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to_kind(Kind::Int64);
    let codes = lookup_table(code).index_select(0, &step.view([-1])).view([blocks, NESTED_BLOCK]);
    let codes = codes.masked_fill(&zero.view([-1, 1]), 0);
    (codes.view([-1]).narrow(0, 0, n).to_kind(Kind::Uint8), absmax)
}

/// For each of the 65536 steps `-1 + 2i/65535` of [-1, 1], the index of the nearest value of
/// the sorted `code` (ties to the lower one).
fn lookup_table(code: &Tensor) -> Tensor {
    let k = code.size()[0];
    let midpoints = (code.narrow(0, 0, k - 1) + code.narrow(0, 1, k - 1)) * 0.5;
    let steps = Tensor::arange(65536, (Kind::Float, Device::Cpu)) * 2.0 / 65535.0 - 1.0;
    steps.bucketize(&midpoints, false, false)
}

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`): for each decade
/// 1e-6 .. 1, the midpoints of `linspace(0.1, 1, 2^i + 1)` scaled to it, both signs, then 0 and
/// 1, sorted; 256 fp32 values.
pub fn dynamic_map() -> Tensor {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1i64 << i) + 1;
        let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
        // `10 ** (i - 6)` as Python computes it: the correctly rounded decimal.
        let decade: f64 = format!("1e{}", i - 6).parse().unwrap_or(1.0);
        for sign in [1.0, -1.0] {
            let scaled = &means * (sign * decade);
            data.extend(Vec::<f32>::try_from(&scaled).unwrap_or_default().into_iter().map(f64::from));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f64::total_cmp);
    let values: Vec<f32> = data.into_iter().map(|v| v as f32).collect();
    Tensor::from_slice(&values)
}

/// src/model/quant_kernels.cpp, compiled by build.rs.
mod ffi {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use tch::{Kind, Tensor};

    /// A 4-bit weight: `at::Tensor*` handles (the nested parts null without double
    /// quantization), borrowed for the call.
    #[repr(C)]
    pub struct Quant {
        pub packed: *const c_void,
        pub absmax: *const c_void,
        pub nested_absmax: *const c_void,
        pub nested_code: *const c_void,
        pub code: *const c_void,
        pub offset: f32,
        pub rows: i64,
        pub cols: i64,
        pub compute: c_int,
    }

    extern "C" {
        pub fn lorafit_quant_dequantize(q: *const Quant, kernel: c_int) -> *mut c_void;
        pub fn lorafit_quant_kernel_supported(kernel: c_int) -> c_int;
        pub fn lorafit_quant_linear(q: *const Quant, x: *const c_void, bias: *const c_void) -> *mut c_void;
        fn lorafit_quant_last_error() -> *const c_char;
    }

    /// c10's `ScalarType` number of a compute dtype (the model's float dtypes).
    pub fn scalar_type(kind: Kind) -> c_int {
        match kind {
            Kind::Half => 5,
            Kind::Float => 6,
            Kind::Double => 7,
            Kind::BFloat16 => 15,
            other => panic!("4-bit weights dequantize to a float dtype, not {other:?}"),
        }
    }

    /// The tensor a call returned. A null handle is a libtorch failure: it panics as tch does on
    /// one (`torch_errors::catch` turns that into an error naming what ran out).
    pub fn tensor(handle: *mut c_void) -> Tensor {
        if handle.is_null() {
            let message =
                unsafe { CStr::from_ptr(lorafit_quant_last_error()) }.to_string_lossy().into_owned();
            panic!("called `Result::unwrap()` on an `Err` value: {:?}", tch::TchError::Torch(message));
        }
        // SAFETY: a handle the C++ side allocated with `new at::Tensor`, owned from here on.
        unsafe { Tensor::from_ptr(handle.cast()) }
    }
}
