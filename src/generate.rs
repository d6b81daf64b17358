//! Decoding, to try a model or an adapter: a KV cache so each new token costs one token's
//! work, and greedy or sampled choice (temperature, top-k, top-p, seeded).

use crate::data::format::{ChatFormat, TextTokenizer};
use crate::model::{Decoder, KvCache};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How the next token is chosen. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_k: None, top_p: None, seed: 0 };
}

/// The tokens after which an answer ends: the EOS ids of the model's `config.json`
/// (`config_eos`) and `generation_config.json` (which instruct models use for their end-of-turn
/// token: Llama 3.1 Instruct's `<|eot_id|>`), and the chat template's end-of-turn marker when it
/// is one token.
pub fn stop_tokens(
    model_dir: &Path,
    config_eos: &[i64],
    chat: Option<&ChatFormat>,
    tok: &TextTokenizer,
) -> Result<Vec<i64>> {
    let mut stop = config_eos.to_vec();
    let path = model_dir.join("generation_config.json");
    if path.exists() {
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n.as_i64()],
            Some(Value::Array(list)) => list.iter().map(Value::as_i64).collect(),
            Some(other) => vec![other.as_i64()],
        };
        let Some(ids) = ids.into_iter().collect::<Option<Vec<i64>>>() else {
            bail!("{}: `eos_token_id` must be a token id or a list of token ids", path.display());
        };
        stop.extend(ids);
    }
    if let Some(chat) = chat {
        if let Ok(marker) = chat.template.end_of_turn() {
            if let Ok([id]) = tok.encode(marker.trim(), false).as_deref() {
                stop.push(*id);
            }
        }
    }
    stop.sort_unstable();
    stop.dedup();
    Ok(stop)
}

/// The next token from the logits `[vocab]` of the last position.
fn choose(logits: &Tensor, sampling: &Sampling) -> i64 {
    if sampling.temperature <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let mut logits = logits.to_kind(Kind::Float) / sampling.temperature;
    if let Some(k) = sampling.top_k.filter(|&k| k > 0 && k < logits.size()[0]) {
        let kth = logits.topk(k, -1, true, true).0.get(k - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if let Some(p) = sampling.top_p.filter(|&p| p < 1.0) {
        // Keep the smallest set of most likely tokens whose probability reaches p.
        let (sorted, order) = logits.sort(-1, true);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let drop_sorted = (&cumulative - sorted.softmax(-1, Kind::Float)).gt(p);
        let drop = drop_sorted.zeros_like().scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits.softmax(-1, Kind::Float).multinomial(1, false).int64_value(&[0])
}

/// Appends up to `max_new_tokens` tokens to `prompt_ids`, stopping after any of `stop`; calls
/// `on_token` with each new token as it is chosen (for streaming). Returns the new tokens.
pub fn generate(
    model: &Decoder,
    prompt_ids: &[i64],
    max_new_tokens: usize,
    stop: &[i64],
    sampling: &Sampling,
    device: Device,
    mut on_token: impl FnMut(i64),
) -> Vec<i64> {
    tch::manual_seed(sampling.seed as i64);
    let mut out = Vec::new();
    tch::no_grad(|| {
        let mut cache = KvCache::new(model);
        let mut input = Tensor::from_slice(prompt_ids).view([1, -1]).to_device(device);
        for _ in 0..max_new_tokens {
            let logits = model.forward_cached(&input, &mut cache);
            let next = choose(&logits.get(0).get(-1), sampling);
            out.push(next);
            on_token(next);
            if stop.contains(&next) {
                break;
            }
            input = Tensor::from_slice(&[next]).view([1, 1]).to_device(device);
        }
    });
    out
}

/// Greedy decoding (see [`generate`]), stopping after `stop_at` if given.
pub fn greedy(
    model: &Decoder,
    prompt_ids: &[i64],
    max_new_tokens: usize,
    stop_at: Option<i64>,
    device: Device,
) -> Vec<i64> {
    let stop: Vec<i64> = stop_at.into_iter().collect();
    generate(model, prompt_ids, max_new_tokens, &stop, &Sampling::GREEDY, device, |_| {})
}

/// Greedy decoding that re-runs the whole sequence for every token: the reference the KV cache
/// is measured against.
pub fn greedy_without_cache(
    model: &Decoder,
    prompt_ids: &[i64],
    max_new_tokens: usize,
    device: Device,
) -> Vec<i64> {
    let mut ids = prompt_ids.to_vec();
    tch::no_grad(|| {
        for _ in 0..max_new_tokens {
            let input = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
            let next = model.forward(&input, false).get(0).get(-1).argmax(-1, false).int64_value(&[]);
            ids.push(next);
        }
    });
    ids.split_off(prompt_ids.len())
}
