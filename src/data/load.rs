//! A run's data, read once for every command that uses it (train, eval, data preview and
//! export): the model's tokenizer, the chat template, and the prepared examples, from the data
//! cache when the same inputs were prepared before.

use super::cache;
use super::format::{prepare_splits, train_formats, ChatFormat, Examples, Prepared};
use super::tokenizer::TextTokenizer;
use crate::config::Config;
use anyhow::{bail, Result};
use std::path::PathBuf;

/// The tokenizer, chat template and prepared data of a run: everything read from the user's
/// data files, checked before any work starts.
pub struct RunData {
    pub tokenizer: TextTokenizer,
    /// The chat template of chat data.
    pub chat: Option<ChatFormat>,
    pub train: Prepared,
    pub validation: Option<Prepared>,
    /// Taken from the data cache rather than prepared.
    pub cached: bool,
    /// Where freshly prepared data belongs in the cache ([`RunData::store_in_cache`]).
    cache_entry: PathBuf,
}

impl RunData {
    /// Refuses data the model cannot embed: a token id at or beyond the model's `embedding_rows`
    /// (config.json's `vocab_size`), freshly prepared or read from the cache. A tokenizer with
    /// more ids than that, none of which the data uses, only gets a warning.
    fn check_vocabulary(&self, embedding_rows: i64) -> Result<()> {
        for (name, set) in self.sets() {
            if let Some((i, &id)) = set.examples.iter().enumerate().find_map(|(i, ex)| {
                ex.input_ids.iter().find(|&&id| id < 0 || id >= embedding_rows).map(|id| (i, id))
            }) {
                bail!(
                    "{name} example {} holds token id {id}, but the model's embedding has {embedding_rows} rows \
                     (vocab_size in config.json): the tokenizer is larger than the model. Use the tokenizer that \
                     belongs to the model",
                    i + 1
                );
            }
        }
        let largest = self.tokenizer.largest_id();
        if largest >= embedding_rows {
            eprintln!(
                "warning: the tokenizer has ids up to {largest} (added tokens included) but the model's embedding \
                 has {embedding_rows} rows; the data uses none of them, but generated prompts that do will be refused"
            );
        }
        Ok(())
    }

    /// Refuses an example longer than the model has positions for: learned positions (GPT-2)
    /// end there, and rotary ones were never trained beyond it.
    fn check_positions(&self, positions: i64, cfg: &Config) -> Result<()> {
        for (name, set) in self.sets() {
            let too_long =
                set.examples.iter().enumerate().find(|(_, ex)| ex.input_ids.len() as i64 > positions);
            if let Some((i, ex)) = too_long {
                bail!(
                    "{name} example {} has {} tokens, but the model in {} has {positions} positions \
                     in its config.json: set data.max_seq_len to {positions} or less \
                     (it is {}); longer examples are then cut or skipped as data.too_long says",
                    i + 1,
                    ex.input_ids.len(),
                    cfg.model.path.display(),
                    cfg.data.max_seq_len
                );
            }
        }
        Ok(())
    }

    /// The training set and, when there is one, the validation set, each with its name.
    fn sets(&self) -> impl Iterator<Item = (&'static str, &Prepared)> {
        std::iter::once(("training", &self.train)).chain(self.validation.iter().map(|v| ("validation", v)))
    }

    /// Saves freshly prepared data for the next run. Called once the run has passed every
    /// check, so that a refused run leaves nothing behind.
    pub fn store_in_cache(&self) {
        if self.cached {
            return;
        }
        // A cache that cannot be written only costs the next run its head start.
        if let Err(e) = cache::store(&self.cache_entry, &self.train, self.validation.as_ref()) {
            eprintln!("warning: could not cache the prepared data: {e:#}");
        }
    }
}

/// What preparing data must know of the model it is for, from the model's `config.json`.
pub struct ModelFacts<'a> {
    /// The ids that end a sequence; the first is appended to each example.
    pub eos_token_ids: &'a [i64],
    /// Rows of the embedding (`vocab_size`): every token id must be below it.
    pub embedding_rows: i64,
    /// The longest sequence the model's positions cover.
    pub positions: i64,
}

/// Reads and prepares the data `cfg` names for the model in `cfg.model.path`, or takes it from
/// the data cache in `<output.dir>/.data-cache/` when the same inputs were prepared before.
/// Either way every example is checked against the model's embedding and positions before the
/// data is returned.
pub fn load_data(cfg: &Config, model: &ModelFacts) -> Result<RunData> {
    let tokenizer = TextTokenizer::from_model_dir(&cfg.model.path, model.eos_token_ids)?;
    let chat = ChatFormat::of_data(&cfg.data, &cfg.model.path)?;
    let key = cache::key_for(cfg, tokenizer.eos_id, chat.as_ref().map(|c| c.template.source()))?;
    let entry = cache::entry(&cfg.output.dir.join(".data-cache"), &key);
    let data = match cache::load(&entry) {
        Some((train, validation)) => {
            RunData { tokenizer, chat, train, validation, cached: true, cache_entry: entry }
        }
        None => {
            let examples = Examples::of(cfg.train.objective);
            let (train, validation) =
                prepare_splits(&cfg.data, cfg.train.seed, &tokenizer, chat.as_ref(), examples)?;
            RunData { tokenizer, chat, train, validation, cached: false, cache_entry: entry }
        }
    };
    data.check_vocabulary(model.embedding_rows)?;
    data.check_positions(model.positions, cfg)?;
    // A validation file is read with data.format; a held-out share has the training formats.
    let train_formats = train_formats(&cfg.data);
    let validation_formats = match cfg.data.validation {
        Some(_) => vec![cfg.data.format],
        None => train_formats.clone(),
    };
    for ((name, set), formats) in data.sets().zip([&train_formats, &validation_formats]) {
        if let Some(warning) = set.loss_warning(name, &cfg.data, formats) {
            eprintln!("warning: {warning}");
        }
    }
    Ok(data)
}
