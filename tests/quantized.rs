//! 4-bit frozen weights against bitsandbytes (scripts/interop/bnb_check.py, run by the interop
//! Python): the codes and scales lorafit makes are bit-identical to `quantize_4bit`'s, and the
//! logits of a model loaded with `model.quantize: nf4` equal transformers + bitsandbytes'.

mod common;

use common::peft_check::{peft_check, PeftJob};
use lorafit::config::{Config, QuantFormat, TargetModules};
use lorafit::lora::peft;
use lorafit::model::quantized::{Dequantizer, FrozenWeight, QuantizedWeight, Scales, BLOCK};
use lorafit::model::{load_model, load_model_quantized, ModelSpec};
use lorafit::train::memory::MemoryEstimate;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// Runs bnb_check.py with `args` and returns the JSON it wrote to its last argument.
fn bnb_check(python: &Path, args: &[&str]) -> Value {
    let script = common::repo().join("scripts/interop/bnb_check.py");
    let out = Command::new(python).arg(script).args(args).output().expect("run the interop python");
    assert!(out.status.success(), "bnb_check.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let report = args.last().expect("an output path");
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// `w` and what lorafit's quantization makes of it, under the names bnb_check.py reads.
fn parts(name: &str, w: &Tensor, q: &QuantizedWeight) -> Vec<(String, Tensor)> {
    let Scales::Nested { codes, offset, nested_absmax, nested_code } = &q.scales else {
        panic!("{name}: the scales are not double-quantized");
    };
    let format = match q.format {
        QuantFormat::Nf4 => 0,
        QuantFormat::Fp4 => 1,
    };
    [
        ("input", w.shallow_clone()),
        ("packed", q.packed.shallow_clone()),
        ("absmax", codes.shallow_clone()),
        ("offset", Tensor::from_slice(&[*offset])),
        ("nested_absmax", nested_absmax.shallow_clone()),
        ("nested_quant_map", nested_code.shallow_clone()),
        ("quant_map", q.format.code()),
        ("format", Tensor::from_slice(&[format as i64])),
    ]
    .into_iter()
    .map(|(part, t)| (format!("{name}.{part}"), t))
    .collect()
}

/// Random weights of awkward shapes (a last block shorter than 64 values, an odd count, a block
/// of zeros, bf16 input, values from 1e-3 to 1e3) and every linear weight of stories260K and of
/// the Llama 3 fixture, as the model loader quantizes them.
#[test]
fn codes_and_scales_equal_bitsandbytes() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    tch::manual_seed(7);
    let mut tensors = Vec::new();
    let mut expected = 0;
    let shapes: [(i64, i64); 5] = [(96, 80), (1000, 77), (17, 5), (64, 19233), (300, 256)];
    for (i, (rows, cols)) in shapes.into_iter().enumerate() {
        for format in [QuantFormat::Nf4, QuantFormat::Fp4] {
            let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 10f64.powi(i as i32 - 2);
            if i == 4 {
                let _ = w.narrow(0, 10, 3).zero_();
            }
            let w = if i % 2 == 1 { w.to_kind(Kind::BFloat16) } else { w };
            let q = QuantizedWeight::quantize(&w, format, true);
            tensors.extend(parts(&format!("random{i}_{}", format.name()), &w, &q));
            expected += 1;
        }
    }
    for (label, dir) in [("stories", common::stories260k(&assets)), ("llama3", common::fixture("llama3"))] {
        let mut dense = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        let mut quantized =
            load_model_quantized(&dir, Kind::Float, Device::Cpu, Some((QuantFormat::Nf4, true))).unwrap();
        for ((site, d), (_, q)) in dense.linear_layers_mut().into_iter().zip(quantized.linear_layers_mut()) {
            if site.path == "lm_head" {
                assert!(matches!(q.weight, FrozenWeight::Dense(_)), "{label}: lm_head is quantized");
                continue;
            }
            let (FrozenWeight::Dense(w), FrozenWeight::Quantized(q)) = (&d.weight, &q.weight) else {
                panic!("{label}: {} is not quantized at load", site.path);
            };
            tensors.extend(parts(&format!("{label}.{}", site.path), w, q));
            expected += 1;
        }
    }
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("tensors.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let report_path = scratch.path().join("report.json");
    let report = bnb_check(&python, &["codes", file.to_str().unwrap(), report_path.to_str().unwrap()]);
    let report = report.as_object().unwrap();
    assert_eq!(report.len(), expected, "bitsandbytes checked {} weights of {expected}", report.len());
    let differing: Vec<String> = report
        .iter()
        .filter(|(_, parts)| !parts.as_array().unwrap().is_empty())
        .map(|(name, parts)| format!("{name}: {parts}"))
        .collect();
    assert!(differing.is_empty(), "not bit-identical to bitsandbytes:\n{}", differing.join("\n"));
}

/// Weights whose block scales all equal their mean (a single block: a 1 × 1 weight, 8 × 8; two
/// equal blocks of ones): the scales less their mean are all zero, and bitsandbytes writes
/// nested codes 0 with a nested absmax of 0, the mean alone carrying the scale.
#[test]
fn uniform_block_scales_quantize_as_bitsandbytes() {
    let Some(python) = common::python() else {
        return;
    };
    tch::manual_seed(11);
    let weights = [
        ("one_by_one", Tensor::randn([1, 1], (Kind::Float, Device::Cpu))),
        ("one_block", Tensor::randn([8, 8], (Kind::Float, Device::Cpu))),
        ("equal_blocks", Tensor::ones([2, 64], (Kind::Float, Device::Cpu))),
    ];
    let mut tensors = Vec::new();
    for (name, w) in &weights {
        for format in [QuantFormat::Nf4, QuantFormat::Fp4] {
            let q = QuantizedWeight::quantize(w, format, true);
            tensors.extend(parts(&format!("{name}_{}", format.name()), w, &q));
        }
    }
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("tensors.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let report_path = scratch.path().join("report.json");
    let report = bnb_check(&python, &["codes", file.to_str().unwrap(), report_path.to_str().unwrap()]);
    let report = report.as_object().unwrap();
    assert_eq!(report.len(), 2 * weights.len(), "bitsandbytes checked {} weights", report.len());
    for (name, differing) in report {
        assert_eq!(differing.as_array().unwrap().len(), 0, "{name}: {differing} differ from bitsandbytes");
    }
}

/// lorafit's dequantization of its NF4 weights is bit-identical to bitsandbytes' generic
/// dequantization of `quantize_4bit`'s state, for the Llama 3 fixture's weights (rows of 32 and
/// 64 values) and random rows of 80, 130 and 128. bitsandbytes 0.50.2's native CPU kernel, the
/// one its CPU forward calls, differs on rows whose length is a multiple of 16 but not of 64: it
/// takes row r's scales from block r·(n / 64), so a 32-wide row reads block 0 whatever its row
/// (on the fixture: dequantization error 0.12 to 0.26 against lorafit's 0.05 to 0.08, and logits
/// 3.02 apart). The logits checks therefore run bitsandbytes with its generic kernel
/// (bnb_check.py `use_exact_dequantize`); this test says when the native one is fixed.
#[test]
fn dequantization_equals_bitsandbytes_generic_kernel() {
    let (Some(_), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    tch::manual_seed(11);
    let mut weights: Vec<(String, Tensor)> = [(96, 80), (10, 130), (64, 128)]
        .into_iter()
        .map(|(rows, cols)| {
            (format!("random_{cols}"), Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)))
        })
        .collect();
    let mut dense = load_model(&common::fixture("llama3"), Kind::Float, Device::Cpu).unwrap();
    for (site, layer) in dense.linear_layers_mut() {
        if site.path != "lm_head" {
            weights.push((format!("llama3.{}", site.path), layer.weight.dense()));
        }
    }
    let mut tensors = Vec::new();
    for (name, w) in &weights {
        let ours = QuantizedWeight::quantize(w, QuantFormat::Nf4, true).dequantize();
        tensors.push((format!("{name}.input"), w.shallow_clone()));
        tensors.push((format!("{name}.ours"), ours));
    }
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("tensors.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let report_path = scratch.path().join("report.json");
    let report = bnb_check(&python, &["dequant", file.to_str().unwrap(), report_path.to_str().unwrap()]);
    assert_eq!(report.as_object().unwrap().len(), weights.len(), "bitsandbytes did not check every weight");
    for (name, w) in &weights {
        let cols = w.size()[1];
        let checked = &report[name.as_str()];
        eprintln!("{name} ({cols} wide): {checked}");
        assert_eq!(checked["exact_equal"], true, "{name}: not bitsandbytes' generic dequantization");
        let native_right = cols % 64 == 0 || cols % 16 != 0;
        assert_eq!(
            checked["native_equal"], native_right,
            "{name}: bitsandbytes' native CPU dequantization of {cols}-wide rows is no longer as described above"
        );
    }
}

/// stories260K and the Llama 3 fixture (GQA, llama3 rope, untied lm_head, 32-wide rows) loaded
/// with `model.quantize: nf4` (double quantization, fp32 compute) give the logits transformers +
/// bitsandbytes give, within the fp32 tolerance of the family tests: the dequantized weights are
/// the same bits, so only the order of the sums differs.
#[test]
fn nf4_logits_equal_transformers_bitsandbytes() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    for (label, dir, ids) in logits_models(&assets) {
        let theirs = bnb_logits(&python, scratch.path(), &dir, ids, "float32");
        let nf4 = Some((QuantFormat::Nf4, true));
        let ours = logits(&load_model_quantized(&dir, Kind::Float, Device::Cpu, nf4).unwrap(), ids);
        let unquantized = logits(&load_model(&dir, Kind::Float, Device::Cpu).unwrap(), ids);
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        let quantization_error = (&unquantized - &theirs).abs().max().double_value(&[]);
        eprintln!(
            "{label}: nf4 logits vs transformers + bitsandbytes: {diff:e}; vs the unquantized model: {quantization_error}"
        );
        assert!(quantization_error > 1e-2, "{label}: the reference is not quantized ({quantization_error})");
        assert!(diff <= 1e-4, "{label}: nf4 logits differ from transformers + bitsandbytes by {diff}");
    }
}

/// The same models loaded with `model.quantize: nf4` and bf16 compute (bf16 weights dequantized
/// to bf16, as `train.precision: bf16-mixed` loads them) against transformers + bitsandbytes with
/// `bnb_4bit_compute_dtype=torch.bfloat16`: both measured from bitsandbytes' fp32-compute logits,
/// lorafit's error stays within bitsandbytes' own bf16 rounding, the family tests' bf16 tolerance.
#[test]
fn nf4_bf16_logits_within_transformers_bitsandbytes_bf16_rounding() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    for (label, dir, ids) in logits_models(&assets) {
        let exact = bnb_logits(&python, scratch.path(), &dir, ids, "float32");
        let theirs = bnb_logits(&python, scratch.path(), &dir, ids, "bfloat16");
        let nf4 = Some((QuantFormat::Nf4, true));
        let ours = logits(&load_model_quantized(&dir, Kind::BFloat16, Device::Cpu, nf4).unwrap(), ids);
        common::assert_within_bf16_rounding(&format!("{label} nf4"), &ours, &theirs, &exact);
    }
}

/// `lorafit train` with `model.quantize: nf4` on stories260K writes a plain PEFT adapter: PEFT
/// loads it onto the transformers + bitsandbytes NF4 base with the logits lorafit computes on
/// its own NF4 base, and onto the unquantized base with lorafit's logits there (before and after
/// `merge_and_unload()`).
#[test]
fn qlora_adapter_loads_in_peft_on_both_bases() {
    qlora_adapter_loads_in_peft(QuantFormat::Nf4);
}

/// The same with `model.quantize: fp4`: the adapter trained on lorafit's FP4 base loads in PEFT
/// onto transformers + bitsandbytes' FP4 base (`bnb_4bit_quant_type="fp4"`) with lorafit's logits.
#[test]
fn fp4_qlora_adapter_loads_in_peft_on_both_bases() {
    qlora_adapter_loads_in_peft(QuantFormat::Fp4);
}

/// Trains an adapter on stories260K with its base quantized to `format` (double-quantized
/// scales), and checks it in PEFT on transformers + bitsandbytes' base of that format and on the
/// unquantized base.
fn qlora_adapter_loads_in_peft(format: QuantFormat) {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = common::stories260k(&assets);
    let quantize = format!("quantize: {}", format.name());
    let adapter = common::train_stories_adapter(tmp.path(), &base, &quantize, "dropout: 0.0", "qlora");
    let ids: Vec<i64> = vec![1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315];
    let input = Tensor::from_slice(&ids).view([1, -1]);

    let mut model = load_model_quantized(&base, Kind::Float, Device::Cpu, Some((format, true))).unwrap();
    let base_logits = tch::no_grad(|| model.forward(&input, false));
    peft::load(&adapter, &mut model, Device::Cpu).unwrap();
    let ours = tch::no_grad(|| model.forward(&input, false)).squeeze_dim(0);
    let effect = (&ours - base_logits.squeeze_dim(0)).abs().max().double_value(&[]);
    assert!(effect > 1e-3, "the trained adapter barely changes the logits ({effect})");

    let report_path = tmp.path().join("peft.json");
    let report = bnb_check(
        &python,
        &[
            "peft",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            &serde_json::to_string(&ids).unwrap(),
            format.name(),
            report_path.to_str().unwrap(),
        ],
    );
    assert_eq!(report["tensors_loaded"], 2 * 5 * 7, "PEFT did not load every adapter tensor as saved");
    let theirs: Vec<Vec<f64>> = serde_json::from_value(report["logits"].clone()).unwrap();
    let diff = (&ours - Tensor::from_slice2(&theirs).to_kind(Kind::Float)).abs().max().double_value(&[]);
    let name = format.name();
    eprintln!("QLoRA logits vs PEFT on the bitsandbytes {name} base: {diff:e} (adapter effect {effect})");
    assert!(diff <= 1e-4, "{name} QLoRA logits differ from PEFT + bitsandbytes by {diff}");

    let mut dense = load_model(&base, Kind::Float, Device::Cpu).unwrap();
    peft::load(&adapter, &mut dense, Device::Cpu).unwrap();
    let logits = tch::no_grad(|| dense.forward(&input, false));
    let job = PeftJob {
        name: format!("{name}-qlora-on-dense"),
        base,
        adapter,
        input_ids: input,
        logits,
        tol: 1e-4,
    };
    assert_eq!(peft_check(&python, tmp.path(), &[job])[0]["tensors_checked"], 2 * 5 * 7);
}

/// stories260K's ids for the logits checks.
const STORY_IDS: [i64; 16] = [1, 403, 407, 261, 378, 324, 266, 292, 270, 290, 363, 287, 341, 308, 269, 260];

/// Ids inside every fixture's vocabulary (256) too.
const SMALL_IDS: [i64; 10] = [1, 45, 200, 17, 99, 255, 3, 128, 64, 7];

/// The fp32 logits `[seq, vocab]` of `model` on `ids`.
fn logits(model: &lorafit::model::Decoder, ids: &[i64]) -> Tensor {
    tch::no_grad(|| model.forward(&Tensor::from_slice(ids).view([1, -1]), false)).squeeze_dim(0)
}

/// The logits bnb_check.py wrote.
fn logits_of(report: Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(report).unwrap();
    Tensor::from_slice2(&rows).to_kind(Kind::Float)
}

/// The models of the logits checks, with their ids: stories260K and the Llama 3 fixture (GQA,
/// llama3 rope, untied lm_head, 32-wide rows).
fn logits_models(assets: &Path) -> [(&'static str, std::path::PathBuf, &'static [i64]); 2] {
    [("stories", common::stories260k(assets), &STORY_IDS), ("llama3", common::fixture("llama3"), &SMALL_IDS)]
}

/// The fp32 logits `[seq, vocab]` of transformers + bitsandbytes on `ids`, with `dir`'s model
/// quantized to NF4 (double-quantized scales) at load and computing in `compute` (a torch dtype
/// name), written under `scratch`.
fn bnb_logits(python: &Path, scratch: &Path, dir: &Path, ids: &[i64], compute: &str) -> Tensor {
    let out = scratch.join("logits.json");
    let ids = serde_json::to_string(ids).unwrap();
    logits_of(bnb_check(python, &["logits", dir.to_str().unwrap(), &ids, compute, out.to_str().unwrap()]))
}

/// A checkpoint written by transformers' 4-bit save (NF4 with double-quantized scales, and FP4
/// with plain fp32 scales) loads in lorafit as it is, with the logits transformers +
/// bitsandbytes computed before saving it.
#[test]
fn transformers_4bit_checkpoint_loads_with_equal_logits() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let dir = common::stories260k(&assets);
    let ids = serde_json::to_string(&STORY_IDS).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let unquantized = logits(&load_model(&dir, Kind::Float, Device::Cpu).unwrap(), &STORY_IDS);
    for (format, double) in [("nf4", "1"), ("fp4", "0")] {
        let saved = scratch.path().join(format);
        let out = scratch.path().join(format!("{format}.json"));
        let theirs = logits_of(bnb_check(
            &python,
            &[
                "save",
                dir.to_str().unwrap(),
                format,
                double,
                &ids,
                saved.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        ));
        let mut model = load_model(&saved, Kind::Float, Device::Cpu).unwrap();
        let layers = model.linear_layers_mut();
        let quantized = layers.iter().filter(|(_, l)| matches!(l.weight, FrozenWeight::Quantized(_))).count();
        assert_eq!(quantized, 5 * 7, "{format}: {quantized} linear layers loaded in 4 bits, not 35");
        let diff = (logits(&model, &STORY_IDS) - &theirs).abs().max().double_value(&[]);
        let quantization_error = (&unquantized - &theirs).abs().max().double_value(&[]);
        eprintln!("{format} checkpoint: logits vs transformers + bitsandbytes {diff:e}, vs unquantized {quantization_error}");
        assert!(quantization_error > 1e-2, "{format}: the reference is not quantized ({quantization_error})");
        assert!(
            diff <= 1e-4,
            "{format} checkpoint: logits differ from transformers + bitsandbytes by {diff}"
        );
    }
}

/// `lorafit quantize` writes a checkpoint that transformers + bitsandbytes load with
/// `from_pretrained` as it is, computing lorafit's NF4 logits, which are also those of
/// transformers + bitsandbytes quantizing the original at load (stories260K and the Llama 3
/// fixture).
#[test]
fn quantize_writes_what_transformers_loads() {
    let (Some(assets), Some(python)) = (common::assets(), common::python()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let ids = serde_json::to_string(&SMALL_IDS).unwrap();
    for (label, dir) in [("stories", common::stories260k(&assets)), ("llama3", common::fixture("llama3"))] {
        let out = scratch.path().join(label);
        let run = common::lorafit(
            scratch.path(),
            &[
                "quantize",
                "--model",
                dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--format",
                "nf4",
            ],
        );
        assert!(run.status.success(), "{label}: quantize failed: {}", String::from_utf8_lossy(&run.stderr));
        let nf4 = Some((QuantFormat::Nf4, true));
        let ours = logits(&load_model_quantized(&dir, Kind::Float, Device::Cpu, nf4).unwrap(), &SMALL_IDS);
        let reloaded = logits(&load_model(&out, Kind::Float, Device::Cpu).unwrap(), &SMALL_IDS);
        assert!(reloaded.equal(&ours), "{label}: the written checkpoint does not reload to the same logits");
        let report = scratch.path().join(format!("{label}.json"));
        let loaded =
            logits_of(bnb_check(&python, &["load", out.to_str().unwrap(), &ids, report.to_str().unwrap()]));
        let quantized_there = logits_of(bnb_check(
            &python,
            &["logits", dir.to_str().unwrap(), &ids, "float32", report.to_str().unwrap()],
        ));
        let diff = (&ours - &loaded).abs().max().double_value(&[]);
        let diff_there = (&ours - &quantized_there).abs().max().double_value(&[]);
        eprintln!(
            "{label}: lorafit quantize → transformers {diff:e}; quantized by bitsandbytes {diff_there:e}"
        );
        assert!(diff <= 1e-4, "{label}: transformers' logits on the written checkpoint differ by {diff}");
        assert!(
            diff_there <= 1e-4,
            "{label}: transformers + bitsandbytes' NF4 logits differ by {diff_there}"
        );
    }
}

/// `lorafit quantize --format` takes the format in any case (`NF4` as bitsandbytes' docs write
/// it): the checkpoint says that format and reloads to the logits of the fixture quantized in it.
#[test]
fn quantize_format_is_case_insensitive() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = common::fixture("llama3");
    for (arg, format) in [("NF4", QuantFormat::Nf4), ("Fp4", QuantFormat::Fp4)] {
        let out = scratch.path().join(arg);
        let args =
            ["quantize", "--model", dir.to_str().unwrap(), "--out", out.to_str().unwrap(), "--format", arg];
        let run = common::lorafit(scratch.path(), &args);
        assert!(
            run.status.success(),
            "--format {arg}: quantize failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], format.name(), "--format {arg}");
        let want = logits(
            &load_model_quantized(&dir, Kind::Float, Device::Cpu, Some((format, true))).unwrap(),
            &SMALL_IDS,
        );
        let reloaded = logits(&load_model(&out, Kind::Float, Device::Cpu).unwrap(), &SMALL_IDS);
        assert!(
            reloaded.equal(&want),
            "--format {arg}: the checkpoint does not reload to {} logits",
            format.name()
        );
    }
}

/// `lorafit merge` of the Llama 3 fixture's adapter onto the fixture written in NF4 by `lorafit
/// quantize`: a dense model (no `quantization_config`, no 4-bit tensors) whose logits are those
/// of the adapter on the NF4 base as lorafit runs it (checked against transformers +
/// bitsandbytes above), not those of the unquantized merge, with a warning that says so.
#[test]
fn merge_onto_a_quantized_base_dequantizes_and_warns() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = common::fixture("llama3");
    let adapter = dir.join("adapter");
    let (base, merged) = (scratch.path().join("nf4"), scratch.path().join("merged"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let run = common::lorafit(scratch.path(), &["quantize", "--model", &path(&dir), "--out", &path(&base)]);
    assert!(run.status.success(), "quantize failed: {}", String::from_utf8_lossy(&run.stderr));
    let run = common::lorafit(
        scratch.path(),
        &["merge", "--model", &path(&base), "--adapter", &path(&adapter), "--out", &path(&merged)],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "merge failed: {stderr}");
    assert!(
        stderr.contains("carry the quantization error"),
        "no warning about the quantization error: {stderr}"
    );

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert!(
        config.get("quantization_config").is_none(),
        "the merged config still says the weights are 4-bit"
    );
    let mut model = load_model(&merged, Kind::Float, Device::Cpu).unwrap();
    for (site, layer) in model.linear_layers_mut() {
        assert!(matches!(layer.weight, FrozenWeight::Dense(_)), "{} is still in 4 bits", site.path);
    }
    let ours = logits(&model, &SMALL_IDS);

    let mut nf4 = load_model(&base, Kind::Float, Device::Cpu).unwrap();
    peft::load(&adapter, &mut nf4, Device::Cpu).unwrap();
    let diff = (&ours - logits(&nf4, &SMALL_IDS)).abs().max().double_value(&[]);
    let mut dense = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    peft::load(&adapter, &mut dense, Device::Cpu).unwrap();
    let quantization_error = (&ours - logits(&dense, &SMALL_IDS)).abs().max().double_value(&[]);
    eprintln!("merged onto NF4: vs the adapter on the NF4 base {diff:e}; vs on the unquantized base {quantization_error}");
    assert!(diff <= 1e-5, "the merged model's logits differ from the adapter on the NF4 base by {diff}");
    assert!(quantization_error > 1e-2, "the merge did not use the NF4 weights ({quantization_error})");
}

/// The 4-bit sizes `lorafit inspect` and the run's memory estimate give are the bytes a model
/// loaded with `model.quantize` holds (its 4-bit parts are bitsandbytes' bit for bit, see
/// above): stories260K and the Llama 3 fixture, double-quantized scales or not.
#[test]
fn quantized_sizes_in_inspect_and_memory_estimate() {
    let Some(assets) = common::assets() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    common::write(&scratch.path().join("train.jsonl"), common::STORY_ROWS);
    for dir in [common::stories260k(&assets), common::fixture("llama3")] {
        let spec = ModelSpec::from_dir(&dir).unwrap();
        let held = |kind: Kind, nested: bool| {
            let mut model =
                load_model_quantized(&dir, kind, Device::Cpu, Some((QuantFormat::Nf4, nested))).unwrap();
            let (mut bytes, mut dense) = (0, spec.parameter_count());
            for (_, layer) in model.linear_layers_mut() {
                if let FrozenWeight::Quantized(q) = &layer.weight {
                    bytes += q.bytes();
                    dense -= q.shape[0] * q.shape[1];
                }
            }
            (bytes + dense * kind.elt_size_in_bytes() as i64) as u64
        };
        for nested in [true, false] {
            let yaml = format!(
                "model: {{path: {}, quantize: nf4, double_quant: {nested}, dtype: fp32}}\n\
                 data: {{train: train.jsonl}}\ntrain: {{precision: fp32}}\n",
                dir.display()
            );
            let cfg =
                Config::from_yaml_str(&yaml, &scratch.path().join("run.yaml").display().to_string(), &[])
                    .unwrap();
            let estimate = MemoryEstimate::of(&cfg, &spec, &cfg.lora, 64).unwrap();
            assert_eq!(
                estimate.weights,
                held(Kind::Float, nested),
                "{}: estimate, double_quant {nested}",
                dir.display()
            );
        }
        let report = lorafit::inspect::inspect(&dir, &TargetModules::AllLinear, 8).unwrap();
        let want = format!("{} with model.quantize", lorafit::inspect::size(held(Kind::BFloat16, true)));
        assert!(report.contains(&want), "{}: inspect does not say `{want}`:\n{report}", dir.display());
    }
}

/// Every CPU dequantization kernel this CPU runs (the vector ones chosen at run time) equals the
/// scalar kernel, and the libtorch-ops path (which equals bitsandbytes' generic kernel, above),
/// bit for bit: NF4 and FP4, plain and double-quantized scales, fp32, bf16 and fp16 output,
/// awkward shapes (a short last block, an odd count, more than 256 blocks, a block of zeros).
#[test]
fn cpu_dequantization_kernels_equal_scalar_and_libtorch_ops() {
    let kernels = runnable_kernels();
    tch::manual_seed(5);
    for (rows, cols) in [(96, 80), (1000, 77), (17, 5), (64, 19233), (300, 256), (3, 64)] {
        let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
        let _ = w.narrow(0, 0, 1).zero_();
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for format in [QuantFormat::Nf4, QuantFormat::Fp4] {
                for nested in [true, false] {
                    let q = QuantizedWeight::quantize(&w.to_kind(kind), format, nested);
                    let case = format!("{rows}×{cols} {kind:?} {} nested {nested}", format.name());
                    assert_same_bits(&q, &kernels, &case);
                }
            }
        }
    }
}

/// The table conversions of the vector kernels round as c10's scalar casts: block scales that
/// make subnormal, overflowing, tied (bf16 and fp16 halfway cases), infinite and NaN products
/// (NaN of either sign and with a payload: c10 writes bf16 0x7FC0 and fp16 0x7E00 under the
/// sign) give the scalar kernel's bits from every kernel, in fp32, bf16 and fp16.
#[test]
fn cpu_dequantization_kernels_round_special_values_as_scalar() {
    let kernels = runnable_kernels();
    let scales: Vec<f32> = vec![
        1.0,
        1e-39,
        2e-38,
        1e-5,
        6e4,
        1e5,
        3.4e38,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        f32::INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7FA0_0001),
        0.0,
    ];
    let n = scales.len() as i64 * BLOCK - 3;
    tch::manual_seed(9);
    let packed = Tensor::randint(256, [(n + 1) / 2, 1], (Kind::Uint8, Device::Cpu));
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for format in [QuantFormat::Nf4, QuantFormat::Fp4] {
            let q = QuantizedWeight {
                format,
                shape: [1, n],
                packed: packed.shallow_clone(),
                scales: Scales::Plain(Tensor::from_slice(&scales)),
                compute: kind,
            };
            assert_same_bits(&q, &kernels, &format!("special scales {kind:?} {}", format.name()));
        }
    }
}

/// The CPU kernels this machine runs. Where /proc/cpuinfo lists a vector kernel's instructions
/// the kernel must be among them, so that a failed detection cannot pass the tests on the
/// scalar kernel alone.
fn runnable_kernels() -> Vec<Dequantizer> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> =
        flags.lines().find(|l| l.starts_with("flags")).map_or(vec![], |l| l.split_whitespace().collect());
    let has = |names: &[&str]| names.iter().all(|f| flags.contains(f));
    let expected = [
        (Dequantizer::Avx2, has(&["avx2", "f16c"])),
        (Dequantizer::Avx512, has(&["avx512f", "avx512bw", "avx512vl"])),
        (Dequantizer::Avx512Bf16, has(&["avx512f", "avx512bw", "avx512vl", "avx512_bf16"])),
    ];
    for (kernel, listed) in expected {
        assert!(
            !listed || kernel.supported(),
            "/proc/cpuinfo lists the instructions of {kernel:?}, not detected"
        );
    }
    let kernels: Vec<Dequantizer> = Dequantizer::CPU_KERNELS.into_iter().filter(|k| k.supported()).collect();
    eprintln!("CPU dequantization kernels checked here: {kernels:?}");
    kernels
}

/// Asserts that every kernel in `kernels`, the default path and libtorch ops give the scalar
/// kernel's bits (NaN included), in `q`'s compute dtype.
fn assert_same_bits(q: &QuantizedWeight, kernels: &[Dequantizer], case: &str) {
    let bits = |t: Tensor| {
        assert_eq!(t.kind(), q.compute, "{case}: dequantized to {:?}", t.kind());
        t.view_dtype(if q.compute == Kind::Float { Kind::Int } else { Kind::Int16 })
    };
    let want = bits(q.dequantize_with(Dequantizer::Scalar));
    let finite = q.dequantize_with(Dequantizer::Scalar).isfinite().all().int64_value(&[]) != 0;
    // libtorch's vectorised casts write NaN otherwise than c10's scalar ones (bf16 0xFFFF, fp16
    // with part of the payload), so libtorch ops are compared on finite values only.
    let others = [Dequantizer::Best].into_iter().chain(kernels.iter().copied());
    for how in others.chain(finite.then_some(Dequantizer::Ops)) {
        let got = bits(q.dequantize_with(how));
        let differing = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            differing, 0,
            "{case}: {differing} values of {how:?} differ from the scalar kernel's bits"
        );
    }
}

/// The 4-bit linear layer, which dequantizes again in its backward pass instead of keeping the
/// dense weight, gives the output and the gradients of input and bias that autograd gives
/// through dequantize + linear, in fp32 and bf16.
#[test]
fn quantized_linear_matches_dequantize_then_linear() {
    tch::manual_seed(6);
    for kind in [Kind::Float, Kind::BFloat16] {
        let w = Tensor::randn([96, 80], (kind, Device::Cpu));
        let q = QuantizedWeight::quantize(&w, QuantFormat::Nf4, true);
        let x = Tensor::randn([3, 7, 80], (kind, Device::Cpu));
        let bias = Tensor::randn([96], (kind, Device::Cpu));
        let upstream = Tensor::randn([3, 7, 96], (kind, Device::Cpu));
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let (x, bias) = (x.copy().set_requires_grad(true), bias.copy().set_requires_grad(true));
            let y = f(&x, &bias);
            (&y * &upstream).sum(Kind::Float).backward();
            [y.detach(), x.grad(), bias.grad()]
        };
        let want = run(&|x, b| x.linear(&q.dequantize_with(Dequantizer::Ops), Some(b)));
        let got = run(&|x, b| q.linear(x, Some(b)));
        for (what, (w, g)) in ["output", "input gradient", "bias gradient"].iter().zip(want.iter().zip(&got))
        {
            assert_eq!(g.kind(), kind, "{kind:?} {what}");
            assert!(w.equal(g), "{kind:?} {what}: differs by {}", (w - g).abs().max());
        }
    }
}

/// Training through a 4-bit base: the loss and every adapter gradient equal those of the same
/// model whose weights are dequantized once and kept dense under autograd (what lorafit did
/// before the 4-bit linear layer), with and without activation checkpointing, in fp32 and bf16.
#[test]
fn adapter_gradients_through_a_4bit_base_match_dequantized_autograd() {
    let _turn = common::global_rng_turn();
    let dir = common::fixture("llama3");
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 250).collect();
    let example = lorafit::data::Example { input_ids: ids.clone(), labels: ids, desirable: None };
    let batch = lorafit::data::Batch::collate(&[&example, &example], 0, Device::Cpu);
    for kind in [Kind::Float, Kind::BFloat16] {
        tch::manual_seed(3);
        let mut model =
            load_model_quantized(&dir, kind, Device::Cpu, Some((QuantFormat::Nf4, true))).unwrap();
        model.activations = kind;
        let cfg = lorafit::config::LoraConfig {
            target_modules: TargetModules::AllLinear,
            dropout: 0.0,
            ..Default::default()
        };
        let injected = lorafit::lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
        let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
        tch::no_grad(|| {
            for p in &params {
                p.shallow_clone().copy_(&(p.randn_like() * 0.05));
            }
        });
        let run = |model: &lorafit::model::Decoder, checkpointing: bool| {
            let backward = lorafit::train::Backward { scale: 1.0, checkpointing };
            let loss = lorafit::train::token_loss(model, &batch, Some(backward)).double_value(&[]);
            let grads: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
            for p in &params {
                let _ = p.grad().zero_();
            }
            (loss, grads)
        };
        let four_bit = [run(&model, false), run(&model, true)];
        for (_, layer) in model.linear_layers_mut() {
            if let FrozenWeight::Quantized(q) = &layer.weight {
                layer.weight = FrozenWeight::Dense(q.dequantize_with(Dequantizer::Ops));
            }
        }
        for (checkpointing, (loss, grads)) in [false, true].into_iter().zip(four_bit) {
            let (want_loss, want) = run(&model, checkpointing);
            assert_eq!(loss, want_loss, "{kind:?} checkpointing {checkpointing}: loss");
            for ((g, w), t) in grads.iter().zip(&want).zip(&injected.trainables) {
                assert!(w.abs().max().double_value(&[]) > 0.0, "{}: no gradient", t.peft_key);
                assert!(g.equal(w), "{kind:?} checkpointing {checkpointing}: {} differs", t.peft_key);
            }
        }
    }
}

/// This process's resident memory in bytes (Linux).
fn resident_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: i64 =
        statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm's resident pages");
    pages * 4096
}

/// Between the forward and the backward pass, autograd keeps no dense copy of a 4-bit weight:
/// eight 2048 × 4096 fp32 layers (32 MiB each dense, 256 MiB together) grow the process by far
/// less than one of them would take twice, where keeping them would add all 256 MiB.
#[test]
fn forward_keeps_no_dense_weight_for_the_backward_pass() {
    tch::manual_seed(9);
    let layers: Vec<QuantizedWeight> = (0..8)
        .map(|_| {
            let w = Tensor::randn([2048, 4096], (Kind::Float, Device::Cpu)) * 0.02;
            QuantizedWeight::quantize(&w, QuantFormat::Nf4, true)
        })
        .collect();
    let x = Tensor::randn([2, 4096], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    // Warm up the allocator with one layer's forward and backward pass.
    let y = layers[0].linear(&x, None);
    y.sum(Kind::Float).backward();
    let before = resident_bytes();
    let mut h = x.shallow_clone();
    for q in &layers {
        // [2, 2048] → [2, 4096] again, so that the layers chain.
        h = q.linear(&h, None).repeat([1, 2]);
    }
    let grown = resident_bytes() - before;
    h.sum(Kind::Float).backward();
    assert!(x.grad().abs().max().double_value(&[]) > 0.0, "no gradient reached the input");
    let dense = 2048 * 4096 * 4;
    assert!(grown < 2 * dense, "the forward pass kept {} MiB (a dense layer is 32 MiB)", grown >> 20);
}
