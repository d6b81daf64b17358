//! A run's data, read once for every command that uses it (train, eval, data preview and
//! export): the model's tokenizer, the chat template, and the prepared examples, from the data
//! cache when the same inputs were prepared before.

use super::cache;
use super::format::{prepare_splits, ChatFormat, Prepared};
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
        let sets = std::iter::once(("training", &self.train))
            .chain(self.validation.iter().map(|v| ("validation", v)));
        for (name, set) in sets {
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

/// Reads and prepares the data `cfg` names for the model in `cfg.model.path` (whose
/// `config.json` gives `eos_token_ids` and, as `vocab_size`, its `embedding_rows`), or takes it
/// from the data cache in `<output.dir>/.data-cache/` when the same inputs were prepared before.
/// Either way every id is checked against the embedding before the data is returned.
pub fn load_data(cfg: &Config, eos_token_ids: &[i64], embedding_rows: i64) -> Result<RunData> {
    let tokenizer = TextTokenizer::from_model_dir(&cfg.model.path, eos_token_ids)?;
    let chat = ChatFormat::of_data(&cfg.data, &cfg.model.path)?;
    let key = cache::key_for(cfg, tokenizer.eos_id, chat.as_ref().map(|c| c.template.source()))?;
    let entry = cache::entry(&cfg.output.dir.join(".data-cache"), &key);
    let data = match cache::load(&entry) {
        Some((train, validation)) => {
            RunData { tokenizer, chat, train, validation, cached: true, cache_entry: entry }
        }
        None => {
            let (train, validation) = prepare_splits(&cfg.data, cfg.train.seed, &tokenizer, chat.as_ref())?;
            RunData { tokenizer, chat, train, validation, cached: false, cache_entry: entry }
        }
    };
    data.check_vocabulary(embedding_rows)?;
    Ok(data)
}
