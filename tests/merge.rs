//! `lorafit::export::merge` folds a PEFT adapter into its base model: the merged directory loads
//! in transformers with no missing or unexpected keys and computes the logits of PEFT's own
//! `merge_and_unload()`, and lorafit's loader computes on it what base + adapter compute.

mod common;

use common::{fixture, FAMILIES};

use lorafit::config::{LoraConfig, TargetModules};
use lorafit::export::merge::{merge, merge_with, MergeDtype};
use lorafit::files::{read_safetensors, safetensors_dtypes};
use lorafit::lora::{self, peft};
use lorafit::model::load_model;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// Two rows of ten token ids, valid for every fixture (vocabulary 256) and stories260K.
fn ids() -> Tensor {
    Tensor::from_slice(&[1i64, 17, 42, 99, 3, 250, 128, 7, 64, 200, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13])
        .view([2, 10])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Folding the adapter into W changes the order of fp32 roundings, so merged and unmerged
/// logits agree to 1e-5 relative to the logits' size (absolute for logits below 1).
fn assert_close_logits(what: &str, reference: &Tensor, merged: &Tensor) {
    let diff = max_abs_diff(reference, merged);
    let size = reference.abs().max().double_value(&[]).max(1.0);
    eprintln!("{what}: lorafit merged vs base + adapter: max |diff| {diff:e} (max |logit| {size:.3})");
    assert!(diff <= 1e-5 * size, "{what}: merged logits differ by {diff}");
}

/// Base + adapter in lorafit, and the merged directory in lorafit: (reference, merged) logits.
fn lorafit_logits(base: &Path, adapter: &Path, merged: &Path) -> (Tensor, Tensor) {
    let mut model = load_model(base, Kind::Float, Device::Cpu).unwrap();
    peft::load(adapter, &mut model, Device::Cpu).unwrap();
    let reference = tch::no_grad(|| model.forward(&ids(), false));
    let merged_model = load_model(merged, Kind::Float, Device::Cpu)
        .unwrap_or_else(|e| panic!("lorafit cannot load {}: {e:#}", merged.display()));
    let logits = tch::no_grad(|| merged_model.forward(&ids(), false));
    (reference, logits)
}

/// Loads each merged directory in transformers (reporting missing/unexpected keys) and compares
/// its logits with PEFT's `merge_and_unload()` of base + adapter.
const PY_CHECK: &str = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
jobs = json.load(open(sys.argv[1]))
results = []
for job in jobs:
    ids = torch.tensor(job["ids"])
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    merged, info = AutoModelForCausalLM.from_pretrained(job["merged"], output_loading_info=True, **kw)
    merged.eval()
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    base = AutoModelForCausalLM.from_pretrained(job["base"], **kw)
    peft_merged = PeftModel.from_pretrained(base, job["adapter"]).merge_and_unload()
    peft_merged.eval()
    with torch.no_grad():
        a = merged(ids).logits.float()
        b = peft_merged(ids).logits.float()
    results.append({"name": job["name"], "problems": problems, "max_abs_diff": (a - b).abs().max().item()})
print(json.dumps(results))
"#;

struct PyJob {
    name: String,
    base: PathBuf,
    adapter: PathBuf,
    merged: PathBuf,
}

/// Runs [`PY_CHECK`] on `jobs`; `None` when the interop venv is not configured.
fn python_check(jobs: &[PyJob], scratch: &Path) -> Option<Vec<Value>> {
    let python = common::python()?;
    let ids = Vec::<Vec<i64>>::try_from(&ids()).unwrap();
    let spec: Vec<Value> = jobs
        .iter()
        .map(
            |j| json!({"name": j.name, "base": j.base, "adapter": j.adapter, "merged": j.merged, "ids": ids}),
        )
        .collect();
    let jobs_file = scratch.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = Command::new(python).args(["-c", PY_CHECK]).arg(&jobs_file).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_str(stdout.lines().last().unwrap()).unwrap())
}

fn assert_python_agrees(results: &[Value]) {
    for r in results {
        let name = &r["name"];
        assert_eq!(r["problems"], json!({}), "{name}: transformers reports loading problems");
        let diff = r["max_abs_diff"].as_f64().unwrap();
        eprintln!("{name}: transformers(merged) vs PEFT merge_and_unload: max |diff| {diff:e}");
        assert!(diff <= 1e-5, "{name}: merged logits differ from PEFT's by {diff}");
    }
}

fn tensor_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        read_safetensors(&dir.join("model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
}

#[test]
fn every_fixture_merges_like_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let mut jobs = vec![];
    for family in FAMILIES {
        let base = fixture(family);
        let adapter = base.join("adapter");
        let merged = tmp.path().join(family);
        let report = merge(&base, &adapter, &merged, MergeDtype::Fp32)
            .unwrap_or_else(|e| panic!("{family}: merge failed: {e:#}"));
        let modules = read_safetensors(&adapter.join(peft::WEIGHTS_FILE)).unwrap().len() / 2;
        assert_eq!(report.tensors_merged, modules, "{family}");
        assert_eq!(report.shards, 1, "{family}");
        assert_eq!(
            report.bytes,
            std::fs::metadata(merged.join("model.safetensors")).unwrap().len(),
            "{family}"
        );

        // Same names as the input: no prefix added or dropped, no lm_head added to a tied model.
        assert_eq!(tensor_names(&merged), tensor_names(&base), "{family}");
        for file in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(merged.join(file).is_file(), "{family}: {file} not copied");
        }
        assert!(!merged.join("adapter").exists());

        let (reference, logits) = lorafit_logits(&base, &adapter, &merged);
        let base_logits =
            tch::no_grad(|| load_model(&base, Kind::Float, Device::Cpu).unwrap().forward(&ids(), false));
        assert!(
            max_abs_diff(&reference, &base_logits) > 1e-4,
            "{family}: the fixture adapter changes nothing"
        );
        assert_close_logits(family, &reference, &logits);
        jobs.push(PyJob { name: family.to_string(), base, adapter, merged });
    }
    if let Some(results) = python_check(&jobs, tmp.path()) {
        assert_eq!(results.len(), FAMILIES.len());
        assert_python_agrees(&results);
    }
}

#[test]
fn bf16_merge_writes_bf16_tensors_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("llama3");
    let out = tmp.path().join("bf16");
    merge(&base, &base.join("adapter"), &out, MergeDtype::Bf16).unwrap();
    assert_eq!(safetensors_dtypes(&out.join("model.safetensors")).unwrap(), ["BF16"]);
    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let original: Value = serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    for key in ["torch_dtype", "dtype"] {
        if original.get(key).is_some() {
            assert_eq!(config[key], "bfloat16", "{key}");
        }
    }
    assert_eq!(config["model_type"], original["model_type"]);

    // The bf16 merge is the fp32 merge rounded once.
    let fp32 = tmp.path().join("fp32");
    merge(&base, &base.join("adapter"), &fp32, MergeDtype::Fp32).unwrap();
    let exact: BTreeMap<String, Tensor> =
        read_safetensors(&fp32.join("model.safetensors")).unwrap().into_iter().collect();
    for (name, t) in read_safetensors(&out.join("model.safetensors")).unwrap() {
        assert_eq!(t.kind(), Kind::BFloat16);
        let rounded = exact[&name].to_kind(Kind::BFloat16);
        assert_eq!(max_abs_diff(&t.to_kind(Kind::Float), &rounded.to_kind(Kind::Float)), 0.0, "{name}");
    }
    // lorafit loads it.
    load_model(&out, Kind::Float, Device::Cpu).unwrap();

    // Merging into a bf16 model keeps bf16 (`Same`), computing in fp32 and rounding once.
    let again = tmp.path().join("again");
    merge(&out, &base.join("adapter"), &again, MergeDtype::Same).unwrap();
    assert_eq!(safetensors_dtypes(&again.join("model.safetensors")).unwrap(), ["BF16"]);
    let config: Value = serde_json::from_slice(&std::fs::read(again.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], original["model_type"]);
    let module = "model.layers.1.mlp.down_proj";
    let name = format!("{module}.weight");
    let stored = |dir: &Path| {
        read_safetensors(&dir.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    };
    let halves: BTreeMap<String, Tensor> =
        read_safetensors(&base.join("adapter").join(peft::WEIGHTS_FILE)).unwrap().into_iter().collect();
    let half = |h: &str| halves[&peft::key(module, h)].to_kind(Kind::Float);
    let delta = half("lora_B").matmul(&half("lora_A")) * lorafit::lora::scale(8.0, 4, false);
    let expected = (stored(&out).to_kind(Kind::Float) + delta).to_kind(Kind::BFloat16);
    assert_eq!(max_abs_diff(&stored(&again).to_kind(Kind::Float), &expected.to_kind(Kind::Float)), 0.0);
}

#[test]
fn an_overflowing_merge_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("llama3");
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(base.join("adapter").join(peft::CONFIG_FILE), adapter.join(peft::CONFIG_FILE)).unwrap();
    let tensors: Vec<(String, Tensor)> = read_safetensors(&base.join("adapter").join(peft::WEIGHTS_FILE))
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" {
                (n, t * 1e9)
            } else {
                (n, t)
            }
        })
        .collect();
    std::fs::write(
        adapter.join(peft::WEIGHTS_FILE),
        lorafit::files::safetensors_bytes(&tensors, &[("format", "pt")]).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let err = merge(&base, &adapter, &out, MergeDtype::Fp16).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("`model.layers.1.self_attn.v_proj.weight`") && msg.contains("infinite"), "{msg}");
    assert!(!out.exists());
    // In fp32 the same update is finite.
    merge(&base, &adapter, &out, MergeDtype::Fp32).unwrap();
}

#[test]
fn an_adapter_for_another_model_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err =
        merge(&fixture("llama3"), &fixture("qwen3").join("adapter"), &out, MergeDtype::Same).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("model.layers.0.") && msg.contains("lora_"), "{msg}");
    assert!(msg.contains("has shape"), "{msg}");
    assert!(!out.exists(), "nothing is written on failure");

    // A family with other module names: the adapter's first module is named.
    let err =
        merge(&fixture("phi3"), &fixture("llama3").join("adapter"), &out, MergeDtype::Same).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("`base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight`"), "{msg}");
    assert!(msg.contains("`phi3` model does not have"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn a_non_empty_output_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let base = fixture("qwen2");
    let err = merge(&base, &base.join("adapter"), &out, MergeDtype::Same).unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    merge(&base, &base.join("adapter"), &empty, MergeDtype::Same).unwrap();
    assert!(empty.join("model.safetensors").is_file());
}

/// An adapter with rsLoRA and per-module ranks and alphas on stories260K, made with lorafit.
fn stories_adapter(base: &Path, dir: &Path) {
    tch::manual_seed(7);
    let mut model = load_model(base, Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: true,
        target_modules: TargetModules::AllLinear,
        rank_pattern: BTreeMap::from([("q_proj".to_string(), 2)]),
        alpha_pattern: BTreeMap::from([("down_proj".to_string(), 3.0)]),
        ..LoraConfig::default()
    };
    let injected = lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
    for t in &injected.trainables {
        if t.peft_key.contains("lora_B") {
            tch::no_grad(|| {
                let _ = t.tensor.shallow_clone().normal_(0.0, 0.05);
            });
        }
    }
    peft::save(dir, &cfg, &injected, &base.display().to_string()).unwrap();
}

#[test]
fn stories260k_merges_sharded_and_loads_everywhere() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = common::stories260k(&assets);
    let adapter = tmp.path().join("adapter");
    stories_adapter(&base, &adapter);

    let single = tmp.path().join("single");
    let report = merge(&base, &adapter, &single, MergeDtype::Same).unwrap();
    assert_eq!((report.tensors_merged, report.shards), (5 * 7, 1));
    assert_eq!(tensor_names(&single), tensor_names(&base));
    assert!(!tensor_names(&single).iter().any(|n| n == "lm_head.weight"), "tied embeddings stay tied");
    for file in
        ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        assert_eq!(
            std::fs::read(single.join(file)).unwrap(),
            std::fs::read(base.join(file)).unwrap(),
            "{file}"
        );
    }
    let (reference, logits) = lorafit_logits(&base, &adapter, &single);
    assert_close_logits("stories260K", &reference, &logits);

    // Shards of at most 100 kB: an index that lists every tensor once, and the same logits.
    let sharded = tmp.path().join("sharded");
    let report = merge_with(&base, &adapter, &sharded, MergeDtype::Same, 100_000).unwrap();
    assert!(report.shards > 3, "{report:?}");
    let index: Value =
        serde_json::from_slice(&std::fs::read(sharded.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.keys().cloned().collect::<Vec<_>>(), tensor_names(&base));
    assert!(!sharded.join("model.safetensors").exists());
    let mut shard_files: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    shard_files.sort();
    shard_files.dedup();
    assert_eq!(shard_files.len(), report.shards);
    assert_eq!(shard_files[0], format!("model-00001-of-{:05}.safetensors", report.shards));
    let file_bytes: u64 = shard_files.iter().map(|f| std::fs::metadata(sharded.join(f)).unwrap().len()).sum();
    assert_eq!(file_bytes, report.bytes);
    let (_, sharded_logits) = lorafit_logits(&base, &adapter, &sharded);
    assert_eq!(max_abs_diff(&logits, &sharded_logits), 0.0);

    // A sharded checkpoint is read through its index.
    let from_shards = tmp.path().join("from-shards");
    let report = merge(&sharded, &adapter, &from_shards, MergeDtype::Same).unwrap();
    assert_eq!((report.tensors_merged, report.shards), (5 * 7, 1));
    assert_eq!(tensor_names(&from_shards), tensor_names(&base));

    let jobs = [
        PyJob { name: "stories260K".into(), base: base.clone(), adapter: adapter.clone(), merged: single },
        PyJob { name: "stories260K sharded".into(), base, adapter, merged: sharded },
    ];
    if let Some(results) = python_check(&jobs, tmp.path()) {
        assert_python_agrees(&results);
    }
}
