//! Error messages in the words of the YAML file: serde_yaml's errors reworded, "did you mean"
//! suggestions, and the file position of a key.

use anyhow::anyhow;
use serde_yaml::Value;

/// Where a piece of configuration came from, for the start of an error message.
pub(super) enum Origin<'a> {
    File(&'a str),
    Override(&'a str),
}

impl Origin<'_> {
    pub(super) fn prefix(&self, location: Option<(usize, usize)>) -> String {
        match (self, location) {
            (Origin::File(name), Some((line, column))) => format!("{name}:{line}:{column}: "),
            (Origin::File(name), None) => format!("{name}: "),
            (Origin::Override(set), _) => format!("in --set {set}: "),
        }
    }
}

/// serde_yaml's message without its trailing " at line L column C" (the caller prints the
/// position in front).
pub(super) fn strip_location(error: &serde_yaml::Error) -> String {
    let text = error.to_string();
    match error.location() {
        Some(l) => text.replacen(&format!(" at line {} column {}", l.line(), l.column()), "", 1),
        None => text,
    }
}

/// One thing wrong with a config: the message with its origin in front, the file position it
/// sorts by, and the dotted key it concerns.
pub(super) struct Problem {
    pub(super) location: Option<(usize, usize)>,
    pub(super) key: String,
    pub(super) message: String,
}

/// All problems as one error: a single one as its own line, several one per line under a header
/// naming the file, in the order of the file (those without a position last).
pub(super) fn report(source_name: &str, mut problems: Vec<Problem>) -> anyhow::Error {
    problems.sort_by_key(|p| (p.location.is_none(), p.location));
    if let [single] = problems.as_slice() {
        return anyhow!("{}", single.message);
    }
    let lines: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    anyhow!("{source_name}: {} problems:\n{}", problems.len(), lines.join("\n"))
}

/// A serde_yaml deserialization error as a [`Problem`]. `yaml`, when given, is the file text the
/// error's position refers to; without it the position is looked up in `file_text` by key.
pub(super) fn explain(
    error: &serde_yaml::Error,
    origin: &Origin,
    yaml: Option<&str>,
    file_text: &str,
) -> Problem {
    let text = strip_location(error);
    let (path, message) = split_path(&text);
    let key = error_key(path, message);
    let location = match (origin, yaml) {
        (Origin::Override(_), _) => None,
        (Origin::File(_), Some(_)) => error.location().map(|l| (l.line(), l.column())),
        (Origin::File(_), None) if message.starts_with("unknown field ") => {
            locate_or_section(file_text, &key)
        }
        (Origin::File(_), None) => {
            locate_value(file_text, &key).or_else(|| locate_or_section(file_text, &key))
        }
    };
    Problem { location, message: format!("{}{}", origin.prefix(location), describe(path, message)), key }
}

/// The dotted key an error is about: the unknown key itself, or the value's key without list
/// indices.
fn error_key(path: Option<&str>, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        if let Some(name) = backticked(rest).first() {
            return join_key(path, name);
        }
    }
    let path = path.unwrap_or("");
    path.split_once('[').map_or(path, |(key, _)| key).to_string()
}

/// serde_yaml writes "dotted.path: message" (no path at the top level).
pub(super) fn split_path(text: &str) -> (Option<&str>, &str) {
    if let Some((path, rest)) = text.split_once(": ") {
        let is_path =
            !path.is_empty() && path.chars().all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c));
        if is_path {
            return (Some(path), rest);
        }
    }
    (None, text)
}

/// The names between backticks, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

pub(super) fn join_key(path: Option<&str>, name: &str) -> String {
    match path {
        Some(path) => format!("{path}.{name}"),
        None => name.to_string(),
    }
}

fn describe(path: Option<&str>, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((unknown, valid)) = names.split_first() {
            return unknown_key(path, unknown, valid);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        if let Some((unknown, valid)) = names.split_first() {
            return unknown_value(path, unknown, valid);
        }
    }
    if let Some(rest) = message.strip_prefix("duplicate field ") {
        if let Some(name) = backticked(rest).first() {
            return format!("key `{}` is given twice; keep one", join_key(path, name));
        }
    }
    let mismatch = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "));
    if let Some((found, expected)) = mismatch.and_then(|rest| rest.rsplit_once(", expected ")) {
        let expected = match (expected, path.and_then(allowed_values)) {
            ("a YAML tag starting with '!'", Some(values)) => {
                format!("one of {}", values.join(", "))
            }
            _ => plain_expected(expected),
        };
        let found = plain_found(found);
        return match path {
            Some(path) => format!("`{path}` must be {expected}, found {found}"),
            None => format!("expected {expected}, found {found}"),
        };
    }
    match path {
        Some(path) => format!("`{path}`: {message}"),
        None => message.to_string(),
    }
}

fn unknown_key(path: Option<&str>, unknown: &str, valid: &[&str]) -> String {
    let full = join_key(path, unknown);
    let kind = if path.is_some() { "key" } else { "section" };
    if let Some(close) = suggest(unknown, valid) {
        return format!("unknown {kind} `{full}`; did you mean `{close}`?");
    }
    match path {
        Some(path) => format!("unknown key `{full}`; the keys of `{path}` are: {}", valid.join(", ")),
        None => format!("unknown section `{full}`; the sections are: {}", valid.join(", ")),
    }
}

fn unknown_value(path: Option<&str>, unknown: &str, valid: &[&str]) -> String {
    let key = path.unwrap_or("value");
    let allowed = valid.join(", ");
    match suggest(unknown, valid) {
        Some(close) => {
            format!("unknown value `{unknown}` for `{key}`; did you mean `{close}`? (allowed: {allowed})")
        }
        None => format!("unknown value `{unknown}` for `{key}`; allowed: {allowed}"),
    }
}

/// The YAML spellings of the enum-valued keys.
fn allowed_values(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "model.dtype" => &["auto", "fp32", "bf16", "fp16"],
        "lora.init" => &["kaiming", "gaussian"],
        "data.format" => &["completion", "alpaca", "input_output", "chat"],
        "data.train_on" => &["assistant", "last", "all"],
        "data.on_bad_row" => &["error", "skip"],
        "data.too_long" => &["truncate", "skip", "error"],
        "train.on_nonfinite" => &["stop", "skip"],
        "train.objective" => &["sft", "dpo", "ipo", "orpo", "kto", "distill"],
        "distill.loss" => &["forward_kl", "reverse_kl", "jsd"],
        "train.lr_scheduler" => &["constant", "linear", "cosine"],
        "train.precision" => &["auto", "fp32", "bf16-mixed", "fp16-mixed"],
        _ => return None,
    })
}

/// serde's "expected" wording in the words of the YAML file.
fn plain_expected(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number >= 0".to_string(),
        "i64" | "i32" => "a whole number".to_string(),
        "f64" | "f32" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "path string" => "a path".to_string(),
        "a sequence" => "a list".to_string(),
        "field identifier" => "a key name".to_string(),
        other if other.starts_with("struct ") => "a section of `key: value` lines".to_string(),
        other => other.to_string(),
    }
}

/// serde's description of the value found, in the words of the YAML file.
fn plain_found(found: &str) -> String {
    match found {
        "unit value" => "null".to_string(),
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        other => other.to_string(),
    }
}

pub(super) fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Names other tools use for our keys.
const SYNONYMS: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("rank", "r"),
    ("lora_r", "r"),
    ("lora_alpha", "alpha"),
    ("lora_dropout", "dropout"),
    ("batch_size", "micro_batch_size"),
    ("per_device_train_batch_size", "micro_batch_size"),
    ("gradient_accumulation_steps", "grad_accum_steps"),
    ("num_epochs", "epochs"),
    ("num_train_epochs", "epochs"),
    ("max_length", "max_seq_len"),
    ("seq_len", "max_seq_len"),
    ("cutoff_len", "max_seq_len"),
    ("scheduler", "lr_scheduler"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("clip_grad_norm", "max_grad_norm"),
    ("activation_checkpointing", "gradient_checkpointing"),
    ("enable_activation_checkpointing", "gradient_checkpointing"),
    ("output_dir", "dir"),
    ("model_name_or_path", "path"),
    ("eval", "validation"),
];

/// The candidate the user most likely meant by `input`: a known synonym, the same name up to
/// case and `-`/`_`, a name containing it (or contained in it), or one within a small edit
/// distance.
pub(super) fn suggest<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normalize = |s: &str| s.trim().to_lowercase().replace('-', "_");
    let wanted = normalize(input);
    if wanted.is_empty() {
        return None;
    }
    for (from, to) in SYNONYMS {
        if *from == wanted {
            if let Some(found) = candidates.iter().find(|c| *c == to) {
                return Some(found);
            }
        }
    }
    let wanted_len = wanted.chars().count();
    let limit = wanted_len.max(3) / 3;
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let name = normalize(candidate);
        let distance = edit_distance(&wanted, &name);
        let related = (wanted_len >= 3 && name.contains(&wanted))
            || (name.chars().count() >= 3 && wanted.contains(&name));
        if (distance <= limit || related) && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// The position of `key`, or else of its section.
pub(super) fn locate_or_section(yaml: &str, key: &str) -> Option<(usize, usize)> {
    let section = key.split('.').next().unwrap_or(key);
    locate(yaml, key).or_else(|| locate(yaml, section))
}

/// The 1-based line and column of the value of `key` (dotted) in block-style YAML: after the
/// colon, or the first line below it.
pub(super) fn locate_value(yaml: &str, key: &str) -> Option<(usize, usize)> {
    let (line, column) = locate(yaml, key)?;
    let lines: Vec<&str> = yaml.lines().collect();
    let text = lines.get(line - 1)?;
    let after_key = text.get(column - 1..)?;
    let after_colon = &after_key[after_key.find(':')? + 1..];
    let value = after_colon.trim_start_matches(' ');
    if !value.is_empty() && !value.starts_with('#') {
        return Some((line, text.len() - value.len() + 1));
    }
    lines.iter().enumerate().skip(line).find_map(|(index, below)| {
        let content = below.trim_start_matches(' ');
        let blank = content.is_empty() || content.starts_with('#');
        (!blank).then(|| (index + 1, below.len() - content.len() + 1))
    })
}

/// The 1-based line and column of `key` (dotted) in block-style YAML, if it can be found.
pub(super) fn locate(yaml: &str, key: &str) -> Option<(usize, usize)> {
    let mut segments = key.split('.');
    let mut wanted = segments.next()?;
    // The indentation of the last matched key; lines must be deeper to belong to it.
    let mut parent_indent: Option<usize> = None;
    for (index, line) in yaml.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        match parent_indent {
            Some(parent) if indent <= parent => return None,
            None if indent > 0 => continue,
            _ => {}
        }
        let is_key =
            content.strip_prefix(wanted).is_some_and(|rest| rest.trim_start_matches(' ').starts_with(':'));
        if is_key {
            match segments.next() {
                Some(next) => {
                    wanted = next;
                    parent_indent = Some(indent);
                }
                None => return Some((index + 1, indent + 1)),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        DataFormat, Divergence, LoraInit, LrScheduler, Objective, OnBadRow, OnNonFinite, Precision, TooLong,
        TrainOn, WeightDtype, ALL_LINEAR, SECTIONS,
    };
    use std::fmt;

    #[test]
    fn edit_distance_counts_swaps_once() {
        assert_eq!(edit_distance("train", "trian"), 1);
        assert_eq!(edit_distance("lr_sheduler", "lr_scheduler"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        let train = ["seed", "epochs", "lr", "lr_scheduler", "warmup_steps", "max_steps"];
        assert_eq!(suggest("lr_sheduler", &train), Some("lr_scheduler"));
        assert_eq!(suggest("learning_rate", &train), Some("lr"));
        assert_eq!(suggest("warmup", &train), Some("warmup_steps"));
        assert_eq!(suggest("epoch", &train), Some("epochs"));
        assert_eq!(suggest("zzzzzz", &train), None);
        assert_eq!(suggest("bf16", &["fp32", "bf16-mixed"]), Some("bf16-mixed"));
        assert_eq!(suggest("BF16_MIXED", &["fp32", "bf16-mixed"]), Some("bf16-mixed"));
        assert_eq!(suggest("trian", &SECTIONS), Some("train"));
        assert_eq!(suggest("all_linear", &[ALL_LINEAR]), Some(ALL_LINEAR));
        assert_eq!(suggest("q_proj", &[ALL_LINEAR]), None);
        // Synonyms only point at keys of the section in question.
        assert_eq!(suggest("learning_rate", &["r", "alpha"]), None);
    }

    #[test]
    fn locate_finds_nested_block_keys() {
        let yaml = "# top\nmodel:\n  path: x\ntrain:\n  # lr below\n  lr: 0\n  epochs: 0\nlr: 1\n";
        assert_eq!(locate(yaml, "model"), Some((2, 1)));
        assert_eq!(locate(yaml, "train.lr"), Some((6, 3)));
        assert_eq!(locate(yaml, "train.epochs"), Some((7, 3)));
        assert_eq!(locate(yaml, "model.lr"), None);
        assert_eq!(locate(yaml, "lora.r"), None);
        assert_eq!(locate("train: {lr: 0}\n", "train.lr"), None);
    }

    #[test]
    fn split_path_recognises_dotted_prefixes() {
        assert_eq!(
            split_path("train.lr: invalid type: string \"x\", expected f64"),
            (Some("train.lr"), "invalid type: string \"x\", expected f64")
        );
        assert_eq!(
            split_path("lora.target_modules[1]: invalid type: map, expected a string"),
            (Some("lora.target_modules[1]"), "invalid type: map, expected a string")
        );
        assert_eq!(
            split_path("invalid type: sequence, expected struct Config"),
            (None, "invalid type: sequence, expected struct Config")
        );
    }

    #[test]
    fn allowed_values_match_the_enums() {
        fn check<T: serde::de::DeserializeOwned + fmt::Debug>(key: &str) {
            let values = allowed_values(key).unwrap();
            for value in values {
                serde_yaml::from_str::<T>(value).unwrap_or_else(|e| panic!("{key}: {value}: {e}"));
            }
            // serde lists the variants in its error for an unknown one: the same set.
            let error = serde_yaml::from_str::<T>("nonsense").unwrap_err().to_string();
            assert_eq!(&backticked(&error)[1..], values, "{key}");
        }
        check::<WeightDtype>("model.dtype");
        check::<LoraInit>("lora.init");
        check::<DataFormat>("data.format");
        check::<TrainOn>("data.train_on");
        check::<OnBadRow>("data.on_bad_row");
        check::<TooLong>("data.too_long");
        check::<OnNonFinite>("train.on_nonfinite");
        check::<Objective>("train.objective");
        check::<Divergence>("distill.loss");
        check::<LrScheduler>("train.lr_scheduler");
        check::<Precision>("train.precision");
    }
}
