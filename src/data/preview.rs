//! `lorafit data preview CONFIG`: the first examples (or preference pairs) as the model will see
//! them, with the trained tokens marked, plus token counts and a length histogram, to check masking before
//! spending compute.

use super::batch::{EpochPlan, RowLayout};
use super::format::{Example, Prepared, IGNORE};
use super::preference::pairs_of;
use super::tokenizer::TextTokenizer;
use anyhow::Result;
use std::fmt::Write;

/// How trained text is marked: colours on a terminal, brackets elsewhere.
pub struct Marks {
    pub open: &'static str,
    pub close: &'static str,
}

pub const BRACKETS: Marks = Marks { open: "[[", close: "]]" };
pub const COLOURS: Marks = Marks { open: "\x1b[1;32m", close: "\x1b[0m" };

/// The text of `example` with each run of trained tokens between `marks`.
pub fn marked_text(example: &Example, tok: &TextTokenizer, marks: &Marks) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    // A token is trained when it is the target of the position before it.
    let trained = |i: usize| i > 0 && example.labels[i] != IGNORE;
    while start < example.input_ids.len() {
        let flag = trained(start);
        let mut end = start + 1;
        while end < example.input_ids.len() && trained(end) == flag {
            end += 1;
        }
        let text = tok.decode_all(&example.input_ids[start..end])?;
        if flag {
            write!(out, "{}{text}{}", marks.open, marks.close)?;
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

/// The report: `n` examples (with `pairs`, `n` preference pairs: the chosen and the rejected
/// answer each after the prompt), then statistics of the whole set.
pub fn preview(
    data: &Prepared,
    tok: &TextTokenizer,
    n: usize,
    max_seq_len: usize,
    micro_batch_size: usize,
    marks: &Marks,
    pairs: bool,
) -> Result<String> {
    let mut out = String::new();
    let shown: Vec<(String, &Example)> = if pairs {
        pairs_of(&data.examples)
            .take(n)
            .enumerate()
            .flat_map(|(i, (c, r))| {
                [(format!("pair {}, chosen", i + 1), c), (format!("pair {}, rejected", i + 1), r)]
            })
            .collect()
    } else {
        let label = |ex: &Example| match ex.desirable {
            Some(true) => ", desirable",
            Some(false) => ", undesirable",
            None => "",
        };
        let name = |i: usize, ex: &Example| format!("example {}{}", i + 1, label(ex));
        data.examples.iter().take(n).enumerate().map(|(i, ex)| (name(i, ex), ex)).collect()
    };
    for (name, ex) in shown {
        let trained = ex.labels.iter().skip(1).filter(|&&l| l != IGNORE).count();
        writeln!(out, "── {name} ({} tokens, {trained} trained) ──", ex.input_ids.len())?;
        writeln!(out, "{}", marked_text(ex, tok, marks)?)?;
    }
    let lengths: Vec<usize> = data.examples.iter().map(|e| e.input_ids.len()).collect();
    let total: usize = lengths.iter().sum();
    let trained: usize =
        data.examples.iter().map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()).sum();
    writeln!(out, "── {} ──", data.report())?;
    writeln!(
        out,
        "tokens: {total} ({trained} trained, {:.0}%); length mean {:.1}, max {}",
        100.0 * trained as f64 / total.max(1) as f64,
        total as f64 / lengths.len().max(1) as f64,
        lengths.iter().max().copied().unwrap_or(0)
    )?;
    let shares = [
        ("packing", real_share(&lengths, RowLayout::Packed(max_seq_len), micro_batch_size)),
        (
            "one example per row, grouped by length",
            real_share(&lengths, RowLayout::ByLength, micro_batch_size),
        ),
        ("one example per row in random batches", random_batches_share(&lengths, micro_batch_size)),
    ];
    // Pairs are never packed.
    for (name, share) in shares.into_iter().skip(pairs as usize) {
        writeln!(out, "real-token share with {name}: {:.1}%", 100.0 * share)?;
    }
    writeln!(out, "length histogram:")?;
    out.push_str(&histogram(&lengths, max_seq_len));
    Ok(out)
}

/// Real tokens over all tokens of the padded micro-batches of one epoch.
pub fn real_share(lengths: &[usize], layout: RowLayout, micro_batch_size: usize) -> f64 {
    let (real, padded) = EpochPlan::new(lengths, micro_batch_size, 1, layout, true, 0, 0).tokens(lengths);
    real as f64 / padded.max(1) as f64
}

/// The share for batches of consecutive shuffled examples, as trainers that neither pack nor
/// group by length have it.
fn random_batches_share(lengths: &[usize], micro_batch_size: usize) -> f64 {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0));
    let (mut real, mut padded) = (0usize, 0usize);
    for batch in order.chunks(micro_batch_size) {
        real += batch.iter().map(|&i| lengths[i]).sum::<usize>();
        padded += batch.len() * batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
    }
    real as f64 / padded.max(1) as f64
}

fn histogram(lengths: &[usize], max_seq_len: usize) -> String {
    const BUCKETS: usize = 8;
    let width = max_seq_len.div_ceil(BUCKETS).max(1);
    let mut counts = [0usize; BUCKETS];
    for &l in lengths {
        counts[(l.saturating_sub(1) / width).min(BUCKETS - 1)] += 1;
    }
    let most = counts.iter().max().copied().unwrap_or(1).max(1);
    let mut out = String::new();
    for (b, &c) in counts.iter().enumerate() {
        let bar = "#".repeat((c * 40).div_ceil(most));
        let _ = writeln!(out, "  {:>5}-{:<5} {c:>6} {bar}", b * width + 1, (b + 1) * width);
    }
    out
}
