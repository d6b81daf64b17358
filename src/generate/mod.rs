//! Decoding, to try a model or an adapter: a KV cache so each new token costs one token's
//! work, and greedy or sampled choice (temperature, top-k, top-p, seeded); and `lorafit
//! generate`, which puts a prompt to a model as a run's data put its examples, or every prompt
//! of a file ([`bulk`]).

pub mod bulk;

use crate::config::Config;
use crate::data::format::{resolve_format, ChatFormat, PromptFormat};
use crate::data::TextTokenizer;
use crate::lora::peft;
use crate::model::{load_model, Decoder, KvCache, ModelSpec};
use crate::torch_errors;
use anyhow::{bail, Context, Result};
pub use bulk::BulkFiles;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
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

    /// Refuses settings transformers' `generate` refuses, naming the flag: a temperature that is
    /// not a finite number ≥ 0 (0 is greedy, as `do_sample=False`), a negative top-k (0 means no
    /// limit, as transformers' `top_k=0`), a top-p outside (0, 1] (1 keeps every token).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature {}: give a finite number ≥ 0 (0 is greedy)", self.temperature);
        }
        if let Some(k) = self.top_k.filter(|&k| k < 0) {
            bail!("--top-k {k}: give a number of tokens ≥ 1, or 0 for no limit");
        }
        if let Some(p) = self.top_p.filter(|&p| !(p > 0.0 && p <= 1.0)) {
            bail!("--top-p {p}: give a probability in (0, 1] (1 keeps every token)");
        }
        Ok(())
    }
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
    // A temperature too small for float32 is the greedy limit (dividing by it would give NaN).
    if (sampling.temperature as f32) < f32::MIN_POSITIVE {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    // Shifted so the largest is 0: a tiny temperature then makes the others -inf, not inf - inf.
    let logits = logits.to_kind(Kind::Float);
    let mut logits = (&logits - logits.max()) / sampling.temperature;
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
        // Learned positions (GPT-2) end at the model's last one, so decoding stops there too.
        let room = match model.spec.rope {
            None => (model.spec.positions() as usize).saturating_sub(prompt_ids.len()),
            Some(_) => usize::MAX,
        };
        for _ in 0..max_new_tokens.min(room) {
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

/// What `lorafit generate` is asked for.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The model directory, when neither `run` nor `config` names it.
    pub model: Option<PathBuf>,
    /// A training run's directory: its model, its adapter (unless `adapter` says otherwise) and
    /// its prompt format.
    pub run: Option<PathBuf>,
    /// A run's config: its model and prompt format (the adapter only from `adapter`).
    pub config: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    /// One prompt, answered on `out` as it is generated; or `bulk`, a file of prompts.
    pub prompt: Option<String>,
    pub bulk: Option<BulkFiles>,
    /// Without a run or config: send the prompt through the chat template `template`.
    pub chat: bool,
    pub template: String,
    /// Print the base model's answer before the adapted one.
    pub compare: bool,
    /// Print the exact text put to the model to stderr first.
    pub show_prompt: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// A model, its tokenizer and the prompt format `lorafit generate` puts prompts in.
struct Generator {
    /// The run's config, when the prompt format comes from a run.
    run_config: Option<Config>,
    chat: Option<ChatFormat>,
    tok: TextTokenizer,
    vocab_size: i64,
    stop: Vec<i64>,
    model: Decoder,
    adapter: Option<PathBuf>,
    device: Device,
}

impl Generator {
    /// Reads the model, tokenizer and prompt format `opts` names; the adapter is not applied yet.
    fn open(opts: &GenerateOptions) -> Result<Generator> {
        let run_config = match (&opts.run, &opts.config) {
            (Some(dir), _) => Some(Config::load(&dir.join("config.yaml"), &[]).map_err(|e| {
                anyhow::anyhow!(
                    "--run {}: {e:#} (is it a run directory written by lorafit train?)",
                    dir.display()
                )
            })?),
            (None, Some(path)) => {
                let mut cfg = Config::load(path, &[])?;
                // The prompts take the format the run's data was detected in; unsaid here.
                resolve_format(&mut cfg.data)?;
                Some(cfg)
            }
            (None, None) => None,
        };
        let adapter = opts.adapter.clone().or_else(|| opts.run.as_ref().map(|dir| dir.join("adapter")));
        let model_dir = match (&run_config, &opts.model, &opts.adapter) {
            (Some(cfg), _, _) => cfg.model.path.clone(),
            (None, Some(dir), _) => dir.clone(),
            (None, None, Some(adapter)) => peft::base_model_dir(adapter, None)?,
            (None, None, None) => bail!("give --model, --run or --config"),
        };
        if opts.compare && adapter.is_none() {
            bail!("--compare needs an adapter: give --adapter or --run");
        }
        let device = Device::cuda_if_available();
        let spec = ModelSpec::from_dir(&model_dir)?;
        let tok = TextTokenizer::from_model_dir(&model_dir, &spec.eos_token_ids)?;
        let chat = match &run_config {
            Some(cfg) => ChatFormat::of_data(&cfg.data, &model_dir)?,
            None if opts.chat => Some(ChatFormat::resolve(&opts.template, &model_dir)?),
            None => None,
        };
        let stop = stop_tokens(&model_dir, &spec.eos_token_ids, chat.as_ref(), &tok)?;
        let model = load_model(&model_dir, Kind::Float, device)?;
        Ok(Generator { run_config, chat, tok, vocab_size: spec.vocab_size, stop, model, adapter, device })
    }

    /// How prompts are put to the model: as the run's data put its examples, or as asked.
    fn format(&self) -> PromptFormat<'_> {
        match (&self.run_config, &self.chat) {
            (Some(cfg), _) => PromptFormat::of_data(&cfg.data, self.chat.as_ref()),
            (None, Some(chat)) => PromptFormat::Chat(chat),
            (None, None) => PromptFormat::Text,
        }
    }

    /// Refuses a prompt holding a token the model has no embedding row for.
    fn check_ids(&self, prompt_ids: &[i64]) -> Result<()> {
        if let Some(&id) = prompt_ids.iter().find(|&&id| id >= self.vocab_size) {
            bail!(
                "the prompt holds token id {id}, but the model's embedding has {} rows: the tokenizer is larger \
                 than the model",
                self.vocab_size
            );
        }
        Ok(())
    }

    fn apply_adapter(&mut self) -> Result<()> {
        if let Some(adapter) = &self.adapter {
            peft::load(adapter, &mut self.model, self.device)?;
        }
        Ok(())
    }

    /// The new tokens for `prompt_ids`, each passed to `on_token` as it is chosen.
    fn answer(
        &self,
        prompt_ids: &[i64],
        opts: &GenerateOptions,
        on_token: impl FnMut(i64),
    ) -> Result<Vec<i64>> {
        let decode = || {
            generate(
                &self.model,
                prompt_ids,
                opts.max_new_tokens,
                &self.stop,
                &opts.sampling,
                self.device,
                on_token,
            )
        };
        torch_errors::catch("generating", "--max-new-tokens or the prompt's length", decode)
    }
}

/// `lorafit generate`: streams the continuation of the prompt to `out`, and with `compare` the
/// base model's before the adapted one; or answers every prompt of a file (see [`bulk`]).
pub fn generate_command(opts: &GenerateOptions, out: &mut dyn Write) -> Result<()> {
    opts.sampling.validate()?;
    if let Some(files) = &opts.bulk {
        // Before the model is loaded: a file that would be overwritten or cannot be read.
        files.check_out()?;
        let prompts = bulk::read_prompts(&files.prompts)?;
        let mut generator = Generator::open(opts)?;
        generator.apply_adapter()?;
        let written = bulk::answer_all(&generator, opts, &prompts, files)?;
        writeln!(out, "wrote {written} answered records to {}", files.out.display())?;
        return Ok(());
    }
    let Some(prompt) = &opts.prompt else { bail!("give --prompt TEXT or --prompts FILE.jsonl") };
    let mut generator = Generator::open(opts)?;
    let prompt_ids = generator.format().ids(&generator.tok, prompt)?;
    generator.check_ids(&prompt_ids)?;
    if opts.show_prompt {
        eprintln!("{}", generator.tok.decode_all(&prompt_ids)?);
    }
    let mut stream = |generator: &Generator, label: &str| -> Result<()> {
        if !label.is_empty() {
            writeln!(out, "── {label} ──")?;
        }
        let (mut ids, mut shown) = (Vec::new(), 0usize);
        generator.answer(&prompt_ids, opts, |id| {
            ids.push(id);
            // Decode everything so far and print what is new: tokens can join into one character.
            if let Ok(text) = generator.tok.decode(&ids) {
                if text.len() > shown && text.is_char_boundary(shown) {
                    let _ = write!(out, "{}", &text[shown..]);
                    let _ = out.flush();
                    shown = text.len();
                }
            }
        })?;
        writeln!(out)?;
        Ok(())
    };
    if opts.compare {
        stream(&generator, "base model")?;
    }
    generator.apply_adapter()?;
    stream(&generator, if opts.compare { "with the adapter" } else { "" })
}
