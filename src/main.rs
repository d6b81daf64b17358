//! The `lorafit` command line: parse, dispatch, print errors. All logic lives in the library.

use clap::{Parser, Subcommand};
use lorafit::config::{Config, TargetModules};
use lorafit::inspect::inspect;
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
    /// Describe a Hugging Face model directory: family, size, dtype, its linear layers (the names
    /// `lora.target_modules` can use) and the trainable parameters an adapter would add.
    Inspect {
        /// The model directory (config.json, *.safetensors).
        model: PathBuf,
        /// Target modules to size an adapter for: `all-linear`, a list such as `[q_proj,v_proj]`,
        /// or a regex over module paths.
        #[arg(long, default_value = "all-linear")]
        targets: String,
        /// Adapter rank to size.
        #[arg(long, default_value_t = 8)]
        r: usize,
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
        Command::Inspect { model, targets, r } => serde_yaml::from_str::<TargetModules>(&targets)
            .map_err(|e| anyhow::anyhow!("--targets {targets}: {e}"))
            .and_then(|targets| inspect(&model, &targets, r))
            .map(|report| print!("{report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
