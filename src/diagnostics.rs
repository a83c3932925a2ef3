//! Diagnostics: what `check` reports, rendered for people (rustc style) or as JSON.

use crate::source::{SourceFile, Span};
use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a file, tied to the span of the offending value.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable kebab-case code, e.g. `unknown-key`; documented in docs/protocol-format.md.
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
    pub span: Span,
    /// Another place worth showing (e.g. where a duplicate id was first declared).
    pub related: Option<(Span, String)>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            hint: None,
            span,
            related: None,
        }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_optional_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related = Some((span, label.into()));
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A diagnostic as `--format json` prints it: 1-based line and column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocatedDiagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

pub fn locate(file: &SourceFile, d: &Diagnostic) -> LocatedDiagnostic {
    let (line, column) = file.line_col(d.span.start);
    let (end_line, end_column) = file.line_col(d.span.end.max(d.span.start));
    LocatedDiagnostic {
        file: file.display_path(),
        line,
        column,
        end_line,
        end_column,
        severity: d.severity,
        code: d.code,
        message: d.message.clone(),
        hint: d.hint.clone(),
    }
}

/// Renders one diagnostic like rustc: `file:line:col`, the source line, a marker
/// under the offending value, the message and a hint.
pub fn render_human(file: &SourceFile, d: &Diagnostic, color: bool) -> String {
    let level = match d.severity {
        Severity::Error => Level::ERROR,
        Severity::Warning => Level::WARNING,
    };
    let path = file.display_path();
    let len = file.text.len();
    let clamp = |s: Span| {
        let start = s.start.min(len);
        let mut end = s.end.clamp(start, len);
        // A marker must cover something visible; a zero-width span at a line end
        // still renders as a caret.
        if end == start && end < len && !file.text[end..].starts_with('\n') {
            end = next_char_boundary(&file.text, end);
        }
        start..end
    };
    let mut snippet = Snippet::source(file.text.as_str())
        .path(path.as_str())
        .fold(true)
        .annotation(AnnotationKind::Primary.span(clamp(d.span)));
    if let Some((span, label)) = &d.related {
        snippet = snippet.annotation(AnnotationKind::Context.span(clamp(*span)).label(label));
    }
    let mut group = level
        .primary_title(d.message.as_str())
        .id(d.code)
        .element(snippet);
    if let Some(hint) = &d.hint {
        group = group.element(Level::HELP.message(hint.as_str()));
    }
    let report: [Group<'_>; 1] = [group];
    let renderer = if color {
        Renderer::styled()
    } else {
        Renderer::plain()
    };
    renderer.render(&report)
}

fn next_char_boundary(text: &str, mut i: usize) -> usize {
    i += 1;
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i.min(text.len())
}

/// "did you mean" for a misspelt name: the closest candidate within a small edit distance.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let word_lower = word.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&word_lower, &c.to_lowercase());
        let limit = (word.chars().count().max(c.chars().count()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Edit distance where swapping two neighbouring letters counts as one edit
/// (optimal string alignment): `valeu` is one edit from `value`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["transfer", "aspirate", "dispense"];
        assert_eq!(
            did_you_mean("transfr", names).as_deref(),
            Some("did you mean `transfer`?")
        );
        assert_eq!(did_you_mean("centrifuge", names), None);
    }

    #[test]
    fn human_output_has_location_marker_and_hint() {
        let f = SourceFile::new("p.toml", "a = 1\nvolume = \"10 ul\"\n");
        let d =
            Diagnostic::error("bad-unit", Span::new(15, 22), "unknown unit").with_hint("use uL");
        let out = render_human(&f, &d, false);
        assert!(out.contains("p.toml:2:10"), "{out}");
        assert!(out.contains("^^^^^^^"), "{out}");
        assert!(out.contains("help: use uL"), "{out}");
        assert!(out.contains("error[bad-unit]: unknown unit"), "{out}");
    }
}
