//! Stopping a run on request (Ctrl-C, SIGTERM): the run finishes its current step, saves a
//! checkpoint and ends with [`Interrupted`] (exit code 130).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The run stopped on request after saving a checkpoint (exit code 130).
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub checkpoint: PathBuf,
    /// The command that continues the run (filled in by the run, which knows how it was started).
    pub resume_command: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "interrupted after step {}; checkpoint {} saved", self.step, self.checkpoint.display())?;
        if let Some(run_dir) = self.checkpoint.parent() {
            write!(f, ". The run is in {}", run_dir.display())?;
        }
        write!(f, "; continue it with:\n  {}", self.resume_command)
    }
}

impl std::error::Error for Interrupted {}

/// A flag that Ctrl-C (SIGINT) or SIGTERM sets: training finishes its current step, saves a
/// checkpoint and exits. A second signal exits at once.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping after the current step and saving a checkpoint (press Ctrl-C again to quit now)"
        );
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C will stop training without a checkpoint: {e}");
    }
    stop
}
