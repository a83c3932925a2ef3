//! `biofoundry runs`: the run journal of a lab (list, show, export, verify).

use crate::print_json;
use biofoundry::journal::{Entry, Journal, Verified, journal_path, samples_csv};
use biofoundry::mqtt::publisher::timestamp;
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct JournalArgs {
    /// The lab whose journal to read (in its data folder).
    #[arg(long, conflicts_with = "journal", required_unless_present = "journal")]
    lab: Option<PathBuf>,
    /// A journal file (`journal.sqlite`), e.g. a copy.
    #[arg(long)]
    journal: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// Every entry as JSON (header included).
    Json,
    /// The samples as a tidy table: one row per value.
    Csv,
}

#[derive(Subcommand)]
pub enum RunsCommand {
    /// The runs in the journal, newest first.
    List {
        #[command(flatten)]
        from: JournalArgs,
        #[arg(long)]
        json: bool,
    },
    /// A run's timeline: states, steps, faults, samples, alarms, prompts, commands.
    Show {
        run_id: String,
        #[command(flatten)]
        from: JournalArgs,
    },
    /// A run's entries as JSON, or its samples as CSV.
    Export {
        run_id: String,
        #[command(flatten)]
        from: JournalArgs,
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
    },
    /// Checks a run's hash chain: exit 0 when intact, 1 when an entry was changed,
    /// removed or reordered.
    Verify {
        run_id: String,
        #[command(flatten)]
        from: JournalArgs,
    },
}

pub(crate) fn open(from: &JournalArgs) -> Result<Journal, String> {
    let path = match (&from.journal, &from.lab) {
        (Some(j), _) => j.clone(),
        (None, Some(lab)) => match crate::devices::load_lab(lab)? {
            Ok(l) => journal_path(&l.data_dir()),
            Err(_) => {
                return Err(format!(
                    "{} has errors (see `biofoundry check --lab`)",
                    lab.display()
                ));
            }
        },
        (None, None) => return Err("give --lab or --journal".into()),
    };
    if !path.is_file() {
        return Err(format!("no journal at {}", path.display()));
    }
    Journal::open(&path).map_err(|e| e.to_string())
}

pub fn cmd_runs(command: RunsCommand) -> Result<ExitCode, String> {
    match command {
        RunsCommand::List { from, json } => {
            let runs = open(&from)?.runs().map_err(|e| e.to_string())?;
            if json {
                print_json(&runs)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<24} {:<10} {:<24} {:>7}  protocol",
                "run", "state", "started", "entries"
            );
            for r in runs {
                let _ = writeln!(
                    out,
                    "{:<24} {:<10} {:<24} {:>7}  {}",
                    r.run_id,
                    r.state,
                    timestamp(r.started_ms),
                    r.entries,
                    r.protocol
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Show { run_id, from } => {
            let entries = open(&from)?.entries(&run_id).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            for e in &entries {
                let _ = writeln!(out, "{}", describe(e));
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Export {
            run_id,
            from,
            format,
        } => {
            let entries = open(&from)?.entries(&run_id).map_err(|e| e.to_string())?;
            match format {
                ExportFormat::Json => {
                    let all: Vec<serde_json::Value> = entries.iter().map(Entry::json).collect();
                    print_json(&all)?;
                }
                ExportFormat::Csv => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(samples_csv(&entries).as_bytes());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Verify { run_id, from } => {
            match open(&from)?.verify(&run_id).map_err(|e| e.to_string())? {
                Verified::Intact { entries } => {
                    println!("run {run_id}: {entries} entries, hash chain intact");
                    Ok(ExitCode::SUCCESS)
                }
                Verified::Broken { seq, reason } => {
                    println!("run {run_id}: entry {seq} does not verify: {reason}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// One timeline line: lab time since the start, then what happened.
fn describe(e: &Entry) -> String {
    let v = e.json();
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if e.kind == "run" {
        let h = &v["header"];
        let hs = |k: &str| h[k].as_str().unwrap_or("").to_string();
        return format!(
            "run {} of \"{}\" {} (sha256 {}), started by {}{}, controller {}",
            hs("run_id"),
            hs("protocol"),
            hs("version"),
            hs("sha256").chars().take(12).collect::<String>(),
            hs("source"),
            h["operator"]
                .as_str()
                .map(|o| format!(", operator {o}"))
                .unwrap_or_default(),
            hs("controller_version"),
        );
    }
    let t = v["t_s"].as_f64().unwrap_or(0.0).max(0.0);
    let clock = format!(
        "{:>3}:{:02}:{:02}",
        (t / 3600.0) as u64,
        (t / 60.0) as u64 % 60,
        t as u64 % 60
    );
    let what = match e.kind.as_str() {
        "run_state" => format!("run {}{}", s("state"), reason(&v)),
        "step" => format!(
            "step {} {} {}{}",
            s("step_id"),
            s("action"),
            s("phase"),
            detail(&v)
        ),
        "device_state" => format!("device {} {}{}", s("device"), s("state"), reason(&v)),
        "sample" => {
            let values: Vec<String> = v["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| format!("{}={}", p[0].as_str().unwrap_or(""), p[1]["value"]))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "sample {} ({}) {}",
                s("device"),
                s("source"),
                values.join(" ")
            )
        }
        "alarm" => format!("alarm {} {}: {}", s("alarm_id"), s("state"), s("message")),
        "prompt" => match v["response"].as_str() {
            Some(r) => format!("prompt {} answered: {r}", s("step_id")),
            None => format!("prompt {}: {}", s("step_id"), s("message")),
        },
        "command" => format!(
            "command {} from {}{}",
            s("command"),
            s("source"),
            v["rejected"]
                .as_str()
                .map(|r| format!(" (rejected: {r})"))
                .unwrap_or_default()
        ),
        "log" => format!("log {}: {}", s("step_id"), s("message")),
        "operation" => format!(
            "operation {} #{} {}{}",
            s("step_id"),
            v["index"].as_u64().map_or(0, |i| i + 1),
            s("phase"),
            detail(&v)
        ),
        "deck" => {
            let labware: Vec<String> = v["labware"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|l| {
                            format!(
                                "{} on {}:{}",
                                l["name"].as_str().unwrap_or(""),
                                l["device"].as_str().unwrap_or(""),
                                l["slot"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("deck {}", labware.join(", "))
        }
        "resumed" => format!(
            "resumed after #{}: {} steps completed before{}{}",
            v["after_seq"],
            v["steps_completed"],
            list(&v, "continued", "; continuing "),
            list(&v, "uncertain", "; UNCERTAIN: ")
        ),
        other => other.to_string(),
    };
    format!("{clock}  #{:<5} {what}", e.seq)
}

fn list(v: &serde_json::Value, key: &str, prefix: &str) -> String {
    let items: Vec<&str> = v[key]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if items.is_empty() {
        String::new()
    } else {
        format!("{prefix}{}", items.join("; "))
    }
}

fn reason(v: &serde_json::Value) -> String {
    v["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default()
}

fn detail(v: &serde_json::Value) -> String {
    v["detail"]
        .as_str()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}
