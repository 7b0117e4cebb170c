//! A line-oriented YAML tokenizer: just enough structure to find line comments, the scalars on
//! a line, and the multi-line constructs (block scalars, quoted and plain scalars spanning lines,
//! flow collections spanning lines) whose text must not be mistaken for markers.

use super::scalar::Style;

/// One token on a line; `start..end` are byte offsets within the line content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tok {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `---` at column 0.
    DocStart,
    /// `...` at column 0.
    DocEnd,
    /// Block sequence entry `- ` before any node on the line.
    Dash,
    /// Explicit key `? `.
    Question,
    /// `: ` before any node on the line (explicit value).
    ExplicitValue,
    /// Mapping value indicator after a key.
    Colon,
    /// A scalar; `complete` is false when it started or continues on another line.
    Scalar {
        style: Style,
        complete: bool,
    },
    FlowOpen {
        map: bool,
    },
    FlowClose,
    Comma,
    Anchor,
    Tag,
    Alias,
    /// `|` or `>` with its optional indentation indicator.
    BlockHeader {
        indent: Option<u8>,
    },
    Comment,
}

/// What kind of line the scanner saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineKind {
    /// Text that belongs to a block scalar, a directive or a blank line inside a multi-line
    /// scalar: never structure, never a marker.
    Text,
    /// Tokenized structure starting fresh on this line.
    Fresh,
    /// Tokenized, but the line continues a construct from a previous line (a quoted or plain
    /// scalar, or a flow collection), so its values cannot be rewritten on their own.
    Continued,
}

/// State carried from one line to the next.
#[derive(Debug, Clone, Copy)]
enum Carry {
    None,
    /// Inside a block scalar whose content must be indented more than `threshold`.
    Block {
        threshold: isize,
        content_indent: Option<usize>,
    },
    /// Inside a quoted scalar that did not close on its line.
    Quoted(Style),
    /// After a plain scalar that may continue on more-indented lines.
    Plain {
        threshold: isize,
    },
}

/// Scans a document line by line, keeping the state that spans lines.
#[derive(Debug)]
pub(crate) struct Scanner {
    carry: Carry,
    flow_depth: usize,
    pub tokens: Vec<Tok>,
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn is_flow_indicator(b: u8) -> bool {
    matches!(b, b',' | b'[' | b']' | b'{' | b'}')
}

/// `---` or `...` at column 0 followed by whitespace or the end of the line.
fn doc_marker(line: &[u8]) -> Option<Kind> {
    let kind = match line.get(..3) {
        Some(b"---") => Kind::DocStart,
        Some(b"...") => Kind::DocEnd,
        _ => return None,
    };
    match line.get(3) {
        None => Some(kind),
        Some(&b) if is_ws(b) => Some(kind),
        Some(_) => None,
    }
}

impl Scanner {
    pub(crate) fn new() -> Self {
        Self {
            carry: Carry::None,
            flow_depth: 0,
            tokens: Vec::new(),
        }
    }

    /// Scans one line (without its line break) and leaves its tokens in `self.tokens`.
    pub(crate) fn line(&mut self, line: &str) -> LineKind {
        self.tokens.clear();
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = bytes.iter().all(|&b| is_ws(b));
        let marker = doc_marker(bytes);

        match self.carry {
            Carry::Block {
                threshold,
                content_indent,
            } => {
                if marker.is_none() {
                    if blank {
                        return LineKind::Text;
                    }
                    match content_indent {
                        Some(ci) if indent >= ci => return LineKind::Text,
                        None if indent as isize > threshold => {
                            self.carry = Carry::Block {
                                threshold,
                                content_indent: Some(indent),
                            };
                            return LineKind::Text;
                        }
                        _ => {}
                    }
                }
                self.carry = Carry::None;
            }
            Carry::Quoted(style) => {
                if marker.is_none() {
                    self.quoted_continuation(bytes, style);
                    return LineKind::Continued;
                }
                // A document marker cannot be inside a quoted scalar: start afresh.
                self.carry = Carry::None;
                self.flow_depth = 0;
            }
            Carry::Plain { threshold } => {
                if blank {
                    return LineKind::Text;
                }
                let first = bytes.get(indent).copied();
                if marker.is_none() && first != Some(b'#') && indent as isize > threshold {
                    self.plain_continuation(bytes, indent);
                    return LineKind::Continued;
                }
                self.carry = Carry::None;
            }
            Carry::None => {}
        }

        if let Some(kind) = marker {
            self.flow_depth = 0;
            self.tokens.push(Tok {
                kind,
                start: 0,
                end: 3,
            });
            let open = self.tokenize(bytes, 3, true);
            self.after_line(open, indent);
            return LineKind::Fresh;
        }
        if self.flow_depth > 0 {
            let open = self.tokenize(bytes, 0, false);
            self.after_line(open, indent);
            return LineKind::Continued;
        }
        if bytes.first() == Some(&b'%') {
            return LineKind::Text; // directive
        }
        let open = self.tokenize(bytes, 0, true);
        self.after_line(open, indent);
        LineKind::Fresh
    }

    /// Continues a quoted scalar from the previous line.
    fn quoted_continuation(&mut self, bytes: &[u8], style: Style) {
        match close_quote(bytes, 0, style) {
            Some(end) => {
                self.tokens.push(Tok {
                    kind: Kind::Scalar {
                        style,
                        complete: false,
                    },
                    start: 0,
                    end,
                });
                self.carry = Carry::None;
                let open = self.tokenize(bytes, end, false);
                // The rest of this line can only be indicators or a comment: no new
                // block scalar or plain scalar to carry, except another open quote.
                if let Some(style) = open {
                    self.carry = Carry::Quoted(style);
                }
            }
            None => {
                self.tokens.push(Tok {
                    kind: Kind::Scalar {
                        style,
                        complete: false,
                    },
                    start: 0,
                    end: bytes.len(),
                });
            }
        }
    }

    /// A more-indented line continuing a multi-line plain scalar; a comment ends it.
    fn plain_continuation(&mut self, bytes: &[u8], indent: usize) {
        let mut end = indent;
        let mut j = indent;
        while j < bytes.len() {
            let b = bytes[j];
            if b == b'#' && j > 0 && is_ws(bytes[j - 1]) {
                break;
            }
            j += 1;
            if !is_ws(b) {
                end = j;
            }
        }
        self.tokens.push(Tok {
            kind: Kind::Scalar {
                style: Style::Plain,
                complete: false,
            },
            start: indent,
            end,
        });
        if j < bytes.len() {
            self.tokens.push(Tok {
                kind: Kind::Comment,
                start: j,
                end: bytes.len(),
            });
            self.carry = Carry::None;
        }
    }

    /// Decides what the next line inherits from this one.
    fn after_line(&mut self, open_quote: Option<Style>, indent: usize) {
        if let Some(style) = open_quote {
            self.carry = Carry::Quoted(style);
            return;
        }
        if self.flow_depth > 0 {
            return;
        }
        let has_comment = self.tokens.last().is_some_and(|t| t.kind == Kind::Comment);
        let last = self.tokens.iter().rev().find(|t| t.kind != Kind::Comment);
        match last.map(|t| t.kind) {
            Some(Kind::BlockHeader { indent: explicit }) => {
                let threshold = self.node_threshold(indent);
                self.carry = Carry::Block {
                    threshold,
                    content_indent: explicit.map(|d| (threshold + isize::from(d)).max(0) as usize),
                };
            }
            Some(Kind::Scalar {
                style: Style::Plain,
                ..
            }) if !has_comment => {
                self.carry = Carry::Plain {
                    threshold: self.node_threshold(indent),
                };
            }
            _ => {}
        }
    }

    /// The indentation that lines continuing the last node on this line must exceed: the
    /// column of the mapping key when there is one, else of the last `-`/`?`/`:` indicator,
    /// else just below the line's own indentation (or -1 after `---`).
    fn node_threshold(&self, indent: usize) -> isize {
        let mut threshold = indent as isize - 1;
        let mut rest = &self.tokens[..];
        if let Some(first) = rest.first()
            && first.kind == Kind::DocStart
        {
            threshold = -1;
            rest = &rest[1..];
        }
        while let Some(tok) = rest.first() {
            if !matches!(tok.kind, Kind::Dash | Kind::Question | Kind::ExplicitValue) {
                break;
            }
            threshold = tok.start as isize;
            rest = &rest[1..];
        }
        if rest.iter().any(|t| t.kind == Kind::Colon)
            && let Some(key) = rest.first()
        {
            threshold = key.start as isize;
        }
        threshold
    }

    /// Tokenizes `bytes[start..]`; returns the style of a quoted scalar left open at the end.
    fn tokenize(&mut self, bytes: &[u8], start: usize, mut leading: bool) -> Option<Style> {
        let n = bytes.len();
        let mut i = start;
        loop {
            while i < n && is_ws(bytes[i]) {
                i += 1;
            }
            if i >= n {
                return None;
            }
            let c = bytes[i];
            let next = bytes.get(i + 1).copied();
            let next_ws = next.is_none_or(is_ws);
            let in_flow = self.flow_depth > 0;
            let push = |this: &mut Self, kind, end| {
                this.tokens.push(Tok {
                    kind,
                    start: i,
                    end,
                });
            };
            match c {
                b'#' if i == 0 || is_ws(bytes[i - 1]) => {
                    push(self, Kind::Comment, n);
                    return None;
                }
                b'-' | b'?' | b':' if leading && !in_flow && next_ws => {
                    let kind = match c {
                        b'-' => Kind::Dash,
                        b'?' => Kind::Question,
                        _ => Kind::ExplicitValue,
                    };
                    push(self, kind, i + 1);
                    i += 1;
                    continue;
                }
                b'?' if in_flow && next_ws => {
                    push(self, Kind::Question, i + 1);
                    i += 1;
                }
                b':' if next_ws
                    || (in_flow && next.is_some_and(is_flow_indicator))
                    || self.adjacent_json_node(i) =>
                {
                    push(self, Kind::Colon, i + 1);
                    i += 1;
                }
                b'[' | b'{' => {
                    self.flow_depth += 1;
                    push(self, Kind::FlowOpen { map: c == b'{' }, i + 1);
                    i += 1;
                }
                b']' | b'}' if in_flow => {
                    self.flow_depth -= 1;
                    push(self, Kind::FlowClose, i + 1);
                    i += 1;
                }
                b',' if in_flow => {
                    push(self, Kind::Comma, i + 1);
                    i += 1;
                }
                b'"' | b'\'' => {
                    let style = if c == b'"' {
                        Style::Double
                    } else {
                        Style::Single
                    };
                    match close_quote(bytes, i + 1, style) {
                        Some(end) => {
                            let kind = Kind::Scalar {
                                style,
                                complete: true,
                            };
                            push(self, kind, end);
                            i = end;
                        }
                        None => {
                            let kind = Kind::Scalar {
                                style,
                                complete: false,
                            };
                            push(self, kind, n);
                            return Some(style);
                        }
                    }
                }
                b'&' | b'*' | b'!' => {
                    let mut j = i + 1;
                    while j < n && !is_ws(bytes[j]) && !(in_flow && is_flow_indicator(bytes[j])) {
                        j += 1;
                    }
                    let kind = match c {
                        b'&' => Kind::Anchor,
                        b'*' => Kind::Alias,
                        _ => Kind::Tag,
                    };
                    push(self, kind, j);
                    i = j;
                    // Properties may precede a block indicator: `- !!str |`.
                    continue;
                }
                b'|' | b'>' if !in_flow => {
                    let mut j = i + 1;
                    let mut indent = None;
                    while j < n && matches!(bytes[j], b'0'..=b'9' | b'+' | b'-') {
                        if bytes[j].is_ascii_digit() {
                            indent = Some(bytes[j] - b'0');
                        }
                        j += 1;
                    }
                    push(self, Kind::BlockHeader { indent }, j);
                    i = j;
                }
                _ => {
                    let end = plain_end(bytes, i, in_flow);
                    let kind = Kind::Scalar {
                        style: Style::Plain,
                        complete: true,
                    };
                    push(self, kind, end);
                    // Guarantee progress even on malformed input such as a lone `#`.
                    i = end.max(i + 1);
                }
            }
            leading = false;
        }
    }

    /// JSON-like nodes (quoted scalars, flow collections) may be followed directly by `:`.
    fn adjacent_json_node(&self, i: usize) -> bool {
        self.tokens.last().is_some_and(|t| {
            t.end == i
                && matches!(
                    t.kind,
                    Kind::FlowClose
                        | Kind::Scalar {
                            style: Style::Single | Style::Double,
                            ..
                        }
                )
        })
    }
}

/// Finds the end (exclusive, after the closing quote) of a quoted scalar whose body starts at
/// `from`.
fn close_quote(bytes: &[u8], from: usize, style: Style) -> Option<usize> {
    let mut j = from;
    while j < bytes.len() {
        match (style, bytes[j]) {
            (Style::Double, b'\\') => j += 2,
            (Style::Double, b'"') => return Some(j + 1),
            (Style::Single, b'\'') => {
                if bytes.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else {
                    return Some(j + 1);
                }
            }
            _ => j += 1,
        }
    }
    None
}

/// End of a plain scalar starting at `start` (trailing whitespace excluded).
fn plain_end(bytes: &[u8], start: usize, in_flow: bool) -> usize {
    let mut j = start;
    let mut end = start;
    while j < bytes.len() {
        let b = bytes[j];
        if is_ws(b) {
            j += 1;
            continue;
        }
        if b == b'#' && j > start && is_ws(bytes[j - 1]) {
            break;
        }
        if b == b':' {
            let next = bytes.get(j + 1).copied();
            if next.is_none_or(|n| is_ws(n) || (in_flow && is_flow_indicator(n))) {
                break;
            }
        }
        if in_flow && is_flow_indicator(b) {
            break;
        }
        j += 1;
        end = j;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(scanner: &mut Scanner, line: &str) -> (LineKind, Vec<(Kind, String)>) {
        let kind = scanner.line(line);
        let toks = scanner
            .tokens
            .iter()
            .map(|t| (t.kind, line[t.start..t.end].to_owned()))
            .collect();
        (kind, toks)
    }

    const PLAIN: Kind = Kind::Scalar {
        style: Style::Plain,
        complete: true,
    };

    #[test]
    fn block_mapping_line() {
        let mut s = Scanner::new();
        let (kind, toks) = kinds(&mut s, "  - key: a b#c # comment");
        assert_eq!(kind, LineKind::Fresh);
        assert_eq!(
            toks,
            vec![
                (Kind::Dash, "-".into()),
                (PLAIN, "key".into()),
                (Kind::Colon, ":".into()),
                (PLAIN, "a b#c".into()),
                (Kind::Comment, "# comment".into()),
            ]
        );
    }

    #[test]
    fn quoted_hash_is_not_comment() {
        let mut s = Scanner::new();
        let (_, toks) = kinds(&mut s, r#"k: "a # \" b" # c"#);
        assert_eq!(toks[2].1, r#""a # \" b""#);
        assert_eq!(toks[3].0, Kind::Comment);
    }

    #[test]
    fn flow_tokens() {
        let mut s = Scanner::new();
        let (_, toks) = kinds(&mut s, r#"i: {"a":b, c: [d, e:f]}"#);
        let texts: Vec<&str> = toks.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "i", ":", "{", "\"a\"", ":", "b", ",", "c", ":", "[", "d", ",", "e:f", "]", "}"
            ]
        );
    }

    #[test]
    fn block_scalar_content_is_text() {
        let mut s = Scanner::new();
        assert_eq!(s.line("- key: |-"), LineKind::Fresh);
        assert_eq!(s.line("    v: 1 # x"), LineKind::Text);
        assert_eq!(s.line(""), LineKind::Text);
        assert_eq!(s.line("      still: text"), LineKind::Text);
        assert_eq!(s.line("  other: 1"), LineKind::Fresh);
    }

    #[test]
    fn multi_line_quoted_and_plain() {
        let mut s = Scanner::new();
        assert_eq!(s.line(r#"a: "one # two"#), LineKind::Fresh);
        assert_eq!(s.line(r#"  three" # c"#), LineKind::Continued);
        assert_eq!(s.tokens.last().map(|t| t.kind), Some(Kind::Comment));
        assert_eq!(s.line("b: plain"), LineKind::Fresh);
        assert_eq!(s.line("  more # c"), LineKind::Continued);
        assert_eq!(s.line("  x: 1"), LineKind::Fresh);
    }
}
