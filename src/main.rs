//! The `lorafit` command line: parse, dispatch, print errors. All logic lives in the library.

use clap::{Parser, Subcommand};
use lorafit::config::TargetModules;
use lorafit::export::gguf::GgufDtype;
use lorafit::export::merge::MergeDtype;
use lorafit::generate::{generate_command, BulkFiles, GenerateOptions, Sampling};
use lorafit::init::{init_command, InitOptions};
use lorafit::inspect::inspect;
use lorafit::torch_errors;
use lorafit::train::data_commands::{self, Split};
use lorafit::train::distill_cache::{distill_cache_command, DEFAULT_TOP_K};
use lorafit::train::eval::{eval_command, eval_report, EvalOptions};
use lorafit::train::interrupt::{stop_on_signal, Interrupted};
use lorafit::train::memory::MEMORY_SETTINGS;
use lorafit::train::run::{dry_run_command, train_command, LogFormat, RunOptions};
use std::path::{Path, PathBuf};
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
    /// Write a commented starting config for a model and a data file: the family's usual LoRA
    /// settings (a preset), the model's linear layers, the data's record layout.
    Init {
        /// The Hugging Face model directory to fine-tune.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The training data file (its record layout is detected from its columns).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Settings of a family: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt2,
        /// smollm2. Default: the model's family.
        #[arg(long)]
        preset: Option<String>,
        /// The config file to write.
        #[arg(long, default_value = "lorafit.yaml")]
        out: PathBuf,
        /// Replace the file when it exists.
        #[arg(long)]
        force: bool,
    },
    /// Train a LoRA adapter as one YAML config describes (see configs/reference.yaml for every key).
    Train {
        /// The run's YAML config file.
        config: PathBuf,
        /// Override one config key, e.g. `--set train.lr=1e-4` or `--set lora.target_modules=[q_proj,v_proj]`.
        /// Repeatable; applied in order after the file is read, with the same validation.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// Replace an existing run directory of the same name instead of refusing to start.
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Continue from the newest complete checkpoint of the run the config names
        /// (output.run_name), or from the checkpoint or run directory given.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
        resume: Option<String>,
        /// With --resume: continue even when the config changes a setting the checkpoint's steps
        /// depended on (seed, data, batch sizes, adapter shape, ...); the changes are recorded in
        /// the run's resumed_with_changes.txt. Without it such a resume is refused.
        #[arg(long, requires = "resume")]
        resume_anyway: bool,
        /// How progress is reported: `text` (lines, and a progress bar on a terminal), `json`
        /// (one JSON object per logged step and evaluation on stdout, for scripts and CI), or
        /// `quiet` (errors only).
        #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
        log_format: LogFormatArg,
        /// Check and load everything, print the run's figures (parameters, trainable share,
        /// tokens and steps per epoch, real-token share, memory estimate with and without
        /// gradient checkpointing) and exit without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Train data-parallel in N local worker processes (each takes 1/N of every step's
        /// micro-batches and of the cores), meeting on a free loopback port, as `torchrun
        /// --standalone --nproc-per-node N` would start them.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        nproc_per_node: Option<u32>,
    },
    /// Compute the validation loss and perplexity of the base model with an adapter, exactly as
    /// training logs them.
    Eval {
        /// The run's YAML config file (model, validation data, batching); or give --data (and
        /// --model, or an --adapter that names its base model) instead.
        #[arg(required_unless_present = "data")]
        config: Option<PathBuf>,
        /// The base model directory (without a config); default: the adapter's
        /// `base_model_name_or_path`, when that is a model directory here.
        #[arg(long, conflicts_with = "config", requires = "data")]
        model: Option<PathBuf>,
        /// The evaluation data file (without a config); its format is `alpaca` unless
        /// `--set data.format=...` says otherwise.
        #[arg(long, conflicts_with = "config")]
        data: Option<PathBuf>,
        /// The PEFT adapter directory; default: the run's final adapter
        /// (output.dir/output.run_name/adapter). `none` evaluates the base model alone.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// Override one config key, as for `train`.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
    },
    /// Run a config's distillation teacher once over its training and validation examples and
    /// write its top-k log-probabilities at every trained token to a folder, which training then
    /// reads (`distill.cache: DIR`) instead of holding the teacher in memory.
    DistillCache {
        /// The run's YAML config file (its `distill.teacher`, temperature and data).
        config: PathBuf,
        /// Override one config key, as for `train`.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// How many of the teacher's most likely tokens to keep per position (at most the
        /// vocabulary; the rest of the mass is kept as one number).
        #[arg(long, value_name = "K", default_value_t = DEFAULT_TOP_K)]
        top_k: usize,
        /// The cache folder to write (replaced whole once complete); default: `distill.cache`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Look at the training data as the model will see it.
    #[command(subcommand)]
    Data(DataCommand),
    /// Merge an adapter into its base model: W' = W + scale·(B@A), computed in fp32 and cast once,
    /// written as a complete Hugging Face model directory (streamed tensor by tensor).
    Merge {
        /// The base model directory; default: the adapter's `base_model_name_or_path`, when that
        /// is a model directory here.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The new model directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype of the merged model: same (as the base), bf16, fp16 or fp32.
        #[arg(long, default_value = "same")]
        dtype: String,
    },
    /// Write a model directory again with its linear weights in 4 bits (NF4 or FP4, blocks of 64,
    /// bitsandbytes' layout): transformers + bitsandbytes and lorafit load it as it is.
    Quantize {
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
        /// The new model directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// nf4 or fp4, in any case.
        #[arg(long, default_value = "nf4")]
        format: String,
        /// Keep the block scales in fp32 instead of quantizing them to 8 bits.
        #[arg(long)]
        no_double_quant: bool,
    },
    /// Convert an adapter for another runtime: a llama.cpp LoRA GGUF (for llama-server, LM Studio,
    /// Ollama). Prints which runtimes load the adapter as it is.
    Export {
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The output format (only `gguf` for now).
        #[arg(long, default_value = "gguf")]
        format: String,
        /// The base model directory the adapter was trained on; default: the adapter's
        /// `base_model_name_or_path`, when that is a model directory here.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The output file (refused if it exists, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Tensor type of the GGUF file: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Try a model, with or without an adapter: a prompt in, the continuation streamed out.
    Generate(GenerateArgs),
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

#[derive(clap::Args)]
struct GenerateArgs {
    /// The Hugging Face model directory (or take it from --run or --config); default with
    /// --adapter: its `base_model_name_or_path`, when that is a model directory here.
    #[arg(long, required_unless_present_any = ["run", "config", "adapter"], conflicts_with_all = ["run", "config"])]
    model: Option<PathBuf>,
    /// A training run's directory: its model, its adapter (RUN_DIR/adapter, unless --adapter
    /// says otherwise), and prompts put to the model as its training data put its examples
    /// (the alpaca prompt or the chat template).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    run: Option<PathBuf>,
    /// A run's YAML config: its model and its prompt format, as with --run (the adapter only
    /// with --adapter).
    #[arg(long, value_name = "CONFIG")]
    config: Option<PathBuf>,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A JSON Lines file of prompts to answer, one record a line: `prompt` (or `instruction`),
    /// or MT-Bench's `turns` (each turn asked after the earlier answers; needs a chat template).
    /// Each record is written to --out with its `answer`, or FastChat's `choices` for `turns`.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "compare", "show_prompt"], requires = "out")]
    prompts: Option<PathBuf>,
    /// Where --prompts' answers go (JSON Lines).
    #[arg(long, value_name = "FILE.jsonl", requires = "prompts")]
    out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long, requires = "out")]
    force: bool,
    /// Send the prompt as a user message through the chat template (see --template).
    #[arg(long, conflicts_with_all = ["run", "config"])]
    chat: bool,
    /// Chat template for --chat: auto (the model's own), chatml, llama3, a .jinja file, or the
    /// template's text.
    #[arg(long, default_value = "auto")]
    template: String,
    /// Print the base model's answer and the adapted one, one after the other.
    #[arg(long)]
    compare: bool,
    /// Print the exact text put to the model (prompt format and special tokens included) to
    /// stderr before generating.
    #[arg(long)]
    show_prompt: bool,
    /// Most tokens to generate (it stops earlier at EOS or the end of the turn).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the most likely token every time).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long)]
    top_k: Option<i64>,
    /// Sample only among the most likely tokens whose probabilities add up to p, in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
    Quiet,
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
    /// Write every prepared example as one JSON line with `input_ids`, `labels` (-100 where no
    /// loss) and `text`: exactly what a run trains on.
    Export {
        /// The run's YAML config file.
        config: PathBuf,
        /// Override one config key, as for `train`.
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// The JSON Lines file to write.
        #[arg(long)]
        out: PathBuf,
        /// Which examples: the training set or the validation set.
        #[arg(long, value_enum, default_value_t = SplitArg::Train)]
        split: SplitArg,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SplitArg {
    Train,
    Validation,
}

fn main() -> ExitCode {
    // The CPU's allocator setting; a GPU's memory has its own caching allocator.
    if !tch::Cuda::is_available() {
        lorafit::host_memory::retain_freed_memory();
    }
    let cli = Cli::parse();
    // A libtorch failure anywhere (loading, evaluating) is an error, not a panic; the training
    // step and generation catch their own with a more precise message.
    let result = torch_errors::catch("lorafit", MEMORY_SETTINGS, || dispatch(cli.command)).and_then(|r| r);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<Interrupted>().is_some() => {
            eprintln!("{err}");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// This command's arguments without `--nproc-per-node`: what each local worker runs.
fn worker_args() -> Vec<String> {
    let mut args = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        if arg == "--nproc-per-node" {
            given.next();
        } else if !arg.starts_with("--nproc-per-node=") {
            args.push(arg);
        }
    }
    args
}

/// Runs one command.
fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { model, data, preset, out, force } => {
            let summary = init_command(&InitOptions { model, data, preset, out, force })?;
            println!("{summary}");
            Ok(())
        }
        Command::Train { nproc_per_node: Some(n), .. } if n > 1 => {
            let code = lorafit::dist::launch_local(n as usize, &worker_args())?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Train {
            config, overrides, overwrite, resume, resume_anyway, log_format, dry_run, ..
        } => {
            let options = RunOptions {
                overwrite,
                resume: resume.map(|p| (!p.is_empty()).then(|| PathBuf::from(p))),
                resume_anyway,
                stop: Some(stop_on_signal()),
                log_format: log_format.into(),
                ..RunOptions::default()
            };
            if dry_run {
                return dry_run_command(&config, &overrides, options);
            }
            train_command(&config, &overrides, options).map(|_| ())
        }
        Command::Eval { config, model, data, adapter, overrides } => {
            eval_command(&EvalOptions { config, model, data, adapter, overrides })
                .map(|v| print!("{}", eval_report(&v)))
        }
        Command::DistillCache { config, overrides, top_k, out } => {
            let report = distill_cache_command(&config, &overrides, top_k, out.as_deref(), true)?;
            let (train, validation) = report.targets;
            println!(
                "teacher cache {}: top {} at {train} training and {validation} validation tokens, {:.1} MB, \
                 in {:.1} s",
                report.dir.display(),
                report.top_k,
                report.bytes as f64 / 1e6,
                report.seconds
            );
            Ok(())
        }
        Command::Generate(args) => generate_command(&args.into(), &mut std::io::stdout()),
        Command::Export { adapter, format, model, out, dtype, force } => dtype
            .parse::<GgufDtype>()
            .map_err(|e| anyhow::anyhow!("--dtype {dtype}: {e}"))
            .and_then(|dtype| {
                lorafit::export::gguf::export_command(&adapter, &format, model.as_deref(), &out, dtype, force)
            })
            .map(|report| print!("{report}")),
        Command::Merge { model, adapter, out, dtype } => merge(model.as_deref(), &adapter, &out, &dtype),
        Command::Quantize { model, out, format, no_double_quant } => {
            quantize(&model, &out, &format, !no_double_quant)
        }
        Command::Data(DataCommand::Preview { config, overrides, n }) => {
            data_commands::preview_command(&config, &overrides, n).map(|report| print!("{report}"))
        }
        Command::Data(DataCommand::Export { config, overrides, out, split }) => {
            let split = match split {
                SplitArg::Train => Split::Train,
                SplitArg::Validation => Split::Validation,
            };
            data_commands::export_command(&config, &overrides, &out, split)
                .map(|summary| println!("{summary}"))
        }
        Command::Inspect { model, targets, r } => serde_yaml::from_str::<TargetModules>(&targets)
            .map_err(|e| anyhow::anyhow!("--targets {targets}: {e}"))
            .and_then(|targets| inspect(&model, &targets, r))
            .map(|report| print!("{report}")),
    }
}

/// `lorafit merge`: merges and says what it wrote (and, onto a 4-bit base, what that costs).
fn merge(model: Option<&Path>, adapter: &Path, out: &Path, dtype: &str) -> anyhow::Result<()> {
    let dtype = dtype.parse::<MergeDtype>().map_err(|e| anyhow::anyhow!("--dtype {dtype}: {e}"))?;
    let report = lorafit::export::merge::merge_command(model, adapter, out, dtype)?;
    if let Some(warning) = report.warning() {
        eprintln!("warning: {warning}");
    }
    println!(
        "merged {} adapted weights into {} ({} shard{}, {:.1} MB)",
        report.tensors_merged,
        out.display(),
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        report.bytes as f64 / 1e6
    );
    Ok(())
}

/// `lorafit quantize`: writes the 4-bit checkpoint and says what it holds.
fn quantize(model: &Path, out: &Path, format: &str, double_quant: bool) -> anyhow::Result<()> {
    let format = serde_yaml::from_str::<lorafit::config::QuantFormat>(&format.to_ascii_lowercase())
        .map_err(|_| anyhow::anyhow!("--format {format}: expected nf4 or fp4"))?;
    let report = lorafit::export::quantize::quantize_command(model, out, format, double_quant)?;
    println!(
        "wrote {} with {} linear weights in 4 bits ({:.1} MB)",
        out.display(),
        report.quantized,
        report.bytes as f64 / 1e6
    );
    Ok(())
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> LogFormat {
        match arg {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
            LogFormatArg::Quiet => LogFormat::Quiet,
        }
    }
}

impl From<GenerateArgs> for GenerateOptions {
    fn from(args: GenerateArgs) -> GenerateOptions {
        GenerateOptions {
            model: args.model,
            run: args.run,
            config: args.config,
            adapter: args.adapter,
            prompt: args.prompt,
            bulk: args.prompts.zip(args.out).map(|(prompts, out)| BulkFiles {
                prompts,
                out,
                force: args.force,
            }),
            chat: args.chat,
            template: args.template,
            compare: args.compare,
            show_prompt: args.show_prompt,
            max_new_tokens: args.max_new_tokens,
            sampling: Sampling {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                seed: args.seed,
            },
        }
    }
}
