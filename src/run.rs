//! `biofoundry run` and `biofoundry simulate`.

use crate::{checked, plural, print_json};
use biofoundry::clock::Clock;
use biofoundry::mqtt::publisher::{RunInfo, new_run_id};
use biofoundry::mqtt::sink::MqttRunSink;
use biofoundry::protocol::ParamOverride;
use biofoundry::runtime::events::{ChannelSink, EventBus, EventKind};
use biofoundry::runtime::executor::{
    RunHandle, RunOptions, RunReport, RunSetup, spawn, spawn_resumed,
};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::runtime::simulate::{Simulation, simulate};
use biofoundry::sim::{SimOptions, SimTiming, simulated_lab};
use biofoundry::sinks::console::ConsoleSink;
use biofoundry::units::Quantity;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

fn init_logging(json: bool) {
    init_logging_at(json, "warn")
}

fn init_logging_at(json: bool, default: &str) {
    use tracing_subscriber::EnvFilter;
    // The console shows the run (progress or event lines); logs stay quiet
    // unless RUST_LOG asks for them.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub fn cmd_simulate(
    file: &Path,
    params: &[ParamOverride],
    binds: &[(String, String)],
    seed: u64,
    json: bool,
) -> Result<ExitCode, String> {
    let report = match checked(file, params, "not simulated")? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let (Some(protocol), Some(plan)) = (&report.protocol, &report.plan) else {
        return Ok(ExitCode::from(1));
    };
    let sim = simulate(protocol, plan, seed, binds).map_err(|e| e.to_string())?;
    if json {
        print_json(&sim)?;
    } else {
        print_simulation(&sim);
    }
    Ok(if sim.state == RunState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_simulation(sim: &Simulation) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Simulation of \"{}\": {}", sim.protocol, sim.state);
    let _ = writeln!(
        out,
        "  estimated duration  {}",
        Quantity::seconds(sim.duration_s.round())
    );
    if sim.prompts > 0 {
        let _ = writeln!(
            out,
            "  operator prompts    {} (answering time not included)",
            sim.prompts
        );
    }
    let _ = writeln!(out, "\nDevices (busy time, utilisation):");
    for d in &sim.devices {
        let _ = writeln!(
            out,
            "  {:<20} {:>12}  {:>5.1} %",
            d.device,
            Quantity::seconds(d.busy_s.round()).to_string(),
            d.utilisation * 100.0
        );
    }
    let _ = writeln!(out, "\nCritical path: {}", sim.critical_path.join(" -> "));
    let _ = writeln!(out, "\nSteps (start, end):");
    for s in &sim.steps {
        let span = match (s.start_s, s.end_s) {
            (Some(a), Some(b)) => format!(
                "{:>10} {:>10}",
                Quantity::seconds(a.round()).to_string(),
                Quantity::seconds(b.round()).to_string()
            ),
            _ => format!("{:>21}", s.outcome),
        };
        let _ = writeln!(
            out,
            "  {:<28} {span}  {}",
            s.id,
            s.device.as_deref().unwrap_or("")
        );
    }
    if !sim.wells.is_empty() {
        let _ = writeln!(
            out,
            "\nFinal contents of the wells that changed: {} wells (see `biofoundry plan`)",
            sim.wells.len()
        );
    }
    let _ = writeln!(
        out,
        "\nAlarms a real run would raise: {}",
        if sim.alarms.is_empty() {
            "none".to_string()
        } else {
            sim.alarms.len().to_string()
        }
    );
    for a in &sim.alarms {
        let _ = writeln!(out, "  {a}");
    }
    let _ = writeln!(
        out,
        "Faults it would hit: {}",
        if sim.faults.is_empty() {
            "none".to_string()
        } else {
            sim.faults.len().to_string()
        }
    );
    for f in &sim.faults {
        let _ = writeln!(out, "  {f}");
    }
}

/// How the simulated lab runs (`--speed`, `--seed`).
pub struct SimSettings {
    pub speed: f64,
    pub seed: u64,
}

pub fn cmd_run(
    file: &Path,
    lab_file: Option<&Path>,
    params: &[ParamOverride],
    binds: &[(String, String)],
    SimSettings { speed, seed }: SimSettings,
    operator: Option<String>,
    json_logs: bool,
) -> Result<ExitCode, String> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(format!("--speed must be a positive number, not {speed}"));
    }
    init_logging(json_logs);
    let lab_file = match lab_file {
        Some(path) => match crate::devices::load_lab(path)? {
            Ok(lab) => Some(lab),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    let report = match &lab_file {
        None => match checked(file, params, "not run")? {
            Ok(r) => r,
            Err(code) => return Ok(code),
        },
        Some(lab) => {
            let report = crate::devices::check_with_lab(crate::load(file)?, params, lab, binds)?;
            if let Err(code) = crate::report_errors(&report, "not run") {
                return Ok(code);
            }
            report
        }
    };
    let (Some(protocol), Some(plan)) = (report.protocol, report.plan) else {
        return Ok(ExitCode::from(1));
    };
    execute(
        protocol,
        plan,
        lab_file,
        params,
        binds,
        speed,
        seed,
        Begin::New { operator },
    )
}

/// A run from its start, or one taken up again from its journal.
enum Begin {
    New {
        operator: Option<String>,
    },
    Resume {
        run_id: String,
        events: Vec<(u64, serde_json::Value)>,
        operator: Option<String>,
    },
}

#[allow(clippy::too_many_arguments)]
fn execute(
    protocol: biofoundry::protocol::Protocol,
    plan: biofoundry::plan::Plan,
    lab_file: Option<biofoundry::lab::LabFile>,
    params: &[ParamOverride],
    binds: &[(String, String)],
    speed: f64,
    seed: u64,
    begin: Begin,
) -> Result<ExitCode, String> {
    let interactive = std::io::stdout().is_terminal();
    // The estimate for the progress display comes from the same runtime on a
    // virtual clock (a separate, paused tokio runtime: it runs before ours starts).
    let sim_binds: &[(String, String)] = if lab_file.is_some() { &[] } else { binds };
    let estimate = simulate(&protocol, &plan, seed, sim_binds)
        .ok()
        .map(|s| s.duration_s);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let total_steps = plan.steps.len();
    let outcome = runtime.block_on(async move {
        let options = SimOptions {
            seed,
            timing: SimTiming::Realistic,
        };
        // Real instruments keep their own time: `--speed` applies to simulators only.
        let all_simulated = lab_file.as_ref().is_none_or(|l| l.all_simulated());
        // `--speed` wins; a simulated lab file may set its own.
        let speed = match &lab_file {
            Some(l) if speed == 1.0 && all_simulated => l.simulation_speed(),
            _ if all_simulated => speed,
            _ => 1.0,
        };
        let clock = Clock::new(speed);
        let (lab, lab_name, lab_runtime) = match &lab_file {
            None => (
                simulated_lab(clock, options),
                "the simulated lab".to_string(),
                None,
            ),
            Some(l) => {
                let backing = biofoundry::lab::SimBacking { clock, options };
                let runtime = biofoundry::lab::connect_lab(l, &backing)?;
                let name = format!("lab {}", l.file.display_path());
                (runtime.lab.clone(), name, Some(runtime))
            }
        };
        let setup = RunSetup::new(&protocol, plan, &lab, binds, RunOptions::default())
            .map_err(|e| e.to_string())?;
        let console = ConsoleSink::new(interactive, total_steps, estimate, speed);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        // A lab file with [mqtt]: the run is published like a run of `serve`.
        let mqtt = match &lab_file {
            Some(l) => biofoundry::mqtt::start(l, false)?,
            None => None,
        };
        // The text that was checked (not the file again: it may have changed since).
        let text = protocol.file.text.clone();
        let params_json: serde_json::Map<String, serde_json::Value> = params
            .iter()
            .map(|p| (p.name.clone(), serde_json::Value::String(p.value.clone())))
            .collect();
        let run_id = match &begin {
            Begin::New { .. } => new_run_id(),
            Begin::Resume { run_id, .. } => run_id.clone(),
        };
        let info = RunInfo::new(
            &run_id,
            &protocol.name,
            protocol.version.as_deref(),
            &text,
            serde_json::Value::Object(params_json),
            match &begin {
                Begin::New { operator } | Begin::Resume { operator, .. } => operator.as_deref(),
            },
        );
        let resumption = match &begin {
            Begin::New { .. } => None,
            Begin::Resume { events, .. } => Some(
                biofoundry::runtime::recovery::recover(
                    events,
                    &setup,
                    biofoundry::store::now_ms(),
                    speed,
                )
                .map_err(|e| format!("run {run_id} cannot be resumed: {e}"))?,
            ),
        };
        if let (Some(r), Some(runtime)) = (&resumption, &lab_runtime) {
            runtime.restore_simulators(r, &setup).await?;
        }
        let mut bus = match &resumption {
            Some(r) => EventBus::continuing_after(r.after_seq),
            None => EventBus::new(),
        };
        // With a lab file the run is journaled (first: before anything reports it).
        if let Some(l) = &lab_file {
            let journal = match &begin {
                Begin::New { .. } => biofoundry::journal::begin_run(
                    l,
                    &info,
                    &text,
                    &setup,
                    "operator (CLI)",
                    &protocol.file.path,
                ),
                Begin::Resume { .. } => biofoundry::journal::Journal::open(
                    &biofoundry::journal::journal_path(&l.data_dir()),
                )
                .and_then(|j| j.resume(&run_id)),
            }
            .map_err(|e| e.to_string())?;
            bus.add_sink(Box::new(journal));
            println!(
                "Run {} (journal: {})",
                info.run_id,
                biofoundry::journal::journal_path(&l.data_dir()).display()
            );
        }
        if let (Some(m), Some(l)) = (&mqtt, &lab_file) {
            let key = l
                .doc
                .mqtt
                .as_ref()
                .is_some_and(|m| m.get_ref().command_key_file.is_some());
            m.publisher
                .description(&biofoundry::serve::description(l, key))
                .map_err(|e| e.to_string())?;
            bus.add_sink(Box::new(MqttRunSink::new(m.publisher.clone(), info)));
        }
        bus.add_sink(Box::new(console));
        bus.add_sink(Box::new(ChannelSink(events_tx)));
        if let Some(r) = &resumption {
            println!(
                "Resuming: {} of {} steps completed before the stop",
                r.completed(),
                total_steps
            );
            for u in r.uncertain() {
                println!("  uncertain: {u}");
            }
        }
        let (handle, task) = match resumption {
            Some(r) => spawn_resumed(setup, r, clock, bus),
            None => spawn(setup, clock, bus),
        };
        if let Some(e) = estimate {
            println!(
                "Running \"{}\" on {lab_name}; estimated duration {}",
                protocol.name,
                Quantity::seconds((e / speed).round())
            );
        }
        let source = match &begin {
            Begin::New { .. } => "operator",
            Begin::Resume { .. } => "operator (resume)",
        };
        handle
            .command(RunCommand::Start, source)
            .await
            .map_err(|e| e.to_string())?;
        operate(handle, events).await;
        let report = task.await.map_err(|e| e.to_string());
        if let Some(m) = mqtt {
            let unsent = m.publisher.clone();
            let link = m
                .link
                .shutdown(b"disconnected", std::time::Duration::from_secs(5))
                .await;
            if !link.flushed {
                println!(
                    "MQTT: {} message{} kept in the outbox for the next start",
                    unsent.unsent(),
                    plural(unsent.unsent() as usize)
                );
            }
        }
        report
    })?;
    print_summary(&outcome);
    Ok(if outcome.state == RunState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `biofoundry resume RUN_ID --lab LAB`: takes up a run the controller was
/// executing when it stopped, with the protocol text, parameters and bindings
/// its journal recorded.
pub fn cmd_resume(
    run_id: &str,
    lab_path: &Path,
    speed: f64,
    json_logs: bool,
) -> Result<ExitCode, String> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(format!("--speed must be a positive number, not {speed}"));
    }
    init_logging(json_logs);
    let lab = match crate::devices::load_lab(lab_path)? {
        Ok(lab) => lab,
        Err(code) => return Ok(code),
    };
    let path = biofoundry::journal::journal_path(&lab.data_dir());
    let journal = biofoundry::journal::Journal::open(&path).map_err(|e| e.to_string())?;
    let recorded = journal.recorded(run_id).map_err(|e| e.to_string())?;
    drop(journal);
    let report = crate::devices::check_with_lab(
        biofoundry::source::SourceFile::new(recorded.source_path(&lab.data_dir()), &recorded.text),
        &recorded.params,
        &lab,
        &recorded.binds,
    )?;
    if let Err(code) = crate::report_errors(&report, "not resumed") {
        return Ok(code);
    }
    let (Some(protocol), Some(plan)) = (report.protocol, report.plan) else {
        return Ok(ExitCode::from(1));
    };
    execute(
        protocol,
        plan,
        Some(lab),
        &recorded.params,
        &recorded.binds,
        speed,
        1,
        Begin::Resume {
            run_id: run_id.to_string(),
            events: recorded.events,
            operator: recorded.operator,
        },
    )
}

/// The operator's side of a run on the terminal: Ctrl-C pauses, then the
/// terminal asks what to do; prompts are answered with Enter (or text).
async fn operate(
    handle: RunHandle,
    mut events: tokio::sync::mpsc::UnboundedReceiver<biofoundry::runtime::events::Event>,
) {
    let mut lines = Some(stdin_lines());
    let mut pending_prompt: Option<String> = None;
    // Answers typed (or piped) before their prompt was asked, in order.
    let mut early_answers: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut state = handle.state();
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                match event.kind {
                    EventKind::RunState { state: s, .. } => {
                        state = s;
                        match s {
                            RunState::Paused => println!("Paused. Type `resume` or `abort` and Enter."),
                            RunState::Held => println!("Held. Type `retry`, `skip`, `resume` or `abort` and Enter."),
                            s if s.is_final() => return,
                            _ => {}
                        }
                    }
                    EventKind::Prompt { step_id, response: None, .. } => match early_answers.pop_front() {
                        Some(answer) => {
                            let answer = if answer.is_empty() { "confirmed".to_string() } else { answer };
                            if let Err(e) = handle.answer_prompt(&step_id, &answer).await {
                                println!("{e}");
                            }
                        }
                        None => {
                            println!("Press Enter to confirm (or type an answer).");
                            pending_prompt = Some(step_id);
                        }
                    },
                    _ => {}
                }
            }
            _ = tokio::signal::ctrl_c() => {
                let command = if matches!(state, RunState::Pausing | RunState::Paused | RunState::Holding | RunState::Held) {
                    RunCommand::Abort
                } else {
                    println!("Pausing at the next safe point (Ctrl-C again aborts)...");
                    RunCommand::Pause
                };
                if let Err(e) = handle.command(command, "operator (Ctrl-C)").await {
                    println!("{e}");
                }
            }
            line = next_line(&mut lines) => {
                let Some(line) = line else {
                    // Standard input closed: the run goes on, answered only by events.
                    lines = None;
                    continue;
                };
                let text = line.trim();
                if let Some(step) = pending_prompt.take() {
                    let answer = if text.is_empty() { "confirmed" } else { text };
                    if let Err(e) = handle.answer_prompt(&step, answer).await {
                        println!("{e}");
                    }
                    continue;
                }
                match RunCommand::from_name(text) {
                    Some(c) => if let Err(e) = handle.command(c, "operator").await { println!("{e}") },
                    None => early_answers.push_back(text.to_string()),
                }
            }
        }
    }
}

fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(
    lines: &mut Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) -> Option<String> {
    match lines {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
}

fn print_summary(r: &RunReport) {
    println!(
        "\nRun {}: {} in {}, {} of {} steps done{}, {} alarm{}",
        r.state,
        if r.state == RunState::Completed {
            "finished"
        } else {
            "ended"
        },
        Quantity::seconds(r.duration_s.round()),
        r.steps_done,
        r.steps_total,
        if r.steps_skipped > 0 {
            format!(" ({} skipped)", r.steps_skipped)
        } else {
            String::new()
        },
        r.alarms.len(),
        plural(r.alarms.len()),
    );
    for a in &r.alarms {
        println!("  alarm: {a}");
    }
    for f in &r.faults {
        println!("  fault: {f}");
    }
}

pub fn cmd_serve(lab_path: &Path, speed: Option<f64>, json_logs: bool) -> Result<ExitCode, String> {
    // A daemon's log is its console: connections, commands, runs.
    init_logging_at(json_logs, "info,rumqttd=warn,rumqttc=warn");
    let lab = match crate::devices::load_lab(lab_path)? {
        Ok(lab) => lab,
        Err(code) => return Ok(code),
    };
    let speed = match speed {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(format!("--speed must be a positive number, not {s}"));
        }
        Some(s) if lab.all_simulated() => s,
        Some(_) => 1.0,
        None if lab.all_simulated() => lab.simulation_speed(),
        None => 1.0,
    };
    let seed = lab.doc.simulation.as_ref().map_or(1, |s| s.get_ref().seed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = runtime.block_on(async move {
        let mqtt = biofoundry::mqtt::start(&lab, true)?
            .ok_or_else(|| "the lab file has no MQTT".to_string())?;
        let options = biofoundry::serve::ServeOptions {
            speed,
            seed,
            ..Default::default()
        };
        biofoundry::serve::serve(lab, mqtt, options, shutdown_signal()).await
    })?;
    tracing::info!(
        "stopped: outbox {}, {} message{} kept for the next start",
        if report.link.flushed {
            "flushed"
        } else {
            "not flushed"
        },
        report.kept,
        plural(report.kept as usize)
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (service managers) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
