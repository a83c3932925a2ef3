//! One bad protocol per rule in tests/bad/. Each file states what `check` must
//! report, in comment lines at its top:
//!
//! ```text
//! # expect: error 12:9 unknown-key "unknown key `tip`"
//! # param: volume=10 s          (optional --param overrides)
//! ```
//!
//! Every expectation must match a diagnostic exactly (severity, line, column,
//! code) with the quoted text inside its message, and every error reported must
//! be expected, so a case cannot pass by accident.

use biofoundry::check::check_source;
use biofoundry::diagnostics::{Severity, locate};
use biofoundry::protocol::ParamOverride;
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use std::path::Path;

#[derive(Debug)]
struct Expect {
    severity: Severity,
    line: usize,
    column: usize,
    code: String,
    text: String,
}

fn expectations(text: &str) -> (Vec<Expect>, Vec<ParamOverride>) {
    let mut expects = Vec::new();
    let mut params = Vec::new();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(rest) = line.strip_prefix("# param:") {
            params.push(rest.trim().parse().expect("param is name=value"));
            continue;
        }
        let Some(rest) = line.strip_prefix("# expect:") else {
            continue;
        };
        let rest = rest.trim();
        let (head, quoted) = rest
            .split_once('"')
            .expect("expect line has a quoted message part");
        let mut words = head.split_whitespace();
        let severity = match words.next() {
            Some("error") => Severity::Error,
            Some("warning") => Severity::Warning,
            other => panic!("bad severity {other:?}"),
        };
        let (line_no, column) = words
            .next()
            .and_then(|p| p.split_once(':'))
            .expect("line:col");
        let code = words.next().expect("code").to_string();
        expects.push(Expect {
            severity,
            line: line_no.parse().unwrap(),
            column: column.parse().unwrap(),
            code,
            text: quoted.strip_suffix('"').expect("closing quote").to_string(),
        });
    }
    (expects, params)
}

#[test]
fn every_bad_case_is_reported_where_it_is() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "only {} bad cases", files.len());
    let mut failures = Vec::new();
    let mut codes = std::collections::BTreeSet::new();
    for path in &files {
        let file = SourceFile::read(path).unwrap();
        let (expects, params) = expectations(&file.text);
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let report = check_source(file, &params, &SimulatedLab);
        let found: Vec<_> = report
            .diagnostics
            .iter()
            .map(|d| locate(&report.file, d))
            .collect();
        for e in &expects {
            codes.insert(e.code.clone());
            let hit = found.iter().any(|d| {
                d.severity == e.severity
                    && d.line == e.line
                    && d.column == e.column
                    && d.code == e.code
                    && d.message.contains(&e.text)
            });
            if !hit {
                failures.push(format!(
                    "{}: expected {:?}\n  found: {:#?}",
                    path.display(),
                    e,
                    found
                ));
            }
        }
        for d in found.iter().filter(|d| d.severity == Severity::Error) {
            let expected = expects
                .iter()
                .any(|e| e.line == d.line && e.column == d.column && e.code == d.code);
            if !expected {
                failures.push(format!(
                    "{}: unexpected {}:{} {} {}",
                    path.display(),
                    d.line,
                    d.column,
                    d.code,
                    d.message
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        codes.len() >= 35,
        "bad cases cover only {} codes: {codes:?}",
        codes.len()
    );
}
