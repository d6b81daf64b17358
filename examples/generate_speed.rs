//! Greedy decoding speed with and without the KV cache, in one run on the same model:
//!
//!     cargo run --release --example generate_speed -- MODEL_DIR [TOKENS]
//!
//! Prints both times and their ratio.

use lorafit::generate::{greedy, greedy_without_cache};
use lorafit::model::load_model;
use std::time::Instant;
use tch::{Device, Kind};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or_else(|| anyhow::anyhow!("usage: generate_speed MODEL_DIR [TOKENS]"))?;
    let tokens: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(256);
    let model = load_model(dir.as_ref(), Kind::Float, Device::Cpu)?;
    let prompt = [1i64];
    // One warm-up each, then alternate so machine noise hits both.
    let _ = greedy(&model, &prompt, 8, None, Device::Cpu);
    let _ = greedy_without_cache(&model, &prompt, 8, Device::Cpu);
    let (mut cached, mut uncached) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let t = Instant::now();
        let a = greedy(&model, &prompt, tokens, None, Device::Cpu);
        cached = cached.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let b = greedy_without_cache(&model, &prompt, tokens, Device::Cpu);
        uncached = uncached.min(t.elapsed().as_secs_f64());
        assert_eq!(a, b, "cached and recomputed decoding disagree");
    }
    println!(
        "{tokens} tokens: KV cache {cached:.3} s, recomputing {uncached:.3} s, speed-up {:.1}x",
        uncached / cached
    );
    Ok(())
}
