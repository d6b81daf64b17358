//! What a training run records and shows about itself: TensorBoard event files (so `tensorboard
//! --logdir checkpoints/` shows every run side by side) and a `metrics.jsonl` holding the same
//! numbers; the console lines, JSON records and progress bars of a run.
//!
//! [`MetricsLog`] is what the training loop uses; [`EventWriter`] is the event-file writer under it.

pub mod console;
pub mod hparams;
pub mod metrics;
pub mod progress;
pub mod tensorboard;

pub use console::{Console, LogFormat};
pub use metrics::{MetricsLog, METRICS_FILE};
pub use tensorboard::EventWriter;
