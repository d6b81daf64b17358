//! The run configuration as a user meets it: defaults, the reference file, `--set` overrides,
//! and the error messages for every kind of mistake.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lorafit::config::*;
use serde_yaml::Value;

mod common;

/// The smallest valid config.
const BASE: &str = "model:\n  path: models/base\ndata:\n  train: data/train.jsonl\n";

fn reference_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/reference.yaml")
}

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().map(|s| s.to_string()).collect()
}

fn parse(yaml: &str, overrides: &[&str]) -> Config {
    Config::from_yaml_str(yaml, "run.yaml", &sets(overrides))
        .unwrap_or_else(|e| panic!("expected {yaml:?} with {overrides:?} to load: {e:#}"))
}

/// The error for `yaml` with `overrides`, checked to be a single paragraph.
fn error(yaml: &str, overrides: &[&str]) -> String {
    match Config::from_yaml_str(yaml, "run.yaml", &sets(overrides)) {
        Ok(config) => panic!("expected an error for {yaml:?} with {overrides:?}, got {config:?}"),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(!message.contains('\n'), "not one paragraph: {message}");
            assert_eq!(message, format!("{e}"), "error has a context chain: {e:?}");
            message
        }
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "missing {part:?} in: {message}");
    }
}

/// Every dotted key of the mappings in `value` (sections and their keys).
fn dotted_keys(value: &Value, prefix: &str, keys: &mut BTreeSet<String>) {
    if let Value::Mapping(map) = value {
        for (key, child) in map {
            let key = key.as_str().expect("string keys");
            let full = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
            dotted_keys(child, &full, keys);
            keys.insert(full);
        }
    }
}

// ---------------------------------------------------------------- defaults and the reference

#[test]
fn minimal_config_takes_every_default() {
    let mut config = parse(BASE, &[]);
    // A config without data.format leaves it to be detected from the data.
    assert!(config.data.format_unset);
    config.data.format_unset = false;
    assert_eq!(config, Config::new("models/base", "data/train.jsonl"));

    assert_eq!(config.model.path, PathBuf::from("models/base"));
    assert_eq!(config.model.dtype, WeightDtype::Auto);

    let lora = &config.lora;
    assert_eq!(lora.r, 8);
    assert_eq!(lora.alpha, 16.0);
    assert_eq!(lora.dropout, 0.05);
    assert!(!lora.use_rslora);
    assert_eq!(
        lora.target_modules,
        TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()])
    );
    assert_eq!(lora.init, LoraInit::Kaiming);

    let data = &config.data;
    assert_eq!(data.train, PathBuf::from("data/train.jsonl"));
    assert_eq!(data.validation, None);
    assert_eq!(data.format, DataFormat::Alpaca);
    assert_eq!(data.max_seq_len, 512);
    assert!(!data.train_on_inputs);
    assert!(data.shuffle);

    let train = &config.train;
    assert_eq!(train.seed, 42);
    assert_eq!(train.epochs, 1);
    assert_eq!(train.max_steps, None);
    assert_eq!(train.micro_batch_size, 4);
    assert_eq!(train.grad_accum_steps, 1);
    assert_eq!(train.lr, 2e-4);
    assert_eq!(train.lr_scheduler, LrScheduler::Cosine);
    assert_eq!(train.warmup_steps, 0);
    assert_eq!(train.weight_decay, 0.0);
    assert_eq!(train.adam_beta1, 0.9);
    assert_eq!(train.adam_beta2, 0.999);
    assert_eq!(train.adam_eps, 1e-8);
    assert_eq!(train.max_grad_norm, Some(1.0));
    assert_eq!(train.precision, Precision::Auto);
    assert_eq!(train.device, "auto");
    assert_eq!(train.threads, None);
    assert_eq!(train.log_every, 1);
    assert_eq!(train.save_every, None);

    let output = &config.output;
    assert_eq!(output.dir, PathBuf::from("checkpoints"));
    assert_eq!(output.run_name, None);
    assert!(output.sample_prompts.is_empty());
    assert_eq!(output.sample_max_new_tokens, 32);

    config.validate().unwrap();
}

#[test]
fn empty_sections_take_defaults() {
    let yaml = format!("{BASE}lora:\ntrain:\noutput: {{}}\n");
    assert_eq!(parse(&yaml, &[]), parse(BASE, &[]));
}

#[test]
fn relative_paths_stay_as_written() {
    let yaml = "model:\n  path: ../models/x\ndata:\n  train: ./d/t.jsonl\n  validation: v.jsonl\n\
                output:\n  dir: out/runs\n";
    let config = parse(yaml, &[]);
    assert_eq!(config.model.path, PathBuf::from("../models/x"));
    assert_eq!(config.data.train, PathBuf::from("./d/t.jsonl"));
    assert_eq!(config.data.validation, Some(PathBuf::from("v.jsonl")));
    assert_eq!(config.output.dir, PathBuf::from("out/runs"));
}

#[test]
fn reference_yaml_is_the_defaults() {
    let config = Config::load(&reference_path(), &[]).unwrap();
    assert_eq!(config, Config::new("data/default-model", "data/default/train.jsonl"));
}

#[test]
fn reference_yaml_documents_every_key() {
    let text = std::fs::read_to_string(reference_path()).unwrap();
    let reference: Value = serde_yaml::from_str(&text).unwrap();
    let defaults: Value = serde_yaml::from_str(&Config::new("m", "t").to_yaml()).expect("to_yaml is YAML");

    let mut schema = BTreeSet::new();
    dotted_keys(&defaults, "", &mut schema);
    let mut documented = BTreeSet::new();
    dotted_keys(&reference, "", &mut documented);
    // The list items of target_modules are values, not keys; both sides are mappings only.
    assert_eq!(schema.len(), 6 + 4 + 11 + 16 + 32 + 7 + 4);
    let missing: Vec<_> = schema.difference(&documented).collect();
    assert!(missing.is_empty(), "keys missing from reference.yaml: {missing:?}");
    let extra: Vec<_> = documented.difference(&schema).collect();
    assert!(extra.is_empty(), "reference.yaml has keys the schema lacks: {extra:?}");

    // Each key line comes right after a comment that documents it.
    let lines: Vec<&str> = text.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        let content = line.trim_start();
        let is_key = !content.starts_with('#')
            && !content.starts_with('-')
            && content.contains(':')
            && !content.is_empty();
        if is_key {
            let previous = lines[..index].last().map(|l| l.trim_start()).unwrap_or("");
            assert!(
                previous.starts_with('#'),
                "reference.yaml line {}: `{}` has no comment above it",
                index + 1,
                line
            );
        }
    }
}

// ---------------------------------------------------------------- to_yaml

#[test]
fn to_yaml_round_trips_a_changed_config() {
    let mut config = Config::new("models/a b/ç", "data/train.jsonl");
    config.model.dtype = WeightDtype::Bf16;
    config.lora = LoraConfig {
        r: 16,
        alpha: 32.5,
        dropout: 0.0,
        use_rslora: true,
        target_modules: TargetModules::AllLinear,
        exclude_modules: Some(TargetModules::Regex(r".*\.0\.mlp\..*".into())),
        layers_to_transform: Some(vec![0, 2]),
        rank_pattern: [("q_proj".to_string(), 4)].into(),
        alpha_pattern: [("v_proj".to_string(), 3.5)].into(),
        init: LoraInit::Gaussian,
        init_from: Some(PathBuf::from("adapters/previous")),
    };
    config.data.validation = Some(PathBuf::from("data/val.jsonl"));
    config.data.format = DataFormat::Completion;
    config.data.max_seq_len = 2048;
    config.data.train_on_inputs = true;
    config.data.shuffle = false;
    config.data.packing = false;
    config.data.split = "test".into();
    config.data.columns = [("instruction".to_string(), "prompt".to_string())].into();
    config.data.prompt_template = Some("Q: {instruction} {input}\nA:".into());
    config.data.chat_template = "chatml".into();
    config.data.train_on = lorafit::config::TrainOn::Last;
    config.data.on_bad_row = lorafit::config::OnBadRow::Skip;
    config.data.too_long = lorafit::config::TooLong::Error;
    config.train = TrainConfig {
        seed: u64::MAX,
        epochs: 3,
        max_steps: Some(1000),
        micro_batch_size: 1,
        grad_accum_steps: 16,
        lr: 1.234_567_890_123e-5,
        lr_scheduler: LrScheduler::Linear,
        warmup_steps: 100,
        warmup_ratio: None,
        weight_decay: 0.01,
        adam_beta1: 0.0,
        adam_beta2: 0.95,
        adam_eps: 1e-12,
        max_grad_norm: None,
        precision: Precision::Bf16Mixed,
        gradient_checkpointing: true,
        device: "cuda:1".into(),
        threads: Some(2),
        dist_timeout: 45,
        log_every: 10,
        save_every: Some(250),
        keep_last: Some(2),
        eval_every: Some(50),
        save_best: true,
        early_stopping_patience: Some(3),
        on_nonfinite: lorafit::config::OnNonFinite::Skip,
        objective: lorafit::config::Objective::Ipo,
        beta: 0.25,
        label_smoothing: 0.0,
        desirable_weight: 1.5,
        undesirable_weight: 0.75,
        precompute_ref: true,
    };
    config.output = OutputConfig {
        dir: PathBuf::from("runs"),
        run_name: Some("true".into()),
        sample_prompts: vec![
            "null".into(),
            "1.5".into(),
            "two\nlines: with # marks".into(),
            "- dash".into(),
            String::new(),
        ],
        sample_max_new_tokens: 0,
    };
    config.validate().unwrap();

    let yaml = config.to_yaml();
    assert_eq!(Config::from_yaml_str(&yaml, "resolved.yaml", &[]).unwrap(), config);
    assert_contains(&yaml, &["all-linear", "bf16-mixed", "max_grad_norm: null", "device: cuda:1"]);
}

#[test]
fn to_yaml_round_trips_the_defaults_and_lists_every_key() {
    let mut config = parse(BASE, &[]);
    // Written out, data.format names a format: the one detected from the data in a run.
    config.data.format_unset = false;
    let yaml = config.to_yaml();
    assert_eq!(Config::from_yaml_str(&yaml, "resolved.yaml", &[]).unwrap(), config);
    for key in ["max_steps: null", "threads: null", "validation: null", "run_name: null"] {
        assert!(yaml.contains(key), "{key} missing from:\n{yaml}");
    }
    // Written into a file and loaded back.
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config-roundtrip.yaml");
    std::fs::write(&path, &yaml).unwrap();
    assert_eq!(Config::load(&path, &[]).unwrap(), config);
}

// ---------------------------------------------------------------- overrides

#[test]
fn overrides_set_nested_keys_lists_and_null() {
    let yaml = format!("{BASE}train:\n  max_steps: 100\n  lr: 0.001\n");
    let config = parse(
        &yaml,
        &[
            "train.lr=3e-5",
            "lora.r=32",
            "lora.target_modules=[q_proj,v_proj]",
            "train.max_steps=null",
            "train.max_grad_norm=null",
            "train.precision=bf16-mixed",
            "output.run_name=exp1",
            "output.sample_prompts=[\"Hello\", 'Say: hi']",
            "data.validation=data/val.jsonl",
            "model.dtype=bf16",
        ],
    );
    assert_eq!(config.train.lr, 3e-5);
    assert_eq!(config.lora.r, 32);
    assert_eq!(config.lora.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
    assert_eq!(config.train.max_steps, None);
    assert_eq!(config.train.max_grad_norm, None);
    assert_eq!(config.train.precision, Precision::Bf16Mixed);
    assert_eq!(config.output.run_name.as_deref(), Some("exp1"));
    assert_eq!(config.output.sample_prompts, vec!["Hello", "Say: hi"]);
    assert_eq!(config.data.validation, Some(PathBuf::from("data/val.jsonl")));
    assert_eq!(config.model.dtype, WeightDtype::Bf16);
    // Keys the overrides do not touch keep the file's or the default values.
    assert_eq!(config.lora.alpha, 16.0);
    assert_eq!(config.model.path, PathBuf::from("models/base"));
}

#[test]
fn override_all_linear_and_last_one_wins() {
    let config = parse(BASE, &["lora.target_modules=all-linear"]);
    assert_eq!(config.lora.target_modules, TargetModules::AllLinear);

    let config = parse(BASE, &["lora.r=4", "lora.r=64"]);
    assert_eq!(config.lora.r, 64);

    // A whole section as a flow mapping.
    let config = parse(BASE, &["lora={r: 2, alpha: 4}"]);
    assert_eq!((config.lora.r, config.lora.alpha), (2, 4.0));
}

#[test]
fn override_values_keep_their_yaml_type_where_strings_are_expected() {
    let config = parse(BASE, &["output.run_name=2024", "train.device=cuda:0"]);
    assert_eq!(config.output.run_name.as_deref(), Some("2024"));
    assert_eq!(config.train.device, "cuda:0");
    // Everything after the first '=' is the value.
    let config = parse(BASE, &["output.run_name=a=b"]);
    assert_eq!(config.output.run_name.as_deref(), Some("a=b"));
}

#[test]
fn overrides_can_supply_the_required_paths() {
    let config = parse("lora:\n  r: 4\n", &["model.path=models/x", "data.train=d.jsonl"]);
    assert_eq!(config.model.path, PathBuf::from("models/x"));
    assert_eq!(config.data.train, PathBuf::from("d.jsonl"));
    assert_eq!(config.lora.r, 4);
}

#[test]
fn overrides_can_fix_an_out_of_range_value_in_the_file() {
    let yaml = format!("{BASE}lora:\n  r: 0\n");
    assert_eq!(parse(&yaml, &["lora.r=4"]).lora.r, 4);
}

// ---------------------------------------------------------------- unknown keys and values

#[test]
fn unknown_key_names_path_position_and_suggestion() {
    let yaml = format!("{BASE}train:\n  lr: 0.001\n  lr_sheduler: linear\n");
    let message = error(&yaml, &[]);
    assert_contains(&message, &["run.yaml:7:3", "`train.lr_sheduler`", "did you mean `lr_scheduler`?"]);
}

#[test]
fn unknown_key_suggests_from_other_tools_names() {
    let yaml = format!("{BASE}train:\n  learning_rate: 0.001\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:6:3", "`train.learning_rate`", "did you mean `lr`?"]);
}

#[test]
fn unknown_key_without_a_close_match_lists_the_valid_keys() {
    let yaml = format!("{BASE}lora:\n  zzzzzz: 1\n");
    assert_contains(
        &error(&yaml, &[]),
        &[
            "run.yaml:6:3",
            "unknown key `lora.zzzzzz`",
            "r, alpha, dropout, use_rslora, target_modules, exclude_modules, layers_to_transform, rank_pattern, alpha_pattern, init, init_from",
        ],
    );
}

#[test]
fn unknown_section_suggests_the_closest() {
    let yaml = format!("{BASE}trian:\n  lr: 0.001\n");
    assert_contains(
        &error(&yaml, &[]),
        &["run.yaml:5:1", "unknown section `trian`", "did you mean `train`?"],
    );
    let yaml = format!("{BASE}qqqqqq: 1\n");
    assert_contains(
        &error(&yaml, &[]),
        &["unknown section `qqqqqq`", "model, lora, data, train, distill, output"],
    );
}

#[test]
fn unknown_enum_value_suggests_the_closest() {
    let yaml = format!("{BASE}train:\n  precision: bf16\n");
    assert_contains(
        &error(&yaml, &[]),
        &[
            "run.yaml:6:14",
            "unknown value `bf16` for `train.precision`",
            "did you mean `bf16-mixed`?",
            "fp32, bf16-mixed",
        ],
    );
    let yaml = format!("{BASE}train:\n  lr_scheduler: cosin\n");
    assert_contains(&error(&yaml, &[]), &["did you mean `cosine`?"]);
    let yaml = "model:\n  path: m\ndata:\n  train: t\n  format: sharegpt\n";
    assert_contains(
        &error(yaml, &[]),
        &["run.yaml:5:11", "unknown value `sharegpt` for `data.format`", "allowed: completion, alpaca"],
    );
    let yaml = "model:\n  path: m\n  dtype: float16\ndata:\n  train: t\n";
    assert_contains(&error(yaml, &[]), &["run.yaml:3:10", "`model.dtype`", "allowed: auto, fp32, bf16"]);
}

#[test]
fn unknown_target_modules_string() {
    let yaml = format!("{BASE}lora:\n  target_modules: all_linear\n");
    assert_contains(
        &error(&yaml, &[]),
        &["run.yaml:6:19", "`lora.target_modules`", "did you mean `all-linear`?"],
    );
    let yaml = format!("{BASE}lora:\n  target_modules: q_proj\n");
    assert_contains(&error(&yaml, &[]), &["`lora.target_modules`", "`[q_proj]`"]);
}

// ---------------------------------------------------------------- wrong types

#[test]
fn wrong_type_names_path_position_and_expectation() {
    let yaml = format!("{BASE}lora:\n  r: eight\n");
    assert_contains(
        &error(&yaml, &[]),
        &["run.yaml:6:6", "`lora.r` must be a whole number >= 0", "found string \"eight\""],
    );
    let yaml = format!("{BASE}train:\n  lr: fast\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:6:7", "`train.lr` must be a number"]);
    let yaml = "model:\n  path: m\ndata:\n  train: t\n  shuffle: yes\n";
    assert_contains(&error(yaml, &[]), &["run.yaml:5:12", "`data.shuffle` must be true or false"]);
    let yaml = format!("{BASE}train:\n  epochs: -1\n");
    assert_contains(&error(&yaml, &[]), &["`train.epochs` must be a whole number >= 0"]);
    let yaml = format!("{BASE}train: 3\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:5:8", "`train` must be a section"]);
    let yaml = format!("{BASE}train:\n  precision: [fp32]\n");
    assert_contains(
        &error(&yaml, &[]),
        &["`train.precision` must be one of auto, fp32, bf16-mixed", "found a list"],
    );
    let yaml = format!("{BASE}lora:\n  target_modules: [q_proj, {{a: b}}]\n");
    assert_contains(&error(&yaml, &[]), &["`lora.target_modules[1]`", "found a mapping"]);
    let yaml = format!("{BASE}lora:\n  target_modules: 5\n");
    assert_contains(
        &error(&yaml, &[]),
        &["`lora.target_modules` must be `all-linear`, a list of module names"],
    );
    let yaml = format!("{BASE}output:\n  sample_prompts: hello\n");
    assert_contains(&error(&yaml, &[]), &["`output.sample_prompts` must be a list"]);
}

#[test]
fn duplicate_key_is_reported_with_its_line() {
    let yaml = format!("{BASE}train:\n  lr: 0.1\n  lr: 0.2\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:6:3", "key `train.lr` is given twice"]);
}

// ---------------------------------------------------------------- missing keys, empty and broken files

#[test]
fn missing_required_keys_say_which_with_an_example() {
    let message = error("data:\n  train: t.jsonl\n", &[]);
    assert_contains(&message, &["run.yaml", "missing required key `model.path`", "path: models/"]);
    let message = error("model:\n  dtype: bf16\ndata:\n  train: t.jsonl\n", &[]);
    assert_contains(&message, &["run.yaml:1:1", "missing required key `model.path`", "under `model:`"]);
    let message = error("model:\n  path: m\n", &[]);
    assert_contains(&message, &["missing required key `data.train`", "train: data/train.jsonl"]);
    let message = error("model:\n  path: ''\ndata:\n  train: t\n", &[]);
    assert_contains(&message, &["run.yaml:2:3", "missing required key `model.path`"]);
}

#[test]
fn empty_file_names_the_file() {
    for yaml in ["", "\n\n", "# only a comment\n"] {
        assert_contains(&error(yaml, &[]), &["run.yaml is empty", "model.path", "data.train"]);
    }
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    let yaml = "model:\n  path: m\n bad: [\ndata:\n  train: t\n";
    assert_contains(&error(yaml, &[]), &["run.yaml:3:", "invalid YAML"]);
    let yaml = "model:\n  path: \"unterminated\ndata:\n";
    assert_contains(&error(yaml, &[]), &["run.yaml:", "invalid YAML"]);
}

#[test]
fn top_level_must_be_a_mapping() {
    assert_contains(
        &error("- model\n- data\n", &[]),
        &["run.yaml", "top level must be a mapping", "found a list"],
    );
}

#[test]
fn load_names_a_missing_file() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-config.yaml");
    let message = format!("{:#}", Config::load(&path, &[]).unwrap_err());
    assert_contains(&message, &["no-such-config.yaml"]);
}

#[test]
fn load_names_the_file_in_errors() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-lr.yaml");
    std::fs::write(&path, format!("{BASE}train:\n  lr: -1\n")).unwrap();
    let message = format!("{:#}", Config::load(&path, &[]).unwrap_err());
    assert_contains(
        &message,
        &[&format!("{}:6:3", path.display()), "`train.lr` must be a finite number > 0"],
    );
}

// ---------------------------------------------------------------- override errors

#[test]
fn malformed_overrides() {
    assert_contains(&error(BASE, &["train.lr"]), &["in --set train.lr:", "expected `key.path=value`"]);
    assert_contains(&error(BASE, &["=3"]), &["in --set =3:", "the key is empty"]);
    assert_contains(&error(BASE, &["train..lr=3"]), &["in --set train..lr=3:", "empty part"]);
    assert_contains(
        &error(BASE, &["output.run_name=[a"]),
        &["in --set output.run_name=[a:", "cannot read `[a` as a YAML value"],
    );
}

#[test]
fn override_unknown_key_and_section() {
    assert_contains(
        &error(BASE, &["train.lr=1e-4", "train.lr_sheduler=linear"]),
        &[
            "in --set train.lr_sheduler=linear:",
            "unknown key `train.lr_sheduler`",
            "did you mean `lr_scheduler`?",
        ],
    );
    assert_contains(
        &error(BASE, &["trian.lr=1"]),
        &["in --set trian.lr=1:", "unknown section `trian`", "did you mean `train`?"],
    );
    assert_contains(
        &error(BASE, &["train.precision=bf16"]),
        &["in --set train.precision=bf16:", "did you mean `bf16-mixed`?"],
    );
    assert_contains(
        &error(BASE, &["lora.target_modules=q_proj,v_proj"]),
        &["in --set lora.target_modules=q_proj,v_proj:", "`[q_proj,v_proj]`"],
    );
}

#[test]
fn override_wrong_type() {
    assert_contains(
        &error(BASE, &["train.lr=abc"]),
        &["in --set train.lr=abc:", "`train.lr` must be a number", "\"abc\""],
    );
    assert_contains(
        &error(BASE, &["lora.r=eight"]),
        &["in --set lora.r=eight:", "`lora.r` must be a whole number"],
    );
    assert_contains(
        &error(BASE, &["model.path=null"]),
        &["in --set model.path=null:", "`model.path` must be a path", "found null"],
    );
    // Keys below a value: absent from the file, the mapping made for it has the wrong type;
    // present in the file, the value is not a section.
    assert_contains(
        &error(BASE, &["train.lr.x=1"]),
        &["in --set train.lr.x=1:", "`train.lr` must be a number, found a mapping"],
    );
    let yaml = format!("{BASE}train:\n  lr: 0.1\n");
    assert_contains(
        &error(&yaml, &["train.lr.x=1"]),
        &["in --set train.lr.x=1:", "`train.lr` is a single value, not a section"],
    );
}

#[test]
fn override_out_of_range_names_the_override() {
    assert_contains(
        &error(BASE, &["lora.r=4", "train.lr=0"]),
        &["in --set train.lr=0:", "`train.lr` must be a finite number > 0, got 0"],
    );
    // A whole-section override is blamed for a bad key inside it.
    assert_contains(
        &error(BASE, &["lora={r: 0}"]),
        &["in --set lora={r: 0}:", "`lora.r` must be at least 1"],
    );
    assert_contains(
        &error(BASE, &["model.path=''"]),
        &["in --set model.path='':", "missing required key `model.path`"],
    );
}

// ---------------------------------------------------------------- ranges

#[test]
fn out_of_range_values_are_refused_with_key_and_range() {
    let cases: &[(&str, &str)] = &[
        ("lora.r=0", "`lora.r` must be at least 1, got 0"),
        ("lora.alpha=0", "`lora.alpha` must be a finite number > 0, got 0"),
        ("lora.alpha=-2", "`lora.alpha` must be a finite number > 0, got -2"),
        ("lora.alpha=.nan", "`lora.alpha` must be a finite number > 0, got NaN"),
        ("lora.dropout=-0.1", "`lora.dropout` must be in [0, 1)"),
        ("lora.dropout=1", "`lora.dropout` must be in [0, 1)"),
        ("lora.target_modules=[]", "`lora.target_modules` is empty"),
        ("lora.target_modules=[q_proj, '']", "`lora.target_modules[1]` is an empty name"),
        ("lora.target_modules=[' ']", "`lora.target_modules[0]` is an empty name"),
        ("data.train=''", "missing required key `data.train`"),
        ("data.validation=''", "`data.validation` is an empty path"),
        ("data.max_seq_len=1", "`data.max_seq_len` must be at least 2, got 1"),
        ("train.epochs=0", "`train.epochs` must be at least 1 (got 0), or set `train.max_steps`"),
        ("train.max_steps=0", "`train.max_steps` must be at least 1 (got 0)"),
        ("train.micro_batch_size=0", "`train.micro_batch_size` must be at least 1, got 0"),
        ("train.grad_accum_steps=0", "`train.grad_accum_steps` must be at least 1, got 0"),
        ("train.lr=0", "`train.lr` must be a finite number > 0, got 0"),
        ("train.lr=-1e-4", "`train.lr` must be a finite number > 0"),
        ("train.lr=.inf", "`train.lr` must be a finite number > 0, got inf"),
        ("train.lr=.nan", "`train.lr` must be a finite number > 0, got NaN"),
        ("train.weight_decay=-0.1", "`train.weight_decay` must be a finite number >= 0"),
        ("train.adam_beta1=1", "`train.adam_beta1` must be in [0, 1)"),
        ("train.adam_beta1=-0.1", "`train.adam_beta1` must be in [0, 1)"),
        ("train.adam_beta2=1.5", "`train.adam_beta2` must be in [0, 1)"),
        ("train.adam_eps=0", "`train.adam_eps` must be a finite number > 0"),
        ("train.max_grad_norm=0", "`train.max_grad_norm` must be a finite number > 0, got 0; use null"),
        ("train.max_grad_norm=-1", "`train.max_grad_norm` must be a finite number > 0"),
        ("train.device=gpu", "`train.device` must be `auto`, `cpu`, `cuda` or `cuda:N`"),
        ("train.device=cuda:x", "got `cuda:x`"),
        ("train.threads=0", "`train.threads` must be at least 1 (got 0), or null"),
        ("train.log_every=0", "`train.log_every` must be at least 1, got 0"),
        ("train.save_every=0", "`train.save_every` must be at least 1 (got 0), or null"),
        ("output.dir=''", "`output.dir` is empty"),
        ("output.run_name=''", "`output.run_name` must not be empty"),
        ("output.run_name=a/b", "`output.run_name` must not contain a path separator"),
        ("output.run_name=.hidden", "`output.run_name` must not start with '.'"),
    ];
    for (set, expected) in cases {
        let message = error(BASE, &[set]);
        assert_contains(&message, &[&format!("in --set {set}: "), expected]);
    }

    // The same checks through `validate` on a value built in code.
    let mut config = Config::new("m", "t");
    config.validate().unwrap();
    config.train.adam_eps = -1.0;
    let message = format!("{:#}", config.validate().unwrap_err());
    assert_contains(&message, &["`train.adam_eps` must be a finite number > 0, got -1"]);
}

#[test]
fn distillation_settings_are_checked() {
    let distill = "train.objective=distill";
    let cases: &[(&[&str], &str)] = &[
        (&[distill], "train.objective distill needs `distill.teacher`"),
        (&["distill.teacher=t"], "`distill.teacher` (t) is only used by train.objective distill, not sft"),
        (
            &[distill, "distill.teacher=t", "distill.temperature=0"],
            "`distill.temperature` must be a finite number > 0",
        ),
        (&[distill, "distill.teacher=t", "distill.alpha=1.5"], "`distill.alpha` must be in [0, 1]"),
        (
            &[distill, "distill.teacher=t", "distill.loss=jsd", "distill.jsd_beta=1"],
            "`distill.jsd_beta` must be above 0",
        ),
    ];
    for (sets, expected) in cases {
        assert_contains(&error(BASE, sets), &[expected]);
    }
    let config = parse(BASE, &[distill, "distill.teacher=t", "distill.alpha=1", "distill.loss=reverse_kl"]);
    assert_eq!(config.distill.teacher, Some(PathBuf::from("t")));
    assert_eq!(config.distill.loss, lorafit::config::Divergence::ReverseKl);
}

#[test]
fn boundary_values_are_accepted() {
    let config = parse(
        BASE,
        &[
            "lora.r=1",
            "lora.dropout=0",
            "lora.alpha=1e-3",
            "data.max_seq_len=2",
            "train.epochs=0",
            "train.max_steps=1",
            "train.adam_beta1=0",
            "train.adam_beta2=0.999999",
            "train.weight_decay=0",
            "train.threads=1",
            "train.save_every=1",
            "train.device=cuda:3",
            "output.run_name=run.v2-final",
            "output.sample_max_new_tokens=0",
        ],
    );
    assert_eq!(config.train.epochs, 0);
    assert_eq!(config.train.max_steps, Some(1));
    for device in ["auto", "cpu", "cuda", "cuda:0"] {
        parse(BASE, &[&format!("train.device={device}")]);
    }
}

#[test]
fn out_of_range_in_the_file_names_file_line_and_key() {
    let yaml = format!("{BASE}lora:\n  r: 0\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:6:3: `lora.r` must be at least 1, got 0"]);
    let yaml = format!("{BASE}train:\n  seed: 1\n  max_grad_norm: -1\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:7:3: `train.max_grad_norm`"]);
    // With max_steps null again, epochs: 0 from the file is refused and the file is blamed.
    let yaml = format!("{BASE}train:\n  epochs: 0\n  max_steps: 10\n");
    parse(&yaml, &[]);
    assert_contains(
        &error(&yaml, &["train.max_steps=null"]),
        &["run.yaml:6:3: `train.epochs` must be at least 1"],
    );
    // Flow style: no line can be found, the file is still named.
    let yaml = format!("{BASE}train: {{lr: 0}}\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:", "`train.lr` must be a finite number > 0"]);
}

#[test]
fn weight_dtype_auto_follows_precision() {
    let config = parse(BASE, &["train.precision=bf16-mixed"]);
    assert_eq!(config.model.dtype.resolve(config.train.precision), WeightDtype::Bf16);
    let config = parse(BASE, &["train.precision=fp32"]);
    assert_eq!(config.model.dtype.resolve(config.train.precision), WeightDtype::Fp32);
}

// ---------------------------------------------------------------- every problem at once

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let yaml = format!(
        "{BASE}lora:\n  r: 0\n  alpah: 4\ntrain:\n  learning_rate: 1.0e-4\n  epochs: many\n  \
         max_grad_norm: -1\noutput:\n  run_name: a/b\n"
    );
    let message =
        format!("{:#}", Config::from_yaml_str(&yaml, "run.yaml", &sets(&["train.seed=x"])).unwrap_err());
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(lines.len(), 8, "{message}");
    assert_eq!(lines[0], "run.yaml: 7 problems:");
    let expected = [
        "run.yaml:6:3: `lora.r` must be at least 1, got 0",
        "run.yaml:7:3: unknown key `lora.alpah`; did you mean `alpha`?",
        "run.yaml:9:3: unknown key `train.learning_rate`; did you mean `lr`?",
        "run.yaml:10:11: `train.epochs` must be a whole number >= 0",
        "run.yaml:11:3: `train.max_grad_norm` must be a finite number > 0",
        "run.yaml:13:3: `output.run_name` must not contain a path separator",
        "in --set train.seed=x: `train.seed` must be a whole number >= 0",
    ];
    for (line, start) in lines[1..].iter().zip(expected) {
        assert!(line.starts_with(start), "expected a line starting {start:?}, got {line:?} in:\n{message}");
    }
}

#[test]
fn a_refused_key_is_not_refused_again_for_its_default() {
    // `model.path: 5` is the wrong type; its empty default must not add "missing model.path".
    let message = error("model:\n  path: [a]\ndata:\n  train: t\n", &[]);
    assert_contains(&message, &["run.yaml:2:9", "`model.path` must be a path"]);
}

// ---------------------------------------------------------------- anchors and merge keys

#[test]
fn merge_keys_and_anchors_are_read() {
    let yaml = "x-common: &common\n  lr: 1.0e-4\n  epochs: 2\nmodel:\n  path: m\ndata:\n  \
                train: &file data/t.jsonl\n  validation: *file\ntrain:\n  <<: *common\n  epochs: 3\n";
    let config = parse(yaml, &[]);
    assert_eq!(config.train.lr, 1.0e-4);
    // A key of the section itself wins over the merged one, as YAML's merge key says.
    assert_eq!(config.train.epochs, 3);
    assert_eq!(config.data.validation, Some(PathBuf::from("data/t.jsonl")));
    assert_eq!(parse(yaml, &["train.lr=0.5"]).train.lr, 0.5);

    let yaml = "x-common: &common\n  lr_sheduler: linear\nmodel:\n  path: m\ndata:\n  train: t\n\
                train:\n  <<: *common\n";
    assert_contains(&error(yaml, &[]), &["unknown key `train.lr_sheduler`; did you mean `lr_scheduler`?"]);
}

// ---------------------------------------------------------------- warmup_ratio

#[test]
fn warmup_ratio_counts_steps_as_the_hf_trainer() {
    let Some(python) = common::python() else { return };
    let cases = [(0.1, 200), (0.03, 1000), (0.05, 7), (0.5, 3), (0.0, 10), (0.99, 9), (0.07, 100), (0.1, 35)];
    let ours: Vec<usize> = cases
        .iter()
        .map(|(ratio, total)| {
            parse(BASE, &[&format!("train.warmup_ratio={ratio}")]).train.warmup_steps_of(*total)
        })
        .collect();
    // transformers 5 takes a warmup ratio as a `warmup_steps` below 1 (so a ratio of 1 is
    // not asked).
    let script = "import json, sys, tempfile\nfrom transformers import TrainingArguments\n\
                  cases = json.loads(sys.argv[1])\nwith tempfile.TemporaryDirectory() as d:\n    \
                  print(json.dumps([TrainingArguments(output_dir=d, warmup_steps=r, report_to=[])\
                  .get_warmup_steps(t) for r, t in cases]))\n";
    let output = std::process::Command::new(python)
        .args(["-c", script, &serde_json::to_string(&cases).unwrap()])
        .output()
        .expect("run the interop python");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let theirs: Vec<usize> = serde_json::from_slice(&output.stdout).expect("a JSON list");
    assert_eq!(ours, theirs, "cases {cases:?}");
    assert_eq!(parse(BASE, &[]).train.warmup_steps_of(100), 0);
    assert_eq!(parse(BASE, &["train.warmup_steps=5"]).train.warmup_steps_of(100), 5);
}

#[test]
fn warmup_ratio_is_refused_out_of_range_or_with_warmup_steps() {
    let yaml = format!("{BASE}train:\n  warmup_ratio: 1.5\n");
    assert_contains(&error(&yaml, &[]), &["run.yaml:6:3: `train.warmup_ratio` must be between 0 and 1"]);
    let yaml = format!("{BASE}train:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n");
    assert_contains(&error(&yaml, &[]), &["`train.warmup_steps`", "`train.warmup_ratio`", "not both"]);
    let yaml = format!("{BASE}train:\n  warmup_ratio: 0.1\n");
    assert_eq!(parse(&yaml, &[]).train.warmup_ratio, Some(0.1));
}
