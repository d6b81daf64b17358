//! The `lorafit` command line: parse, dispatch, print errors. All logic lives in the library.

use clap::{Parser, Subcommand};
use lorafit::config::{Config, TargetModules};
use lorafit::data::preview;
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
    /// Look at the training data as the model will see it.
    #[command(subcommand)]
    Data(DataCommand),
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

#[derive(Subcommand)]
enum DataCommand {
    /// Print the first examples with the trained tokens marked, token counts, the real-token
    /// share with and without packing, and a length histogram.
    Preview {
        /// The run's YAML config file.
        config: PathBuf,
        /// Override one config key, as for `train`.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// How many examples to print.
        #[arg(short, long, default_value_t = 3)]
        n: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { config, overrides, overwrite } => {
            Config::load(&config, &overrides).and_then(|cfg| {
                let config_stem =
                    config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                run(&cfg, &RunOptions { overwrite, config_stem }).map(|_| ())
            })
        }
        Command::Data(DataCommand::Preview { config, overrides, n }) => {
            Config::load(&config, &overrides).and_then(|cfg| preview_command(&cfg, n))
        }
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

/// `lorafit data preview`: prepares the data exactly as `train` would and prints it.
fn preview_command(cfg: &Config, n: usize) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let spec = lorafit::model::ModelSpec::from_dir(&cfg.model.path)?;
    let data = lorafit::train::run::load_data(cfg, &spec)?;
    let marks = if std::io::stdout().is_terminal() { &preview::COLOURS } else { &preview::BRACKETS };
    let report = preview::preview(
        &data.train,
        &data.tokenizer,
        n,
        cfg.data.max_seq_len,
        cfg.train.micro_batch_size,
        marks,
    )?;
    print!("{report}");
    Ok(())
}
