//! How much memory a run will take, estimated from config.json and the run's config before
//! anything is allocated, against how much the process can get: a run that cannot fit is refused
//! up front, naming the settings that size it, instead of failing in its first step.

use super::distill::TEACHER_DOUBLE_QUANT;
use crate::config::{Config, LoraConfig, Objective};
use crate::lora::select_targets;
use crate::model::load::{activation_kind, weight_kind};
use crate::model::quantized::model_bytes;
use crate::model::{LinearSites, ModelSpec};
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// The settings that size a run's memory, for messages.
pub const MEMORY_SETTINGS: &str =
    "train.micro_batch_size, data.max_seq_len or lora.r, or set train.gradient_checkpointing: true";

/// libtorch's code and working set: `lorafit eval` of the shipped 1M-parameter model peaks at a
/// resident size of 180 MB, nearly all of it this.
const RUNTIME_BYTES: u64 = 180 << 20;

/// Estimated bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The frozen base weights at the dtype they are held in (the linear layers in 4 bits with
    /// `model.quantize`).
    pub weights: u64,
    /// A distillation teacher's weights, at the student's weight dtype (none with
    /// `distill.cache`: the teacher is not loaded).
    pub teacher: u64,
    /// Adapter parameters (fp32) and their gradients.
    pub adapters: u64,
    /// AdamW's two fp32 moments per adapter parameter.
    pub optimizer: u64,
    /// What one micro-batch keeps for its backward pass, and the logits of one chunk.
    pub activations: u64,
}

impl MemoryEstimate {
    /// The run's estimate: `spec`'s weights, the adapters `lora` puts on them, and the
    /// activations of `train.micro_batch_size` rows of `row_tokens` tokens (the longest row).
    pub fn of(
        cfg: &Config,
        spec: &ModelSpec,
        lora: &LoraConfig,
        row_tokens: usize,
    ) -> Result<MemoryEstimate> {
        let sites = LinearSites::of(spec);
        let mut adapter_params = 0u64;
        let mut adapter_activations = 0u64; // per token, over all layers: dropped-out input and x·A
        for target in select_targets(&sites, lora)? {
            let site = sites.find(&target.path)?;
            let r = target.r as u64;
            adapter_params += r * (site.in_features + site.out_features) as u64;
            adapter_activations += (site.in_features as u64 + r) * 4;
        }
        let weight_kind = weight_kind(cfg.model.dtype, cfg.train.precision);
        let act = bytes(activation_kind(cfg.train.precision));
        let (h, f) = (spec.hidden_size as u64, spec.intermediate_size as u64);
        let (q, kv) = ((spec.num_heads * spec.head_dim) as u64, (spec.num_kv_heads * spec.head_dim) as u64);
        let seq = row_tokens as u64;
        let tokens = cfg.train.micro_batch_size as u64 * seq;
        // Per token of one block: norms, residuals and projections' outputs (attention's q, k,
        // v before and after RoPE, its output; the MLP's gate, up, activation and product), and
        // the attention scores and probabilities (fp32) of its row.
        let block = (8 * h + 2 * (q + 2 * kv) + 4 * f) * act + 2 * spec.num_heads as u64 * seq * 4;
        let layers = spec.num_layers as u64;
        let kept_per_token = if cfg.train.gradient_checkpointing {
            // Each block's input, and one block's activations while it runs again.
            layers * h * act + block + adapter_activations / layers.max(1)
        } else {
            layers * block + adapter_activations
        };
        let logits = (super::LOGITS_PER_CHUNK as u64) * 4 * 3; // logits, softmax, their gradient
        let count = spec.parameter_count() as u64;
        let teacher = match (&cfg.distill.teacher, &cfg.distill.cache, cfg.train.objective) {
            (Some(dir), None, Objective::Distill) => {
                let teacher = ModelSpec::from_dir(dir)?;
                let count = teacher.parameter_count() as u64;
                match cfg.distill.quantize {
                    Some(_) => {
                        model_bytes(count, weight_kind, &LinearSites::of(&teacher), TEACHER_DOUBLE_QUANT)
                    }
                    None => count * bytes(weight_kind),
                }
            }
            _ => 0,
        };
        Ok(MemoryEstimate {
            teacher,
            weights: match cfg.model.quantize {
                Some(_) => model_bytes(count, weight_kind, &sites, cfg.model.double_quant),
                None => count * bytes(weight_kind),
            },
            adapters: adapter_params * 4 * 2,
            optimizer: adapter_params * 4 * 2,
            activations: tokens * kept_per_token + logits.min(tokens * spec.vocab_size as u64 * 4 * 3),
        })
    }

    /// Everything, with libtorch's own share.
    pub fn total(&self) -> u64 {
        self.weights + self.teacher + self.adapters + self.optimizer + self.activations + RUNTIME_BYTES
    }

    /// One line for the run's opening lines.
    pub fn describe(&self) -> String {
        format!(
            "memory estimate {}: weights {}{}, adapters and gradients {}, AdamW {}, activations {}",
            gb(self.total()),
            gb(self.weights),
            match self.teacher {
                0 => String::new(),
                teacher => format!(", teacher {}", gb(teacher)),
            },
            gb(self.adapters),
            gb(self.optimizer),
            gb(self.activations)
        )
    }

    /// One line for the estimate of the other `train.gradient_checkpointing` setting than the
    /// run's: `checkpointing` is the setting this estimate is for.
    pub fn describe_alternative(&self, checkpointing: bool) -> String {
        format!(
            "{} gradient checkpointing it would be {} (activations {})",
            if checkpointing { "with" } else { "without" },
            gb(self.total()),
            gb(self.activations)
        )
    }

    /// [`MemoryEstimate::check`] against what this process can get now, for a run on the CPU
    /// (a GPU's memory is its allocator's business).
    pub fn check_host(&self, device: Device) -> Result<Option<String>> {
        match Available::now() {
            Some(available) if device == Device::Cpu => self.check(available),
            _ => Ok(None),
        }
    }

    /// Refuses a run whose estimate exceeds `available` bytes, naming the largest part and what
    /// to lower; a warning when it takes more than 80% of it.
    pub fn check(&self, available: Available) -> Result<Option<String>> {
        let total = self.total();
        let parts = [
            (self.weights, "the base weights (set model.dtype: bf16, or use a smaller model)"),
            (self.teacher, "the distillation teacher (cache its distributions with `lorafit distill-cache`)"),
            (self.adapters + self.optimizer, "the adapters and AdamW (lower lora.r or target fewer modules)"),
            (
                self.activations,
                "the activations (lower train.micro_batch_size or data.max_seq_len, or set \
                 train.gradient_checkpointing: true)",
            ),
        ];
        let largest = parts.iter().max_by_key(|p| p.0).map(|p| p.1).unwrap_or_default();
        if total > available.bytes {
            bail!(
                "this run needs about {} but the process can get {} ({}); most of it is {largest}",
                gb(total),
                gb(available.bytes),
                available.limited_by
            );
        }
        Ok((total * 10 > available.bytes * 8).then(|| {
            format!(
                "the run needs about {} of the {} the process can get ({}); most of it is {largest}",
                gb(total),
                gb(available.bytes),
                available.limited_by
            )
        }))
    }
}

/// How much more memory this process can get, and what limits it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub limited_by: &'static str,
}

impl Available {
    /// The smallest of the machine's available memory (`MemAvailable`), what the cgroup still
    /// allows, and what the address-space limit (`ulimit -v`) leaves beside what is mapped now.
    /// `None` where none of them can be read.
    pub fn now() -> Option<Available> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let limits = std::fs::read_to_string("/proc/self/limits").ok();
        let cgroup = |name: &str| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok()?.trim().parse::<u64>().ok()
        };
        let candidates = [
            (meminfo.as_deref().and_then(|m| kib_field(m, "MemAvailable:")), "available memory"),
            (
                cgroup("memory.max")
                    .zip(cgroup("memory.current"))
                    .map(|(max, used)| max.saturating_sub(used)),
                "the cgroup's memory limit",
            ),
            (
                limits.as_deref().and_then(address_space_limit).map(|limit| {
                    let mapped = status.as_deref().and_then(|s| kib_field(s, "VmSize:")).unwrap_or(0);
                    limit.saturating_sub(mapped)
                }),
                "the address-space limit (ulimit -v)",
            ),
        ];
        candidates
            .into_iter()
            .filter_map(|(bytes, limited_by)| bytes.map(|bytes| Available { bytes, limited_by }))
            .min_by_key(|a| a.bytes)
    }
}

/// A `Name:   1234 kB` line of /proc/meminfo or /proc/self/status, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    Some(line[name.len()..].split_whitespace().next()?.parse::<u64>().ok()? * 1024)
}

/// The soft "Max address space" of /proc/self/limits; `None` when unlimited.
fn address_space_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..].split_whitespace().next()?.parse().ok()
}

fn bytes(kind: Kind) -> u64 {
    match kind {
        Kind::BFloat16 | Kind::Half => 2,
        _ => 4,
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_in_bytes() {
        assert_eq!(kib_field("MemTotal: 10 kB\nMemAvailable:   2048 kB\n", "MemAvailable:"), Some(2 << 20));
        let limits = "Limit Soft Limit Hard Limit Units\nMax address space         8000000000           unlimited            bytes\n";
        assert_eq!(address_space_limit(limits), Some(8_000_000_000));
        let unlimited = "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_limit(unlimited), None);
    }
}
