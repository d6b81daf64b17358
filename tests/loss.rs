//! The training loss computes logits only at target positions, a few rows at a time, and joins
//! their gradients to the body's backward by hand; it must equal the plain loss over full
//! logits, value and gradients.

mod common;

use common::fixture;
use lorafit::config::{LoraConfig, TargetModules};
use lorafit::data::format::IGNORE;
use lorafit::data::{Batch, Example};
use lorafit::lora;
use lorafit::model::Decoder;
use lorafit::train::run::load_model;
use lorafit::train::token_loss_in_chunks;
use tch::{Device, Kind, Reduction, Tensor};

/// The loss as it was before chunking: full `[batch, seq, vocab]` logits, shifted labels.
fn full_logits_loss(model: &Decoder, batch: &Batch) -> Tensor {
    let logits = model.forward_packed(&batch.input_ids, batch.packing.as_ref(), true);
    let (b, t, v) = logits.size3().unwrap();
    let predictions = logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]);
    let targets = batch.labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    predictions.cross_entropy_loss(&targets, None::<Tensor>, Reduction::Sum, IGNORE, 0.0)
}

fn grads(params: &[Tensor]) -> Vec<Tensor> {
    let out = params.iter().map(|p| p.grad().copy()).collect();
    for p in params {
        let _ = p.grad().zero_();
    }
    out
}

fn example(ids: &[i64], prompt: usize) -> Example {
    let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt { IGNORE } else { t }).collect();
    Example { input_ids: ids.to_vec(), labels }
}

#[test]
fn chunked_target_only_loss_equals_the_full_logits_loss() {
    // Untied with an adapted lm_head (llama3), tied (smollm2), tied with logit soft-capping (gemma2).
    for (family, targets) in [
        ("llama3", vec!["q_proj", "down_proj", "lm_head"]),
        ("smollm2", vec!["v_proj"]),
        ("gemma2", vec!["o_proj", "up_proj"]),
    ] {
        tch::manual_seed(0);
        let mut model = load_model(&fixture(family), Kind::Float, Device::Cpu).unwrap();
        let cfg = LoraConfig {
            target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let injected = lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
        let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
        // B starts at zero, which would leave A without gradient: give it values.
        tch::no_grad(|| {
            for p in &params {
                p.shallow_clone().copy_(&(p.randn_like() * 0.05));
            }
        });
        let a = example(&[1, 17, 33, 90, 4, 250, 7, 9, 61], 3);
        let b = example(&[1, 40, 41, 42, 43], 1);
        let c = example(&[1, 200, 12, 13, 14, 15, 16], 2);
        let batches = [
            Batch::collate(&[&a, &b, &c], 0, Device::Cpu),
            Batch::pack(&[vec![&a, &b], vec![&c]], 0, Device::Cpu),
        ];
        for batch in &batches {
            let scale = 1.0 / batch.label_tokens as f64;
            let want = full_logits_loss(&model, batch);
            (&want * scale).backward();
            let want_grads = grads(&params);
            for rows in [3, 1000] {
                let got = token_loss_in_chunks(&model, batch, Some(scale), rows);
                let got_grads = grads(&params);
                let (want, got) = (want.double_value(&[]), got.double_value(&[]));
                assert!(
                    (want - got).abs() <= 1e-5 * want.abs(),
                    "{family}, {rows} rows: loss {got} vs {want}"
                );
                for (w, g) in want_grads.iter().zip(&got_grads) {
                    let largest = w.abs().max().double_value(&[]);
                    let diff = (w - g).abs().max().double_value(&[]);
                    assert!(largest > 0.0, "{family}: a trainable tensor got no gradient");
                    assert!(
                        diff <= 1e-5 * largest,
                        "{family}, {rows} rows: gradient off by {diff} (largest {largest})"
                    );
                }
                let no_grad =
                    tch::no_grad(|| token_loss_in_chunks(&model, batch, None, rows)).double_value(&[]);
                assert!(
                    (no_grad - want).abs() <= 1e-5 * want.abs(),
                    "{family}: evaluation loss {no_grad} vs {want}"
                );
            }
        }
    }
}
