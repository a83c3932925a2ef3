//! The `biofoundry` command line.

use biofoundry::catalogue::DeviceKind;
use biofoundry::check::{CheckReport, check_source};
use biofoundry::diagnostics::{locate, render_human};
use biofoundry::labware::builtin;
use biofoundry::plan::describe;
use biofoundry::protocol::ParamOverride;
use biofoundry::source::SourceFile;
use biofoundry::units::Quantity;
use biofoundry::validate::SimulatedLab;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod devices;
mod report_cmd;
mod run;
mod runs;

// Parsing allocates many small strings; mimalloc makes `check` of a 10k-step
// protocol about a third faster than the system allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "biofoundry", version, about = "Biofoundry workcell controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check protocol files: every mistake that can be found before a device moves.
    ///
    /// Exit code 0 when every file is valid (warnings allowed), 1 when any has
    /// errors, 2 on usage errors.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override a parameter from [params], checked like a value in the file.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<ParamOverride>,
        /// Check against this lab's devices: their profiles' limits and abilities.
        #[arg(long)]
        lab: Option<PathBuf>,
        #[arg(long = "bind", value_name = "ROLE=DEVICE")]
        binds: Vec<ParamOverride>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Print the expanded operations of a protocol and the final well volumes.
    Plan {
        file: PathBuf,
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<ParamOverride>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Run a protocol. Without a lab file, on the built-in simulated lab in real time.
    ///
    /// Ctrl-C pauses at the next safe point, then asks whether to resume or
    /// abort. Exit code 0 only when the run completed.
    Run {
        file: PathBuf,
        /// The workcell's lab file; without it, the built-in simulated lab.
        #[arg(long)]
        lab: Option<PathBuf>,
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<ParamOverride>,
        /// Bind a protocol role to a lab device (needed when several devices fit).
        #[arg(long = "bind", value_name = "ROLE=DEVICE")]
        binds: Vec<ParamOverride>,
        /// Run the simulated lab's clock this many times faster (demos, training).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Seed of the simulated lab's noise.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Who runs it, for the journal (default: the login name, $USER).
        #[arg(long)]
        operator: Option<String>,
        /// Log format on stderr (RUST_LOG selects what is logged).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Take up a run the controller was executing when it stopped (killed,
    /// power cut): completed steps are not repeated, decks and setpoints are
    /// restored, an operation whose outcome is unknown holds the run.
    Resume {
        run_id: String,
        /// The lab file whose journal has the run.
        #[arg(long)]
        lab: PathBuf,
        /// Run the simulated lab's clock this many times faster.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Simulate a run on the simulated lab with a virtual clock: duration, device
    /// use, critical path, final volumes, alarms and faults, in about a second.
    Simulate {
        file: PathBuf,
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<ParamOverride>,
        #[arg(long = "bind", value_name = "ROLE=DEVICE")]
        binds: Vec<ParamOverride>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Instruments of a lab: list, probe, read signals, write setpoints; check profiles.
    Devices {
        #[command(subcommand)]
        command: devices::DevicesCommand,
    },
    /// Serve simulators of a lab's instruments on pseudo-terminals and Modbus TCP
    /// ports, at the paths and ports the lab file names, until Ctrl-C.
    Sim(devices::SimArgs),
    /// The run journal of a lab: list runs, show a run's timeline, export it
    /// (JSON, or its samples as CSV), verify its hash chain.
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
    },
    /// A run's report as one self-contained HTML file (no scripts, nothing
    /// loaded from elsewhere): header, signal plots with limits and alarms,
    /// steps per device, final plate maps, alarms and every journal entry.
    ///
    /// Exit code 0 when written, 1 for an unknown run, 2 on usage or I/O errors.
    Report {
        run_id: String,
        /// The HTML file to write.
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
        #[command(flatten)]
        from: runs::JournalArgs,
    },
    /// The workcell daemon: connects the lab's devices, publishes their telemetry
    /// and every run to MQTT, and runs protocols started by MES (docs/mqtt.md).
    /// Stops cleanly on SIGTERM or Ctrl-C.
    Serve {
        #[arg(long)]
        lab: PathBuf,
        /// Run a simulated lab's clock this many times faster (the lab file's
        /// [simulation] speed otherwise).
        #[arg(long)]
        speed: Option<f64>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Run the MQTT broker that `serve` embeds, on its own (a workcell without a
    /// broker, or a dashboard's broker); until killed.
    #[cfg(feature = "embedded-broker")]
    Broker {
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// The address to listen on; loopback unless another host must reach it.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
    /// Print the JSON Schema of the protocol format (for editor completion).
    Schema,
    /// List the built-in labware, or show one definition.
    Labware { name: Option<String> },
    /// List device kinds with their signals, setpoints, limits and actions.
    Kinds { kind: Option<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check {
            files,
            params,
            lab,
            binds,
            format,
        } => cmd_check(&files, &params, lab.as_deref(), &pairs(&binds), format),
        Command::Plan {
            file,
            params,
            format,
        } => cmd_plan(&file, &params, format),
        Command::Run {
            file,
            lab,
            params,
            binds,
            speed,
            seed,
            operator,
            log_format,
        } => run::cmd_run(
            &file,
            lab.as_deref(),
            &params,
            &pairs(&binds),
            run::SimSettings { speed, seed },
            operator
                .or_else(|| std::env::var("USER").ok())
                .filter(|o| !o.trim().is_empty()),
            log_format == LogFormat::Json,
        ),
        Command::Resume {
            run_id,
            lab,
            speed,
            log_format,
        } => run::cmd_resume(&run_id, &lab, speed, log_format == LogFormat::Json),
        Command::Simulate {
            file,
            params,
            binds,
            seed,
            format,
        } => run::cmd_simulate(&file, &params, &pairs(&binds), seed, format == Format::Json),
        Command::Devices { command } => devices::cmd_devices(command),
        Command::Sim(args) => devices::cmd_sim(args),
        Command::Runs { command } => runs::cmd_runs(command),
        Command::Report {
            run_id,
            output,
            from,
        } => report_cmd::cmd_report(&run_id, &output, &from),
        Command::Serve {
            lab,
            speed,
            log_format,
        } => run::cmd_serve(&lab, speed, log_format == LogFormat::Json),
        #[cfg(feature = "embedded-broker")]
        Command::Broker { port, bind } => {
            biofoundry::mqtt::broker::run_embedded(std::net::SocketAddr::new(bind, port))
                .map(|_| ExitCode::SUCCESS)
                .map_err(|e| e.to_string())
        }
        Command::Schema => {
            print_json(&biofoundry::schema::protocol_schema()).map(|_| ExitCode::SUCCESS)
        }
        Command::Labware { name } => cmd_labware(name.as_deref()),
        Command::Kinds { kind } => cmd_kinds(kind.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn pairs(binds: &[ParamOverride]) -> Vec<(String, String)> {
    binds
        .iter()
        .map(|b| (b.name.clone(), b.value.clone()))
        .collect()
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

pub(crate) fn load(path: &Path) -> Result<SourceFile, String> {
    SourceFile::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn cmd_check(
    files: &[PathBuf],
    params: &[ParamOverride],
    lab: Option<&Path>,
    binds: &[(String, String)],
    format: Format,
) -> Result<ExitCode, String> {
    let lab = match lab {
        Some(path) => match devices::load_lab(path)? {
            Ok(lab) => Some(lab),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    let mut reports = Vec::new();
    for path in files {
        let source = load(path)?;
        reports.push(match &lab {
            None => check_source(source, params, &SimulatedLab),
            Some(lab) => devices::check_with_lab(source, params, lab, binds)?,
        });
    }
    let failed = reports.iter().any(CheckReport::has_errors);
    match format {
        Format::Json => {
            let all: Vec<_> = reports
                .iter()
                .flat_map(|r| r.diagnostics.iter().map(|d| locate(&r.file, d)))
                .collect();
            print_json(&all)?;
        }
        Format::Human => {
            let color = color();
            let mut out = std::io::stdout().lock();
            for r in &reports {
                for d in &r.diagnostics {
                    let _ = writeln!(out, "{}\n", render_human(&r.file, d, color));
                }
            }
            for r in &reports {
                let summary = match (r.error_count(), r.warning_count()) {
                    (0, 0) => "ok".to_string(),
                    (0, w) => format!("ok, {w} warning{}", plural(w)),
                    (e, w) => format!("{e} error{}, {w} warning{}", plural(e), plural(w)),
                };
                let _ = writeln!(out, "{}: {summary}", r.file.display_path());
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Checks a protocol for commands that need a valid one; on errors, prints them
/// to stderr and gives the exit code.
pub(crate) fn checked(
    file: &Path,
    params: &[ParamOverride],
    what: &str,
) -> Result<Result<CheckReport, ExitCode>, String> {
    let report = check_source(load(file)?, params, &SimulatedLab);
    Ok(report_errors(&report, what).map(|()| report))
}

/// Prints a report's diagnostics to stderr if it has errors, giving the exit code.
pub(crate) fn report_errors(report: &CheckReport, what: &str) -> Result<(), ExitCode> {
    if report.has_errors() || report.protocol.is_none() || report.plan.is_none() {
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        for d in &report.diagnostics {
            eprintln!("{}\n", render_human(&report.file, d, color));
        }
        let errors = report.error_count();
        eprintln!(
            "{}: {errors} error{}; {what}",
            report.file.display_path(),
            plural(errors)
        );
        return Err(ExitCode::from(1));
    }
    Ok(())
}

fn cmd_plan(file: &Path, params: &[ParamOverride], format: Format) -> Result<ExitCode, String> {
    let report = match checked(file, params, "no plan")? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let Some(plan) = &report.plan else {
        return Ok(ExitCode::from(1));
    };
    if format == Format::Json {
        print_json(&plan)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Plan for \"{}\": {} steps, {} operations",
        plan.protocol,
        plan.steps.len(),
        plan.operation_count()
    );
    let mut n = 0usize;
    for s in &plan.steps {
        let after = if s.after.is_empty() {
            "start".to_string()
        } else {
            s.after.join(", ")
        };
        let repeat = s
            .repeat
            .map(|r| match r.every_s {
                Some(e) => format!(", {} times every {}", r.times, Quantity::seconds(e)),
                None => format!(", {} times", r.times),
            })
            .unwrap_or_default();
        let _ = writeln!(out, "\nstep {} ({}) after: {after}{repeat}", s.id, s.action);
        let device = s.device.as_deref().unwrap_or("-");
        for op in &s.operations {
            n += 1;
            let rep = op
                .repetition
                .map(|r| format!(" [{}]", r + 1))
                .unwrap_or_default();
            let _ = writeln!(out, "  {n:>5}  {device:<6} {}{rep}", describe(&op.op));
        }
    }
    if !plan.wells.is_empty() {
        let _ = writeln!(out, "\nFinal contents of the wells that changed:");
        for w in &plan.wells {
            let place = format!("{}:{}", w.labware, w.well);
            let volume = Quantity::volume_ul(w.volume_ul).to_string();
            let _ = writeln!(out, "  {place:<20} {volume:>10}  {}", w.liquids.join(" + "));
        }
    }
    for d in &report.diagnostics {
        let _ = writeln!(out, "\n{}", render_human(&report.file, d, false));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_labware(name: Option<&str>) -> Result<ExitCode, String> {
    match name {
        None => {
            let mut out = std::io::stdout().lock();
            for n in builtin::builtin_names() {
                if let Some(d) = builtin::builtin(n) {
                    let _ = writeln!(out, "{n:<58} {}", d.size_description());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(n) => match builtin::builtin(n) {
            Some(d) => print_json(d).map(|_| ExitCode::SUCCESS),
            None => Err(format!(
                "no built-in labware `{n}`; `biofoundry labware` lists them"
            )),
        },
    }
}

fn cmd_kinds(kind: Option<&str>) -> Result<ExitCode, String> {
    let kinds: Vec<DeviceKind> = match kind {
        None => DeviceKind::ALL.to_vec(),
        Some(k) => vec![DeviceKind::from_name(k).ok_or_else(|| format!("no device kind `{k}`"))?],
    };
    let mut out = std::io::stdout().lock();
    for k in kinds {
        let spec = k.spec();
        let _ = writeln!(out, "{k}");
        if spec.slots > 0 {
            let _ = writeln!(out, "  slots: 1..{}", spec.slots);
        }
        for s in spec.signals {
            let _ = writeln!(
                out,
                "  signal   {:<18} {:<12} {}",
                s.name,
                s.dimension.canonical_unit(),
                s.description
            );
        }
        for s in spec.setpoints {
            let _ = writeln!(out, "  setpoint {:<18} {}", s.name, s.limits());
        }
        if !spec.pumps.is_empty() {
            let _ = writeln!(out, "  pumps: {}", spec.pumps.join(", "));
        }
        for a in spec.actions {
            let args: Vec<String> = a
                .args
                .iter()
                .map(|x| {
                    if x.required {
                        x.name.to_string()
                    } else {
                        format!("{}?", x.name)
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "  action   {:<18} {{{}}}  {}",
                a.name,
                args.join(", "),
                a.description
            );
        }
        let _ = writeln!(out);
    }
    Ok(ExitCode::SUCCESS)
}
