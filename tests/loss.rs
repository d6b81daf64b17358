//! The training loss computes logits only at target positions, a few rows at a time, and joins
//! their gradients to the body's backward by hand; it must equal the plain loss over full
//! logits, value and gradients.

mod common;

use common::fixture;
use lorafit::config::{LoraConfig, TargetModules};
use lorafit::data::format::IGNORE;
use lorafit::data::{Batch, Example};
use lorafit::lora;
use lorafit::model::load_model;
use lorafit::model::Decoder;
use lorafit::train::{token_loss_in_chunks, Backward};
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
    Example { input_ids: ids.to_vec(), labels, desirable: None }
}

/// A fixture model with adapters on `targets` (B non-zero, so that A gets gradients too).
fn adapted(family: &str, targets: &[&str], dropout: f64) -> (Decoder, Vec<Tensor>) {
    tch::manual_seed(0);
    let mut model = load_model(&fixture(family), Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
        dropout,
        ..LoraConfig::default()
    };
    let injected = lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
    let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    tch::no_grad(|| {
        for p in &params {
            p.shallow_clone().copy_(&(p.randn_like() * 0.05));
        }
    });
    (model, params)
}

/// Three examples of different lengths with masked prompts, one per row and packed.
fn batches() -> [Batch; 2] {
    let a = example(&[1, 17, 33, 90, 4, 250, 7, 9, 61], 3);
    let b = example(&[1, 40, 41, 42, 43], 1);
    let c = example(&[1, 200, 12, 13, 14, 15, 16], 2);
    [Batch::collate(&[&a, &b, &c], 0, Device::Cpu), Batch::pack(&[vec![&a, &b], vec![&c]], 0, Device::Cpu)]
}

fn assert_close(what: &str, want: &[Tensor], got: &[Tensor]) {
    for (w, g) in want.iter().zip(got) {
        let largest = w.abs().max().double_value(&[]);
        let diff = (w - g).abs().max().double_value(&[]);
        assert!(largest > 0.0, "{what}: a trainable tensor got no gradient");
        assert!(diff <= 1e-5 * largest, "{what}: gradient off by {diff} (largest {largest})");
    }
}

#[test]
fn chunked_target_only_loss_equals_the_full_logits_loss() {
    let _turn = common::global_rng_turn();
    // Untied with an adapted lm_head (llama3), tied (smollm2), tied with logit soft-capping (gemma2).
    for (family, targets) in [
        ("llama3", &["q_proj", "down_proj", "lm_head"][..]),
        ("smollm2", &["v_proj"][..]),
        ("gemma2", &["o_proj", "up_proj"][..]),
    ] {
        let (model, params) = adapted(family, targets, 0.0);
        for batch in &batches() {
            let scale = 1.0 / batch.label_tokens as f64;
            let want = full_logits_loss(&model, batch);
            (&want * scale).backward();
            let want_grads = grads(&params);
            let want = want.double_value(&[]);
            for rows in [3, 1000] {
                let backward = Backward { scale, checkpointing: false };
                let got = token_loss_in_chunks(&model, batch, Some(backward), rows).double_value(&[]);
                assert!(
                    (want - got).abs() <= 1e-5 * want.abs(),
                    "{family}, {rows} rows: loss {got} vs {want}"
                );
                assert_close(&format!("{family}, {rows} rows"), &want_grads, &grads(&params));
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

/// Activation checkpointing runs each block again in the backward pass, with the same dropout
/// masks (the adapters' and the model's own): the gradients equal those of the plain backward
/// pass.
#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let _turn = common::global_rng_turn();
    // Sliding-window layers and soft-capping (gemma2), an adapted lm_head (llama3), with adapter
    // dropout; GPT-2's own dropout on embeddings, attention probabilities and residual branches,
    // without adapter dropout.
    for (family, targets, adapter_dropout) in [
        ("gemma2", &["q_proj", "o_proj", "up_proj"][..], 0.1),
        ("llama3", &["v_proj", "lm_head"][..], 0.1),
        ("gpt2", &["c_attn", "c_fc"][..], 0.0),
    ] {
        let (model, params) = adapted(family, targets, adapter_dropout);
        for batch in &batches() {
            let scale = 1.0 / batch.label_tokens as f64;
            let run = |checkpointing: bool| {
                tch::manual_seed(7);
                let loss = token_loss_in_chunks(&model, batch, Some(Backward { scale, checkpointing }), 4);
                (loss.double_value(&[]), grads(&params))
            };
            let (plain_loss, plain) = run(false);
            let (loss, checkpointed) = run(true);
            assert!(
                (plain_loss - loss).abs() <= 1e-6 * plain_loss.abs(),
                "{family}: loss {loss} vs {plain_loss}"
            );
            assert_close(&format!("{family}, checkpointing"), &plain, &checkpointed);
            // Dropout is on: another seed gives other gradients, so the masks really were replayed.
            tch::manual_seed(8);
            let _ = token_loss_in_chunks(&model, batch, Some(Backward { scale, checkpointing: true }), 4);
            let other = grads(&params);
            let moved = plain.iter().zip(&other).any(|(a, b)| (a - b).abs().max().double_value(&[]) > 1e-6);
            assert!(moved, "{family}: dropout changed nothing");
        }
    }
}
