//! The module walls (README, "Layout"): which top-level module of `src/` may import which. Every
//! `crate::` path, `super::` path that climbs to the crate root, and (in `main.rs`) `lorafit::`
//! path in the sources is checked against [`WALLS`]; a forbidden one is reported by file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module (and the binary, `main`) with the modules it may import besides itself.
const WALLS: &[(&str, &[&str])] = &[
    // Leaves: they import nothing of the crate.
    ("clock", &[]),
    ("config", &[]),
    ("dist", &[]),
    ("files", &[]),
    ("host_memory", &[]),
    ("observe", &[]),
    ("packing", &[]),
    ("torch_errors", &[]),
    // The frozen model knows nothing of data, adapters or training: adapters plug in through
    // `model::LinearAdapter`.
    ("model", &["config", "files", "packing"]),
    // Data gets the tokenizer and EOS ids as values, never from the model.
    ("data", &["clock", "config", "files", "packing"]),
    ("lora", &["config", "files", "model"]),
    ("export", &["config", "files", "lora", "model"]),
    ("generate", &["config", "data", "files", "lora", "model", "torch_errors"]),
    ("init", &["config", "data", "model"]),
    ("inspect", &["config", "files", "lora", "model"]),
    (
        "train",
        &[
            "clock",
            "config",
            "data",
            "dist",
            "export",
            "files",
            "generate",
            "lora",
            "model",
            "observe",
            "packing",
            "torch_errors",
        ],
    ),
    // The command line parses arguments and calls one command function of the library each.
    (
        "main",
        &["config", "dist", "export", "generate", "host_memory", "init", "inspect", "torch_errors", "train"],
    ),
];

/// One path into another top-level module: the line it is on and the module it names.
#[derive(Debug, PartialEq)]
struct Reference {
    line: usize,
    module: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

/// `source` with comments and the contents of string and character literals blanked out
/// (newlines kept), so that only code is searched.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && !prev_is_ident(&chars, i) {
            // A raw string: r"..." or r#"..."#.
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let end: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let body_start = i + 2 + hashes;
            let rest: String = chars[body_start..].iter().collect();
            let len = rest.find(&end).map(|at| rest[..at].chars().count()).unwrap_or(rest.chars().count());
            for &c in &chars[i..(body_start + len + 1 + hashes).min(chars.len())] {
                out.push(blank(c));
            }
            i = body_start + len + 1 + hashes;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\n', '\''); a lifetime ('a) has no closing quote.
            let len = if next == Some('\\') {
                chars[i + 3..].iter().position(|&c| c == '\'').map(|p| p + 4).unwrap_or(1)
            } else {
                3
            };
            out.extend(std::iter::repeat_n(' ', len));
            i += len;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The tokens of code (see [`code_only`]) with their line numbers.
fn tokens(code: &str) -> Vec<(usize, Token)> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let token = if c.is_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push((n + 1, Token::Ident(chars[start..i].iter().collect())));
                continue;
            } else if c == ':' && chars.get(i + 1) == Some(&':') {
                i += 1;
                Token::PathSep
            } else if c.is_whitespace() {
                i += 1;
                continue;
            } else {
                match c {
                    '{' => Token::Open,
                    '}' => Token::Close,
                    ',' => Token::Comma,
                    _ => Token::Other,
                }
            };
            out.push((n + 1, token));
            i += 1;
        }
    }
    out
}

fn ident(tokens: &[(usize, Token)], at: usize) -> Option<&str> {
    match tokens.get(at) {
        Some((_, Token::Ident(name))) => Some(name),
        _ => None,
    }
}

fn is(tokens: &[(usize, Token)], at: usize, token: &Token) -> bool {
    tokens.get(at).is_some_and(|(_, t)| t == token)
}

/// The top-level modules a path names from the crate root, starting at `at` (just after
/// `crate::`): one ident, or the first ident of each item of a `{...}` list.
fn roots_at(tokens: &[(usize, Token)], at: usize) -> Vec<(usize, String)> {
    if let Some(name) = ident(tokens, at) {
        return vec![(tokens[at].0, name.to_string())];
    }
    if !is(tokens, at, &Token::Open) {
        return vec![];
    }
    let (mut out, mut depth, mut item_start) = (Vec::new(), 0, true);
    for (i, (line, token)) in tokens.iter().enumerate().skip(at) {
        match token {
            Token::Open => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            Token::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Token::Comma if depth == 1 => {
                item_start = true;
                continue;
            }
            Token::Ident(name)
                if depth == 1 && item_start && !is(tokens, i.wrapping_sub(1), &Token::PathSep) =>
            {
                out.push((*line, name.clone()));
            }
            _ => {}
        }
        item_start = false;
    }
    out
}

/// Every path in `source`, a file of module `module_path` (e.g. `["model", "decoder"]`), that
/// names a top-level module: `crate::x` (and `root::x`, e.g. `lorafit::x` in the binary), and
/// `super::` chains that climb to the crate root. Inline modules (`mod tests { .. }`) count as
/// levels for `super`.
fn references(module_path: &[&str], source: &str, root: &str) -> Vec<Reference> {
    let tokens = tokens(&code_only(source));
    let mut found = Vec::new();
    // The brace depths at which inline modules opened.
    let (mut depth, mut inline): (usize, Vec<usize>) = (0, Vec::new());
    let mut i = 0;
    while i < tokens.len() {
        let starts_path = !is(&tokens, i.wrapping_sub(1), &Token::PathSep);
        match &tokens[i].1 {
            Token::Open => depth += 1,
            Token::Close => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            Token::Ident(word)
                if word == "mod" && ident(&tokens, i + 1).is_some() && is(&tokens, i + 2, &Token::Open) =>
            {
                inline.push(depth);
            }
            Token::Ident(word)
                if starts_path
                    && (word == "crate" || word == root)
                    && is(&tokens, i + 1, &Token::PathSep) =>
            {
                found.extend(roots_at(&tokens, i + 2));
            }
            // `pub(super)` names no path: only `super::` climbs.
            Token::Ident(word) if starts_path && word == "super" && is(&tokens, i + 1, &Token::PathSep) => {
                let mut climbs = 0;
                let mut j = i;
                while ident(&tokens, j) == Some("super") && is(&tokens, j + 1, &Token::PathSep) {
                    climbs += 1;
                    j += 2;
                }
                if climbs == module_path.len() + inline.len() {
                    found.extend(roots_at(&tokens, j));
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found.into_iter().map(|(line, module)| Reference { line, module }).collect()
}

/// The source files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file relative to `src/`: `model/decoder.rs` → `[model, decoder]`,
/// `model/mod.rs` → `[model]`, `main.rs` → `[main]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        relative.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The walls broken in `src`, one message per forbidden path.
fn broken_walls(src: &Path) -> Vec<String> {
    let walls: BTreeMap<&str, &[&str]> = WALLS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut broken = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let path = module_path(relative);
        if path == ["lib"] {
            continue;
        }
        let own = path[0].as_str();
        let Some(allowed) = walls.get(own) else {
            broken.push(format!(
                "src/{}: module `{own}` has no entry in the walls table of tests/walls.rs; add one and \
                 list it in the README's Layout section",
                relative.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(&file).unwrap();
        // In the binary, the library is `lorafit`; `crate` is the binary itself.
        let (module_path, root): (Vec<&str>, &str) = if own == "main" {
            (vec![], "lorafit")
        } else {
            (path.iter().map(String::as_str).collect(), "crate")
        };
        for r in references(&module_path, &source, root) {
            let known = walls.contains_key(r.module.as_str());
            if r.module != own && known && !allowed.contains(&r.module.as_str()) {
                broken.push(format!(
                    "src/{}:{}: `{own}` may not import `{}` (it may import: {})",
                    relative.display(),
                    r.line,
                    r.module,
                    if allowed.is_empty() { "nothing of the crate".to_string() } else { allowed.join(", ") }
                ));
            }
        }
    }
    broken
}

#[test]
fn every_module_keeps_its_walls() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let broken = broken_walls(&src);
    assert!(
        broken.is_empty(),
        "module walls broken (see the README's Layout section):\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_module_of_the_crate_has_walls() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> =
        lib.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")?.strip_suffix(';')).collect();
    assert!(declared.len() > 5, "found too few modules in src/lib.rs: {declared:?}");
    for module in declared {
        assert!(
            WALLS.iter().any(|(m, _)| *m == module),
            "src/lib.rs declares `{module}`, which has no walls"
        );
    }
}

/// The path finder itself: every spelling of an import is found, and text that is no code is not.
#[test]
fn references_are_found_in_every_spelling() {
    let source = r#"use crate::train;
use crate::{config::Config, data::{Batch, format}};
// use crate::lora; in a comment
/* use crate::lora; in a block comment */
let s = "crate::lora::Adapter";
let c = '{';
fn f<'a>(x: &'a str) -> crate::observe::MetricsLog { todo!() }
use super::layout::Layout;
use super::super::export::gguf;
mod tests {
    use super::*;
    use super::super::super::generate;
}
let r = r"crate::inspect";
pub(super) fn g() {}
"#;
    let found = references(&["model", "decoder"], source, "crate");
    let found: Vec<(usize, &str)> = found.iter().map(|r| (r.line, r.module.as_str())).collect();
    assert_eq!(
        found,
        vec![(1, "train"), (2, "config"), (2, "data"), (7, "observe"), (9, "export"), (12, "generate")]
    );
}

/// A forbidden import is reported with its file, line and the wall it breaks.
#[test]
fn a_forbidden_import_names_file_line_and_wall() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("spec.rs"), "use anyhow::Result;\nuse crate::train;\n").unwrap();
    std::fs::write(dir.path().join("config.rs"), "pub struct Config;\n").unwrap();
    assert_eq!(
        broken_walls(dir.path()),
        vec!["src/model/spec.rs:2: `model` may not import `train` (it may import: config, files, packing)"]
    );
}
