//! `simulate`: the run executor on the simulated lab with a virtual clock.
//!
//! The code path is the one `run` takes — the same executor, the same
//! simulated devices — on a tokio runtime whose clock is paused: whenever every
//! task is waiting, time jumps to the next timer, so a 48-hour protocol takes
//! as long as its computation. Prompts are answered at once (operator time is
//! not in the estimate).

use super::events::{EventBus, EventKind, MemorySink};
use super::executor::{RunOptions, RunReport, RunSetup, StepTiming, spawn};
use super::machine::{RunCommand, RunState};
use crate::clock::Clock;
use crate::plan::{Plan, WellVolume};
use crate::protocol::Protocol;
use crate::sim::{SimOptions, SimTiming, simulated_lab};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct DeviceUse {
    pub device: String,
    pub busy_s: f64,
    /// Busy time over the run's duration.
    pub utilisation: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Simulation {
    pub protocol: String,
    pub state: RunState,
    pub duration_s: f64,
    pub devices: Vec<DeviceUse>,
    /// Steps whose chain of waits decides the duration, first to last.
    pub critical_path: Vec<String>,
    pub steps: Vec<StepTiming>,
    pub wells: Vec<WellVolume>,
    pub alarms: Vec<String>,
    pub faults: Vec<String>,
    pub prompts: usize,
    /// Events the run produced (samples included).
    pub events: usize,
}

/// Longest lab time a simulation may cover.
const MAX_LAB_TIME: std::time::Duration = std::time::Duration::from_secs(60 * 24 * 3600);

/// Why the run went to held: the reason of the last state change.
fn hold_reason(events: &[super::events::Event]) -> String {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::RunState {
                reason: Some(r), ..
            } => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "held".into())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SimulateError {
    #[error("{0}")]
    Bind(#[from] super::executor::BindError),
    #[error("the simulation could not start: {0}")]
    Runtime(String),
}

/// Simulates a checked protocol to its end and reports what a real run would do.
pub fn simulate(
    protocol: &Protocol,
    plan: &Plan,
    seed: u64,
    binds: &[(String, String)],
) -> Result<Simulation, SimulateError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| SimulateError::Runtime(e.to_string()))?;
    runtime.block_on(async {
        let clock = Clock::new(1.0);
        let lab = simulated_lab(
            clock,
            SimOptions {
                seed,
                timing: SimTiming::Realistic,
            },
        );
        let options = RunOptions {
            auto_answer_prompts: true,
            ..RunOptions::default()
        };
        let setup = RunSetup::new(protocol, plan.clone(), &lab, binds, options)?;
        let memory = MemorySink::default();
        let mut bus = EventBus::new();
        bus.add_sink(Box::new(memory.clone()));
        let (mut handle, task) = spawn(setup, clock, bus);
        handle
            .command(RunCommand::Start, "simulate")
            .await
            .map_err(|e| SimulateError::Runtime(e.to_string()))?;
        // Nobody answers a held run in a simulation: where a real run would
        // wait for the operator, the simulation ends and says why.
        let mut ended_held = None;
        loop {
            let state = handle.state();
            if state.is_final() {
                break;
            }
            if state == RunState::Held {
                ended_held = Some((clock.now_s(), hold_reason(&memory.snapshot())));
                let _ = handle.command(RunCommand::Abort, "simulate").await;
            }
            match tokio::time::timeout(MAX_LAB_TIME, handle.changed()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    ended_held.get_or_insert((
                        clock.now_s(),
                        "the run did not end within 60 days".into(),
                    ));
                    let _ = handle.command(RunCommand::Abort, "simulate").await;
                }
            }
        }
        let mut report = task
            .await
            .map_err(|e| SimulateError::Runtime(e.to_string()))?;
        if let Some((t, reason)) = ended_held {
            report.state = RunState::Held;
            report.faults.push(format!(
                "the run would hold after {}: {reason}",
                crate::units::Quantity::seconds(t.round())
            ));
            report.duration_s = t;
        }
        let events = memory.snapshot();
        Ok(summarise(protocol, plan, report, events.len(), &events))
    })
}

fn summarise(
    protocol: &Protocol,
    plan: &Plan,
    report: RunReport,
    event_count: usize,
    events: &[super::events::Event],
) -> Simulation {
    let duration = report.duration_s;
    let devices = report
        .device_busy_s
        .iter()
        .map(|(device, busy)| DeviceUse {
            device: device.clone(),
            busy_s: *busy,
            utilisation: if duration > 0.0 { busy / duration } else { 0.0 },
        })
        .collect();
    let mut faults = report.faults.clone();
    for e in events {
        if let EventKind::Step {
            step_id,
            phase: super::events::StepPhase::Failed,
            detail: Some(d),
            ..
        } = &e.kind
        {
            faults.push(format!("step `{step_id}`: {d}"));
        }
    }
    Simulation {
        protocol: protocol.name.clone(),
        state: report.state,
        duration_s: duration,
        devices,
        critical_path: critical_path(&report.steps),
        steps: report.steps,
        wells: plan.wells.clone(),
        alarms: report.alarms,
        faults,
        prompts: report.prompts,
        events: event_count,
    }
}

/// Walks back from the step that ended last through what each step waited
/// for: the dependency that ended last, or the step that had its device.
pub fn critical_path(steps: &[StepTiming]) -> Vec<String> {
    let Some(mut current) = steps
        .iter()
        .filter(|s| s.end_s.is_some())
        .max_by(|a, b| a.end_s.unwrap_or(0.0).total_cmp(&b.end_s.unwrap_or(0.0)))
    else {
        return Vec::new();
    };
    let mut path = vec![current.id.clone()];
    while path.len() <= steps.len() {
        let previous = match current.waited_for.as_deref() {
            Some(w) if w.starts_with("device ") => {
                let device = &w["device ".len()..];
                let start = current.start_s.unwrap_or(0.0);
                steps
                    .iter()
                    .filter(|s| s.id != current.id && s.device.as_deref() == Some(device))
                    .filter(|s| s.end_s.is_some_and(|e| e <= start + 1e-9))
                    .max_by(|a, b| a.end_s.unwrap_or(0.0).total_cmp(&b.end_s.unwrap_or(0.0)))
            }
            Some(id) => steps.iter().find(|s| s.id == id),
            None => None,
        };
        match previous {
            Some(p) if !path.contains(&p.id) => {
                path.push(p.id.clone());
                current = p;
            }
            _ => break,
        }
    }
    path.reverse();
    path
}
