//! Adapter initialisation follows PEFT: A Kaiming-uniform(a=√5) (bound 1/√in) or Gaussian
//! (std 1/r), B zero, and both trainable.

use lorafit::config::{LoraConfig, LoraInit, TargetModules};
use lorafit::files::safetensors_bytes;
use lorafit::lora;
use lorafit::model::load_model;
use tch::{Device, Kind, Tensor};

/// Writes a random-weight Llama checkpoint (hidden 64, 2 layers, 4 heads / 2 KV heads).
fn tiny_llama(dir: &std::path::Path) {
    let config = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":32,"tie_word_embeddings":true,"eos_token_id":2}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut tensors =
        vec![("model.embed_tokens.weight".to_string(), Tensor::randn([32, 64], (Kind::Float, Device::Cpu)))];
    let shapes = [
        ("self_attn.q_proj", [64, 64]),
        ("self_attn.k_proj", [32, 64]),
        ("self_attn.v_proj", [32, 64]),
        ("self_attn.o_proj", [64, 64]),
        ("mlp.gate_proj", [96, 64]),
        ("mlp.up_proj", [96, 64]),
        ("mlp.down_proj", [64, 96]),
    ];
    for i in 0..2 {
        for (name, shape) in shapes {
            tensors.push((
                format!("model.layers.{i}.{name}.weight"),
                Tensor::randn(shape, (Kind::Float, Device::Cpu)),
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((
                format!("model.layers.{i}.{norm}.weight"),
                Tensor::ones([64], (Kind::Float, Device::Cpu)),
            ));
        }
    }
    tensors.push(("model.norm.weight".to_string(), Tensor::ones([64], (Kind::Float, Device::Cpu))));
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors, &[]).unwrap()).unwrap();
}

fn injected(init: LoraInit, r: usize) -> lora::AttachedAdapters {
    let tmp = tempfile::tempdir().unwrap();
    tiny_llama(tmp.path());
    let mut model = load_model(tmp.path(), Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r,
        alpha: 16.0,
        init,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    tch::manual_seed(0);
    lora::inject(&mut model, &cfg, Device::Cpu).unwrap()
}

#[test]
fn kaiming_a_is_uniform_within_one_over_root_fan_in_and_b_is_zero() {
    let inj = injected(LoraInit::Kaiming, 8);
    assert_eq!(inj.module_paths.len(), 14);
    for t in &inj.trainables {
        let v = t.tensor.detach();
        assert!(t.tensor.requires_grad(), "{} is not trainable", t.peft_key);
        if t.peft_key.ends_with("lora_B.weight") {
            assert_eq!(v.abs().max().double_value(&[]), 0.0, "{}", t.peft_key);
        } else {
            let fan_in = v.size()[1] as f64;
            let bound = 1.0 / fan_in.sqrt();
            let max = v.abs().max().double_value(&[]);
            // Uniform(-b, b) has std b/√3; with 512+ samples the sample std is within 15%.
            let std = v.std(true).double_value(&[]);
            assert!(max <= bound && max > 0.9 * bound, "{}: max {max} bound {bound}", t.peft_key);
            assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.15, "{}: std {std}", t.peft_key);
        }
    }
}

#[test]
fn gaussian_a_has_std_one_over_r() {
    let inj = injected(LoraInit::Gaussian, 4);
    let a: Vec<Tensor> = inj
        .trainables
        .iter()
        .filter(|t| t.peft_key.ends_with("lora_A.weight"))
        .map(|t| t.tensor.detach().view([-1]))
        .collect();
    let std = Tensor::cat(&a, 0).std(true).double_value(&[]);
    assert!((std - 0.25).abs() < 0.02, "std {std}");
}
