//! libtorch failures as errors. libtorch reports a failure (above all an allocation it cannot get)
//! by throwing; tch turns that into a Rust panic. [`catch`] turns such a panic back into an error
//! that says what ran out and what to lower, and keeps the panic hook from printing a panic
//! message and backtrace note for it. Any other panic is a bug and goes on unwinding as before.

use anyhow::{anyhow, Result};
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Whether this thread is inside [`catch`], where the hook stays quiet about libtorch panics.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a libtorch failure in it into an error. `doing` names the work ("training
/// step 12", "loading the model") and `lower` the settings that shrink it, for the message.
/// Memory `f` had allocated is freed as the panic unwinds; what it left half-done (gradients
/// of a step) must not be used afterwards.
pub fn catch<T>(doing: &str, lower: &str, f: impl FnOnce() -> T) -> Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let ours = CATCHING.with(Cell::get) && torch_message(info.payload()).is_some();
            if !ours {
                default(info);
            }
        }));
    });
    let outer = CATCHING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| match torch_message(payload.as_ref()) {
        Some(message) => describe(doing, lower, &message),
        None => panic::resume_unwind(payload),
    })
}

/// The error for libtorch's `message` while `doing`.
fn describe(doing: &str, lower: &str, message: &str) -> anyhow::Error {
    // libtorch's first line says what failed; the rest is its C++ backtrace.
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim();
    let lowered = message.to_lowercase();
    let out_of_memory = ["out of memory", "can't allocate memory", "cannot allocate memory"]
        .iter()
        .any(|m| lowered.contains(m));
    if out_of_memory {
        anyhow!("{doing} ran out of memory ({first}). Lower {lower}")
    } else {
        anyhow!("{doing} failed in libtorch: {first}")
    }
}

/// libtorch's message when `payload` is a panic tch raised for a libtorch error.
fn torch_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    let text = match (payload.downcast_ref::<String>(), payload.downcast_ref::<&str>()) {
        (Some(s), _) => s.as_str(),
        (None, Some(s)) => s,
        (None, None) => return None,
    };
    // tch's `unwrap()` of a `TchError::Torch(message)`.
    let start = text.find("Torch(\"")? + "Torch(\"".len();
    let body = text[start..].strip_suffix("\")").unwrap_or(&text[start..]);
    Some(body.replace("\\n", "\n").replace("\\\"", "\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn an_allocation_libtorch_cannot_get_is_an_error_naming_what_to_lower() {
        let err = catch("the test", "its size", || Tensor::zeros([1 << 60], (Kind::Float, tch::Device::Cpu)))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("the test ran out of memory ("), "{err}");
        assert!(err.ends_with("Lower its size"), "{err}");
        assert!(!err.contains('\n'), "one line, no C++ backtrace: {err}");
    }

    #[test]
    fn other_panics_still_unwind() {
        let outer = panic::catch_unwind(|| catch("x", "y", || panic!("a bug")));
        assert!(outer.is_err());
    }
}
