//! The `lorafit` command line: parse, dispatch, print errors. All logic lives in the library.

use clap::{Parser, Subcommand};
use lorafit::config::Config;
use lorafit::train::run::{run, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Fine-tune causal language models with LoRA adapters and write adapters that Hugging Face PEFT,
/// vLLM and other runtimes load as they are.
#[derive(Parser)]
#[command(name = "lorafit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter as one YAML config describes (see configs/reference.yaml for every key).
    Train {
        /// The run's YAML config file.
        config: PathBuf,
        /// Override one config key, e.g. `--set train.lr=1e-4` or `--set lora.target_modules=[q_proj,v_proj]`.
        /// Repeatable; applied in order after the file is read, with the same validation.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// Replace an existing run directory of the same name instead of refusing to start.
        #[arg(long)]
        overwrite: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train {
            config,
            overrides,
            overwrite,
        } => Config::load(&config, &overrides).and_then(|cfg| {
            let config_stem = config
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            run(
                &cfg,
                &RunOptions {
                    overwrite,
                    config_stem,
                },
            )
            .map(|_| ())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
