//! `validate DIR`: the loader's verdict on a folder, for CI and for humans.

use std::path::Path;
use std::process::ExitCode;

pub fn run(dir: &Path) -> ExitCode {
    if !dir.is_dir() {
        eprintln!("error: {} is not a directory", dir.display());
        return ExitCode::from(2);
    }
    let catalog = pipeline_manifests::load_dir(dir);
    for error in &catalog.errors {
        eprintln!("error: {error}");
    }
    for warning in &catalog.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "{}: {} pipeline(s), {} secret(s) in {} file(s); {} error(s), {} warning(s)",
        dir.display(),
        catalog.pipelines.len(),
        catalog.secrets.len(),
        catalog.files,
        catalog.errors.len(),
        catalog.warnings.len()
    );
    if catalog.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
