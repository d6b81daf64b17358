//! lorafit's side of the speed benchmark (`scripts/bench.sh`): LoRA training steps through the
//! library on saved token batches, measured the way `scripts/bench/peft_train.py` measures PEFT.
//!
//!     cargo run --release --example train_speed -- --model DIR --batches FILE \
//!         --precision fp32|bf16-mixed [--warmup N] [--steps N] [--threads N] [--device cpu|cuda]
//!     cargo run --release --example train_speed -- --model DIR --data CONFIG --examples-out FILE \
//!         --precision fp32|bf16-mixed [--warmup N] [--steps N] [--threads N]
//!     cargo run --release --example train_speed -- --gemm [--threads N]
//!     cargo run --release --example train_speed -- --cpu
//!
//! `--checkpointing` turns on activation checkpointing (`train.gradient_checkpointing`).
//! `--quantize nf4|fp4` stores the frozen linear weights in 4 bits as `model.quantize` does (QLoRA:
//! blocks of 64, double-quantized scales, quantized tensor by tensor at load), computing in the
//! precision's dtype; the JSON then names the format in `quantize`.
//!
//! Data-parallel (`scripts/bench.sh dist`): launched by torchrun, e.g.
//! `torchrun --standalone --nproc-per-node 2 --no-python train_speed --batches FILE ...`, each
//! worker joins the group from the environment as `lorafit train` does and trains on its slice of
//! every saved batch's rows (the global batch stays the saved one), the gradients summed across
//! the workers each step. Rank 0 alone prints the JSON, which adds `workers` and allreduce_s /
//! allreduce_share: the time inside the step's all-reduces (token counts, then the adapter
//! gradients with the loss; waiting for the other worker included) per measured step, and its
//! share of the measured step time.
//!
//! Training: LoRA r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down; AdamW (lr 1e-4, no weight
//! decay), gradient norm clipped at 1.0; step i trains on saved batch i (labels = inputs).
//! `bf16-mixed` is what `lorafit train` does for that precision: frozen weights in bf16 and the
//! blocks computed in bf16, with fp32 adapter weights, residual stream, norms and loss.
//! Prints one JSON line: tokens_per_s (tokens of one global step / median step time), median_step_s,
//! peak_rss_mb (VmHWM, the whole process including loading), first_loss (step 0, before any
//! update), final_loss (the last step's), and the per-step times and losses of the measured steps.
//!
//! `--data` is the real-data case: the data section of CONFIG (its model path replaced by `--model`)
//! is prepared as `lorafit train` prepares it, the examples are written to FILE as JSON Lines
//! (`input_ids`, `labels`) for the PEFT side, and training runs on `lorafit train`'s batches
//! (packed rows of `max_seq_len`, `micro_batch_size` rows a step). The JSON adds label_tokens_per_s
//! and real_tokens_per_s (over all measured steps), since steps then differ in size.
//!
//! `--gemm` measures the machine's matmul throughput instead (the roofline for model FLOP
//! utilisation): square 2048² matmuls in fp32 and bf16, the best of up to ten within a time
//! bound, printed as GFLOP/s. Where the CPU has no native bf16 (see `--cpu`) the bf16 probe is
//! skipped and reported as `"emulated"`: emulated bf16 GEMMs are slow enough to stall the bench.
//!
//! `--cpu` prints the CPU's model name and whether it computes bf16 natively (AVX512-BF16 or
//! AMX-BF16 in `/proc/cpuinfo`, as `train.precision: auto` decides).

use anyhow::{bail, Context, Result};
use lorafit::config::{Config, LoraConfig, Precision, QuantFormat, TargetModules, TrainConfig, WeightDtype};
use lorafit::data::{Batch, EpochPlan, Example};
use lorafit::dist::{Backend, Group, Rendezvous};
use lorafit::files::write_atomic;
use lorafit::lora;
use lorafit::model::load::{load_model_quantized, weight_kind};
use lorafit::model::{Decoder, ModelSpec};
use lorafit::train::run::{collate, load_run_data, row_layout};
use lorafit::train::Trainer;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const LR: f64 = 1e-4;

struct Args {
    model: Option<PathBuf>,
    batches: Option<PathBuf>,
    precision: Precision,
    warmup: usize,
    steps: usize,
    threads: usize,
    gemm: bool,
    cpu: bool,
    checkpointing: bool,
    /// `--quantize nf4|fp4`: the frozen linear weights in 4 bits (double-quantized scales).
    quantize: Option<QuantFormat>,
    data: Option<PathBuf>,
    examples_out: Option<PathBuf>,
    /// `--device cpu|cuda|cuda:N`: where the model and batches live (the GPU check's runs).
    device: Device,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: None,
        batches: None,
        precision: Precision::Fp32,
        warmup: 2,
        steps: 5,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        gemm: false,
        cpu: false,
        checkpointing: false,
        quantize: None,
        data: None,
        examples_out: None,
        device: Device::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--gemm" || flag == "--cpu" || flag == "--checkpointing" {
            args.gemm |= flag == "--gemm";
            args.cpu |= flag == "--cpu";
            args.checkpointing |= flag == "--checkpointing";
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => args.model = Some(value.into()),
            "--batches" => args.batches = Some(value.into()),
            "--data" => args.data = Some(value.into()),
            "--examples-out" => args.examples_out = Some(value.into()),
            "--precision" => {
                args.precision = match value.as_str() {
                    "fp32" => Precision::Fp32,
                    "bf16-mixed" => Precision::Bf16Mixed,
                    other => bail!("--precision {other}: expected fp32 or bf16-mixed"),
                }
            }
            "--quantize" => {
                args.quantize = Some(match value.as_str() {
                    "nf4" => QuantFormat::Nf4,
                    "fp4" => QuantFormat::Fp4,
                    other => bail!("--quantize {other}: expected nf4 or fp4"),
                })
            }
            "--warmup" => args.warmup = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--threads" => args.threads = value.parse()?,
            "--device" => args.device = lorafit::model::load::resolve_device(&value)?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Peak resident set size of this process in MB (VmHWM, reported in kB by Linux).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The time one dtype's GEMM probe may take, warm-up included: the probe must not stall the bench
/// on a slow or busy CPU.
const GEMM_BUDGET_S: f64 = 10.0;

/// GFLOP/s of an `n`×`n` by `n`×`n` matmul in `kind`: the best of up to ten timed products after
/// one warm-up (thread pool start, kernel selection), stopping once [`GEMM_BUDGET_S`] is spent
/// (at least one product is timed). The best, not the median, because this is the roofline: on a
/// shared machine the slower products measure the neighbours, not the hardware.
fn gemm_gflops(kind: Kind, n: i64) -> f64 {
    let started = Instant::now();
    let a = Tensor::randn([n, n], (kind, Device::Cpu));
    let b = Tensor::randn([n, n], (kind, Device::Cpu));
    let _ = a.matmul(&b);
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        let c = a.matmul(&b);
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
        if started.elapsed().as_secs_f64() > GEMM_BUDGET_S {
            break;
        }
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// The GEMM roofline: fp32, and bf16 where the CPU computes it natively ("emulated" elsewhere).
fn gemm_json(threads: usize) -> serde_json::Value {
    let n = 2048;
    let native = lorafit::train::precision::cpu_bf16().native;
    json!({
        "gemm_n": n,
        "threads": threads,
        "fp32_gflops": gemm_gflops(Kind::Float, n),
        "bf16_gflops": if native { json!(gemm_gflops(Kind::BFloat16, n)) } else { json!("emulated") },
    })
}

/// The CPU's model name (the first `model name` of `/proc/cpuinfo`) and its bf16 support.
fn cpu_json() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, name)| name.trim());
    let bf16 = lorafit::train::precision::cpu_bf16();
    json!({
        "model": model,
        "avx512_bf16": bf16.finding.contains("AVX512-BF16"),
        "amx_bf16": bf16.finding.contains("AMX-BF16"),
        "native_bf16": bf16.native,
        "finding": bf16.finding,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

fn main() -> Result<()> {
    lorafit::host_memory::retain_freed_memory();
    let args = parse_args()?;
    tch::set_num_threads(args.threads as i32);
    if args.cpu || args.gemm {
        println!("{}", if args.cpu { cpu_json() } else { gemm_json(args.threads) });
        return Ok(());
    }
    let Some(model_dir) = &args.model else {
        bail!("usage: train_speed --model DIR (--batches FILE | --data CONFIG --examples-out FILE) --precision fp32|bf16-mixed [--warmup N] [--steps N] [--threads N] [--checkpointing] [--quantize nf4|fp4] | --gemm | --cpu");
    };
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = args.device;
    let group = join_group(device)?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank, g.world));
    tch::manual_seed(0);
    let total = args.warmup + args.steps;
    let (batches, global_batch) = match (&args.batches, &args.data, &args.examples_out) {
        (Some(file), None, None) => saved_batches(file, total, rank, world, device)?,
        (None, Some(_), Some(_)) if world > 1 => bail!("--data runs in one process only"),
        (None, Some(config), Some(out)) => {
            let batches = real_data_batches(config, model_dir, out, total, device)?;
            let rows = batches[0].input_ids.size2()?.0;
            (batches, rows)
        }
        _ => bail!("give either --batches, or --data with --examples-out"),
    };
    let seq = batches[0].input_ids.size2()?.1;

    let (model, mut trainer) = adapted_model(model_dir, &args)?;
    trainer.group = group;
    let m = measure(&model, &mut trainer, &batches, args.warmup)?;
    // Every rank measured the same synchronised steps: rank 0 speaks for the run.
    if rank != 0 {
        return Ok(());
    }
    let med = median(&m.times);
    let spent: f64 = m.times.iter().sum();
    let out = json!({
        "runner": "lorafit",
        "precision": lorafit::train::precision::name(args.precision),
        "threads": args.threads,
        "workers": world,
        "device": format!("{device:?}"),
        "batch": global_batch,
        "seq": seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_s": (global_batch * seq) as f64 / med,
        "median_step_s": med,
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": m.first_loss,
        "final_loss": m.losses.last().copied().unwrap_or(f64::NAN),
        "checkpointing": args.checkpointing,
        "quantize": args.quantize.map(QuantFormat::name),
        "label_tokens_per_s": m.label_tokens as f64 / spent,
        "real_tokens_per_s": m.real_tokens as f64 / spent,
        "allreduce_share": (world > 1).then(|| m.all_reduce.iter().sum::<f64>() / spent),
        "step_s": m.times,
        "allreduce_s": m.all_reduce,
        "losses": m.losses,
    });
    println!("{out}");
    Ok(())
}

/// The data-parallel group the environment names (launched by torchrun or `lorafit train
/// --nproc-per-node`, as `lorafit train` joins it), or `None` for a single process.
fn join_group(device: Device) -> Result<Option<Arc<Group>>> {
    let Some(at) = Rendezvous::from_env()? else { return Ok(None) };
    let backend = Backend::for_device(device);
    let timeout = Duration::from_secs(TrainConfig::default().dist_timeout);
    Ok(Some(Arc::new(Group::join(&at, backend, timeout)?)))
}

/// The measured steps of a run.
struct Measured {
    times: Vec<f64>,
    losses: Vec<f64>,
    /// Time inside the group's all-reduces (token counts, then gradients and loss) of each step.
    all_reduce: Vec<f64>,
    first_loss: Option<f64>,
    label_tokens: i64,
    real_tokens: i64,
}

/// One optimizer step per batch; the steps after the first `warmup` are measured.
fn measure(model: &Decoder, trainer: &mut Trainer, batches: &[Batch], warmup: usize) -> Result<Measured> {
    let mut m = Measured {
        times: Vec::new(),
        losses: Vec::new(),
        all_reduce: Vec::new(),
        first_loss: None,
        label_tokens: 0,
        real_tokens: 0,
    };
    let reduced = |t: &Trainer| t.group.as_ref().map_or(0.0, |g| g.all_reduce_time().as_secs_f64());
    for (step, b) in batches.iter().enumerate() {
        let (started, reduced_before) = (Instant::now(), reduced(trainer));
        // `step` reads the loss and gradient norm back, so the time covers all the work.
        let stats = trainer.step(model, std::slice::from_ref(b), None, LR)?;
        let elapsed = started.elapsed().as_secs_f64();
        // Step 0 runs before any update: the base model's loss, which PEFT's run must match.
        m.first_loss.get_or_insert(stats.loss);
        if step >= warmup {
            m.times.push(elapsed);
            m.all_reduce.push(reduced(trainer) - reduced_before);
            m.losses.push(stats.loss);
            m.label_tokens += stats.label_tokens;
            m.real_tokens += stats.real_tokens;
        }
    }
    Ok(m)
}

/// The frozen model on `args.device` with the benchmark's adapters, and their trainer.
fn adapted_model(model_dir: &Path, args: &Args) -> Result<(Decoder, Trainer)> {
    let kind = weight_kind(WeightDtype::Auto, args.precision);
    let quantization = args.quantize.map(|format| (format, true));
    let mut model = load_model_quantized(model_dir, kind, args.device, quantization)?;
    let lora_cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: TargetModules::List(TARGETS.iter().map(|s| s.to_string()).collect()),
        ..LoraConfig::default()
    };
    let injected = lora::inject(&mut model, &lora_cfg, args.device)?;
    let train_cfg = TrainConfig {
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        lr: LR,
        gradient_checkpointing: args.checkpointing,
        ..TrainConfig::default()
    };
    let params: Vec<Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    Ok((model, Trainer::new(params, &train_cfg)))
}

/// Saved `[count, batch, seq]` token blocks, each one micro-batch of equal-length rows with
/// labels = ids (collate makes the first position of every row a non-target, as the shifted HF
/// loss does). Rank `rank` of `world` takes its slice of each block's rows, as a data-parallel
/// run splits a step; also returns the rows of a whole block (the global batch).
fn saved_batches(
    file: &Path,
    total: usize,
    rank: usize,
    world: usize,
    device: Device,
) -> Result<(Vec<Batch>, i64)> {
    let saved = Tensor::read_safetensors(file)?;
    let ids = saved
        .into_iter()
        .find(|(name, _)| name == "input_ids")
        .map(|(_, t)| t)
        .with_context(|| format!("{} holds no input_ids", file.display()))?;
    let (count, batch, _) = ids.size3()?;
    if (count as usize) < total {
        bail!("{} holds {count} batches, {total} steps asked for", file.display());
    }
    if batch % world as i64 != 0 {
        bail!("{}: {batch} rows a batch do not split evenly over {world} workers", file.display());
    }
    let per_rank = batch / world as i64;
    let rows = rank as i64 * per_rank..(rank as i64 + 1) * per_rank;
    let batches = (0..total as i64)
        .map(|i| {
            let rows: Vec<Example> = rows
                .clone()
                .map(|r| {
                    let row = Vec::<i64>::try_from(&ids.get(i).get(r)).expect("int64 token ids");
                    Example { input_ids: row.clone(), labels: row, desirable: None }
                })
                .collect();
            let refs: Vec<&Example> = rows.iter().collect();
            Batch::collate(&refs, 0, device)
        })
        .collect();
    Ok((batches, batch))
}

/// The first `total` micro-batches `lorafit train` would build from `config`'s data for the model
/// in `model_dir`; the prepared examples also go to `examples_out` for the PEFT side.
fn real_data_batches(
    config: &Path,
    model_dir: &Path,
    examples_out: &Path,
    total: usize,
    device: Device,
) -> Result<Vec<Batch>> {
    let model_path = format!("model.path={}", model_dir.display());
    let cfg = Config::load(config, &[model_path])?;
    let spec = ModelSpec::from_dir(model_dir)?;
    let data = load_run_data(&cfg, &spec)?;
    let examples = &data.train.examples;
    let lines: Vec<String> =
        examples.iter().map(|e| json!({"input_ids": e.input_ids, "labels": e.labels}).to_string()).collect();
    write_atomic(examples_out, (lines.join("\n") + "\n").as_bytes())?;
    let layout = row_layout(&cfg);
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    let (micro, seed) = (cfg.train.micro_batch_size, cfg.train.seed);
    let mut batches = Vec::new();
    for epoch in 0.. {
        let plan = EpochPlan::new(&lengths, micro, 1, layout, true, seed, epoch);
        for micro_batch in plan.steps.into_iter().flatten() {
            batches.push(collate(examples, &micro_batch, layout, data.tokenizer.eos_id, device));
            if batches.len() == total {
                return Ok(batches);
            }
        }
    }
    unreachable!("epochs go on until enough batches are made")
}
