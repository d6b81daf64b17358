//! What a training run records about itself: TensorBoard event files (so `tensorboard --logdir
//! checkpoints/` shows every run side by side) and a `metrics.jsonl` holding the same numbers.
//!
//! [`MetricsLog`] is what the training loop uses; [`EventWriter`] is the event-file writer under it.

pub mod metrics;
pub mod tensorboard;

pub use metrics::{MetricsLog, METRICS_FILE};
pub use tensorboard::EventWriter;
