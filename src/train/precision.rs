//! `train.precision: auto`: bf16-mixed where bf16 arithmetic is native, fp32 elsewhere.
//!
//! On a CPU without bf16 instructions libtorch emulates bf16 with conversions around fp32
//! arithmetic, which made bf16-mixed about 7× slower than fp32 on an AVX2 EPYC (322 vs 2355
//! tokens/s on the default model). CPUs with AVX512-BF16 or AMX-BF16, and CUDA GPUs of compute
//! capability 8.0 and up, compute bf16 natively.
//!
//! The CPU is probed through the flags in `/proc/cpuinfo` (`avx512_bf16`, `amx_bf16`) rather
//! than `is_x86_feature_detected!`, whose names for these features need a newer Rust than the
//! crate's minimum. [`CPU_BF16_ENV`] overrides the probe.

use crate::config::{Config, Precision, TrainConfig};
use tch::Device;

/// Set to `1` or `0` to say whether the CPU computes bf16 natively instead of probing it (for
/// tests, and for a CPU whose flags are hidden from `/proc/cpuinfo`, e.g. in some VMs).
pub const CPU_BF16_ENV: &str = "LORAFIT_CPU_BF16";

/// How much slower bf16-mixed ran than fp32 on a CPU without native bf16 (AVX2 EPYC, default
/// model), for the warning.
const EMULATED_SLOWDOWN: &str = "about 7×";

/// The precision a run uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `Fp32` or `Bf16Mixed`, never `Auto`.
    pub precision: Precision,
    /// Why, for the banner: e.g. "auto: this CPU has AVX512-BF16".
    pub reason: String,
    /// Set when the configured precision is likely to be much slower than the alternative.
    pub warning: Option<String>,
}

impl Choice {
    /// The banner's words: "bf16-mixed (auto: this CPU has AVX512-BF16)".
    pub fn describe(&self) -> String {
        format!("{} ({})", name(self.precision), self.reason)
    }
}

/// What the CPU offers for bf16.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuBf16 {
    /// bf16 matrix arithmetic in hardware.
    pub native: bool,
    /// What was found, as a clause: "this CPU has AVX512-BF16 and AMX-BF16", "no native bf16
    /// on this CPU", "LORAFIT_CPU_BF16=0 says this CPU has no native bf16", ...
    pub finding: String,
}

/// Resolves `requested` for a run on `device`: the one place `auto` becomes a precision.
pub fn choose(requested: Precision, device: Device) -> Choice {
    let configured =
        |warning| Choice { precision: requested, reason: "set in the config".to_string(), warning };
    match (requested, device) {
        (Precision::Auto, Device::Cuda(_)) => Choice {
            precision: Precision::Bf16Mixed,
            // libtorch's C API, as tch exposes it, does not report the compute capability.
            reason: "auto: CUDA GPU; lorafit cannot read its compute capability, so bf16 support \
                     (capability 8.0 or newer) is assumed; set train.precision: fp32 on an older GPU"
                .to_string(),
            warning: None,
        },
        (Precision::Auto, _) => {
            let cpu = cpu_bf16();
            let (precision, reason) = if cpu.native {
                (Precision::Bf16Mixed, format!("auto: {}", cpu.finding))
            } else {
                (Precision::Fp32, format!("auto: {}; bf16 would be emulated", cpu.finding))
            };
            Choice { precision, reason, warning: None }
        }
        (Precision::Bf16Mixed, Device::Cpu) => {
            let cpu = cpu_bf16();
            configured((!cpu.native).then(|| {
                format!(
                    "train.precision is bf16-mixed but {}, so libtorch emulates bf16: expect the run to \
                     be {EMULATED_SLOWDOWN} slower than fp32 (measured on an AVX2 CPU); set \
                     train.precision: auto or fp32",
                    cpu.finding
                )
            }))
        }
        _ => configured(None),
    }
}

/// `cfg` with its precision resolved for `device` (see [`choose`]), and the choice. A warning
/// goes to stderr at once, so that every command that runs the model gives it.
pub fn resolve(cfg: &Config, device: Device) -> (Config, Choice) {
    let choice = choose(cfg.train.precision, device);
    if let Some(warning) = &choice.warning {
        eprintln!("warning: {warning}");
    }
    let train = TrainConfig { precision: choice.precision, ..cfg.train.clone() };
    (Config { train, ..cfg.clone() }, choice)
}

/// The YAML spelling of a precision.
pub fn name(precision: Precision) -> &'static str {
    match precision {
        Precision::Auto => "auto",
        Precision::Fp32 => "fp32",
        Precision::Bf16Mixed => "bf16-mixed",
    }
}

/// Whether this CPU computes bf16 natively: [`CPU_BF16_ENV`] when set, else the flags of
/// `/proc/cpuinfo` (none on non-x86 CPUs and outside Linux).
pub fn cpu_bf16() -> CpuBf16 {
    let answer = |native: bool, finding: String| CpuBf16 { native, finding };
    match std::env::var(CPU_BF16_ENV).as_deref() {
        Ok("1") => return answer(true, format!("{CPU_BF16_ENV}=1 says this CPU has native bf16")),
        Ok("0") => return answer(false, format!("{CPU_BF16_ENV}=0 says this CPU has no native bf16")),
        _ => {}
    }
    if !cfg!(target_arch = "x86_64") {
        return answer(false, "no native bf16 on this CPU (not x86-64)".to_string());
    }
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(text) => from_cpuinfo(&text),
        Err(_) => answer(false, "/proc/cpuinfo is unreadable, so no native bf16 is assumed".to_string()),
    }
}

/// The bf16 instructions the `flags` line of `/proc/cpuinfo` lists.
fn from_cpuinfo(text: &str) -> CpuBf16 {
    let flags: Vec<&str> = text
        .lines()
        .find(|line| line.starts_with("flags"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().collect())
        .unwrap_or_default();
    let found: Vec<&str> = [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")]
        .into_iter()
        .filter(|(flag, _)| flags.contains(flag))
        .map(|(_, name)| name)
        .collect();
    if found.is_empty() {
        return CpuBf16 { native: false, finding: "no native bf16 on this CPU".to_string() };
    }
    CpuBf16 { native: true, finding: format!("this CPU has {}", found.join(" and ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags() {
        let amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n";
        assert_eq!(
            from_cpuinfo(amx),
            CpuBf16 { native: true, finding: "this CPU has AVX512-BF16 and AMX-BF16".into() }
        );
        let avx2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n";
        assert!(!from_cpuinfo(avx2).native);
        // A flag must match whole, not as a prefix of another.
        assert!(!from_cpuinfo("flags : avx512_bf16x\n").native);
        assert!(!from_cpuinfo("").native);
    }
}
