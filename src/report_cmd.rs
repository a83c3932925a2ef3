//! `biofoundry report`: a run's report as one self-contained HTML file.

use crate::runs::{JournalArgs, open};
use biofoundry::report::{ReportError, render};
use std::path::Path;
use std::process::ExitCode;

pub fn cmd_report(run_id: &str, output: &Path, from: &JournalArgs) -> Result<ExitCode, String> {
    let journal = open(from)?;
    let html = match render(&journal, run_id) {
        Ok(html) => html,
        Err(e @ ReportError::UnknownRun(_)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.to_string()),
    };
    std::fs::write(output, &html).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    println!(
        "run {run_id}: report written to {} ({} kB)",
        output.display(),
        html.len().div_ceil(1024)
    );
    Ok(ExitCode::SUCCESS)
}
