//! Data paths with `*` / `?` wildcards.

use anyhow::{bail, Result};
use std::path::{Component, Path, PathBuf};

/// The paths matching `pattern`, sorted. `*` matches any run of characters and `?` one
/// character, within one path component (they never match `/`, nor a leading `.` unless the
/// pattern component starts with `.`). A path without wildcards must exist and is returned
/// as is. A pattern matching nothing is an error.
pub fn expand_paths(pattern: &Path) -> Result<Vec<PathBuf>> {
    if !has_wildcard(pattern.as_os_str()) {
        if pattern.exists() {
            return Ok(vec![pattern.to_path_buf()]);
        }
        bail!(
            "data path {} does not exist; check the path (relative paths start at the \
             directory lorafit runs in)",
            pattern.display()
        );
    }
    let mut current = vec![PathBuf::new()];
    for component in pattern.components() {
        match component {
            Component::Normal(name) if has_wildcard(name) => {
                let pat: Vec<char> = name.to_string_lossy().chars().collect();
                let mut next = Vec::new();
                for base in &current {
                    let dir = if base.as_os_str().is_empty() { Path::new(".") } else { base.as_path() };
                    let Ok(entries) = std::fs::read_dir(dir) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        let file_name = entry.file_name();
                        let name: Vec<char> = file_name.to_string_lossy().chars().collect();
                        if name.first() == Some(&'.') && pat.first() != Some(&'.') {
                            continue;
                        }
                        if wildcard_match(&pat, &name) {
                            next.push(base.join(&file_name));
                        }
                    }
                }
                current = next;
            }
            other => current.iter_mut().for_each(|p| p.push(other)),
        }
        if current.is_empty() {
            break;
        }
    }
    current.retain(|p| p.exists());
    current.sort();
    current.dedup();
    if current.is_empty() {
        bail!(
            "no file matches {}; `*` and `?` match within one path component, so check each \
             directory of the pattern",
            pattern.display()
        );
    }
    Ok(current)
}

pub(super) fn has_wildcard(s: &std::ffi::OsStr) -> bool {
    s.to_string_lossy().contains(['*', '?'])
}

/// Whole-string match of `name` against `pat` (`*` = any run, `?` = any one character).
fn wildcard_match(pat: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && (pat[p] == '?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        let p: Vec<char> = p.chars().collect();
        let n: Vec<char> = n.chars().collect();
        wildcard_match(&p, &n)
    }

    #[test]
    fn wildcards_match_whole_names() {
        assert!(m("*.jsonl", "a.jsonl"));
        assert!(m("*", "anything"));
        assert!(m("train-?????-of-*.parquet", "train-00000-of-00002.parquet"));
        assert!(m("a*b*c", "abbbc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(!m("*.json", "a.jsonl"));
        assert!(!m("?", ""));
        assert!(m("", ""));
        assert!(m("**", ""));
        assert!(m("x?z", "xéz"));
    }
}
