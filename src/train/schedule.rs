//! Learning-rate schedules with linear warmup, as Hugging Face's `get_*_schedule_with_warmup`.

use crate::config::LrScheduler;

/// The learning rate of step `step` (1-based, as every step number in a run): the value Hugging
/// Face's schedule gives its `step - 1`-th update, so the first update of a warmup uses 0.
pub fn learning_rate(kind: LrScheduler, base_lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let step = step.saturating_sub(1);
    if step < warmup {
        return base_lr * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    let factor = match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => (1.0 - progress).max(0.0),
        LrScheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base_lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_zero_at_the_end() {
        let lr = |k, s: usize| learning_rate(k, 1.0, s + 1, 10, 110);
        assert_eq!(lr(LrScheduler::Cosine, 0), 0.0);
        assert_eq!(lr(LrScheduler::Cosine, 5), 0.5);
        assert_eq!(lr(LrScheduler::Cosine, 10), 1.0);
        assert!((lr(LrScheduler::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(LrScheduler::Cosine, 110).abs() < 1e-12);
        assert!((lr(LrScheduler::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(LrScheduler::Linear, 110), 0.0);
        assert_eq!(lr(LrScheduler::Constant, 109), 1.0);
    }
}
