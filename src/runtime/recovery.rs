//! Taking a run up again after the controller stopped (SIGKILL, power cut):
//! what its journal says about every step and operation, turned into where
//! the executor goes on. Pure: it reads journal events and the run's plan and
//! replays the operations that are known to have happened onto the decks'
//! models; nothing is sent to a device here.
//!
//! The rule for the operation that was in flight (its `sent` entry is in the
//! journal, its `done` entry is not): an operation that is safe to repeat
//! (setpoints, waits, readings, device commands) is repeated; one that moves
//! liquid or labware (tips, aspirate, dispense, mix, feed, pump, plate moves)
//! may or may not have happened, so the run comes back `held` and says which
//! one, and the deck model is left as it was before that operation.

use super::events::OperationPhase;
use super::executor::RunSetup;
use super::machine::RunState;
use crate::device::{DeckLabware, DeckState};
use crate::plan::{Op, PlannedSetpoint, describe};
use crate::sim::liquid_handler::LiquidHandlerModel;
use indexmap::IndexMap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// Why a run cannot be resumed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecoveryError {
    #[error("the run has already ended ({0})")]
    Ended(String),
    #[error("journal entry {seq}: {reason}")]
    Entry { seq: u64, reason: String },
    #[error("the journal and the plan disagree: {0}")]
    Plan(String),
}

/// Where a step stands.
#[derive(Debug, Clone, PartialEq)]
pub enum StepProgress {
    NotStarted,
    Completed,
    Skipped,
    /// Started, not finished: go on at `next_op`.
    Running {
        started_s: f64,
        next_op: usize,
        /// When a wait in flight ends (lab time).
        wait_until_s: Option<f64>,
        /// The operation at `next_op` was sent and may or may not have happened.
        uncertain: Option<String>,
        /// The step had failed and held the run (retry or skip were awaited).
        failed: Option<String>,
    },
}

/// A pump started at a rate for a duration.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedFeed {
    pub role: String,
    pub pump: String,
    pub rate_ml_min: f64,
    /// Lab time at which the pump must stop.
    pub ends_s: f64,
}

/// Everything the executor needs to go on with a run.
#[derive(Clone)]
pub struct Resumption {
    /// The last journal entry before the stop; the resumed run numbers on.
    pub after_seq: u64,
    /// Lab time at which the run goes on: the last entry's time plus the time
    /// the controller was away (a real incubation went on meanwhile).
    pub resume_at_s: f64,
    /// By plan step index.
    pub steps: Vec<StepProgress>,
    /// Decks after every operation known to have happened, by liquid handler role.
    pub decks: IndexMap<String, DeckState>,
    /// Incubator storage (slot, labware), by incubator role.
    pub storage: IndexMap<String, Vec<(u32, String)>>,
    /// The last value written to each setpoint, by role, to write again.
    pub setpoints: IndexMap<String, Vec<PlannedSetpoint>>,
    /// Feeds at a rate for a duration that were started: the controller
    /// stops their pumps, so it must go on timing them.
    pub timed_feeds: Vec<TimedFeed>,
    /// The state the run was in when it stopped, and why.
    pub last_state: String,
    pub last_reason: Option<String>,
}

impl Resumption {
    pub fn completed(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, StepProgress::Completed | StepProgress::Skipped))
            .count()
    }

    /// `Aborting` or `Stopping` if the run was ending when the controller
    /// stopped: it is not taken up, only ended.
    pub fn was_ending(&self) -> Option<RunState> {
        RunState::from_name(&self.last_state)
            .filter(|s| matches!(s, RunState::Aborting | RunState::Stopping))
    }

    /// Steps taken up where they were, by id.
    pub fn continued(&self, setup: &RunSetup) -> Vec<String> {
        self.steps
            .iter()
            .zip(&setup.plan.steps)
            .filter(|(p, _)| {
                matches!(
                    p,
                    StepProgress::Running {
                        uncertain: None,
                        ..
                    }
                )
            })
            .map(|(_, s)| s.id.clone())
            .collect()
    }

    /// What the operator must check before the run goes on.
    pub fn uncertain(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|p| match p {
                StepProgress::Running {
                    uncertain: Some(u), ..
                } => Some(u.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Whether an operation may simply be done again when it is not known to
/// have finished.
pub fn safe_to_repeat(op: &Op) -> bool {
    matches!(
        op,
        Op::Set { .. }
            | Op::Sample { .. }
            | Op::Command { .. }
            | Op::Wait { .. }
            | Op::WaitUntil { .. }
            | Op::Prompt { .. }
            | Op::Log { .. }
    )
}

#[derive(Default)]
struct Seen {
    started_s: Option<f64>,
    ended: Option<&'static str>,
    /// Last operation sent and its time.
    sent: Option<(usize, f64)>,
    /// Why the step failed, while it waits for retry or skip.
    failed: Option<String>,
    /// Highest operation known done.
    done: Option<usize>,
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name)
}

/// Reads a run's journal events (entry 1 on; entry 0 is the header) against
/// its setup. `now_ms`: wall-clock time of the resume; `speed`: lab seconds
/// per real second.
pub fn recover(
    events: &[(u64, Value)],
    setup: &RunSetup,
    now_ms: u64,
    speed: f64,
) -> Result<Resumption, RecoveryError> {
    let plan = &setup.plan;
    let index: HashMap<&str, usize> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut seen: Vec<Seen> = plan.steps.iter().map(|_| Seen::default()).collect();
    // Operations that happened, in the order they finished, with the time.
    let mut done_ops: Vec<(usize, usize, f64)> = Vec::new();
    let mut last_state = "idle".to_string();
    let mut last_reason = None;
    let (mut last_seq, mut last_t, mut last_ms) = (0u64, 0.0f64, now_ms);
    for (seq, e) in events {
        let bad = |reason: &str| RecoveryError::Entry {
            seq: *seq,
            reason: reason.to_string(),
        };
        last_seq = last_seq.max(*seq);
        if let Some(t) = field(e, "t_s").and_then(Value::as_f64) {
            last_t = t;
        }
        if let Some(ms) = field(e, "unix_ms").and_then(Value::as_u64) {
            last_ms = ms;
        }
        let step = || -> Result<usize, RecoveryError> {
            let id = field(e, "step_id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("no step_id"))?;
            index
                .get(id)
                .copied()
                .ok_or_else(|| RecoveryError::Plan(format!("no step `{id}` in the plan")))
        };
        match field(e, "type").and_then(Value::as_str) {
            Some("run_state") => {
                last_state = field(e, "state")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string();
                last_reason = field(e, "reason")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            Some("step") => {
                let i = step()?;
                let t = field(e, "t_s").and_then(Value::as_f64).unwrap_or(0.0);
                let phase = field(e, "phase").and_then(Value::as_str);
                match phase {
                    Some("started") => {
                        seen[i].started_s.get_or_insert(t);
                    }
                    Some("completed") => seen[i].ended = Some("completed"),
                    Some("skipped") => seen[i].ended = Some("skipped"),
                    _ => {}
                }
                seen[i].failed = (phase == Some("failed")).then(|| {
                    field(e, "detail")
                        .and_then(Value::as_str)
                        .map_or_else(|| "failed".to_string(), str::to_string)
                });
            }
            Some("operation") => {
                let i = step()?;
                let k = field(e, "index")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("no operation index"))? as usize;
                if k >= plan.steps[i].operations.len() {
                    return Err(RecoveryError::Plan(format!(
                        "step `{}` has no operation {k}",
                        plan.steps[i].id
                    )));
                }
                let t = field(e, "t_s").and_then(Value::as_f64).unwrap_or(0.0);
                let phase: Option<OperationPhase> = field(e, "phase")
                    .cloned()
                    .and_then(|p| serde_json::from_value(p).ok());
                // An operation after a failure: the step was retried.
                seen[i].failed = None;
                match phase {
                    Some(OperationPhase::Sent) => seen[i].sent = Some((k, t)),
                    Some(OperationPhase::Done) => {
                        seen[i].done = Some(k);
                        done_ops.push((i, k, t));
                    }
                    None => return Err(bad("unknown operation phase")),
                }
            }
            _ => {}
        }
    }
    if RunState::from_name(&last_state).is_some_and(RunState::is_final) {
        return Err(RecoveryError::Ended(last_state));
    }

    let mut steps = Vec::with_capacity(plan.steps.len());
    for (i, s) in seen.iter().enumerate() {
        let ops = &plan.steps[i].operations;
        let progress = match (s.ended, s.started_s) {
            (Some("completed"), _) => StepProgress::Completed,
            (Some(_), _) => StepProgress::Skipped,
            (None, None) => StepProgress::NotStarted,
            (None, Some(started_s)) => {
                let after_done = s.done.map_or(0, |d| d + 1);
                match s.sent {
                    Some((k, sent_t)) if s.done.is_none_or(|d| d < k) => {
                        let op = &ops[k].op;
                        let wait_until_s = match op {
                            Op::Wait { duration_s } => Some(sent_t + duration_s),
                            _ => None,
                        };
                        let uncertain = (!safe_to_repeat(op)).then(|| {
                            format!(
                                "step `{}`, operation {} of {} ({}) was sent before the controller stopped; whether it happened is unknown",
                                plan.steps[i].id,
                                k + 1,
                                ops.len(),
                                describe(op)
                            )
                        });
                        StepProgress::Running {
                            started_s,
                            next_op: k,
                            wait_until_s,
                            uncertain,
                            failed: s.failed.clone(),
                        }
                    }
                    _ => StepProgress::Running {
                        started_s,
                        next_op: after_done,
                        wait_until_s: None,
                        uncertain: None,
                        failed: s.failed.clone(),
                    },
                }
            }
        };
        steps.push(progress);
    }

    let done: Vec<(usize, usize)> = done_ops.iter().map(|&(i, k, _)| (i, k)).collect();
    let (decks, storage) = replay(setup, &done)?;
    let mut setpoints: IndexMap<String, Vec<PlannedSetpoint>> = IndexMap::new();
    let mut timed_feeds: Vec<TimedFeed> = Vec::new();
    for &(i, k, t) in &done_ops {
        let Some(role) = &plan.steps[i].device else {
            continue;
        };
        match &plan.steps[i].operations[k].op {
            Op::Set { setpoints: sps, .. } => {
                let known = setpoints.entry(role.clone()).or_default();
                for sp in sps {
                    known.retain(|x| x.name != sp.name);
                    known.push(sp.clone());
                }
            }
            // A later feed on the same pump replaces a running one.
            Op::Feed {
                pump,
                volume_ul,
                rate_ml_min,
                duration_s,
            } => {
                timed_feeds.retain(|f| !(f.role == *role && f.pump == *pump));
                if let (None, Some(rate), Some(d)) = (volume_ul, rate_ml_min, duration_s) {
                    timed_feeds.push(TimedFeed {
                        role: role.clone(),
                        pump: pump.clone(),
                        rate_ml_min: *rate,
                        ends_s: t + d,
                    });
                }
            }
            _ => {}
        }
    }
    let away_s = now_ms.saturating_sub(last_ms) as f64 / 1000.0;
    Ok(Resumption {
        after_seq: last_seq,
        resume_at_s: last_t + away_s * speed,
        steps,
        decks,
        storage,
        setpoints,
        timed_feeds,
        last_state,
        last_reason,
    })
}

type Decks = (
    IndexMap<String, DeckState>,
    IndexMap<String, Vec<(u32, String)>>,
);

/// The decks and incubator storage after the operations that happened, as
/// the executor's `perform` would have left them.
fn replay(setup: &RunSetup, done_ops: &[(usize, usize)]) -> Result<Decks, RecoveryError> {
    let mut decks: IndexMap<String, LiquidHandlerModel> = IndexMap::new();
    for (role, deck) in &setup.decks {
        let mut model = LiquidHandlerModel::default();
        model
            .configure(deck)
            .map_err(|e| RecoveryError::Plan(format!("the deck of {role}: {e}")))?;
        decks.insert(role.clone(), model);
    }
    let mut storage: IndexMap<String, BTreeMap<u32, String>> = IndexMap::new();
    for &(i, k) in done_ops {
        let step = &setup.plan.steps[i];
        let Some(role) = step.device.as_deref() else {
            continue;
        };
        let op = &step.operations[k].op;
        let fail = |e: String| {
            RecoveryError::Plan(format!(
                "step `{}` operation {} ({}): {e}",
                step.id,
                k + 1,
                describe(op)
            ))
        };
        fn deck<'a>(
            decks: &'a mut IndexMap<String, LiquidHandlerModel>,
            role: &str,
        ) -> Result<&'a mut LiquidHandlerModel, String> {
            decks
                .get_mut(role)
                .ok_or_else(|| format!("{role} has no deck"))
        }
        match op {
            Op::PickUpTip { rack, well, .. } => {
                deck(&mut decks, role)
                    .map_err(fail)?
                    .pick_up_tip(rack, well)
                    .map_err(fail)?;
            }
            Op::Aspirate {
                labware,
                well,
                volume_ul,
            } => {
                deck(&mut decks, role)
                    .map_err(fail)?
                    .aspirate(labware, well, *volume_ul)
                    .map_err(fail)?;
            }
            Op::Dispense {
                labware,
                well,
                volume_ul,
            } => {
                deck(&mut decks, role)
                    .map_err(fail)?
                    .dispense(labware, well, *volume_ul)
                    .map_err(fail)?;
            }
            Op::Mix {
                labware,
                well,
                volume_ul,
                cycles,
            } => {
                deck(&mut decks, role)
                    .map_err(fail)?
                    .mix(labware, well, *volume_ul, *cycles)
                    .map_err(fail)?;
            }
            Op::DropTip => {
                deck(&mut decks, role)
                    .map_err(fail)?
                    .drop_tip()
                    .map_err(fail)?;
            }
            Op::MoveLabware { labware, from, to } => {
                let (from_role, _) = split_place(from);
                let (to_role, to_slot) = split_place(to);
                if to_role == role {
                    storage
                        .entry(role.to_string())
                        .or_default()
                        .insert(to_slot, labware.clone());
                    if let Some(d) = decks.get_mut(from_role) {
                        d.remove(labware).map_err(fail)?;
                    }
                } else {
                    if let Some(s) = storage.get_mut(role) {
                        s.retain(|_, l| l != labware);
                    }
                    if let (Some(d), Some(placed)) =
                        (decks.get_mut(to_role), setup.labware.get(labware))
                    {
                        let placed = DeckLabware {
                            slot: to_slot,
                            ..placed.clone()
                        };
                        d.place(&placed).map_err(fail)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok((
        decks.into_iter().map(|(r, m)| (r, DeckState(m))).collect(),
        storage
            .into_iter()
            .map(|(r, s)| (r, s.into_iter().collect()))
            .collect(),
    ))
}

/// `role:slot` of a labware place.
pub(crate) fn split_place(place: &str) -> (&str, u32) {
    match place.split_once(':') {
        Some((role, slot)) => (role, slot.parse().unwrap_or(0)),
        None => (place, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_source;
    use crate::clock::Clock;
    use crate::runtime::executor::RunOptions;
    use crate::sim::{SimOptions, SimTiming, simulated_lab};
    use crate::source::SourceFile;
    use crate::validate::SimulatedLab;
    use serde_json::json;

    const PROTOCOL: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "recovery"
[devices]
lh = "liquid_handler"
tm = "temperature_module"
[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"
[labware.source]
type = "nest_12_reservoir_15ml"
at = "lh:2"
contents = { A1 = "10 mL buffer" }
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:3"
[[step]]
id = "cool"
do = "tm.set_temperature"
temperature = "20 C"
[[step]]
id = "fill"
do = "lh.transfer"
from = "source:A1"
to = "plate:A1:B1"
volume = "40 uL"
tips = "always"
"#;

    fn setup() -> RunSetup {
        setup_of(PROTOCOL)
    }

    fn setup_of(text: &str) -> RunSetup {
        let report = check_source(SourceFile::new("r.toml", text), &[], &SimulatedLab);
        assert!(!report.has_errors(), "{:?}", report.diagnostics);
        let (protocol, plan) = (report.protocol.unwrap(), report.plan.unwrap());
        let lab = simulated_lab(
            Clock::new(1.0),
            SimOptions {
                seed: 1,
                timing: SimTiming::Instant,
            },
        );
        RunSetup::new(&protocol, plan, &lab, &[], RunOptions::default()).unwrap()
    }

    fn op(seq: u64, step: &str, index: u32, phase: &str) -> (u64, Value) {
        (
            seq,
            json!({"seq": seq, "t_s": seq as f64, "unix_ms": 1_000 + seq, "type": "operation",
                   "step_id": step, "index": index, "phase": phase}),
        )
    }

    fn step(seq: u64, id: &str, phase: &str) -> (u64, Value) {
        (
            seq,
            json!({"seq": seq, "t_s": seq as f64, "unix_ms": 1_000 + seq, "type": "step",
                   "step_id": id, "action": "x", "phase": phase}),
        )
    }

    fn volume(r: &Resumption, labware: &str, well: &str) -> f64 {
        r.decks["lh"]
            .records("lh1")
            .iter()
            .find(|l| l.name == labware)
            .and_then(|l| l.volumes_ul.get(well).copied())
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn an_unknown_dispense_holds_a_repeatable_setpoint_is_repeated_and_the_deck_is_replayed()
    {
        let setup = setup();
        let fill = &setup.plan.steps[1];
        // A transfer with tips "always": pick, aspirate, dispense, drop per well.
        assert!(matches!(fill.operations[2].op, Op::Dispense { .. }));
        let events = vec![
            step(1, "cool", "started"),
            op(2, "cool", 0, "sent"),
            step(3, "fill", "started"),
            op(4, "fill", 0, "sent"),
            op(5, "fill", 0, "done"),
            op(6, "fill", 1, "sent"),
            op(7, "fill", 1, "done"),
            op(8, "fill", 2, "sent"),
        ];
        // Stopped 10 s (wall clock) after the last entry, at lab speed 2.
        let r = recover(&events, &setup, 1_008 + 10_000, 2.0).unwrap();
        assert_eq!(r.after_seq, 8);
        assert!(
            (r.resume_at_s - (8.0 + 20.0)).abs() < 1e-9,
            "{}",
            r.resume_at_s
        );
        assert!(matches!(
            &r.steps[0],
            StepProgress::Running {
                next_op: 0,
                uncertain: None,
                ..
            }
        ));
        let StepProgress::Running {
            next_op: 2,
            uncertain: Some(why),
            ..
        } = &r.steps[1]
        else {
            panic!("{:?}", r.steps[1]);
        };
        assert!(
            why.contains("operation 3 of 8") && why.contains("dispense"),
            "{why}"
        );
        // The aspirate happened: the source lost 40 uL, the tip holds it;
        // the uncertain dispense is not counted.
        assert!((volume(&r, "source", "A1") - 9960.0).abs() < 1e-6);
        assert_eq!(volume(&r, "plate", "A1"), 0.0);
        assert_eq!(r.decks["lh"].tip_volume_ul(), Some(40.0));
        assert_eq!(r.uncertain().len(), 1);
    }

    #[tokio::test]
    async fn completed_steps_stay_done_setpoints_are_kept_and_an_ended_run_is_refused() {
        let setup = setup();
        let mut events = vec![
            step(1, "cool", "started"),
            op(2, "cool", 0, "sent"),
            op(3, "cool", 0, "done"),
            step(4, "cool", "completed"),
        ];
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        assert_eq!(r.steps[0], StepProgress::Completed);
        assert_eq!(r.steps[1], StepProgress::NotStarted);
        assert_eq!(r.completed(), 1);
        assert_eq!(r.setpoints["tm"][0].name, "temperature");
        events.push((
            5,
            json!({"seq": 5, "t_s": 5.0, "unix_ms": 1005, "type": "run_state", "state": "completed"}),
        ));
        assert_eq!(
            recover(&events, &setup, 2_000, 1.0).err(),
            Some(RecoveryError::Ended("completed".into()))
        );
        // An operation the plan does not have: the journal is not this run's.
        let wrong = vec![op(1, "fill", 99, "sent")];
        assert!(matches!(
            recover(&wrong, &setup, 2_000, 1.0),
            Err(RecoveryError::Plan(_))
        ));
    }

    fn run_state(seq: u64, state: &str, reason: Option<&str>) -> (u64, Value) {
        (
            seq,
            json!({"seq": seq, "t_s": seq as f64, "unix_ms": 1_000 + seq, "type": "run_state",
                   "state": state, "reason": reason}),
        )
    }

    #[tokio::test]
    async fn a_failed_run_has_ended_and_an_ending_run_is_only_ended() {
        let setup = setup();
        let mut events = vec![step(1, "cool", "started"), op(2, "cool", 0, "sent")];
        events.push(run_state(3, "aborting", Some("step `cool` failed")));
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        assert_eq!(r.was_ending(), Some(RunState::Aborting));
        events.push(run_state(4, "failed", None));
        assert_eq!(
            recover(&events, &setup, 2_000, 1.0).err(),
            Some(RecoveryError::Ended("failed".into()))
        );
        let stopping = vec![
            run_state(1, "running", None),
            run_state(2, "stopping", None),
        ];
        let r = recover(&stopping, &setup, 2_000, 1.0).unwrap();
        assert_eq!(r.was_ending(), Some(RunState::Stopping));
        let held = vec![run_state(1, "running", None), run_state(2, "held", None)];
        assert_eq!(
            recover(&held, &setup, 2_000, 1.0).unwrap().was_ending(),
            None
        );
    }

    #[tokio::test]
    async fn a_failed_step_stays_failed_until_it_is_retried() {
        let setup = setup();
        let mut failed = step(3, "cool", "failed");
        failed.1["detail"] = json!("tm1 did not answer");
        let mut events = vec![step(1, "cool", "started"), op(2, "cool", 0, "sent"), failed];
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        let StepProgress::Running {
            failed: Some(why),
            next_op: 0,
            ..
        } = &r.steps[0]
        else {
            panic!("{:?}", r.steps[0]);
        };
        assert_eq!(why, "tm1 did not answer");
        // Retried by the operator: the operation is sent again.
        events.push(op(4, "cool", 0, "sent"));
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        assert!(matches!(
            r.steps[0],
            StepProgress::Running { failed: None, .. }
        ));
    }

    #[tokio::test]
    async fn a_timed_feed_is_timed_on_and_a_later_feed_replaces_it() {
        let text = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "feeds"
[devices]
br = "bioreactor"
[[step]]
id = "feed"
do = "br.feed"
pump = "feed"
rate = "0.5 mL/min"
duration = "6 h"
[[step]]
id = "base"
do = "br.feed"
pump = "base"
rate = "0.2 mL/min"
duration = "1 h"
[[step]]
id = "base_again"
do = "br.feed"
pump = "base"
volume = "1 mL"
"#;
        let setup = setup_of(text);
        let mut events = vec![
            step(1, "feed", "started"),
            op(2, "feed", 0, "sent"),
            op(3, "feed", 0, "done"),
            step(4, "feed", "completed"),
            step(5, "base", "started"),
            op(6, "base", 0, "sent"),
            op(7, "base", 0, "done"),
        ];
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        assert_eq!(
            r.timed_feeds,
            vec![
                TimedFeed {
                    role: "br".into(),
                    pump: "feed".into(),
                    rate_ml_min: 0.5,
                    ends_s: 3.0 + 6.0 * 3600.0,
                },
                TimedFeed {
                    role: "br".into(),
                    pump: "base".into(),
                    rate_ml_min: 0.2,
                    ends_s: 7.0 + 3600.0,
                },
            ]
        );
        events.extend([
            step(8, "base", "completed"),
            step(9, "base_again", "started"),
            op(10, "base_again", 0, "sent"),
            op(11, "base_again", 0, "done"),
        ]);
        let r = recover(&events, &setup, 2_000, 1.0).unwrap();
        assert_eq!(r.timed_feeds.len(), 1);
        assert_eq!(r.timed_feeds[0].pump, "feed");
    }
}
