//! What transformers gives chat templates beyond Jinja, written the way Python writes it:
//! `raise_exception`, `strftime_now`, a `tojson` filter that writes like `json.dumps`, mappings
//! that keep their keys in order like Python dicts, and `{% generation %}` tags.

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Error as JError, ErrorKind as JErrorKind};
use std::sync::OnceLock;

/// A mapping with its keys in the order given, like a Python dict (minijinja's maps keep
/// insertion order with its `preserve_order` feature).
pub(super) fn dict(fields: Vec<(&'static str, JValue)>) -> JValue {
    JValue::from_pairs(fields)
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its own
/// masks; it renders its body unchanged. Rewritten to an always-true `if` with the same
/// whitespace control, which renders the same.
pub(super) fn without_generation_tags(source: &str) -> String {
    static OPEN: OnceLock<regex::Regex> = OnceLock::new();
    static CLOSE: OnceLock<regex::Regex> = OnceLock::new();
    let open = OPEN.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").unwrap());
    let close = CLOSE.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").unwrap());
    let s = open.replace_all(source, "{%${1} if true ${2}%}");
    close.replace_all(&s, "{%${1} endif ${2}%}").into_owned()
}

pub(super) fn raise_exception(message: String) -> std::result::Result<JValue, JError> {
    Err(JError::new(JErrorKind::InvalidOperation, format!("the template raised an exception: {message}")))
}

pub(super) fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(secs, &format)
}

/// `strftime` for a UTC time: `%Y %y %m %d %e %H %I %M %S %p %j %B %b %h %A %a %%`, with glibc's
/// `-` flag (no padding); other directives are kept as written.
fn strftime_utc(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = crate::clock::civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - crate::clock::days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, without jinja2's HTML escaping.
pub(super) fn tojson(
    value: &JValue,
    indent: Option<JValue>,
    kwargs: Kwargs,
) -> std::result::Result<JValue, JError> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JValue>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => {
                    return Err(JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: indent must be a number or a string",
                    ))
                }
            },
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (mut item_sep, mut key_sep) =
        (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string());
    if let Some(seps) = kwargs.get::<Option<JValue>>("separators")? {
        if !seps.is_none() {
            let parts: Vec<JValue> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    item_sep = a.as_str().unwrap_or_default().to_string();
                    key_sep = b.as_str().unwrap_or_default().to_string();
                }
                _ => {
                    return Err(JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    }
    kwargs.assert_all_used()?;
    let opts = PyJson { indent, item_sep, key_sep, ensure_ascii, sort_keys };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

/// `value` as Python's `json.dumps(value, ensure_ascii=False)` writes it (what `tojson` gives).
pub(super) fn py_json(value: &JValue) -> String {
    let opts = PyJson {
        indent: None,
        item_sep: ", ".into(),
        key_sep: ": ".into(),
        ensure_ascii: false,
        sort_keys: false,
    };
    let mut out = String::new();
    // Values read from JSON always serialize; were one not to, its partial text would match
    // nothing and the call would be found by name.
    let _ = opts.write(value, 0, &mut out);
    out
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, v: &JValue, depth: usize, out: &mut String) -> std::result::Result<(), JError> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    out.push_str(&py_float(f64::try_from(v.clone())?));
                }
            }
            ValueKind::String => self.write_str(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = v.try_iter()?.collect();
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.item(i == 0, depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.close(items.is_empty(), depth, ']', out);
            }
            ValueKind::Map => {
                let mut keys: Vec<JValue> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    self.item(i == 0, depth + 1, out);
                    match key.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, depth + 1, out)?;
                }
                self.close(keys.is_empty(), depth, '}', out);
            }
            _ => self.write_str(&v.to_string(), out),
        }
        Ok(())
    }

    fn item(&self, first: bool, depth: usize, out: &mut String) {
        if !first {
            out.push_str(&self.item_sep);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn close(&self, empty: bool, depth: usize, c: char, out: &mut String) {
        if let (Some(indent), false) = (&self.indent, empty) {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(c);
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e-05`, `1e+16`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208 (as Python's strftime writes it).
        let t = 1_722_000_309;
        assert_eq!(strftime_utc(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(strftime_utc(t, "%Y-%m-%d %H:%M:%S"), "2024-07-26 13:25:09");
        assert_eq!(strftime_utc(t, "%A %B %-d, %j %I%p %%"), "Friday July 26, 208 01PM %");
        assert_eq!(strftime_utc(0, "%a %d %b %Y"), "Thu 01 Jan 1970");
        assert_eq!(strftime_utc(951_782_400, "%Y-%m-%d %A %j"), "2000-02-29 Tuesday 060");
    }
}
