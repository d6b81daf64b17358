//! The adapter `lorafit train` writes is a real PEFT adapter: Python's `peft` loads every tensor
//! of it and computes the same logits as lorafit, before and after `merge_and_unload()`.

mod common;

use common::peft_check::{peft_check, PeftJob};
use lorafit::lora::peft;
use lorafit::model::load_model;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

#[test]
fn trained_adapter_loads_in_peft_with_equal_logits() {
    let Some(assets) = common::assets() else {
        return;
    };
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = common::stories260k(&assets);
    let adapter = common::train_stories_adapter(tmp.path(), &base, "", "", "interop");

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8);
    assert_eq!(
        config["target_modules"],
        json!(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    );

    let mut model = load_model(&base, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[
        1i64, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 1, 274, 287, 269, 301, 425, 411, 337,
        266, 335, 261, 370,
    ])
    .view([2, 12]);
    let base_logits = tch::no_grad(|| model.forward(&ids, false));
    let modules = peft::load(&adapter, &mut model, Device::Cpu).unwrap();
    assert_eq!(modules.module_paths.len(), 5 * 7);
    let logits = tch::no_grad(|| model.forward(&ids, false));
    let effect = (&logits - &base_logits).abs().max().double_value(&[]);
    assert!(effect > 1e-3, "the trained adapter barely changes the logits ({effect})");

    let job = PeftJob { name: "stories260K".into(), base, adapter, input_ids: ids, logits, tol: 1e-4 };
    let report = &peft_check(&python, tmp.path(), &[job])[0];
    assert_eq!(report["ok"], true);
    assert_eq!(report["tensors_checked"], 2 * 5 * 7);
    assert!(report["max_abs_diff_peft"].as_f64().unwrap() <= 1e-4);
    assert!(report["max_abs_diff_merged"].as_f64().unwrap() <= 1e-4);
}
