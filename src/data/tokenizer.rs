//! The model's tokenizer (`tokenizer.json`, read with HF `tokenizers`) as the data pipeline
//! uses it: ids with the byte ranges they stand for, and text back from ids.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;
use tokenizers::Tokenizer;

/// The tokenizer settings file beside `tokenizer.json` (special tokens, chat template).
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// `<dir>/tokenizer_config.json` as a JSON object; empty when the model has none.
pub fn read_tokenizer_config(dir: &Path) -> Result<Map<String, Value>> {
    let path = dir.join(TOKENIZER_CONFIG);
    if path.exists() {
        read_json_object(&path)
    } else {
        Ok(Map::new())
    }
}

/// A JSON file that must hold one object, with errors naming the file.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!("{} must hold a JSON object", path.display()),
        Err(e) => bail!("{} is not valid JSON: {e}", path.display()),
    }
}

/// The model's tokenizer plus the ids the data pipeline needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub eos_id: i64,
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json`; `eos_token_ids` are those of the model's `config.json`
    /// (the first ends training examples).
    pub fn from_model_dir(dir: &Path, eos_token_ids: &[i64]) -> Result<TextTokenizer> {
        let eos_id = match eos_token_ids.first() {
            Some(&id) => id,
            None => bail!(
                "{}/config.json has no eos_token_id; it is needed to end training examples",
                dir.display()
            ),
        };
        // transformers reads tokenizer_config.json for every data format; a damaged one is
        // reported here rather than ignored until a chat template is wanted.
        read_tokenizer_config(dir)?;
        Self::from_file(&dir.join("tokenizer.json"), eos_id)
    }

    /// Loads a `tokenizer.json`. Padding and truncation settings stored in the file are
    /// dropped: batching pads and `max_seq_len` truncates, each with its own accounting.
    pub fn from_file(path: &Path, eos_id: i64) -> Result<TextTokenizer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let mut json: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        if let Some(post) = json.get_mut("post_processor") {
            keep_whitespace_offsets(post);
        }
        let mut inner: Tokenizer = serde_json::from_value(json)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot configure tokenizer {}: {e}", path.display()))?;
        Ok(TextTokenizer { inner, eos_id })
    }

    /// Every token with its id, added tokens included.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding =
            self.inner.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// Many texts encoded in parallel, each token with the byte range of its text.
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Encoded>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(encodings
            .iter()
            .map(|e| Encoded {
                ids: e.get_ids().iter().map(|&id| id as i64).collect(),
                offsets: e.get_offsets().to_vec(),
            })
            .collect())
    }

    /// The largest token id, added tokens included.
    pub fn largest_id(&self) -> i64 {
        self.inner.get_vocab(true).into_values().max().map_or(-1, i64::from)
    }

    /// Text of `ids` without special tokens (BOS, EOS, ...).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode_all(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, false)
    }

    fn decode_with(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }
}

/// A text's token ids and the byte range of the text each token stands for (empty for the
/// tokens the post-processor adds, such as BOS).
pub struct Encoded {
    pub ids: Vec<i64>,
    pub offsets: Vec<(usize, usize)>,
}

/// Turns off `trim_offsets` in a post-processor (and the processors of a sequence). It changes
/// no id, only offsets: trimmed, a token of only whitespace (`\n`) gets an empty range placed
/// after itself, which would label it by the text that follows.
fn keep_whitespace_offsets(post: &mut Value) {
    if let Some(flag) = post.get_mut("trim_offsets") {
        *flag = Value::Bool(false);
    }
    if let Some(Value::Array(processors)) = post.get_mut("processors") {
        processors.iter_mut().for_each(keep_whitespace_offsets);
    }
}
