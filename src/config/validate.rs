//! Step 4 of loading: out-of-range values and missing required keys, each refused with a
//! message that names the key; every one is found, not only the first.

use std::path::Path;

use super::{
    Config, DataConfig, DeviceName, DistillConfig, Divergence, LoraConfig, ModelConfig, Objective,
    OutputConfig, TargetModules, TrainConfig, TrainData,
};

type Checked = std::result::Result<(), Invalid>;

impl Config {
    /// Every refused value, section by section in file order.
    pub(super) fn check(&self) -> Vec<Invalid> {
        let Config { model, lora, data, train, distill, output } = self;
        let mut found = Found::default();
        found.add(check_model(model));
        check_lora(lora, &mut found);
        check_data(data, &mut found);
        check_train_length(train, &mut found);
        check_optimizer(train, &mut found);
        check_runtime(train, &mut found);
        check_objective(train, data, &mut found);
        check_distill(train.objective, distill, &mut found);
        found.add(check_output(output));
        found.0
    }
}

/// The refusals found so far; each check adds its own and the next one still runs.
#[derive(Default)]
struct Found(Vec<Invalid>);

impl Found {
    fn add(&mut self, checked: Checked) {
        if let Err(invalid) = checked {
            self.0.push(invalid);
        }
    }
}

fn check_model(model: &ModelConfig) -> Checked {
    required_path(
        "model.path",
        &model.path,
        "the Hugging Face model directory to fine-tune",
        "path: models/SmolLM2-135M",
    )
}

fn check_lora(lora: &LoraConfig, found: &mut Found) {
    found.add(at_least("lora.r", lora.r, 1));
    found.add(positive("lora.alpha", lora.alpha));
    found.add(fraction("lora.dropout", lora.dropout));
    if let TargetModules::List(names) = &lora.target_modules {
        if names.is_empty() {
            found.add(Err(Invalid::new(
                "lora.target_modules",
                "`lora.target_modules` is empty; list at least one module name \
                 (e.g. [q_proj, v_proj]) or write `all-linear`"
                    .to_string(),
            )));
        }
        if let Some(index) = names.iter().position(|name| name.trim().is_empty()) {
            found.add(Err(Invalid::new(
                "lora.target_modules",
                format!(
                    "`lora.target_modules[{index}]` is an empty name; every entry must be \
                     a module name such as `q_proj`"
                ),
            )));
        }
    }
    if lora.exclude_modules == Some(TargetModules::AllLinear) {
        found.add(Err(Invalid::new(
            "lora.exclude_modules",
            "`lora.exclude_modules` cannot be `all-linear`; give a list of module names or a regex"
                .to_string(),
        )));
    }
    for (pattern, &r) in &lora.rank_pattern {
        found.add(valid_pattern("lora.rank_pattern", pattern));
        found.add(at_least("lora.rank_pattern", r, 1));
    }
    for (pattern, &alpha) in &lora.alpha_pattern {
        found.add(valid_pattern("lora.alpha_pattern", pattern));
        found.add(positive("lora.alpha_pattern", alpha));
    }
}

fn check_data(data: &DataConfig, found: &mut Found) {
    found.add(check_train_data(&data.train));
    if data.validation.as_ref().is_some_and(|validation| validation.as_os_str().is_empty()) {
        found.add(Err(Invalid::new(
            "data.validation",
            "`data.validation` is an empty path; give a file or null for no validation".to_string(),
        )));
    }
    found.add(at_least("data.max_seq_len", data.max_seq_len, 2));
    if let Some(share) = data.val_split {
        if !(share > 0.0 && share < 1.0) {
            found.add(Err(Invalid::new(
                "data.val_split",
                format!("`data.val_split` must be between 0 and 1 (e.g. 0.05), got {share}"),
            )));
        }
        if data.validation.is_some() {
            found.add(Err(Invalid::new(
                "data.val_split",
                "give either `data.validation` (a file) or `data.val_split` (a share of the \
                 training records), not both"
                    .to_string(),
            )));
        }
    }
    if data.chat_template.trim().is_empty() {
        found.add(Err(Invalid::new(
            "data.chat_template",
            "`data.chat_template` is empty; use auto, chatml, llama3 or a Jinja template".to_string(),
        )));
    }
}

/// How long the run is, how its steps are made of micro-batches, and how many of them warm up.
fn check_train_length(train: &TrainConfig, found: &mut Found) {
    match train.max_steps {
        Some(0) => found.add(Err(Invalid::new(
            "train.max_steps",
            "`train.max_steps` must be at least 1 (got 0), or null to run \
             `train.epochs` epochs"
                .to_string(),
        ))),
        None if train.epochs == 0 => found.add(Err(Invalid::new(
            "train.epochs",
            "`train.epochs` must be at least 1 (got 0), or set `train.max_steps`".to_string(),
        ))),
        _ => {}
    }
    found.add(at_least("train.micro_batch_size", train.micro_batch_size, 1));
    found.add(at_least("train.grad_accum_steps", train.grad_accum_steps, 1));
    if let Some(ratio) = train.warmup_ratio {
        if !(0.0..=1.0).contains(&ratio) {
            found.add(Err(Invalid::new(
                "train.warmup_ratio",
                format!("`train.warmup_ratio` must be between 0 and 1 (e.g. 0.03), got {ratio}"),
            )));
        }
        if train.warmup_steps > 0 {
            found.add(Err(Invalid::new(
                "train.warmup_ratio",
                "give either `train.warmup_steps` (a number of steps) or `train.warmup_ratio` \
                 (a share of the run's steps), not both"
                    .to_string(),
            )));
        }
    }
}

/// AdamW and gradient clipping.
fn check_optimizer(train: &TrainConfig, found: &mut Found) {
    found.add(positive("train.lr", train.lr));
    if !(train.weight_decay >= 0.0 && train.weight_decay.is_finite()) {
        found.add(Err(Invalid::new(
            "train.weight_decay",
            format!("`train.weight_decay` must be a finite number >= 0, got {}", train.weight_decay),
        )));
    }
    found.add(fraction("train.adam_beta1", train.adam_beta1));
    found.add(fraction("train.adam_beta2", train.adam_beta2));
    found.add(positive("train.adam_eps", train.adam_eps));
    if let Some(norm) = train.max_grad_norm {
        if !(norm > 0.0 && norm.is_finite()) {
            found.add(Err(Invalid::new(
                "train.max_grad_norm",
                format!(
                    "`train.max_grad_norm` must be a finite number > 0, got {norm}; \
                     use null to disable clipping"
                ),
            )));
        }
    }
}

/// Where the run computes and how often it logs, evaluates and saves.
fn check_runtime(train: &TrainConfig, found: &mut Found) {
    if DeviceName::parse(&train.device).is_none() {
        found.add(Err(Invalid::new(
            "train.device",
            format!(
                "`train.device` must be `auto`, `cpu`, `cuda` or `cuda:N` (N = GPU index), \
                 got `{}`",
                train.device
            ),
        )));
    }
    if train.threads == Some(0) {
        found.add(Err(Invalid::new(
            "train.threads",
            "`train.threads` must be at least 1 (got 0), or null to use all cores".to_string(),
        )));
    }
    found.add(at_least("train.log_every", train.log_every, 1));
    found.add(at_least("train.dist_timeout", train.dist_timeout as usize, 1));
    if train.save_every == Some(0) {
        found.add(Err(Invalid::new(
            "train.save_every",
            "`train.save_every` must be at least 1 (got 0), or null to save only at the end".to_string(),
        )));
    }
    for (key, value) in [
        ("train.keep_last", train.keep_last),
        ("train.eval_every", train.eval_every),
        ("train.early_stopping_patience", train.early_stopping_patience),
    ] {
        if value == Some(0) {
            found.add(Err(Invalid::new(key, format!("`{key}` must be at least 1 (got 0), or null"))));
        }
    }
}

/// A preference objective's settings, and the data layouts it does not take (yet).
fn check_objective(train: &TrainConfig, data: &DataConfig, found: &mut Found) {
    if !train.objective.is_preference() {
        if train.precompute_ref {
            found.add(Err(Invalid::new(
                "train.precompute_ref",
                format!(
                    "`train.precompute_ref` precomputes a preference objective's reference log-probabilities; \
                     train.objective is {}: set it to false",
                    train.objective
                ),
            )));
        }
        return;
    }
    let objective = train.objective;
    found.add(positive("train.beta", train.beta));
    found.add(positive("train.desirable_weight", train.desirable_weight));
    found.add(positive("train.undesirable_weight", train.undesirable_weight));
    if !(0.0..0.5).contains(&train.label_smoothing) {
        found.add(Err(Invalid::new(
            "train.label_smoothing",
            format!(
                "`train.label_smoothing` must be at least 0 and below 0.5, got {}",
                train.label_smoothing
            ),
        )));
    } else if train.label_smoothing > 0.0 && objective != Objective::Dpo {
        found.add(Err(Invalid::new(
            "train.label_smoothing",
            format!(
                "`train.label_smoothing` applies to train.objective dpo only, not {objective}; set it to 0"
            ),
        )));
    }
    if objective == Objective::Kto && train.micro_batch_size < 2 {
        // As TRL refuses it: the KL estimate pairs each prompt with another row's answer.
        found.add(Err(Invalid::new(
            "train.micro_batch_size",
            "train.objective kto estimates its KL term from each prompt with another answer of the same \
             micro-batch: set train.micro_batch_size to 2 or more"
                .to_string(),
        )));
    }
    if data.packing {
        found.add(Err(Invalid::new(
            "data.packing",
            format!(
                "train.objective {objective} keeps each pair's chosen and rejected answers in rows of their \
                 own; set data.packing: false"
            ),
        )));
    }
    if matches!(data.train, TrainData::Sets(_)) {
        found.add(Err(Invalid::new(
            "data.train",
            format!(
                "train.objective {objective} reads one preference data set: give data.train a single path"
            ),
        )));
    }
}

/// The `distill` section: a teacher exactly when the objective distills, and its numbers in range.
fn check_distill(objective: Objective, distill: &DistillConfig, found: &mut Found) {
    let distilling = objective == Objective::Distill;
    match (&distill.teacher, &distill.cache) {
        (None, None) if distilling => found.add(Err(Invalid::new(
            "distill.teacher",
            "train.objective distill needs `distill.teacher`: the model directory of the teacher, \
             e.g. `distill: {teacher: models/teacher}` (or `distill.cache`, a folder `lorafit \
             distill-cache` wrote)"
                .to_string(),
        ))),
        (Some(path), _) | (None, Some(path)) if !distilling => {
            let key = if distill.teacher.is_some() { "distill.teacher" } else { "distill.cache" };
            found.add(Err(Invalid::new(
                key,
                format!(
                    "`{key}` ({}) is only used by train.objective distill, not {objective}; \
                     set train.objective: distill or remove it",
                    path.display()
                ),
            )))
        }
        _ => {}
    }
    if !distilling {
        return;
    }
    found.add(positive("distill.temperature", distill.temperature));
    if !(0.0..=1.0).contains(&distill.alpha) {
        found.add(Err(Invalid::new(
            "distill.alpha",
            format!("`distill.alpha` must be in [0, 1] (1: cross-entropy only), got {}", distill.alpha),
        )));
    }
    let open = distill.jsd_beta > 0.0 && distill.jsd_beta < 1.0;
    if distill.loss == Divergence::Jsd && !open {
        found.add(Err(Invalid::new(
            "distill.jsd_beta",
            format!(
                "`distill.jsd_beta` must be above 0 and below 1, got {} (at 0 or 1 the divergence is \
                 a KL: use distill.loss forward_kl or reverse_kl)",
                distill.jsd_beta
            ),
        )));
    }
}

fn check_output(output: &OutputConfig) -> Checked {
    if output.dir.as_os_str().is_empty() {
        return Err(Invalid::new(
            "output.dir",
            "`output.dir` is empty; give a directory such as `checkpoints`".to_string(),
        ));
    }
    let Some(name) = &output.run_name else {
        return Ok(());
    };
    let problem = if name.is_empty() {
        "must not be empty"
    } else if name.contains('/') || name.contains('\\') {
        "must not contain a path separator"
    } else if name.starts_with('.') {
        "must not start with '.'"
    } else {
        return Ok(());
    };
    Err(Invalid::new(
        "output.run_name",
        format!(
            "`output.run_name` {problem} (got `{name}`); it names one directory \
             under `output.dir`, or null to generate a name"
        ),
    ))
}

/// A value refused by validation: the dotted key and a message that names it.
pub(super) struct Invalid {
    pub(super) key: &'static str,
    pub(super) message: String,
}

impl Invalid {
    fn new(key: &'static str, message: String) -> Self {
        Invalid { key, message }
    }
}

/// A plain `data.train` path must be given; a list needs at least one set, each with a path
/// and a positive weight.
fn check_train_data(train: &TrainData) -> Checked {
    let sets = match train {
        TrainData::Path(path) => {
            return required_path("data.train", path, "the training data file", "train: data/train.jsonl")
        }
        TrainData::Sets(sets) => sets,
    };
    if sets.is_empty() {
        return Err(Invalid::new(
            "data.train",
            "`data.train` is an empty list; give a path, or data sets such as `- {path: a.jsonl, weight: 1}`"
                .to_string(),
        ));
    }
    for (i, set) in sets.iter().enumerate() {
        if set.path.as_os_str().is_empty() {
            return Err(Invalid::new(
                "data.train",
                format!("`data.train[{i}]` has no `path`; give its data file"),
            ));
        }
        if !(set.weight.is_finite() && set.weight > 0.0) {
            return Err(Invalid::new(
                "data.train",
                format!(
                    "`data.train[{i}].weight` must be a positive number (2 repeats each example, 0.5 keeps half), \
                     got {}; leave the set out rather than weighting it 0",
                    set.weight
                ),
            ));
        }
    }
    Ok(())
}

fn required_path(key: &'static str, path: &Path, what: &str, example: &str) -> Checked {
    if !path.as_os_str().is_empty() {
        return Ok(());
    }
    let (section, _) = key.split_once('.').unwrap_or((key, ""));
    Err(Invalid::new(
        key,
        format!(
            "missing required key `{key}` ({what}); add a line such as `{example}` under \
             `{section}:`, or pass `--set {key}=...`"
        ),
    ))
}

fn at_least(key: &'static str, value: usize, min: usize) -> Checked {
    if value >= min {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be at least {min}, got {value}")))
}

fn positive(key: &'static str, value: f64) -> Checked {
    if value > 0.0 && value.is_finite() {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be a finite number > 0, got {value}")))
}

/// In [0, 1).
fn fraction(key: &'static str, value: f64) -> Checked {
    if (0.0..1.0).contains(&value) {
        return Ok(());
    }
    Err(Invalid::new(key, format!("`{key}` must be in [0, 1) (at least 0 and below 1), got {value}")))
}

/// A rank/alpha pattern key must be a valid regex.
fn valid_pattern(key: &'static str, pattern: &str) -> Checked {
    match regex::Regex::new(pattern) {
        Ok(_) => Ok(()),
        Err(e) => Err(Invalid::new(key, format!("`{key}` key `{pattern}` is not a valid regex: {e}"))),
    }
}
