//! Packing several examples into one row changes nothing but speed: the loss of a packed row
//! equals the loss of its examples run one by one, attention never crosses an example
//! boundary, and gradient accumulation stays normalised over all label tokens.

mod common;

use common::fixture;

use lorafit::data::format::{Example, IGNORE};
use lorafit::data::Batch;
use lorafit::model::attention::attention_mask;
use lorafit::model::load_model;
use lorafit::train::token_loss;
use tch::{Device, Kind, Tensor};

fn examples() -> Vec<Example> {
    let make = |ids: &[i64], prompt: usize| Example {
        input_ids: ids.to_vec(),
        labels: ids.iter().enumerate().map(|(i, &id)| if i < prompt { IGNORE } else { id }).collect(),
        desirable: None,
    };
    vec![
        make(&[1, 17, 42, 99, 100, 3, 250, 7, 8, 2], 4),
        make(&[1, 64, 33, 21, 5, 2], 0),
        make(&[1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 2], 6),
    ]
}

/// Families whose positions or attention differ: RoPE, sliding window, soft-capped eager
/// attention, learned positions. (Phi-3's longrope picks factors by the longest position in the
/// batch, as transformers does, so a packed row and its examples alone may differ there.)
const PACKING_FAMILIES: &[&str] = &["llama3", "mistral", "gemma2", "gemma3", "qwen3", "gpt2"];

#[test]
fn a_packed_row_has_the_loss_of_its_examples_run_alone() {
    let ex = examples();
    for family in PACKING_FAMILIES {
        let model = load_model(&fixture(family), Kind::Float, Device::Cpu).unwrap();
        let packed = Batch::pack(&[ex.iter().collect()], 0, Device::Cpu);
        let alone: Vec<Batch> = ex.iter().map(|e| Batch::collate(&[e], 0, Device::Cpu)).collect();
        let packed_loss = tch::no_grad(|| token_loss(&model, &packed, None)).double_value(&[]);
        let alone_loss: f64 =
            alone.iter().map(|b| tch::no_grad(|| token_loss(&model, b, None)).double_value(&[])).sum();
        assert_eq!(packed.label_tokens, alone.iter().map(|b| b.label_tokens).sum::<i64>());
        assert!(
            (packed_loss - alone_loss).abs() <= 1e-4,
            "{family}: packed {packed_loss} vs alone {alone_loss}"
        );
        // Without the example boundaries the same row gives a different loss: the test can tell.
        let unmasked = Batch { packing: None, ..Batch::pack(&[ex.iter().collect()], 0, Device::Cpu) };
        let unmasked_loss = tch::no_grad(|| token_loss(&model, &unmasked, None)).double_value(&[]);
        assert!((unmasked_loss - alone_loss).abs() > 1e-2, "{family}: {unmasked_loss} vs {alone_loss}");
    }
}

#[test]
fn no_position_attends_across_an_example_boundary() {
    let ex = examples();
    let batch = Batch::pack(&[ex.iter().collect(), vec![&ex[1]]], 0, Device::Cpu);
    let docs = &batch.packing.as_ref().unwrap().documents;
    let seq = docs.size()[1];
    for window in [None, Some(4)] {
        let mask = attention_mask(seq, window, Some(docs), Device::Cpu);
        let allowed: Vec<i64> =
            Vec::try_from(&mask.expand([2, 1, seq, seq], false).to_kind(Kind::Int64).reshape([-1])).unwrap();
        let docs: Vec<Vec<i64>> = Vec::try_from(docs).unwrap();
        for (row, doc) in docs.iter().enumerate() {
            for i in 0..seq as usize {
                for j in 0..seq as usize {
                    let expected = j <= i && doc[i] == doc[j] && window.is_none_or(|w| i - j < w as usize);
                    let got = allowed[(row * seq as usize + i) * seq as usize + j] == 1;
                    assert_eq!(got, expected, "row {row} query {i} key {j} window {window:?}");
                }
            }
        }
    }
}

#[test]
fn accumulation_over_packed_and_padded_micro_batches_matches_one_batch() {
    let ex = examples();
    let dir = fixture("llama3");
    let grads = |batches: &[Batch]| -> Vec<Tensor> {
        let mut model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        let cfg = lorafit::config::LoraConfig {
            dropout: 0.0,
            target_modules: lorafit::config::TargetModules::AllLinear,
            ..Default::default()
        };
        tch::manual_seed(11);
        let injected = lorafit::lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
        tch::no_grad(|| {
            for t in &injected.trainables {
                let _ = t.tensor.shallow_clone().normal_(0.0, 0.05);
            }
        });
        let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
        let mut trainer = lorafit::train::Trainer::new(params, &Default::default());
        let _ = trainer.accumulate(&model, batches, None, 1.0);
        trainer.params.iter().map(|p| p.grad().copy()).collect()
    };
    let one = grads(&[Batch::pack(&[vec![&ex[0], &ex[1]], vec![&ex[2]]], 0, Device::Cpu)]);
    let split = grads(&[
        Batch::pack(&[vec![&ex[0], &ex[1]]], 0, Device::Cpu),
        Batch::collate(&[&ex[2]], 0, Device::Cpu),
    ]);
    let scale = one.iter().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
    let diff = one.iter().zip(&split).map(|(a, b)| (a - b).abs().max().double_value(&[])).fold(0.0, f64::max);
    assert!(scale > 0.0 && diff <= 1e-6 * scale.max(1.0), "gradients differ by {diff} (largest {scale})");
}
