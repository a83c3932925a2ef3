//! `check`: parse, validate and plan one protocol file, collecting every diagnostic.

use crate::diagnostics::Diagnostic;
use crate::plan::{Plan, plan};
use crate::protocol::{ParamOverride, Protocol, parse};
use crate::source::SourceFile;
use crate::validate::{DeviceLimits, validate};
use std::sync::Arc;

/// Everything `check` learnt about one file.
#[derive(Debug)]
pub struct CheckReport {
    pub file: Arc<SourceFile>,
    pub protocol: Option<Protocol>,
    pub plan: Option<Plan>,
    /// Sorted by position in the file.
    pub diagnostics: Vec<Diagnostic>,
}

impl CheckReport {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }
    pub fn warning_count(&self) -> usize {
        self.diagnostics.len() - self.error_count()
    }
}

/// Checks protocol text (the path is used for messages and for `definition` files).
pub fn check_source(
    file: SourceFile,
    overrides: &[ParamOverride],
    lab: &dyn DeviceLimits,
) -> CheckReport {
    let file = Arc::new(file);
    let (protocol, mut diagnostics) = parse(Arc::clone(&file), overrides);
    let mut planned = None;
    if let Some(p) = &protocol {
        diagnostics.extend(validate(p, lab));
        let (plan, tracking) = plan(p, lab);
        diagnostics.extend(tracking);
        note_parameter_origins(p, &mut diagnostics);
        planned = Some(plan);
    }
    diagnostics.sort_by_key(|d| (d.span.start, d.severity));
    diagnostics.dedup();
    CheckReport {
        file,
        protocol,
        plan: planned,
        diagnostics,
    }
}

/// Checks see values after substitution; a message about a value written as
/// `${name}` says where the value came from: "(from --param volume=0 uL)".
fn note_parameter_origins(p: &Protocol, diagnostics: &mut [Diagnostic]) {
    for d in diagnostics
        .iter_mut()
        .filter(|d| !d.message.contains("(from "))
    {
        let Some(written) = p.file.text.get(d.span.start..d.span.end) else {
            continue;
        };
        let mut origins = Vec::new();
        let mut rest = written;
        while let Some(start) = rest.find("${") {
            let Some(end) = rest[start..].find('}') else {
                break;
            };
            if let Some(param) = p.params.get(rest[start + 2..start + end].trim()) {
                origins.push(param.origin());
            }
            rest = &rest[start + end + 1..];
        }
        if !origins.is_empty() {
            d.message
                .push_str(&format!(" (from {})", origins.join(", ")));
        }
    }
}
