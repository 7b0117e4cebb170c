//! Printing promotion records: `-o table|json|yaml`.

use chrono::{DateTime, Utc};
use pipeline_core::PromotionRecord;

use crate::cli::OutputFormat;

/// Widest MESSAGE cell of a table, in characters; longer messages end with `…`.
pub const MESSAGE_WIDTH: usize = 60;

/// Prints `records` (a list: a JSON array, a YAML sequence, or a table with a header).
pub fn print_records(records: &[PromotionRecord], output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(records)?),
        OutputFormat::Yaml => print!("{}", lines(serde_saphyr::to_string(&records)?)),
        OutputFormat::Table => print!("{}", table(records, Utc::now())),
    }
    Ok(())
}

/// Prints one record (a JSON object, a YAML mapping, or a one-row table).
pub fn print_record(record: &PromotionRecord, output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(record)?),
        OutputFormat::Yaml => print!("{}", lines(serde_saphyr::to_string(record)?)),
        OutputFormat::Table => print!("{}", table(std::slice::from_ref(record), Utc::now())),
    }
    Ok(())
}

/// `text` ending with a newline.
fn lines(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// One line of at most `width` characters: control characters (newlines in error
/// messages, escape sequences) become spaces, runs of spaces one, and a longer text is
/// cut with `…`.
pub fn cell(text: &str, width: usize) -> String {
    let mut flat = String::with_capacity(text.len().min(width * 4));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (flat.is_empty() || flat.ends_with(' ')) {
            continue;
        }
        flat.push(c);
    }
    let flat = flat.trim_end();
    if flat.chars().count() <= width {
        return flat.to_string();
    }
    let mut cut: String = flat.chars().take(width.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// The records as an aligned table, newest first as given.
pub fn table(records: &[PromotionRecord], now: DateTime<Utc>) -> String {
    const HEADER: [&str; 10] = [
        "ID", "PIPELINE", "FROM", "TO", "REVISION", "PHASE", "ATTEMPTS", "TRIGGER", "AGE",
        "MESSAGE",
    ];
    let rows: Vec<[String; 10]> = records
        .iter()
        .map(|r| {
            let age = (now - r.created_at).to_std().unwrap_or_default();
            let age = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
            let message = r.result.as_deref().unwrap_or(&r.message);
            [
                r.id.clone(),
                r.pipeline.to_string(),
                r.source_environment.clone(),
                r.target_environment.clone(),
                cell(&r.revision, 256),
                r.phase.to_string(),
                r.attempts.to_string(),
                cell(
                    if r.trigger.source.is_empty() {
                        "-"
                    } else {
                        &r.trigger.source
                    },
                    32,
                ),
                age.to_string(),
                cell(message, MESSAGE_WIDTH),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if records.is_empty() {
        out.push_str("(no promotions)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cells_are_one_bounded_line() {
        assert_eq!(cell("short", 60), "short");
        assert_eq!(
            cell("git push failed:\n  fatal:\tdenied\n", 60),
            "git push failed: fatal: denied"
        );
        let long = "x".repeat(100);
        let cut = cell(&long, 60);
        assert_eq!(cut.chars().count(), 60);
        assert!(cut.ends_with('…'));
        assert_eq!(cell("ééééé", 3), "éé…");
        assert_eq!(cell("ab   cd", 60), "ab cd");
    }

    #[test]
    fn table_has_id_trigger_and_a_bounded_message() {
        let pipeline = pipeline_core::PipelineRef::new("flux-system", "podinfo");
        let json = serde_json::json!({
            "id": "podinfo-staging-0123456789abcdef",
            "pipeline": pipeline,
            "sourceEnvironment": "dev",
            "targetEnvironment": "staging",
            "revision": "6.5.1",
            "phase": "Failed",
            "attempts": 3,
            "message": format!("gave up after 3 attempts: {}", "very long detail ".repeat(10)),
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": "2026-01-01T00:00:00Z",
            "trigger": {"source": "webhook"},
        });
        let record: PromotionRecord = serde_json::from_value(json).unwrap();
        let now = "2026-01-01T00:01:30Z".parse().unwrap();
        let text = table(&[record], now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("ID  "), "{text}");
        assert!(lines[0].contains("TRIGGER"), "{text}");
        assert!(
            lines[1].starts_with("podinfo-staging-0123456789abcdef  flux-system/podinfo"),
            "{text}"
        );
        assert!(lines[1].contains("webhook"), "{text}");
        assert!(lines[1].contains("1m 30s"), "{text}");
        let message = &lines[1][lines[0].find("MESSAGE").unwrap()..];
        assert_eq!(message.chars().count(), MESSAGE_WIDTH, "{message}");
        assert!(message.ends_with('…'));
    }
}
