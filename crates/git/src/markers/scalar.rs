//! Scalar text helpers: decoding quoted scalars, and choosing how to write a new value so that
//! it reads back as exactly the requested string.

/// How a scalar is written in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    Plain,
    Single,
    Double,
}

/// Decodes the body of a single-line scalar (`raw` includes the quotes for quoted styles).
///
/// Returns `None` for text we cannot decode (e.g. an invalid escape): callers then treat the
/// value as different from anything, which leads to a rewrite with a well-formed value.
pub(crate) fn decode(style: Style, raw: &str) -> Option<String> {
    match style {
        Style::Plain => Some(raw.to_owned()),
        Style::Single => {
            let inner = raw.strip_prefix('\'')?.strip_suffix('\'')?;
            Some(inner.replace("''", "'"))
        }
        Style::Double => decode_double(raw.strip_prefix('"')?.strip_suffix('"')?),
    }
}

/// Decodes the escapes of a double-quoted scalar body (YAML 1.2 §5.7), single line only.
fn decode_double(inner: &str) -> Option<String> {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let esc = chars.next()?;
        let decoded = match esc {
            '0' => '\0',
            'a' => '\u{7}',
            'b' => '\u{8}',
            't' | '\t' => '\t',
            'n' => '\n',
            'v' => '\u{b}',
            'f' => '\u{c}',
            'r' => '\r',
            'e' => '\u{1b}',
            ' ' => ' ',
            '"' => '"',
            '/' => '/',
            '\\' => '\\',
            'N' => '\u{85}',
            '_' => '\u{a0}',
            'L' => '\u{2028}',
            'P' => '\u{2029}',
            'x' | 'u' | 'U' => {
                let len = match esc {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let mut code = 0u32;
                for _ in 0..len {
                    code = code * 16 + chars.next()?.to_digit(16)?;
                }
                char::from_u32(code)?
            }
            _ => return None,
        };
        out.push(decoded);
    }
    Some(out)
}

/// Characters that a single-line scalar should never carry literally.
fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}')
}

/// Writes `value` as a double-quoted scalar, escaping everything that is not plain printable.
pub(crate) fn double_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            '\u{1b}' => out.push_str("\\e"),
            '\u{85}' => out.push_str("\\N"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if is_unprintable(c) => {
                let code = u32::from(c);
                if code <= 0xff {
                    out.push_str(&format!("\\x{code:02x}"));
                } else {
                    out.push_str(&format!("\\u{code:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `value` single-quoted, or `None` when single quotes cannot carry it on one line.
fn single_quoted(value: &str) -> Option<String> {
    if value.chars().any(is_unprintable) {
        return None;
    }
    Some(format!("'{}'", value.replace('\'', "''")))
}

/// Renders `new` in place of a scalar written as `old_raw` in `style`.
///
/// The original style is kept whenever it can represent `new` without changing its meaning;
/// otherwise the value is double-quoted, which can represent any string.
pub(crate) fn render(style: Style, old_raw: &str, new: &str, in_flow: bool) -> String {
    match style {
        Style::Double => double_quoted(new),
        Style::Single => single_quoted(new).unwrap_or_else(|| double_quoted(new)),
        Style::Plain => {
            // A string must stay a string: `version: v1` -> `1.0` would become a float.
            let retypes = !is_non_string(old_raw) && is_non_string(new);
            if plain_safe(new, in_flow) && !retypes {
                new.to_owned()
            } else {
                double_quoted(new)
            }
        }
    }
}

/// Whether `s` can be written as a plain scalar and read back as the same text.
pub(crate) fn plain_safe(s: &str, in_flow: bool) -> bool {
    let bytes = s.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false; // empty plain is null
    };
    if matches!(first, b' ' | b'\t') || matches!(last, b' ' | b'\t' | b':') {
        return false;
    }
    if s.chars().any(is_unprintable) {
        return false;
    }
    if s.starts_with("---") || s.starts_with("...") {
        return false; // would read as a document marker at column 0
    }
    let flow_indicator = |b: u8| matches!(b, b',' | b'[' | b']' | b'{' | b'}');
    match first {
        b'-' | b'?' | b':' => match bytes.get(1) {
            // Indicator followed by a space means "sequence item"/"key"/"value", not text.
            Some(&next) if next != b' ' && !(in_flow && flow_indicator(next)) => {}
            _ => return false,
        },
        b',' | b'[' | b']' | b'{' | b'}' | b'#' | b'&' | b'*' | b'!' | b'|' | b'>' | b'\''
        | b'"' | b'%' | b'@' | b'`' => return false,
        _ => {}
    }
    if s.contains(": ") || s.contains(" #") {
        return false;
    }
    // In flow context `:` and the flow indicators end a plain scalar in some parsers.
    !(in_flow && bytes.iter().any(|&b| b == b':' || flow_indicator(b)))
}

/// Whether a plain scalar would resolve to something other than a string under YAML 1.2 core
/// or YAML 1.1 (which Kubernetes' go-yaml still follows for booleans like `yes`/`on`).
///
/// Deliberately over-approximates: a false positive only costs a pair of quotes.
pub(crate) fn is_non_string(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "", "~", "null", "Null", "NULL", "true", "True", "TRUE", "false", "False", "FALSE", "y",
        "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF", "<<", "=",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    if matches!(
        unsigned,
        ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN"
    ) {
        return true;
    }
    if !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return false;
    }
    let digits: String = unsigned.chars().filter(|&c| c != '_').collect();
    is_int(&digits) || is_float(&digits) || is_sexagesimal(&digits) || is_date(s)
}

fn all_digits(s: &str, radix: u32) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_digit(radix))
}

fn is_int(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("0x") {
        return all_digits(hex, 16);
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return all_digits(oct, 8);
    }
    if let Some(bin) = s.strip_prefix("0b") {
        return all_digits(bin, 2);
    }
    all_digits(s, 10)
}

fn is_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (int.is_empty() || all_digits(int, 10))
                && (frac.is_empty() || all_digits(frac, 10))
                && !(int.is_empty() && frac.is_empty())
        }
        None => all_digits(mantissa, 10),
    };
    let exponent_ok =
        exponent.is_none_or(|e| all_digits(e.strip_prefix(['+', '-']).unwrap_or(e), 10));
    mantissa_ok && exponent_ok
}

/// YAML 1.1 base-60 numbers such as `1:30` or `1:30.5`.
fn is_sexagesimal(s: &str) -> bool {
    let mut parts = s.split(':');
    let Some(head) = parts.next() else {
        return false;
    };
    let rest: Vec<&str> = parts.collect();
    let Some((tail, middle)) = rest.split_last() else {
        return false;
    };
    let tail_int = tail.split_once('.').map_or(*tail, |(int, _)| int);
    all_digits(head, 10) && middle.iter().all(|p| all_digits(p, 10)) && all_digits(tail_int, 10)
}

/// YAML 1.1 timestamps start with `YYYY-M-D`.
fn is_date(s: &str) -> bool {
    let mut parts = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let day: String = d.chars().take_while(char::is_ascii_digit).collect();
    y.len() == 4
        && all_digits(y, 10)
        && (1..=2).contains(&m.len())
        && all_digits(m, 10)
        && (1..=2).contains(&day.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_string_detection() {
        for s in [
            "1",
            "-1",
            "1.0",
            "1e3",
            ".5",
            "0x1F",
            "0o17",
            "0b101",
            "1_000",
            "1:30",
            "true",
            "yes",
            "off",
            "null",
            "~",
            "",
            ".inf",
            "-.INF",
            ".nan",
            "2024-01-01",
            "2024-1-1T10:00:00Z",
        ] {
            assert!(is_non_string(s), "{s:?} should not resolve to a string");
        }
        for s in [
            "6.5.1",
            "v1.0",
            "1.0.0-rc.1",
            "abc",
            "1.2.3.4",
            "latest",
            "0.1.0+build",
            "1-2",
        ] {
            assert!(!is_non_string(s), "{s:?} should resolve to a string");
        }
    }

    #[test]
    fn plain_safety() {
        for s in ["6.5.1", "a b", "a#b", "-1", "a:b", "ghcr.io/x", "ünï"] {
            assert!(plain_safe(s, false), "{s:?}");
        }
        for s in [
            "", " a", "a ", "- a", "a: b", "a #b", "#a", "'a", "\"a", "&a", "a:", "a\tb", "---",
        ] {
            assert!(!plain_safe(s, false), "{s:?}");
        }
        assert!(!plain_safe("a,b", true));
        assert!(!plain_safe("a:b", true));
        assert!(plain_safe("a,b", false));
    }

    #[test]
    fn double_round_trip() {
        for s in [
            "plain",
            "quote \" back \\ slash",
            "nl\nnl",
            "tab\t",
            "\u{1}\u{85}\u{2028}\u{feff}",
            "ü",
        ] {
            assert_eq!(decode(Style::Double, &double_quoted(s)).as_deref(), Some(s));
        }
        assert_eq!(
            decode(Style::Double, r#""\x41\u00e9\U0001F600""#).as_deref(),
            Some("Aé😀")
        );
        assert_eq!(decode(Style::Double, r#""\q""#), None);
    }

    #[test]
    fn render_keeps_style_when_possible() {
        assert_eq!(render(Style::Plain, "6.0.0", "6.5.1", false), "6.5.1");
        assert_eq!(render(Style::Plain, "6.0.0", "1.0", false), "\"1.0\"");
        assert_eq!(render(Style::Plain, "1.0", "2.0", false), "2.0");
        assert_eq!(render(Style::Plain, "v1", "a: b", false), "\"a: b\"");
        assert_eq!(render(Style::Single, "'v1'", "it's", false), "'it''s'");
        assert_eq!(render(Style::Single, "'v1'", "a\nb", false), "\"a\\nb\"");
        assert_eq!(
            render(Style::Double, "\"v1\"", "say \"hi\"", false),
            "\"say \\\"hi\\\"\""
        );
    }
}
