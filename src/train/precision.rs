//! `train.precision: auto`: bf16-mixed where bf16 arithmetic is native, fp16-mixed on CUDA GPUs
//! without bf16, fp32 elsewhere.
//!
//! On a CPU without bf16 instructions libtorch emulates bf16 with conversions around fp32
//! arithmetic, which made bf16-mixed about 7× slower than fp32 on an AVX2 EPYC (322 vs 2355
//! tokens/s on the default model). CPUs with AVX512-BF16 or AMX-BF16, and CUDA GPUs of compute
//! capability 8.0 and up, compute bf16 natively.
//!
//! The CPU is probed through the flags in `/proc/cpuinfo` (`avx512_bf16`, `amx_bf16`) rather
//! than `is_x86_feature_detected!`, whose names for these features need a newer Rust than the
//! crate's minimum. [`CPU_BF16_ENV`] overrides the probe. A GPU's compute capability comes from
//! the CUDA driver (`cuDeviceGetAttribute`), which tch does not expose.

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
    /// Never `Auto`.
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
    match device {
        Device::Cuda(index) => choose_for_gpu(requested, cuda_capability(index)),
        _ => choose_for_cpu(requested),
    }
}

/// [`choose`] on a CUDA GPU of compute `capability` (major, minor), `None` when unknown.
/// Capability 8.0 (Ampere) and newer compute bf16 natively; older GPUs need fp16 with loss
/// scaling.
fn choose_for_gpu(requested: Precision, capability: Option<(i32, i32)>) -> Choice {
    let gpu = match capability {
        Some((major, minor)) => format!("CUDA GPU of compute capability {major}.{minor}"),
        None => "CUDA GPU whose compute capability the CUDA driver did not report".to_string(),
    };
    let has_bf16 = capability.is_none_or(|c| c >= (8, 0));
    match requested {
        Precision::Auto if has_bf16 => Choice {
            precision: Precision::Bf16Mixed,
            reason: match capability {
                Some(_) => format!("auto: {gpu}, which computes bf16"),
                None => format!("auto: {gpu}; bf16 (capability 8.0 or newer) is assumed"),
            },
            warning: None,
        },
        Precision::Auto => Choice {
            precision: Precision::Fp16Mixed,
            reason: format!("auto: {gpu}, which has no bf16"),
            warning: None,
        },
        Precision::Bf16Mixed if !has_bf16 => configured(
            requested,
            Some(format!(
                "train.precision is bf16-mixed but this is a {gpu}, which has no native bf16 (8.0 or \
                 newer has); set train.precision: auto or fp16-mixed"
            )),
        ),
        _ => configured(requested, None),
    }
}

/// [`choose`] on the CPU.
fn choose_for_cpu(requested: Precision) -> Choice {
    match requested {
        Precision::Auto => {
            let cpu = cpu_bf16();
            let (precision, reason) = if cpu.native {
                (Precision::Bf16Mixed, format!("auto: {}", cpu.finding))
            } else {
                (Precision::Fp32, format!("auto: {}; bf16 would be emulated", cpu.finding))
            };
            Choice { precision, reason, warning: None }
        }
        Precision::Bf16Mixed => {
            let cpu = cpu_bf16();
            configured(
                requested,
                (!cpu.native).then(|| {
                    format!(
                        "train.precision is bf16-mixed but {}, so libtorch emulates bf16: expect the run \
                         to be {EMULATED_SLOWDOWN} slower than fp32 (measured on an AVX2 CPU); set \
                         train.precision: auto or fp32",
                        cpu.finding
                    )
                }),
            )
        }
        Precision::Fp16Mixed => configured(
            requested,
            Some(
                "train.precision is fp16-mixed on the CPU: it is meant for CUDA GPUs without bf16; \
                 on a CPU, train.precision: auto picks fp32 or bf16-mixed by what the CPU computes natively"
                    .to_string(),
            ),
        ),
        Precision::Fp32 => configured(requested, None),
    }
}

/// The precision as the config set it.
fn configured(precision: Precision, warning: Option<String>) -> Choice {
    Choice { precision, reason: "set in the config".to_string(), warning }
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
        Precision::Fp16Mixed => "fp16-mixed",
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

/// The compute capability (major, minor) of CUDA device `index`, from the CUDA driver library;
/// `None` where it cannot be loaded or does not answer. The driver is opened at run time, so a
/// CPU-only build needs no CUDA library to link.
pub fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    #[cfg(target_os = "linux")]
    {
        cuda_driver::capability(i32::try_from(index).ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = index;
        None
    }
}

#[cfg(target_os = "linux")]
mod cuda_driver {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    extern "C" {
        fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    // cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR and _MINOR; CUDA_SUCCESS is 0.
    const CAPABILITY_MAJOR: c_int = 75;
    const CAPABILITY_MINOR: c_int = 76;

    type Init = unsafe extern "C" fn(c_uint) -> c_int;
    type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type GetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

    pub(super) fn capability(ordinal: i32) -> Option<(i32, i32)> {
        // SAFETY: the library and symbols are the CUDA driver API's, called with the signatures
        // cuda.h gives them; the handle stays open for the life of the process (libtorch holds
        // the same library open on a GPU run).
        unsafe {
            let library = dlopen(c"libcuda.so.1".as_ptr(), RTLD_NOW);
            if library.is_null() {
                return None;
            }
            let symbol = |name: &CStr| {
                let found = dlsym(library, name.as_ptr());
                (!found.is_null()).then_some(found)
            };
            let init: Init = std::mem::transmute(symbol(c"cuInit")?);
            let device_get: DeviceGet = std::mem::transmute(symbol(c"cuDeviceGet")?);
            let get_attribute: GetAttribute = std::mem::transmute(symbol(c"cuDeviceGetAttribute")?);
            let mut device = 0;
            if init(0) != 0 || device_get(&mut device, ordinal) != 0 {
                return None;
            }
            let (mut major, mut minor) = (0, 0);
            if get_attribute(&mut major, CAPABILITY_MAJOR, device) != 0
                || get_attribute(&mut minor, CAPABILITY_MINOR, device) != 0
            {
                return None;
            }
            Some((major, minor))
        }
    }
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

    /// `auto` on a GPU: bf16-mixed from capability 8.0 (and when the capability is unknown),
    /// fp16-mixed below; bf16-mixed set on an older GPU warns.
    #[test]
    fn gpu_choice_by_capability() {
        let auto = |capability| choose_for_gpu(Precision::Auto, capability).precision;
        assert_eq!(auto(Some((9, 0))), Precision::Bf16Mixed);
        assert_eq!(auto(Some((8, 0))), Precision::Bf16Mixed);
        assert_eq!(auto(Some((7, 5))), Precision::Fp16Mixed);
        assert_eq!(auto(Some((7, 0))), Precision::Fp16Mixed);
        assert_eq!(auto(None), Precision::Bf16Mixed);
        assert!(choose_for_gpu(Precision::Bf16Mixed, Some((7, 5))).warning.is_some());
        assert!(choose_for_gpu(Precision::Bf16Mixed, Some((8, 6))).warning.is_none());
        assert!(choose_for_gpu(Precision::Fp16Mixed, Some((7, 5))).warning.is_none());
        assert!(choose_for_gpu(Precision::Auto, Some((7, 5))).reason.contains("7.5"));
    }

    /// The driver probe reads a capability where libtorch sees a GPU, and answers nothing
    /// rather than failing where it sees none.
    #[test]
    fn capability_probe() {
        match tch::Cuda::is_available() {
            true => assert!(cuda_capability(0).is_some_and(|(major, _)| major >= 3)),
            false => assert_eq!(cuda_capability(0), None),
        }
    }
}
