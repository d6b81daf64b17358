//! Progress bars and spinners, drawn on stderr only when it is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar counting `unit`s on a terminal (hidden otherwise, or when not `wanted`).
pub fn progress_bar(total: u64, wanted: bool, unit: &str) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    let template = format!("{{spinner}} {unit} {{pos}}/{{len}} [{{bar:30}}] {{msg}} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar
}

/// A spinner with `message` on a terminal while something of unknown length runs.
pub fn spinner(message: &str, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// A duration as a person reads it: "45 s", "3 min 12 s", "2 h 05 min".
pub fn duration_words(secs: f64) -> String {
    let secs = if secs.is_finite() { secs.max(0.0).round() as u64 } else { 0 };
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::duration_words;

    #[test]
    fn durations_in_words() {
        assert_eq!(duration_words(0.2), "0 s");
        assert_eq!(duration_words(44.6), "45 s");
        assert_eq!(duration_words(192.0), "3 min 12 s");
        assert_eq!(duration_words(7500.0), "2 h 05 min");
        assert_eq!(duration_words(f64::NAN), "0 s");
    }
}
