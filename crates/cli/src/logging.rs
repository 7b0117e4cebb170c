//! Logging of `serve`: text or JSON lines on stderr, filtered by `--log-level` (or
//! `RUST_LOG`, which wins when set).
//!
//! JSON lines never repeat a key. The stock formatter of `tracing-subscriber` with
//! `flatten_event` writes every event field next to `timestamp`, `level`, `target` and
//! the format message, so an event with a field called `message` (or `target`, ...) gave
//! a line with that key twice, which JSON parsers read differently (most keep the last).
//! [`JsonLines`] writes `timestamp`, `level`, `message`, the event's fields, `target`,
//! then `span` and `spans` when there are spans; a field whose name is already taken is
//! written as `fields.<name>` instead.

use std::collections::HashSet;
use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogFormat;

/// Levels `--log-level` takes alone; filter directives (`info,pipeline_git=debug`) are
/// accepted too.
const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// `--log-level` value parser: a level, or `EnvFilter` directives whose bare words are
/// levels (a bare word is otherwise taken as a target name and would silently log
/// nothing).
pub fn parse_log_level(text: &str) -> Result<String, String> {
    let text = text.trim();
    let hint =
        "expected error, warn, info, debug or trace, or directives like info,pipeline_git=debug";
    if text.is_empty() {
        return Err(hint.to_string());
    }
    for directive in text.split(',') {
        let directive = directive.trim();
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?} is not a level; {hint}"));
        }
    }
    EnvFilter::try_new(text).map_err(|e| format!("{e}; {hint}"))?;
    Ok(text.to_string())
}

/// Installs the global subscriber. `RUST_LOG`, when set and not empty, overrides `level`;
/// an invalid `RUST_LOG` is reported (once logging works) and `level` used instead.
pub fn init(format: LogFormat, level: &str) {
    let mut ignored = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => match EnvFilter::try_new(&value) {
            Ok(filter) => filter,
            Err(err) => {
                ignored = Some((value, err.to_string()));
                EnvFilter::new(level)
            }
        },
        _ => EnvFilter::new(level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(TextFields)
            .init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .init(),
    }
    if let Some((value, error)) = ignored {
        tracing::warn!(rust_log = %value, error = %error, level, "RUST_LOG is not a valid filter; using --log-level");
    }
}

/// Text-line fields that cannot forge lines: every field value (and the message) is
/// written with control characters escaped (`\n` as `\\n`, ESC as `\\u{1b}`, ...), so a
/// revision, a name or a remote error text that slipped through validation still ends up
/// on its own line, as text.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

/// `text` with control characters written as escapes.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

impl Visit for TextVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, &escape_controls(value));
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = pipeline_core::report::error_chain(value);
        self.write(field, &escape_controls(&text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.write(field, &escape_controls(&text));
    }
}

impl TextVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        self.result = if name == "message" {
            write!(self.writer, "{separator}{value}")
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}={value}")
        };
    }
}

/// One JSON object per event, with unique keys (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

/// Keys the formatter writes itself; event fields of these names are renamed.
const RESERVED: [&str; 5] = ["timestamp", "level", "target", "span", "spans"];

/// Ordered JSON object whose keys stay unique.
#[derive(Default)]
struct Object {
    entries: Vec<(String, Value)>,
    keys: HashSet<String>,
}

impl Object {
    fn reserving(keys: &[&str]) -> Self {
        Self {
            entries: Vec::new(),
            keys: keys.iter().map(|k| (*k).to_string()).collect(),
        }
    }

    /// Writes `value` at `key` when it is free, else at `fields.<key>` (numbered if need
    /// be).
    fn insert(&mut self, key: &str, value: Value) {
        let mut name = key.to_string();
        if self.keys.contains(&name) {
            name = format!("fields.{key}");
            let mut n = 2;
            while self.keys.contains(&name) {
                name = format!("fields.{key}.{n}");
                n += 1;
            }
        }
        self.keys.insert(name.clone());
        self.entries.push((name, value));
    }

    /// Writes a reserved key (already counted as taken).
    fn put(&mut self, key: &str, value: Value) {
        self.keys.insert(key.to_string());
        self.entries.push((key.to_string(), value));
    }

    fn into_value(self) -> Value {
        // A `Map` would sort or dedupe silently; keys are already unique here.
        Value::Object(self.entries.into_iter().collect::<Map<String, Value>>())
    }

    fn write(&self, out: &mut String) -> fmt::Result {
        out.push('{');
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(key).map_err(|_| fmt::Error)?);
            out.push(':');
            out.push_str(&serde_json::to_string(value).map_err(|_| fmt::Error)?);
        }
        out.push('}');
        Ok(())
    }
}

/// Collects an event's fields in order.
struct Fields<'a> {
    object: &'a mut Object,
    /// `log.target` of events that came from the `log` crate: their real target.
    log_target: Option<String>,
}

impl Fields<'_> {
    fn add(&mut self, field: &Field, value: Value) {
        if field.name() == "log.target" {
            if let Value::String(target) = value {
                self.log_target = Some(target);
            }
            return;
        }
        if field.name() == "log.module_path" {
            return;
        }
        self.object.insert(field.name(), value);
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.add(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.add(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.add(field, Value::from(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let value =
            i64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.add(field, value);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let value =
            u64::try_from(value).map_or_else(|_| Value::from(value.to_string()), Value::from);
        self.add(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.add(field, Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.add(
            field,
            Value::from(pipeline_core::report::error_chain(value)),
        );
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field, Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Object::reserving(&RESERVED);
        line.put(
            "timestamp",
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.put("level", Value::from(metadata.level().as_str()));
        let mut fields = Fields {
            object: &mut line,
            log_target: None,
        };
        event.record(&mut fields);
        let target = fields
            .log_target
            .take()
            .unwrap_or_else(|| metadata.target().to_string());
        line.put("target", Value::from(target));

        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let mut object = Object::reserving(&["name"]);
                object.put("name", Value::from(span.name()));
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<N>>() {
                    match serde_json::from_str::<Map<String, Value>>(&formatted.fields) {
                        Ok(map) => {
                            for (key, value) in map {
                                object.insert(&key, value);
                            }
                        }
                        Err(_) if formatted.fields.is_empty() => {}
                        Err(_) => object.insert("fields", Value::from(formatted.fields.as_str())),
                    }
                }
                spans.push(object.into_value());
            }
        }
        if let Some(current) = spans.last().cloned() {
            line.put("span", current);
            line.put("spans", Value::Array(spans));
        }

        let mut out = String::new();
        line.write(&mut out)?;
        out.push('\n');
        writer.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Top-level keys in order, as written, duplicates included (a `Map` hides them).
    fn keys(line: &str) -> Vec<String> {
        struct Keys(Vec<String>);
        impl<'de> serde::Deserialize<'de> for Keys {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = Keys;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Keys, A::Error> {
                        let mut keys = Vec::new();
                        while let Some(key) = map.next_key::<String>()? {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            keys.push(key);
                        }
                        Ok(Keys(keys))
                    }
                }
                d.deserialize_map(Visitor)
            }
        }
        serde_json::from_str::<Keys>(line).unwrap().0
    }

    #[test]
    fn fields_named_like_the_line_keys_are_renamed_not_repeated() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", name = "shadow", id = 7);
            let _entered = span.enter();
            let detail = "the detail";
            tracing::info!(message = %detail, target = "t", level = 3, "event ignored");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line = text.lines().next().unwrap();
        assert_eq!(
            keys(line),
            [
                "timestamp",
                "level",
                "message",
                "fields.message",
                "fields.target",
                "fields.level",
                "target",
                "span",
                "spans"
            ],
            "{line}"
        );
        let value: Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["message"], "event ignored");
        assert_eq!(value["fields.message"], "the detail");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["span"]["name"], "request");
        assert_eq!(value["span"]["fields.name"], "shadow");
        assert_eq!(value["spans"][0]["id"], 7);
    }

    #[test]
    fn text_lines_cannot_be_forged() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(TextFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let revision = "1.0\nINFO forged line\u{1b}[31m";
            tracing::info!(revision = %revision, raw = revision, "event {revision}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("revision=1.0\\nINFO forged line"), "{text}");
    }

    #[test]
    fn log_levels_are_checked() {
        assert_eq!(parse_log_level("debug").unwrap(), "debug");
        assert!(parse_log_level("info,pipeline_git=debug").is_ok());
        assert!(
            parse_log_level("verbose")
                .unwrap_err()
                .contains("not a level")
        );
        assert!(parse_log_level("").is_err());
    }
}
