//! Run reports: one self-contained HTML file from a run's journal
//! (`biofoundry report RUN_ID -o report.html`).
//!
//! The file has inline CSS and inline SVG only: no script, no font, image or
//! style sheet from anywhere else (a Content-Security-Policy says so too), so it
//! can be archived, mailed and opened offline. It shows the run's header, every
//! sampled signal against lab time (with the protocol's limit bands, `wait_until`
//! thresholds and alarm markers), the steps per device as a Gantt chart, the
//! decks' final well volumes and tips, the alarms and every journal entry.
//!
//! Everything in a journal is untrusted text: it is escaped on output, and no
//! content (malformed JSON, missing fields, non-finite numbers, one entry, a
//! million samples) makes rendering panic or the file grow without bound —
//! long signals are drawn min/max per pixel column, long tables are capped.

mod gantt;
mod plates;
mod plots;
mod svg;

use crate::check::{CheckReport, check_source};
use crate::journal::{Entry, Journal, JournalError, Verified};
use crate::protocol::ParamOverride;
use crate::source::SourceFile;
use crate::validate::SimulatedLab;
use serde_json::Value;
use std::fmt::Write;
use svg::{clock, esc, truncate, wall};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no run `{0}` in the journal")]
    UnknownRun(String),
    #[error(transparent)]
    Journal(JournalError),
}

impl From<JournalError> for ReportError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::UnknownRun(id) => ReportError::UnknownRun(id),
            other => ReportError::Journal(other),
        }
    }
}

/// The report of one run of the journal, with its hash chain verified.
pub fn render(journal: &Journal, run_id: &str) -> Result<String, ReportError> {
    let entries = journal.entries(run_id)?;
    let verified = journal.verify(run_id)?;
    Ok(render_document(&entries, Some(&verified)))
}

/// The report of a run's entries (entry 0 the header), as read from a journal.
/// Pure: any entries give a document, never a panic.
pub fn render_entries(entries: &[Entry]) -> String {
    render_document(entries, None)
}

/// The colour of the readings' line in the signal plots.
pub const LINE_COLOUR: &str = plots::LINE;
/// The fill of a monitor's limit band in the signal plots (opaque).
pub const BAND_COLOUR: &str = plots::BAND;

/// Beyond this many entries, runs of consecutive samples are one row each in
/// the event table (their values are in the plots and `runs export --format csv`).
const FULL_TABLE_ENTRIES: usize = 5_000;
/// The most rows of the event table, and of the alarm table.
const MAX_TABLE_ROWS: usize = 10_000;
/// Protocol and lab texts longer than this are not copied into the report.
const MAX_TEXT: usize = 256 * 1024;

/// One journal entry, read.
pub(crate) struct Ev<'a> {
    pub seq: u64,
    pub kind: &'a str,
    /// Lab time, when the entry has a finite one.
    pub t: Option<f64>,
    pub unix_ms: Option<u64>,
    pub v: Value,
}

impl Ev<'_> {
    pub fn s(&self, key: &str) -> &str {
        self.v.get(key).and_then(Value::as_str).unwrap_or("")
    }
}

/// What the report knows about the run, shared by its sections.
pub(crate) struct Run<'a> {
    pub events: Vec<Ev<'a>>,
    pub header: Value,
    /// Lab time covered by the run (`lo` ≤ 0 ≤ `hi`; `hi` the last entry's time).
    pub t_lo: f64,
    pub t_hi: f64,
    /// role → device id, in the protocol's declaration order when known.
    pub bindings: Vec<(String, String)>,
    /// The protocol text of the header, checked again with the run's parameters.
    pub checked: Option<CheckReport>,
}

impl Run<'_> {
    pub fn device_of_role(&self, role: &str) -> String {
        self.bindings
            .iter()
            .find(|(r, _)| r == role)
            .map_or_else(|| role.to_string(), |(_, d)| d.clone())
    }

    pub fn run_id(&self) -> String {
        text(&self.header["run_id"])
    }
}

/// A JSON value as plain text: strings as they are, others as compact JSON.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn read_run(entries: &[Entry]) -> Run<'_> {
    let events: Vec<Ev> = entries
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.body).unwrap_or(Value::Null);
            let kind = if e.kind.is_empty() {
                match v.get("type").and_then(Value::as_str) {
                    Some("run") => "run",
                    _ => "",
                }
            } else {
                e.kind.as_str()
            };
            let t = if kind == "run" {
                Some(0.0)
            } else {
                v.get("t_s")
                    .and_then(Value::as_f64)
                    .filter(|t| t.is_finite())
            };
            Ev {
                seq: e.seq,
                kind,
                t,
                unix_ms: v.get("unix_ms").and_then(Value::as_u64),
                v,
            }
        })
        .collect();
    let header = events
        .iter()
        .find(|e| e.kind == "run")
        .map(|e| e.v["header"].clone())
        .filter(Value::is_object)
        .unwrap_or(Value::Null);
    let (mut t_lo, mut t_hi) = (0.0f64, 0.0f64);
    for t in events.iter().filter_map(|e| e.t) {
        t_lo = t_lo.min(t);
        t_hi = t_hi.max(t);
    }
    let checked = header["text"].as_str().map(|protocol| {
        let overrides: Vec<ParamOverride> = header["params"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| ParamOverride {
                        name: k.clone(),
                        value: text(v),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // A folder that does not exist: a `definition` file of the protocol is
        // not read from wherever the report happens to be made.
        let file = SourceFile::new("<journal>/protocol.toml", protocol);
        check_source(file, &overrides, &SimulatedLab)
    });
    let mut bindings: Vec<(String, String)> = header["bindings"]
        .as_object()
        .map(|m| m.iter().map(|(r, d)| (r.clone(), text(d))).collect())
        .unwrap_or_default();
    if let Some(p) = checked.as_ref().and_then(|c| c.protocol.as_ref()) {
        let order = |role: &str| p.devices.get_index_of(role).unwrap_or(usize::MAX);
        bindings.sort_by_key(|(r, _)| order(r));
    }
    Run {
        events,
        header,
        t_lo,
        t_hi,
        bindings,
        checked,
    }
}

const CSS: &str = r#"
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", "Liberation Sans", Arial, sans-serif;
  margin: 0 auto; padding: 16px 24px 48px; max-width: 1000px; color: #1d2330; background: #fff; font-size: 14px; line-height: 1.4; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #d0d5dd; }
h3 { font-size: 15px; margin: 18px 0 4px; }
nav a { margin-right: 14px; color: #24508f; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
pre { background: #f6f7f9; border: 1px solid #e1e4e8; padding: 8px; overflow: auto; max-height: 480px; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 3px 8px; border-bottom: 1px solid #e6e8ec; }
th { background: #eef0f3; font-weight: 600; white-space: nowrap; }
table.kv { width: auto; }
table.kv th { background: none; color: #556070; font-weight: 600; white-space: nowrap; }
table.events td:nth-child(-n+4) { white-space: nowrap; }
table.events td, table.alarms td { font-size: 12.5px; }
tr.k-alarm td { background: #fdecec; }
tr.k-alarm.cleared td { background: #eaf6ea; }
tr.failed td { background: #fff1e0; }
tr.collapsed td { color: #5b6472; font-style: italic; }
.note { color: #5b6472; }
.warn { color: #9a3412; }
.state { font-weight: 700; }
.state.completed { color: #1e7b34; } .state.failed, .state.aborted { color: #b42318; } .state.stopped { color: #9a3412; }
figure { margin: 10px 0 18px; }
figcaption { font-size: 12.5px; color: #3d4552; }
svg { display: block; max-width: 100%; height: auto; background: #fff; }
svg text { font-family: inherit; }
svg .tick { font-size: 11px; fill: #4a5261; }
svg .label { font-size: 12px; fill: #1d2330; }
svg .small { font-size: 10px; }
svg .grid { stroke: #e3e6ea; stroke-width: 1; }
svg .axis { stroke: #4a5261; stroke-width: 1; }
.sw { display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 10px; vertical-align: middle; border: 1px solid #8a919c; }
.sw.line { height: 0; border: 0; border-top: 3px solid #1a56db; }
.sw.band { background: #cdeccd; }
.sw.thr { height: 0; border: 0; border-top: 2px dashed #7c3aed; }
.sw.alarm { width: 0; height: 12px; border: 0; border-left: 2px solid #d62828; }
.sw.cleared { width: 0; height: 12px; border: 0; border-left: 2px dashed #2f8f46; }
.sw.completed { background: #59a869; } .sw.failed { background: #d9534f; } .sw.skipped { background: #b8bec8; }
.sw.unfinished { background: #f0b429; } .sw.held { background: #fbeecd; }
.sw.tip { background: #c9b28a; border-radius: 50%; width: 10px; } .sw.used { background: #fff; border: 1px dashed #9aa1ab; border-radius: 50%; width: 10px; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #24508f; }
footer { margin-top: 36px; font-size: 12px; color: #6b7280; }
@media print { nav { display: none; } pre { max-height: none; } }
"#;

fn render_document(entries: &[Entry], verified: Option<&Verified>) -> String {
    let run = read_run(entries);
    let mut out = String::with_capacity(256 * 1024);
    let h = &run.header;
    let title = format!(
        "Run {} — {}",
        if run.run_id().is_empty() {
            "(no header)".into()
        } else {
            run.run_id()
        },
        text(&h["protocol"])
    );
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    // Nothing may be loaded or run, whatever the journal's text says.
    out.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let title = truncate(&title, 300);
    let _ = writeln!(out, "<title>{}</title>", esc(&title));
    let _ = writeln!(out, "<style>{CSS}</style>\n</head>\n<body>");
    let _ = writeln!(out, "<h1>{}</h1>", esc(&title));
    out.push_str(
        "<nav><a href=\"#run\">Run</a><a href=\"#signals\">Signals</a><a href=\"#steps\">Steps</a>\
         <a href=\"#deck\">Deck</a><a href=\"#alarms\">Alarms</a><a href=\"#events\">Events</a></nav>\n",
    );
    header_section(&mut out, &run, entries.len(), verified);
    out.push_str("<section id=\"signals\">\n<h2>Signals</h2>\n");
    plots::section(&mut out, &run);
    out.push_str("</section>\n<section id=\"steps\">\n<h2>Steps</h2>\n");
    gantt::section(&mut out, &run);
    out.push_str("</section>\n<section id=\"deck\">\n<h2>Deck at the end</h2>\n");
    plates::section(&mut out, &run);
    out.push_str("</section>\n<section id=\"alarms\">\n<h2>Alarms</h2>\n");
    alarm_table(&mut out, &run);
    out.push_str("</section>\n<section id=\"events\">\n<h2>Events</h2>\n");
    event_table(&mut out, &run);
    let _ = writeln!(
        out,
        "</section>\n<footer>Made by <code>biofoundry report</code> {} from the run's journal ({} entries). \
         Lab time is time since the run started; times of day are UTC.</footer>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION"),
        entries.len()
    );
    out
}

fn kv(out: &mut String, key: &str, value_html: &str) {
    let _ = writeln!(out, "<tr><th>{}</th><td>{value_html}</td></tr>", esc(key));
}

fn header_section(out: &mut String, run: &Run, n_entries: usize, verified: Option<&Verified>) {
    let h = &run.header;
    out.push_str("<section id=\"run\">\n<h2>Run</h2>\n");
    if h.is_null() {
        out.push_str(
            "<p class=\"warn\">This run has no readable header entry (entry 0): protocol, parameters and bindings are unknown.</p>\n",
        );
    }
    out.push_str("<table class=\"kv\">\n");
    let plain = |k: &str| esc(&truncate(&text(&h[k]), 1000));
    kv(out, "run", &format!("<code>{}</code>", plain("run_id")));
    let version = text(&h["version"]);
    kv(
        out,
        "protocol",
        &format!(
            "{}{}",
            plain("protocol"),
            if version.is_empty() {
                String::new()
            } else {
                format!(", version {}", esc(&truncate(&version, 200)))
            }
        ),
    );
    kv(out, "sha256", &format!("<code>{}</code>", plain("sha256")));
    let operator = text(&h["operator"]);
    kv(
        out,
        "operator",
        &if operator.is_empty() {
            "<span class=\"note\">not given</span>".into()
        } else {
            esc(&truncate(&operator, 200))
        },
    );
    kv(out, "source", &plain("source"));
    let start_ms = h["started_ms"]
        .as_u64()
        .or_else(|| run.events.iter().find_map(|e| e.unix_ms));
    kv(
        out,
        "started",
        &start_ms.map(|ms| esc(&wall(ms))).unwrap_or_default(),
    );

    // The final state: the last run_state entry; the run ended if it is final.
    let last_state = run.events.iter().rev().find(|e| e.kind == "run_state");
    let state = last_state
        .map(|e| e.s("state").to_string())
        .unwrap_or_default();
    let is_final = matches!(
        state.as_str(),
        "completed" | "failed" | "aborted" | "stopped"
    );
    let end = if is_final {
        last_state.and_then(|e| e.unix_ms).map(|ms| esc(&wall(ms)))
    } else {
        None
    };
    let last_ms = run.events.iter().rev().find_map(|e| e.unix_ms);
    kv(
        out,
        "ended",
        &end.unwrap_or_else(|| {
            format!(
                "<span class=\"warn\">not ended</span>{}",
                last_ms
                    .map(|ms| format!(" (last entry {})", esc(&wall(ms))))
                    .unwrap_or_default()
            )
        }),
    );
    kv(
        out,
        "final state",
        &if state.is_empty() {
            "<span class=\"note\">none recorded</span>".into()
        } else {
            let reason = last_state.map(|e| e.s("reason")).unwrap_or("");
            format!(
                "<span class=\"state {0}\">{0}</span>{1}",
                esc(&truncate(&state, 100)),
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", esc(&truncate(reason, 1000)))
                }
            )
        },
    );
    kv(out, "duration (lab time)", &esc(&svg::duration(run.t_hi)));
    kv(out, "controller", &plain("controller_version"));
    let chain = match verified {
        None => "<span class=\"note\">not verified</span>".to_string(),
        Some(Verified::Intact { entries }) => format!("intact ({entries} entries)"),
        Some(Verified::Broken { seq, reason }) => format!(
            "<span class=\"warn\">BROKEN at entry {seq}: {}</span>",
            esc(reason)
        ),
    };
    kv(out, "hash chain", &chain);
    kv(out, "journal entries", &n_entries.to_string());
    out.push_str("</table>\n");

    // Step outcomes at a glance.
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for e in run.events.iter().filter(|e| e.kind == "step") {
        let phase = e.s("phase");
        if matches!(phase, "completed" | "failed" | "skipped") {
            *counts.entry(phase).or_default() += 1;
        }
    }
    let samples = run.events.iter().filter(|e| e.kind == "sample").count();
    let alarms = run
        .events
        .iter()
        .filter(|e| e.kind == "alarm" && e.s("state") == "active")
        .count();
    let steps: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let _ = writeln!(
        out,
        "<p>Steps: {}. Samples: {samples}. Alarms raised: {alarms}.</p>",
        if steps.is_empty() {
            "none ended".into()
        } else {
            esc(&steps.join(", "))
        }
    );

    // Parameters: the protocol's, with the value in force; else the header's.
    out.push_str("<h3>Parameters</h3>\n");
    let protocol = run.checked.as_ref().and_then(|c| c.protocol.as_ref());
    match protocol {
        Some(p) if !p.params.is_empty() => {
            out.push_str("<table class=\"kv\">\n");
            for (name, param) in &p.params {
                let value = match &param.value {
                    crate::protocol::ParamValue::Text(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(
                    out,
                    "<tr><th>{}</th><td><code>{}</code>{}</td></tr>",
                    esc(&truncate(name, 200)),
                    esc(&truncate(&value, 1000)),
                    if param.overridden {
                        " <span class=\"note\">(given for this run)</span>"
                    } else {
                        " <span class=\"note\">(default)</span>"
                    }
                );
            }
            out.push_str("</table>\n");
        }
        _ => match h["params"].as_object() {
            Some(m) if !m.is_empty() => {
                out.push_str("<table class=\"kv\">\n");
                for (k, v) in m {
                    kv(
                        out,
                        &truncate(k, 200),
                        &format!("<code>{}</code>", esc(&truncate(&text(v), 1000))),
                    );
                }
                out.push_str("</table>\n");
            }
            _ => out.push_str("<p class=\"note\">None.</p>\n"),
        },
    }
    out.push_str("<h3>Bindings</h3>\n");
    if run.bindings.is_empty() {
        out.push_str("<p class=\"note\">No roles bound.</p>\n");
    } else {
        out.push_str("<table class=\"kv\">\n");
        for (role, device) in &run.bindings {
            let kind = protocol
                .and_then(|p| p.devices.get(role))
                .map(|d| format!(" <span class=\"note\">({})</span>", d.kind))
                .unwrap_or_default();
            kv(
                out,
                &truncate(role, 200),
                &format!("<code>{}</code>{kind}", esc(&truncate(device, 200))),
            );
        }
        out.push_str("</table>\n");
    }
    if let Some(c) = &run.checked {
        let errors = c.error_count();
        if errors > 0 {
            let first = c
                .diagnostics
                .iter()
                .find(|d| d.is_error())
                .map(|d| d.message.clone())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "<p class=\"warn\">Checked again here (with the simulated lab's limits), the protocol has {errors} error{}: {}. \
                 Limit bands and step devices are shown as far as it could be read.</p>",
                if errors == 1 { "" } else { "s" },
                esc(&truncate(&first, 300))
            );
        }
    } else if !h.is_null() {
        out.push_str("<p class=\"warn\">The header has no protocol text: no limit bands, steps placed by their action's role.</p>\n");
    }
    for (key, what) in [("text", "Protocol text"), ("lab", "Lab file")] {
        if let Some(t) = h[key].as_str() {
            if t.len() > MAX_TEXT {
                let _ = writeln!(
                    out,
                    "<p class=\"note\">{what}: {} bytes, not copied here (<code>biofoundry runs export</code> has it).</p>",
                    t.len()
                );
            } else {
                let _ = writeln!(
                    out,
                    "<details><summary>{what}</summary><pre>{}</pre></details>",
                    esc(t)
                );
            }
        }
    }
    out.push_str("</section>\n");
}

/// One line about an entry, plain text (escaped by the caller).
fn summary(e: &Ev) -> String {
    let v = &e.v;
    let opt = |k: &str, f: &dyn Fn(&str) -> String| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(f)
            .unwrap_or_default()
    };
    let reason = opt("reason", &|r| format!(" ({r})"));
    let detail = opt("detail", &|d| format!(": {d}"));
    let list = |k: &str| -> String {
        v[k].as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    match e.kind {
        "run" => {
            let h = &v["header"];
            format!(
                "run {} of \"{}\" {} started by {}",
                text(&h["run_id"]),
                text(&h["protocol"]),
                text(&h["version"]),
                text(&h["source"])
            )
        }
        "run_state" => format!("run {}{reason}", e.s("state")),
        "command" => format!(
            "command {} from {}{}",
            text(&v["command"]),
            e.s("source"),
            opt("rejected", &|r| format!(" (rejected: {r})"))
        ),
        "step" => format!(
            "step {} ({}) {}{}{detail}",
            e.s("step_id"),
            e.s("action"),
            e.s("phase"),
            v["repetition"]
                .as_u64()
                .map(|r| format!(" [repetition {}]", r.saturating_add(1)))
                .unwrap_or_default()
        ),
        "operation" => format!(
            "step {} operation {} {}{detail}",
            e.s("step_id"),
            text(&v["index"]),
            e.s("phase")
        ),
        "device_state" => format!("device {} {}{reason}", e.s("device"), e.s("state")),
        "sample" => {
            let values: Vec<String> = v["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .take(32)
                        .map(|p| {
                            let (value, unit) = plots::quantity(&p[1]);
                            let value = value.map_or_else(|| "?".to_string(), svg::reading);
                            let unit = plots::unit_label(&unit);
                            format!(
                                "{}={value}{}{unit}",
                                text(&p[0]),
                                if unit.is_empty() { "" } else { " " }
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{} ({}) {}",
                e.s("device"),
                e.s("source"),
                values.join(", ")
            )
        }
        "alarm" => format!(
            "alarm {} {}: {}",
            e.s("alarm_id"),
            e.s("state"),
            e.s("message")
        ),
        "prompt" => match v["response"].as_str() {
            Some(r) => format!("prompt {} answered: {r}", e.s("step_id")),
            None => format!("prompt {}: {}", e.s("step_id"), e.s("message")),
        },
        "log" => format!("log {}: {}", e.s("step_id"), e.s("message")),
        "deck" => {
            let names: Vec<String> = v["labware"]
                .as_array()
                .map(|a| a.iter().take(20).map(|l| text(&l["name"])).collect())
                .unwrap_or_default();
            format!("deck: {}", names.join(", "))
        }
        "resumed" => format!(
            "run resumed after entry {}: {} steps done; continued: {}; uncertain: {}; restored: {}",
            text(&v["after_seq"]),
            text(&v["steps_completed"]),
            list("continued"),
            list("uncertain"),
            list("restored")
        ),
        _ if v.is_null() => "(not readable JSON)".into(),
        _ => v.to_string(),
    }
}

fn time_cells(out: &mut String, e: &Ev) {
    let _ = write!(
        out,
        "<td>{}<td>{}",
        e.t.map(clock).unwrap_or_default(),
        e.unix_ms.map(|ms| esc(&wall(ms))).unwrap_or_default()
    );
}

fn event_table(out: &mut String, run: &Run) {
    let collapse = run.events.len() > FULL_TABLE_ENTRIES;
    if collapse {
        let _ = writeln!(
            out,
            "<p class=\"note\">{} entries: each run of consecutive samples is one row here (their values are in the plots; \
             <code>biofoundry runs export {} --format csv</code> has every value).</p>",
            run.events.len(),
            esc(&run.run_id())
        );
    }
    out.push_str("<table class=\"events\">\n<thead><tr><th>#</th><th>lab time</th><th>time (UTC)</th><th>kind</th><th>what</th></tr></thead>\n<tbody>\n");
    let mut rows = 0usize;
    let mut i = 0usize;
    while i < run.events.len() {
        if rows >= MAX_TABLE_ROWS {
            let _ = writeln!(
                out,
                "<tr class=\"collapsed\"><td colspan=\"5\">… {} more entries not shown (<code>biofoundry runs show</code> lists them all)</tr>",
                run.events.len() - i
            );
            break;
        }
        let e = &run.events[i];
        if collapse && e.kind == "sample" {
            let mut j = i;
            let mut devices: Vec<&str> = Vec::new();
            while j < run.events.len() && run.events[j].kind == "sample" {
                let d = run.events[j].s("device");
                if devices.len() < 8 && !devices.contains(&d) {
                    devices.push(d);
                }
                j += 1;
            }
            if j - i > 1 {
                let last = &run.events[j - 1];
                let _ = write!(out, "<tr class=\"collapsed\"><td>{}–{}", e.seq, last.seq);
                time_cells(out, e);
                let _ = writeln!(
                    out,
                    "<td>sample<td>{} samples from {} until {}</tr>",
                    j - i,
                    esc(&devices.join(", ")),
                    last.t.map(clock).unwrap_or_default()
                );
                rows += 1;
                i = j;
                continue;
            }
        }
        let mut class = format!(
            "k-{}",
            e.kind
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "")
        );
        if e.kind == "alarm" && e.s("state") == "cleared" {
            class.push_str(" cleared");
        }
        if e.kind == "step" && e.s("phase") == "failed" {
            class.push_str(" failed");
        }
        let _ = write!(out, "<tr class=\"{}\"><td>{}", esc(&class), e.seq);
        time_cells(out, e);
        let _ = writeln!(
            out,
            "<td>{}<td>{}</tr>",
            esc(&truncate(e.kind, 40)),
            esc(&truncate(&summary(e), 600))
        );
        rows += 1;
        i += 1;
    }
    out.push_str("</tbody>\n</table>\n");
}

fn alarm_table(out: &mut String, run: &Run) {
    let alarms: Vec<&Ev> = run.events.iter().filter(|e| e.kind == "alarm").collect();
    if alarms.is_empty() {
        out.push_str("<p>No alarms.</p>\n");
        return;
    }
    out.push_str("<table class=\"alarms\">\n<thead><tr><th>alarm</th><th>state</th><th>source</th><th>message</th><th>lab time</th><th>time (UTC)</th><th>#</th></tr></thead>\n<tbody>\n");
    for e in alarms.iter().take(MAX_TABLE_ROWS) {
        let state = e.s("state");
        let _ = writeln!(
            out,
            "<tr class=\"k-alarm{}\"><td><code>{}</code><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}</tr>",
            if state == "cleared" { " cleared" } else { "" },
            esc(&truncate(e.s("alarm_id"), 200)),
            esc(&truncate(state, 40)),
            esc(&truncate(e.s("source"), 200)),
            esc(&truncate(e.s("message"), 600)),
            e.t.map(clock).unwrap_or_default(),
            e.unix_ms.map(|ms| esc(&wall(ms))).unwrap_or_default(),
            e.seq
        );
    }
    if alarms.len() > MAX_TABLE_ROWS {
        let _ = writeln!(
            out,
            "<tr class=\"collapsed\"><td colspan=\"7\">… {} more alarm entries not shown</tr>",
            alarms.len() - MAX_TABLE_ROWS
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn entry(seq: u64, body: Value) -> Entry {
        let kind = body["type"].as_str().unwrap_or("").to_string();
        Entry {
            seq,
            kind,
            body: body.to_string(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    pub const PROTOCOL: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "report test"
version = "2.0"
[params]
temp = "37 C"
[devices]
lh = "liquid_handler"
br = "bioreactor"
[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:2"
contents = { A1 = "200 uL water" }
[[step]]
id = "warm"
do = "br.set"
temperature = "${temp}"
[[step]]
id = "move"
do = "lh.transfer"
from = "plate:A1"
to = "plate:B1"
volume = "50 uL"
[[step]]
id = "hot"
do = "wait_until"
condition = "br.temperature >= 36.5 C"
timeout = "1 h"
[[step]]
id = "pause"
do = "wait"
duration = "10 s"
[[monitor]]
id = "process"
device = "br"
read = ["temperature", "ph"]
every = "10 s"
limits = { temperature = "36..38 C", ph = "6.8..7.4" }
on_violation = "alarm"
"#;

    /// A small run with every kind of entry.
    pub fn sample_run() -> Vec<Entry> {
        let mut e = vec![entry(
            0,
            json!({"type": "run", "header": {
                "run_id": "r-1", "protocol": "report test", "version": "2.0", "sha256": "ab".repeat(32),
                "text": PROTOCOL, "params": {"temp": "37.5 C"}, "bindings": {"lh": "ot2", "br": "br1"},
                "lab": "format = \"biofoundry.lab/1\"", "controller_version": "0.1.0",
                "operator": "ada", "source": "operator (CLI)", "started_ms": 1_800_000_000_000u64}}),
        )];
        let mut seq = 0;
        let mut push = |t: f64, body: Value| {
            seq += 1;
            let mut b = body;
            b["seq"] = json!(seq);
            b["t_s"] = json!(t);
            b["unix_ms"] = json!(1_800_000_000_000u64 + (t * 1000.0) as u64);
            e.push(entry(seq, b));
        };
        push(
            0.0,
            json!({"type": "command", "command": "start", "source": "operator"}),
        );
        push(0.1, json!({"type": "run_state", "state": "running"}));
        push(
            1.0,
            json!({"type": "step", "step_id": "warm", "action": "br.set", "phase": "started"}),
        );
        push(
            2.0,
            json!({"type": "step", "step_id": "warm", "action": "br.set", "phase": "completed"}),
        );
        push(
            2.0,
            json!({"type": "step", "step_id": "move", "action": "lh.transfer", "phase": "started"}),
        );
        push(
            2.0,
            json!({"type": "step", "step_id": "hot", "action": "wait_until", "phase": "started"}),
        );
        for i in 0..40 {
            let t = 3.0 + i as f64 * 10.0;
            let temp = 35.0 + i as f64 * 0.1;
            push(
                t,
                json!({"type": "sample", "device": "br1", "source": "process", "values": [
                ["temperature", {"value": temp, "dimension": "temperature"}],
                ["ph", {"value": 7.0 + (i as f64 * 0.3).sin() * 0.1, "dimension": "unitless"}]]}),
            );
            if i == 0 {
                push(
                    t,
                    json!({"type": "alarm", "alarm_id": "process.temperature", "state": "active",
                    "source": "process", "message": "br temperature = 35 C, outside 36..38 C"}),
                );
            }
            if i == 11 {
                push(
                    t,
                    json!({"type": "alarm", "alarm_id": "process.temperature", "state": "cleared",
                    "source": "process", "message": "temperature back within 36..38 C: 36.1 C"}),
                );
            }
        }
        push(
            60.0,
            json!({"type": "step", "step_id": "move", "action": "lh.transfer", "phase": "failed", "detail": "tip <not> found"}),
        );
        push(
            61.0,
            json!({"type": "run_state", "state": "held", "reason": "step move failed"}),
        );
        push(
            90.0,
            json!({"type": "command", "command": "skip", "source": "operator"}),
        );
        push(
            90.0,
            json!({"type": "step", "step_id": "move", "action": "lh.transfer", "phase": "skipped"}),
        );
        push(90.0, json!({"type": "run_state", "state": "running"}));
        push(
            150.0,
            json!({"type": "step", "step_id": "hot", "action": "wait_until", "phase": "completed"}),
        );
        push(
            150.0,
            json!({"type": "step", "step_id": "pause", "action": "wait", "phase": "started"}),
        );
        push(
            400.0,
            json!({"type": "deck", "labware": [
            {"name": "tips", "device": "ot2", "slot": 1, "load_name": "opentrons_96_tiprack_300ul", "rows": 8, "columns": 12,
             "volumes_ul": {}, "tips_used": ["A1", "B1"]},
            {"name": "plate", "device": "ot2", "slot": 2, "load_name": "corning_96_wellplate_360ul_flat", "rows": 8, "columns": 12,
             "volumes_ul": {"A1": 150.0, "B1": 50.0}}]}),
        );
        push(
            401.0,
            json!({"type": "run_state", "state": "stopped", "reason": "operator"}),
        );
        e
    }

    #[test]
    fn a_run_has_every_section() {
        let html = render_entries(&sample_run());
        for needle in [
            "id=\"run\"",
            "id=\"signals\"",
            "id=\"steps\"",
            "id=\"deck\"",
            "id=\"alarms\"",
            "id=\"events\"",
            "r-1",
            "report test",
            "ada",
            "ot2",
            "37.5 C",
            "(given for this run)",
            "stopped",
            "process.temperature",
        ] {
            assert!(html.contains(needle), "missing {needle}");
        }
        // One plot per device and signal.
        assert_eq!(html.matches("class=\"plot\"").count(), 2, "plots");
        // The limit band of the temperature and the pH.
        assert_eq!(html.matches("class=\"band\"").count(), 2);
        // The wait_until threshold on the temperature plot.
        assert!(html.contains("class=\"threshold\""));
        // The step's detail is escaped.
        assert!(html.contains("tip &lt;not&gt; found"));
        assert!(!html.contains("<not>"));
        // Two labware drawn, 96 wells each.
        assert_eq!(html.matches("class=\"labware\"").count(), 2);
        assert!(html.contains("2 of 96 tips used"), "tips");
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn hostile_text_is_escaped() {
        let evil = "</title><script>alert(1)</script><img src=x onerror=alert(2)>\"'&";
        let mut entries = sample_run();
        entries.push(entry(
            99,
            json!({"type": "alarm", "seq": 99, "t_s": 5.0, "alarm_id": evil, "state": evil, "source": evil, "message": evil}),
        ));
        entries.push(entry(
            100,
            json!({"type": "sample", "seq": 100, "t_s": 6.0, "device": evil, "source": evil,
                "values": [[evil, {"value": 1.0, "dimension": "unitless"}]]}),
        ));
        entries.push(entry(
            101,
            json!({"type": "step", "seq": 101, "t_s": 6.0, "step_id": evil, "action": format!("{evil}.x"), "phase": "started"}),
        ));
        entries.push(entry(
            102,
            json!({"type": "deck", "seq": 102, "t_s": 7.0, "labware": [{"name": evil, "device": evil, "load_name": evil,
                "rows": 2, "columns": 2, "volumes_ul": {evil: 5.0, "A1": 1.0}, "tips_used": [evil]}]}),
        ));
        let mut h = entries[0].json();
        h["header"]["text"] = json!(format!("{PROTOCOL}\n# {evil}"));
        h["header"]["protocol"] = json!(evil);
        h["header"]["bindings"] = json!({evil: evil});
        h["header"]["params"] = json!({evil: evil});
        entries[0].body = h.to_string();
        let html = render_entries(&entries);
        assert!(!html.contains("<script"), "script tag");
        assert!(!html.contains("<img"), "img tag");
        assert!(!html.contains(evil), "raw text");
        assert!(html.contains("&lt;script&gt;"));
    }

    #[test]
    fn no_panic_on_broken_entries() {
        let cases: Vec<Vec<Entry>> = vec![
            vec![],
            vec![Entry {
                seq: 0,
                kind: "run".into(),
                body: "{not json".into(),
                prev: String::new(),
                hash: String::new(),
            }],
            vec![entry(
                0,
                json!({"type": "run", "header": {"text": "format = 1", "params": [1, 2], "bindings": "x"}}),
            )],
            vec![
                entry(0, json!({"type": "run", "header": null})),
                entry(
                    1,
                    json!({"type": "sample", "t_s": 1e308, "device": 5, "values": [["x", {"value": 1e308, "dimension": "nope"}], [null], "x", ["y", {"value": -1e308}]]}),
                ),
                entry(
                    2,
                    json!({"type": "sample", "t_s": -1e308, "device": 5, "values": [["x", {"value": -1e308, "dimension": "volume"}]]}),
                ),
                entry(
                    3,
                    json!({"type": "sample", "t_s": 5, "values": [["one", {"value": 3.0, "dimension": "percent"}]]}),
                ),
                entry(
                    4,
                    json!({"type": "step", "t_s": "x", "step_id": null, "phase": "completed"}),
                ),
                entry(
                    5,
                    json!({"type": "step", "t_s": 1e308, "step_id": "a", "phase": "started"}),
                ),
                entry(6, json!({"type": "alarm", "t_s": -5.0})),
                entry(
                    7,
                    json!({"type": "deck", "labware": [{"rows": 1e12, "columns": -1}, {"rows": 3, "columns": 1000000}, {"rows": 2, "columns": 2, "volumes_ul": {"A1": "x", "B2": 1e308, "A2": -5}}, 7]}),
                ),
                entry(8, json!({"type": "deck", "labware": "none"})),
                entry(
                    9,
                    json!({"type": "run_state", "state": {"x": 1}, "t_s": 2.0}),
                ),
                entry(10, json!([1, 2, 3])),
            ],
        ];
        for entries in cases {
            let html = render_entries(&entries);
            assert!(html.ends_with("</html>\n"));
        }
    }

    #[test]
    fn steps_land_in_their_devices_lanes() {
        let html = render_entries(&sample_run());
        let gantt = &html[html.find("class=\"gantt\"").unwrap()..html.find("id=\"deck\"").unwrap()];
        for lane in ["ot2 (lh)", "br1 (br)", "controller"] {
            assert!(gantt.contains(&format!(">{lane}</text>")), "lane {lane}");
        }
        assert_eq!(gantt.matches("class=\"bar completed\"").count(), 2);
        assert_eq!(gantt.matches("class=\"bar failed\"").count(), 1);
        assert_eq!(gantt.matches("class=\"bar unfinished\"").count(), 1);
        assert!(gantt.contains("failed, then skipped"));
        assert!(gantt.contains("still running at the run&#39;s end"));
        // The run was held from 61 s to 90 s.
        assert!(gantt.contains("run held (step move failed)"));
    }

    #[test]
    fn a_plate_with_an_empty_tips_list_is_a_plate() {
        let mut entries = sample_run();
        entries.push(entry(
            500,
            json!({"type": "deck", "seq": 500, "t_s": 402.0, "labware": [
                {"name": "plate", "device": "ot2", "slot": 2, "load_name": "corning_96_wellplate_360ul_flat",
                 "rows": 8, "columns": 12, "volumes_ul": {"A1": 10.0}, "tips_used": []},
                {"name": "tips", "device": "ot2", "slot": 1, "load_name": "opentrons_96_tiprack_300ul",
                 "rows": 8, "columns": 12, "volumes_ul": {}, "tips_used": []}]}),
        ));
        let html = render_entries(&entries);
        assert!(html.contains("1 of 96 wells hold liquid"), "the plate");
        assert!(html.contains("0 of 96 tips used"), "the rack");
    }

    #[test]
    fn huge_strings_do_not_make_a_huge_report() {
        let big = "x".repeat(1 << 20);
        let entries = vec![
            entry(
                0,
                json!({"type": "run", "header": {"run_id": big, "protocol": big, "operator": big, "source": big,
                    "sha256": big, "version": big, "controller_version": big, "params": {"p": big}, "bindings": {"r": big}}}),
            ),
            entry(
                1,
                json!({"type": "sample", "seq": 1, "t_s": 1.0, "device": big, "source": big,
                    "values": [[big, {"value": 1.0, "dimension": "unitless"}]]}),
            ),
            entry(
                2,
                json!({"type": "step", "seq": 2, "t_s": 1.0, "step_id": big, "action": big, "phase": "started", "detail": big}),
            ),
            entry(
                3,
                json!({"type": "alarm", "seq": 3, "t_s": 1.0, "alarm_id": big, "state": big, "source": big, "message": big}),
            ),
            entry(
                4,
                json!({"type": "deck", "seq": 4, "t_s": 1.0, "labware": [{"name": big, "device": big, "slot": big,
                    "load_name": big, "rows": 1, "columns": 1, "volumes_ul": {"A1": 1.0}}]}),
            ),
        ];
        let html = render_entries(&entries);
        assert!(html.len() < 100_000, "{} bytes", html.len());
    }

    #[test]
    fn a_run_without_a_deck_entry_says_so() {
        let entries: Vec<Entry> = sample_run()
            .into_iter()
            .filter(|e| e.kind != "deck")
            .collect();
        let html = render_entries(&entries);
        assert!(html.contains("no deck entry"), "deck note");
        assert_eq!(html.matches("class=\"labware\"").count(), 0);
    }

    #[test]
    fn the_last_deck_entry_counts() {
        let mut entries = sample_run();
        entries.push(entry(
            500,
            json!({"type": "deck", "seq": 500, "t_s": 402.0, "labware": [{"name": "late", "device": "ot2", "slot": 3,
                "load_name": "x", "rows": 2, "columns": 3, "volumes_ul": {"A1": 1.0}}]}),
        ));
        let html = render_entries(&entries);
        assert_eq!(html.matches("class=\"labware\"").count(), 1);
        assert!(html.contains("late"));
    }

    #[test]
    fn big_runs_collapse_samples_in_the_table() {
        let mut entries = vec![entry(
            0,
            json!({"type": "run", "header": {"run_id": "big"}}),
        )];
        for i in 1..8000u64 {
            entries.push(entry(
                i,
                json!({"type": "sample", "seq": i, "t_s": i as f64, "device": "d", "source": "m",
                    "values": [["x", {"value": i as f64, "dimension": "unitless"}]]}),
            ));
        }
        let html = render_entries(&entries);
        assert!(html.contains("7999 samples from d"), "collapsed row");
        assert!(html.len() < 400_000, "{} bytes", html.len());
    }
}
