//! The CPU dequantization kernels of 4-bit weights side by side: each round dequantizes the same
//! NF4 weight (double-quantized scales) with the scalar kernel, then with every vector kernel this
//! CPU runs, alternating within one process so that a machine's changing load falls on all of
//! them alike.
//!
//!     cargo run --release --example dequant_speed -- [--rounds N] [--threads N]
//!
//! The kernels are C++ compiled at -O3 in any profile, so a debug build measures them as well.
//! Freed outputs are pooled as in `lorafit train`, so the timings leave out page faults.
//! Prints, per shape and output dtype, each kernel's median time, nanoseconds per weight and
//! speed-up over the scalar kernel.

use anyhow::{bail, Context, Result};
use lorafit::config::QuantFormat;
use lorafit::model::quantized::{Dequantizer, QuantizedWeight};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const SHAPES: [[i64; 2]; 2] = [[4096, 4096], [576, 1536]];

fn main() -> Result<()> {
    let (rounds, threads) = parse_args()?;
    // As `lorafit train` does: the outputs reuse pooled memory instead of faulting fresh pages.
    lorafit::host_memory::retain_freed_memory();
    if let Some(n) = threads {
        tch::set_num_threads(n);
    }
    let kernels: Vec<Dequantizer> = Dequantizer::CPU_KERNELS.into_iter().filter(|k| k.supported()).collect();
    println!("threads {}, {rounds} rounds, kernels {kernels:?}", tch::get_num_threads());
    tch::manual_seed(0);
    for shape in SHAPES {
        let w = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.02;
        for kind in [Kind::BFloat16, Kind::Float] {
            let q = QuantizedWeight::quantize(&w.to_kind(kind), QuantFormat::Nf4, true);
            report(shape, kind, &kernels, &medians(&q, &kernels, rounds));
        }
    }
    Ok(())
}

/// The median seconds of each kernel over `rounds` alternating rounds (after one warm-up round).
fn medians(q: &QuantizedWeight, kernels: &[Dequantizer], rounds: usize) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(rounds); kernels.len()];
    for round in 0..=rounds {
        for (k, &kernel) in kernels.iter().enumerate() {
            let start = Instant::now();
            let dense = q.dequantize_with(kernel);
            let elapsed = start.elapsed().as_secs_f64();
            drop(dense);
            if round > 0 {
                times[k].push(elapsed);
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

fn report(shape: [i64; 2], kind: Kind, kernels: &[Dequantizer], medians: &[f64]) {
    let weights = (shape[0] * shape[1]) as f64;
    for (kernel, &s) in kernels.iter().zip(medians) {
        println!(
            "{}x{} {kind:?} {kernel:?}: {:.3} ms, {:.2} ns/weight, {:.2}x scalar",
            shape[0],
            shape[1],
            s * 1e3,
            s * 1e9 / weights,
            medians[0] / s
        );
    }
}

fn parse_args() -> Result<(usize, Option<i32>)> {
    let (mut rounds, mut threads) = (15, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => rounds = value.parse().with_context(|| format!("--rounds {value}: not a count"))?,
            "--threads" => {
                threads = Some(value.parse().with_context(|| format!("--threads {value}: not a count"))?)
            }
            other => bail!("unknown argument {other} (expected --rounds N or --threads N)"),
        }
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok((rounds, threads))
}
