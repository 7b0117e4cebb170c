//! How the command fails: one line, `error: <what>; <what to do>`, on stderr; exit code 2
//! for a mistaken invocation (usage), 1 for a failure while doing the work.

use std::fmt;
use std::process::ExitCode;

use clap::error::ErrorKind;

/// A mistaken invocation (a missing setting, a value that cannot work): exit code 2. Its
/// text says what to do instead.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Exit code for a usage error.
pub const USAGE: u8 = 2;

/// Prints `err` as one line and gives the exit code: 2 when it (or a cause) is a
/// [`UsageError`], else 1.
pub fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(err));
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        ExitCode::from(USAGE)
    } else {
        ExitCode::FAILURE
    }
}

/// The error and the causes that add something, on one line.
pub fn one_line(err: &anyhow::Error) -> String {
    let chain = pipeline_core::report::error_chain(err.as_ref());
    squeeze(&chain)
}

/// Whitespace runs (newlines included) become one space.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Handles a command-line parse failure: help and `--version` are printed as clap
/// prints them; errors become one line (`error: <what>; <tip or usage>`), exit code 2.
pub fn clap_failure(err: &clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            return ExitCode::from(USAGE);
        }
        _ => {}
    }
    eprintln!("error: {}", condense(err.kind(), &err.render().to_string()));
    ExitCode::from(USAGE)
}

/// clap's multi-line error text as one line: the message, then clap's tips, else (when
/// arguments are missing or unexpected) the usage line, else where to find help.
fn condense(kind: ErrorKind, rendered: &str) -> String {
    let mut paragraphs: Vec<Vec<&str>> = vec![Vec::new()];
    for line in rendered.lines() {
        if line.trim().is_empty() {
            paragraphs.push(Vec::new());
        } else if let Some(last) = paragraphs.last_mut() {
            last.push(line.trim());
        }
    }
    paragraphs.retain(|p| !p.is_empty());
    let mut what = String::new();
    let mut tips = Vec::new();
    let mut usage = None;
    for (i, paragraph) in paragraphs.iter().enumerate() {
        let text = paragraph.join(" ");
        if i == 0 {
            what = text.strip_prefix("error: ").unwrap_or(&text).to_string();
        } else if let Some(tip) = text.strip_prefix("tip: ") {
            tips.push(tip.to_string());
        } else if let Some(line) = text.strip_prefix("Usage: ") {
            usage = Some(line.to_string());
        }
    }
    let command = usage
        .as_deref()
        .map_or("pipeline-controller".to_string(), |u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-', '|']))
                .collect::<Vec<_>>()
                .join(" ")
        });
    let todo = if !tips.is_empty() {
        tips.join("; ")
    } else if matches!(kind, ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        // The value parser's message (or clap's list of possible values) says it.
        return squeeze(&what);
    } else {
        match (kind, &usage) {
            (
                ErrorKind::MissingRequiredArgument
                | ErrorKind::MissingSubcommand
                | ErrorKind::UnknownArgument
                | ErrorKind::InvalidSubcommand
                | ErrorKind::ArgumentConflict
                | ErrorKind::TooManyValues
                | ErrorKind::WrongNumberOfValues
                | ErrorKind::NoEquals,
                Some(usage),
            ) => format!("usage: {usage}"),
            _ => format!("see '{command} --help'"),
        }
    };
    format!("{}; {todo}", squeeze(&what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let missing = "error: the following required arguments were not provided:\n  <ENVIRONMENT>\n  <REVISION>\n\nUsage: pipeline-controller approve <PIPELINE> <ENVIRONMENT> <REVISION>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            condense(ErrorKind::MissingRequiredArgument, missing),
            "the following required arguments were not provided: <ENVIRONMENT> <REVISION>; usage: pipeline-controller approve <PIPELINE> <ENVIRONMENT> <REVISION>"
        );
        let tip = "error: unexpected argument '--lsten' found\n\n  tip: a similar argument exists: '--listen'\n\nUsage: pipeline-controller serve --listen <ADDR>\n\nFor more information, try '--help'.\n";
        let subcommand = "error: unrecognized subcommand 'serv'\n\nUsage: pipeline-controller <COMMAND>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            condense(ErrorKind::InvalidSubcommand, subcommand),
            "unrecognized subcommand 'serv'; usage: pipeline-controller <COMMAND>"
        );
        let other = "error: something\n\nUsage: pipeline-controller promotions list [OPTIONS]\n";
        assert_eq!(
            condense(ErrorKind::Io, other),
            "something; see 'pipeline-controller promotions list --help'"
        );
        assert_eq!(
            condense(ErrorKind::UnknownArgument, tip),
            "unexpected argument '--lsten' found; a similar argument exists: '--listen'"
        );
        let invalid = "error: invalid value ':9000' for '--listen <ADDR>': no host; use 0.0.0.0:9000\n\nFor more information, try '--help'.\n";
        assert_eq!(
            condense(ErrorKind::ValueValidation, invalid),
            "invalid value ':9000' for '--listen <ADDR>': no host; use 0.0.0.0:9000"
        );
    }

    #[test]
    fn usage_errors_are_found_through_context() {
        use anyhow::Context;
        let err = Err::<(), _>(usage("no configuration; pass --manifests DIR"))
            .context("starting")
            .unwrap_err();
        assert_eq!(
            one_line(&err),
            "starting: no configuration; pass --manifests DIR"
        );
        assert!(err.chain().any(|c| c.is::<UsageError>()));
    }
}
