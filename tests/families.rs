//! Every supported family against transformers, on the tiny random checkpoints in
//! tests/fixtures/models (made by scripts/fixtures/make_model_fixtures.py, which records
//! transformers' logits and writes a PEFT adapter for each).

mod common;

use common::peft_check::{peft_check, PeftJob};
use common::{fixture, FAMILIES};

use lorafit::config::{LoraConfig, TargetModules};
use lorafit::data::format::Example;
use lorafit::data::Batch;
use lorafit::files::read_safetensors;
use lorafit::inspect::inspect;
use lorafit::lora::{self, peft};
use lorafit::model::load_model;
use lorafit::model::{Decoder, LinearSites, ModelSpec};
use lorafit::train::{token_loss, Backward, Trainer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    read_safetensors(&dir.join("reference.safetensors")).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn logits(model: &Decoder, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(ids, false))
}

#[test]
fn fp32_logits_match_transformers() {
    for family in FAMILIES {
        let dir = fixture(family);
        let r = reference(&dir);
        let model = load_model(&dir, Kind::Float, Device::Cpu).unwrap_or_else(|e| panic!("{family}: {e:#}"));
        let diff = max_diff(&logits(&model, &r["input_ids"]), &r["logits"]);
        assert!(diff <= 1e-4, "{family}: fp32 logits differ from transformers by {diff}");
        if let Some(short) = r.get("input_ids_short") {
            // Phi-3's longrope uses other factors for sequences within the original context.
            let diff = max_diff(&logits(&model, short), &r["logits_short"]);
            assert!(diff <= 1e-4, "{family}: short-sequence logits differ by {diff}");
        }
    }
}

/// lorafit's bf16 logits are within transformers' own bf16 rounding of the fp32 ones (see
/// `assert_within_bf16_rounding`): when this was written, lorafit's mean error was below
/// transformers' for all nine families, and its largest error too but for Phi-3's (1.25×).
#[test]
fn bf16_stays_within_transformers_bf16_rounding() {
    for family in FAMILIES {
        let dir = fixture(family);
        let r = reference(&dir);
        let model = load_model(&dir, Kind::BFloat16, Device::Cpu).unwrap();
        let ours = logits(&model, &r["input_ids"]);
        common::assert_within_bf16_rounding(family, &ours, &r["logits_bf16"], &r["logits"]);
    }
}

#[test]
fn peft_made_adapters_load_with_equal_logits() {
    for family in FAMILIES {
        let dir = fixture(family);
        let r = reference(&dir);
        let mut model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        let injected = peft::load(&dir.join("adapter"), &mut model, Device::Cpu)
            .unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert!(!injected.module_paths.is_empty());
        let diff = max_diff(&logits(&model, &r["input_ids"]), &r["logits_adapter"]);
        assert!(diff <= 1e-4, "{family}: logits with the PEFT adapter differ by {diff}");
    }
}

#[test]
fn inspect_lists_the_family_and_every_linear_module() {
    for family in FAMILIES {
        let dir = fixture(family);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let report = inspect(&dir, &TargetModules::AllLinear, 8).unwrap();
        let tied = meta["tied_embeddings"].as_bool().unwrap();
        let listed: Vec<&str> = report
            .lines()
            .filter_map(|l| l.strip_prefix("  "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let expected: Vec<&str> = meta["linear_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["path"].as_str().unwrap())
            .filter(|p| !(tied && *p == "lm_head"))
            .collect();
        let (mut listed_sorted, mut expected_sorted) = (listed.clone(), expected.clone());
        listed_sorted.sort();
        expected_sorted.sort();
        assert_eq!(listed_sorted, expected_sorted, "{family}:\n{report}");
        let model_type = meta["model_type"].as_str().unwrap();
        assert!(report.contains(&format!("(model_type {model_type})")), "{family}:\n{report}");
        assert!(report.contains(&format!("parameters: {} ", meta["num_parameters"])), "{family}:\n{report}");
        assert!(
            report.contains(&format!("tied embeddings: {}", if tied { "yes" } else { "no" })),
            "{family}:\n{report}"
        );
    }
}

/// transformers' linear modules of a fixture (meta.json), as `(path, in, out, fan_in_fan_out,
/// bias)` sorted by path, without the output head when it is tied to the embeddings.
fn transformers_linears(dir: &Path) -> Vec<(String, i64, i64, bool, bool)> {
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let tied = meta["tied_embeddings"].as_bool().unwrap();
    let mut linears: Vec<_> = meta["linear_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap().to_string(),
                m["in_features"].as_i64().unwrap(),
                m["out_features"].as_i64().unwrap(),
                m["kind"] == "Conv1D",
                !m["bias_key"].is_null(),
            )
        })
        .filter(|(path, ..)| !(tied && path == "lm_head"))
        .collect();
    linears.sort();
    linears
}

/// The table of linear layers, made from config.json alone, lists what transformers builds
/// for every family: the same module paths, shapes, storage order and biases.
#[test]
fn linear_sites_match_transformers() {
    for family in FAMILIES {
        let dir = fixture(family);
        let sites = LinearSites::of(&ModelSpec::from_dir(&dir).unwrap());
        let mut ours: Vec<_> = sites
            .sites
            .iter()
            .map(|s| (s.path.clone(), s.in_features, s.out_features, s.fan_in_fan_out, s.bias))
            .collect();
        ours.sort();
        assert_eq!(ours, transformers_linears(&dir), "{family}");
        for site in sites.sites.iter().filter(|s| !s.parts.is_empty()) {
            let rows: i64 = site.parts.iter().map(|p| p.rows.end - p.rows.start).sum();
            assert_eq!(rows, site.out_features, "{family}: {}", site.path);
        }
    }
}

/// `inspect` describes a model from its config.json: a directory without the weights gets the
/// same linear modules, with transformers' shapes.
#[test]
fn inspect_needs_only_config_json() {
    for family in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture(family).join("config.json"), dir.path().join("config.json")).unwrap();
        let report =
            inspect(dir.path(), &TargetModules::AllLinear, 8).unwrap_or_else(|e| panic!("{family}: {e:#}"));
        let mut listed: Vec<String> =
            report.lines().filter_map(|l| l.strip_prefix("  ")).map(str::to_string).collect();
        listed.sort();
        let expected: Vec<String> = transformers_linears(&fixture(family))
            .into_iter()
            .map(|(path, inp, out, ..)| format!("{path} [{out}, {inp}]"))
            .collect();
        assert_eq!(listed, expected, "{family}:\n{report}");
    }
}

/// Trains two steps on random tokens and saves the adapter, as `lorafit train` does.
fn train_and_export(dir: &Path, out: &Path) -> (Tensor, Tensor) {
    let mut model = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    tch::manual_seed(3);
    let injected = lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
    let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    let train_cfg = lorafit::config::TrainConfig { lr: 0.05, ..Default::default() };
    let mut trainer = Trainer::new(params, &train_cfg);
    let ids = Tensor::randint_low(3, 256, [2, 10], (Kind::Int64, Device::Cpu));
    let rows: Vec<Vec<i64>> = Vec::try_from(&ids).unwrap();
    let examples: Vec<Example> =
        rows.iter().map(|r| Example { input_ids: r.clone(), labels: r.clone(), desirable: None }).collect();
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    for _ in 0..2 {
        trainer.step(&model, std::slice::from_ref(&batch), None, train_cfg.lr).unwrap();
    }
    peft::save(out, &cfg, &injected, &dir.display().to_string()).unwrap();
    let probe = Tensor::from_slice(&[5i64, 17, 42, 99, 100, 3, 250, 7, 8, 64, 33, 21]).view([1, 12]);
    (probe.shallow_clone(), logits(&model, &probe))
}

#[test]
fn lorafit_adapters_load_in_peft_for_every_family() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut jobs = vec![];
    for family in FAMILIES {
        let dir = fixture(family);
        let adapter = tmp.path().join(family);
        let (input_ids, logits) = train_and_export(&dir, &adapter);
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join(peft::CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["fan_in_fan_out"], json!(family.starts_with("gpt2")), "{family}");
        jobs.push(PeftJob { name: family.to_string(), base: dir, adapter, input_ids, logits, tol: 1e-4 });
    }
    peft_check(&python, tmp.path(), &jobs);
}

/// Copies a fixture's config into `dest` and writes its tensors through `write`.
fn rewritten(family: &str, dest: &Path, write: impl FnOnce(Vec<(String, Tensor)>, &Path)) {
    let src = fixture(family);
    std::fs::copy(src.join("config.json"), dest.join("config.json")).unwrap();
    write(read_safetensors(&src.join("model.safetensors")).unwrap(), dest);
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let tmp = tempfile::tempdir().unwrap();
    rewritten("llama3", tmp.path(), |tensors, dest| {
        let (first, second) = tensors.split_at(tensors.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part) in
            [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
        {
            std::fs::write(dest.join(file), lorafit::files::safetensors_bytes(part, &[]).unwrap()).unwrap();
            for (name, _) in part {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dest.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    let r = reference(&fixture("llama3"));
    let model = load_model(tmp.path(), Kind::Float, Device::Cpu).unwrap();
    assert!(max_diff(&logits(&model, &r["input_ids"]), &r["logits"]) <= 1e-4);
}

#[test]
fn missing_or_misshaped_tensors_are_named_with_shapes_and_file() {
    let name = "model.layers.1.self_attn.k_proj.weight";
    let tmp = tempfile::tempdir().unwrap();
    rewritten("llama3", tmp.path(), |tensors, dest| {
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| if n == name { (n, t.narrow(0, 0, 8).contiguous()) } else { (n, t) })
            .collect();
        std::fs::write(
            dest.join("model.safetensors"),
            lorafit::files::safetensors_bytes(&tensors, &[]).unwrap(),
        )
        .unwrap();
    });
    let err = format!("{:#}", load_model(tmp.path(), Kind::Float, Device::Cpu).err().unwrap());
    assert!(
        err.contains(name)
            && err.contains("[8, 32]")
            && err.contains("[16, 32]")
            && err.contains("model.safetensors"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    rewritten("llama3", tmp.path(), |tensors, dest| {
        let tensors: Vec<(String, Tensor)> = tensors.into_iter().filter(|(n, _)| n != name).collect();
        std::fs::write(
            dest.join("model.safetensors"),
            lorafit::files::safetensors_bytes(&tensors, &[]).unwrap(),
        )
        .unwrap();
    });
    let err = format!("{:#}", load_model(tmp.path(), Kind::Float, Device::Cpu).err().unwrap());
    assert!(err.contains(name) && err.contains("no tensor"), "{err}");
}

/// Decoding with the KV cache gives the tokens that re-running the whole sequence gives, also
/// past sliding windows, with soft-capping, and past Phi-3's original context, where longrope
/// switches every position to its long factors.
#[test]
fn kv_cached_decoding_matches_recomputing_the_sequence() {
    for family in FAMILIES {
        let model = load_model(&fixture(family), Kind::Float, Device::Cpu).unwrap();
        let prompt = [1i64, 40, 41, 42, 43];
        let cached = lorafit::generate::greedy(&model, &prompt, 24, None, Device::Cpu);
        let recomputed = lorafit::generate::greedy_without_cache(&model, &prompt, 24, Device::Cpu);
        assert_eq!(cached, recomputed, "{family}");
    }
}

/// Phi-3's greedy decoding with the KV cache crosses original_max_position_embeddings (8) and
/// gives transformers' `generate` tokens, which encodes every key again with the long factors
/// at that step (the fixture checks that keeping the short-factor keys gives other tokens).
#[test]
fn phi3_cached_decoding_across_the_original_context_matches_transformers_generate() {
    let dir = fixture("phi3");
    let r = reference(&dir);
    let model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let prompts: Vec<Vec<i64>> = Vec::try_from(&r["generate_prompts"]).unwrap();
    let generated: Vec<Vec<i64>> = Vec::try_from(&r["generated"]).unwrap();
    for (prompt, want) in prompts.iter().zip(&generated) {
        let got = lorafit::generate::greedy(&model, prompt, want.len(), None, Device::Cpu);
        assert_eq!(&got, want, "prompt {prompt:?}");
    }
}

/// Gemma multiplies its embeddings by √hidden_size cast to the embeddings' kind first: the bf16
/// model's embeddings equal transformers' bf16 ones once rounded to bf16 (lorafit keeps the
/// residual stream in fp32, transformers' bf16 model rounds the product).
#[test]
fn gemma_bf16_embeddings_equal_transformers() {
    for family in ["gemma2", "gemma3"] {
        let dir = fixture(family);
        let r = reference(&dir);
        let model = load_model(&dir, Kind::BFloat16, Device::Cpu).unwrap();
        let (embedded, _) = tch::no_grad(|| model.embed(&r["input_ids"], None, 0, false));
        let ours = embedded.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let differ = ours.ne_tensor(&r["embeddings_bf16"]).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differ, 0, "{family}: {differ} bf16 embeddings differ from transformers'");
    }
}

/// Draws of lorafit's training loss the GPT-2 dropout test averages:
/// DROPOUT_TEST_DRAWS in scripts/fixtures/make_model_fixtures.py, which checks that the tolerance
/// below tells each of GPT-2's three dropouts missing.
const DROPOUT_TEST_DRAWS: i64 = 1000;
/// DROPOUT_SIGMAS there: the tolerance in standard errors of the difference of the two means.
const DROPOUT_SIGMAS: f64 = 5.0;

fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// GPT-2's embd_pdrop, attn_pdrop and resid_pdrop apply in training as in transformers' train
/// mode: over many dropout draws, lorafit's training loss has the mean of transformers' (within
/// 5 standard errors of the difference of the two means, about 0.01), which lies more than that
/// above the eval loss; the eval loss is transformers' eval loss.
#[test]
fn gpt2_dropout_matches_transformers_train_mode() {
    let _turn = common::global_rng_turn();
    // A thousand passes over tiny tensors: threads only add waiting (tenfold on a busy machine).
    tch::set_num_threads(1);
    let dir = fixture("gpt2");
    let r = reference(&dir);
    let model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let rows: Vec<Vec<i64>> = Vec::try_from(&r["dropout_input_ids"]).unwrap();
    let examples: Vec<Example> = rows
        .iter()
        .map(|row| Example { input_ids: row.clone(), labels: row.clone(), desirable: None })
        .collect();
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    let mean_loss = |backward: Option<Backward>| {
        token_loss(&model, &batch, backward).double_value(&[]) / batch.label_tokens as f64
    };

    let eval = tch::no_grad(|| mean_loss(None));
    let eval_theirs = r["dropout_eval_loss"].double_value(&[]);
    assert!((eval - eval_theirs).abs() <= 1e-5, "eval loss {eval} vs transformers' {eval_theirs}");

    let training = Some(Backward { scale: 1.0, checkpointing: false });
    let ours: Vec<f64> = (0..DROPOUT_TEST_DRAWS)
        .map(|draw| {
            tch::manual_seed(draw);
            mean_loss(training)
        })
        .collect();
    let theirs: Vec<f64> =
        Vec::<f32>::try_from(&r["dropout_train_losses"]).unwrap().into_iter().map(f64::from).collect();
    let ((mean, std), (mean_theirs, std_theirs)) = (mean_and_std(&ours), mean_and_std(&theirs));
    let tolerance = DROPOUT_SIGMAS
        * (std * std / ours.len() as f64 + std_theirs * std_theirs / theirs.len() as f64).sqrt();
    eprintln!(
        "train-mode loss: mean {mean:.4} (std {std:.4}) vs transformers' {mean_theirs:.4} (std \
         {std_theirs:.4}), eval {eval:.4}, tolerance {tolerance:.4}"
    );
    assert!((mean_theirs - eval).abs() > tolerance, "the fixture cannot tell dropout from none");
    assert!(
        (mean - mean_theirs).abs() <= tolerance,
        "mean train-mode loss {mean} vs transformers' {mean_theirs} (tolerance {tolerance})"
    );
}
