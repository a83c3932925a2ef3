//! The plan: every step expanded into the operations a device will perform,
//! in execution order, with the deck tracked through all of them.
//!
//! Tracking follows the liquid handler's physics: each well's volume from
//! `contents` through every aspirate and dispense, the tip on each liquid
//! handler and what it holds, the tips left in each rack, and where every
//! labware is. Whatever would fail on the instrument is reported here, before
//! a device moves.

use crate::diagnostics::Diagnostic;
use crate::labware::LabwareDefinition;
use crate::protocol::{
    Action, ErrorPolicy, Location, MixSpec, Protocol, Repeat, Step, TipPolicy, Transfer, WellSet,
};
use crate::source::Span;
use crate::units::{Quantity, trim};
use crate::validate::DeviceLimits;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

const EPS: f64 = 1e-6;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub protocol: String,
    /// Steps in execution order.
    pub steps: Vec<PlannedStep>,
    /// Final volume and liquids of every well whose volume or contents changed.
    pub wells: Vec<WellVolume>,
}

impl Plan {
    pub fn operation_count(&self) -> usize {
        self.steps.iter().map(|s| s.operations.len()).sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    pub id: String,
    #[serde(rename = "do")]
    pub action: String,
    pub device: Option<String>,
    /// Steps that must finish first.
    pub after: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<Repeat>,
    /// What happens when the step fails, and how many attempts `retry` makes.
    pub on_error: ErrorPolicy,
    pub retries: u32,
    /// The longest the step may take, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    pub operations: Vec<Operation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    /// 0-based repetition, for steps with `repeat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition: Option<u32>,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    PickUpTip {
        rack: String,
        well: String,
        tip_capacity_ul: f64,
    },
    Aspirate {
        labware: String,
        well: String,
        volume_ul: f64,
    },
    Dispense {
        labware: String,
        well: String,
        volume_ul: f64,
    },
    Mix {
        labware: String,
        well: String,
        volume_ul: f64,
        cycles: u32,
    },
    DropTip,
    MoveLabware {
        labware: String,
        from: String,
        to: String,
    },
    Set {
        setpoints: Vec<PlannedSetpoint>,
        wait: bool,
    },
    Feed {
        pump: String,
        volume_ul: Option<f64>,
        rate_ml_min: Option<f64>,
        duration_s: Option<f64>,
    },
    PumpDispense {
        volume_ul: f64,
        rate_ml_min: Option<f64>,
    },
    Sample {
        read: Vec<String>,
    },
    Command {
        name: String,
    },
    Wait {
        duration_s: f64,
    },
    WaitUntil {
        condition: String,
        /// The condition, read: any group holds when all its terms hold.
        any: Vec<Vec<ConditionTerm>>,
        timeout_s: Option<f64>,
        poll_s: f64,
    },
    Prompt {
        message: String,
    },
    Log {
        message: String,
    },
}

/// One comparison of a `wait_until` condition, in canonical units.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionTerm {
    pub role: String,
    pub signal: String,
    pub op: crate::protocol::condition::Op,
    pub value: f64,
}

impl ConditionTerm {
    pub fn holds(&self, reading: f64) -> bool {
        self.op.holds(reading, self.value)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedSetpoint {
    pub name: String,
    pub value: Quantity,
}

#[derive(Debug, Clone, Serialize)]
pub struct WellVolume {
    pub labware: String,
    pub well: String,
    pub volume_ul: f64,
    pub liquids: Vec<String>,
}

/// Most operations a protocol may expand to; beyond it the plan stops, so a
/// runaway `repeat` cannot exhaust memory.
pub const MAX_OPERATIONS: usize = 2_000_000;

/// Default poll interval of `wait_until`.
pub const DEFAULT_POLL_S: f64 = 10.0;

/// Steps in execution order: `after` respected, otherwise file order (a
/// step that may start is taken in file order among those that may).
pub fn execution_order(p: &Protocol) -> Vec<usize> {
    let n = p.steps.len();
    let index: HashMap<&str, usize> = p
        .steps
        .iter()
        .enumerate()
        .rev()
        .map(|(i, s)| (s.id.value.as_str(), i))
        .collect();
    let mut waiting_for = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in p.steps.iter().enumerate() {
        for d in dependencies(&index, i, s) {
            if d != i {
                waiting_for[i] += 1;
                dependents[d].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..n)
        .filter(|&i| waiting_for[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            waiting_for[d] -= 1;
            if waiting_for[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    // Steps in a cycle (already reported by validation) go last, in file order.
    if order.len() < n {
        let mut placed = vec![false; n];
        for &i in &order {
            placed[i] = true;
        }
        order.extend((0..n).filter(|&i| !placed[i]));
    }
    order
}

fn dependencies(index: &HashMap<&str, usize>, i: usize, s: &Step) -> Vec<usize> {
    match &s.after {
        Some(list) => list
            .iter()
            .filter_map(|d| index.get(d.value.as_str()).copied())
            .collect(),
        None if i > 0 => vec![i - 1],
        None => Vec::new(),
    }
}

/// Expands the protocol into operations and tracks the deck through them.
pub fn plan(p: &Protocol, lab: &dyn DeviceLimits) -> (Plan, Vec<Diagnostic>) {
    let mut t = Tracker::new(p, lab);
    let order = execution_order(p);
    let mut steps = Vec::with_capacity(order.len());
    let mut total = 0usize;
    for &i in &order {
        let s = &p.steps[i];
        let after = match &s.after {
            Some(list) => list.iter().map(|d| d.value.clone()).collect(),
            None if i > 0 => vec![p.steps[i - 1].id.value.clone()],
            None => Vec::new(),
        };
        let times = s.repeat.map_or(1, |r| r.times);
        let mut operations = Vec::new();
        t.step_errors.clear();
        for rep in 0..times {
            if total + operations.len() > MAX_OPERATIONS {
                break;
            }
            let start = operations.len();
            t.expand(s, &mut operations);
            if s.repeat.is_some() {
                for op in &mut operations[start..] {
                    op.repetition = Some(rep);
                }
            }
        }
        // One message per rule per step, with the count of the others.
        for &(_, index, count) in &t.step_errors {
            if count > 1 {
                t.diags[index]
                    .message
                    .push_str(&format!(" ({} more like this in this step)", count - 1));
            }
        }
        total += operations.len();
        steps.push(PlannedStep {
            id: s.id.value.clone(),
            action: s.action_name.value.clone(),
            device: s.role.as_ref().map(|r| r.value.clone()),
            after,
            repeat: s.repeat,
            on_error: s.on_error,
            retries: s.retries,
            timeout_s: s.timeout.as_ref().map(|t| t.value.value),
            operations,
        });
        if total > MAX_OPERATIONS {
            t.diags.push(
                Diagnostic::error(
                    "too-many-operations",
                    s.span,
                    format!("the protocol expands to more than {} million operations; planning stopped at this step", MAX_OPERATIONS / 1_000_000),
                )
                .with_hint("use fewer repetitions, or split the protocol into several runs"),
            );
            break;
        }
    }
    let wells = t.changed_wells();
    (
        Plan {
            protocol: p.name.clone(),
            steps,
            wells,
        },
        t.diags,
    )
}

#[derive(Debug, Clone)]
struct WellState {
    volume: f64,
    initial: f64,
    capacity: f64,
    liquids: Vec<Arc<str>>,
    initial_liquids: Vec<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Tip {
    capacity: f64,
    volume: f64,
    liquids: Vec<Arc<str>>,
    /// The step that picked it up, for messages.
    step: String,
}

struct Tracker<'p> {
    p: &'p Protocol,
    lab: &'p dyn DeviceLimits,
    /// (labware index, well index) -> state, created on first touch.
    wells: HashMap<(usize, usize), WellState>,
    tips: HashMap<String, Tip>,
    /// Tips used so far in each rack (by labware index).
    tips_used: HashMap<usize, usize>,
    locations: Vec<Option<Location>>,
    occupancy: HashMap<Location, usize>,
    diags: Vec<Diagnostic>,
    /// Tracking errors in the current step: (code, index in `diags`, count).
    /// Only the first of each code is reported.
    step_errors: Vec<(&'static str, usize, usize)>,
    step_id: String,
}

impl<'p> Tracker<'p> {
    fn new(p: &'p Protocol, lab: &'p dyn DeviceLimits) -> Self {
        let mut t = Tracker {
            p,
            lab,
            wells: HashMap::new(),
            tips: HashMap::new(),
            tips_used: HashMap::new(),
            locations: p
                .labware
                .values()
                .map(|l| l.at.as_ref().map(|a| a.value.clone()))
                .collect(),
            occupancy: HashMap::new(),
            diags: Vec::new(),
            step_errors: Vec::new(),
            step_id: String::new(),
        };
        for (i, loc) in t.locations.iter().enumerate() {
            if let Some(loc) = loc {
                t.occupancy.entry(loc.clone()).or_insert(i);
            }
        }
        for (li, lw) in p.labware.values().enumerate() {
            for c in &lw.contents {
                let liquid: Arc<str> = Arc::from(c.liquid.as_str());
                for w in &c.wells {
                    let Some(wi) = lw.definition.wells.get_index_of(w) else {
                        continue;
                    };
                    let capacity = lw.definition.wells[wi].capacity_ul;
                    let state = t.wells.entry((li, wi)).or_insert_with(|| WellState {
                        volume: 0.0,
                        initial: 0.0,
                        capacity,
                        liquids: Vec::new(),
                        initial_liquids: Vec::new(),
                    });
                    state.volume += c.volume_ul;
                    state.initial = state.volume;
                    if !state.liquids.contains(&liquid) {
                        state.liquids.push(liquid.clone());
                        state.initial_liquids.push(liquid.clone());
                    }
                    if state.volume > capacity + EPS {
                        t.diags.push(
                            Diagnostic::error(
                                "overfill",
                                c.span,
                                format!(
                                    "{}:{w} would hold {}, more than its capacity of {}",
                                    lw.name,
                                    Quantity::volume_ul(state.volume),
                                    Quantity::volume_ul(capacity)
                                ),
                            )
                            .with_hint(format!(
                                "{} wells hold at most {}",
                                lw.definition.load_name,
                                Quantity::volume_ul(capacity)
                            )),
                        );
                    }
                }
            }
        }
        t
    }

    fn error(&mut self, code: &'static str, span: Span, message: String, hint: Option<String>) {
        if let Some(seen) = self.step_errors.iter_mut().find(|e| e.0 == code) {
            seen.2 += 1;
            return;
        }
        self.step_errors.push((code, self.diags.len(), 1));
        self.diags.push(
            Diagnostic::error(code, span, format!("step `{}`: {message}", self.step_id))
                .with_optional_hint(hint),
        );
    }

    fn labware_index(&self, name: &str) -> Option<usize> {
        self.p.labware.get_index_of(name)
    }

    fn definition(&self, li: usize) -> &'p LabwareDefinition {
        &self.p.labware[li].definition
    }

    /// Whether labware is where liquid handler `lh` can reach it; reports if not.
    fn reachable(&mut self, lh: &str, li: usize, span: Span) -> bool {
        let name = self.p.labware[li].name.clone();
        let Some(loc) = self.locations[li].clone() else {
            self.error(
                "not-placed",
                span,
                format!("labware `{name}` is used before it is placed"),
                Some(format!("give [labware.{name}] an `at = \"{lh}:<slot>\"`, or unload it to the deck first")),
            );
            return false;
        };
        if loc.role == lh {
            return true;
        }
        let on_module = self
            .p
            .devices
            .get(&loc.role)
            .and_then(|d| d.on_deck.as_ref())
            .is_some_and(|at| at.role == lh);
        if on_module {
            return true;
        }
        self.error(
            "not-reachable",
            span,
            format!("labware `{name}` is at {loc}, not on {lh}'s deck"),
            Some(format!("unload it to a slot of {lh} before pipetting")),
        );
        false
    }

    fn well_state(&mut self, li: usize, well: &str) -> Option<(usize, &mut WellState)> {
        let def = &self.p.labware[li].definition;
        let wi = def.wells.get_index_of(well)?;
        let capacity = def.wells[wi].capacity_ul;
        Some((
            wi,
            self.wells.entry((li, wi)).or_insert_with(|| WellState {
                volume: 0.0,
                initial: 0.0,
                capacity,
                liquids: Vec::new(),
                initial_liquids: Vec::new(),
            }),
        ))
    }

    fn expand(&mut self, s: &Step, ops: &mut Vec<Operation>) {
        self.step_id = s.id.value.clone();
        let role = s
            .role
            .as_ref()
            .map(|r| r.value.as_str())
            .unwrap_or_default();
        let mut push = |op: Op| {
            ops.push(Operation {
                repetition: None,
                op,
            })
        };
        match &s.action {
            Action::Transfer(t) => self.transfer(role, t, ops),
            Action::Aspirate { from, volume } => {
                if let Some(li) = self.wells_on_deck(role, from) {
                    for w in &from.wells {
                        self.aspirate(role, li, w, volume.value.value, from.span, ops);
                    }
                }
            }
            Action::Dispense { to, volume } => {
                if let Some(li) = self.wells_on_deck(role, to) {
                    for w in &to.wells {
                        self.dispense(role, li, w, volume.value.value, to.span, ops);
                    }
                }
            }
            Action::Mix { at, volume, cycles } => {
                if let Some(li) = self.wells_on_deck(role, at) {
                    let mix = MixSpec {
                        cycles: *cycles,
                        volume_ul: volume.value.value,
                    };
                    for w in &at.wells {
                        self.mix(role, li, w, mix, at.span, ops);
                    }
                }
            }
            Action::PickUpTip { tip_rack } => {
                let rack = match tip_rack {
                    Some(r) => self.labware_index(&r.value).map(|li| (li, r.span)),
                    None => None,
                };
                self.pick_up(role, rack, None, s.action_name.span, ops);
            }
            Action::DropTip => self.drop_tip(role, s.action_name.span, ops),
            Action::Load { labware, slot } => {
                self.load(role, labware, slot.as_ref().map(|s| (s.value, s.span)), ops)
            }
            Action::Unload { labware, to } => self.unload(role, labware, to, ops),
            Action::Set {
                setpoints,
                wait,
                duration,
            } => {
                push(Op::Set {
                    setpoints: setpoints
                        .iter()
                        .map(|sp| PlannedSetpoint {
                            name: sp.setpoint.to_string(),
                            value: sp.value.value,
                        })
                        .collect(),
                    wait: *wait,
                });
                // `shake { duration }` and a pump's `run { duration }`: the motor runs
                // for that long (a wait, which a pause can interrupt), then stops.
                if let Some(d) = duration {
                    push(Op::Wait {
                        duration_s: d.value.value,
                    });
                    let kind = self.p.devices.get(role).map(|d| d.kind);
                    let stop = if kind == Some(crate::catalogue::DeviceKind::Pump) {
                        "stop"
                    } else {
                        "stop_shaking"
                    };
                    push(Op::Command {
                        name: stop.to_string(),
                    });
                }
            }
            Action::Feed {
                pump,
                volume,
                rate,
                duration,
            } => push(Op::Feed {
                pump: pump.value.clone(),
                volume_ul: volume.as_ref().map(|v| v.value.value),
                rate_ml_min: rate.as_ref().map(|v| v.value.value),
                duration_s: duration.as_ref().map(|v| v.value.value),
            }),
            Action::PumpDispense { volume, rate } => push(Op::PumpDispense {
                volume_ul: volume.value.value,
                rate_ml_min: rate.as_ref().map(|r| r.value.value),
            }),
            Action::Sample { read } => push(Op::Sample {
                read: read.iter().map(|r| r.value.clone()).collect(),
            }),
            Action::Command { name } => push(Op::Command {
                name: name.to_string(),
            }),
            Action::Wait { duration } => push(Op::Wait {
                duration_s: duration.value.value,
            }),
            Action::WaitUntil { condition, poll } => push(Op::WaitUntil {
                condition: condition.text.clone(),
                any: condition
                    .any
                    .iter()
                    .map(|group| {
                        group
                            .iter()
                            .map(|c| ConditionTerm {
                                role: c.role.clone(),
                                signal: c.signal.clone(),
                                op: c.op,
                                value: c.value.value,
                            })
                            .collect()
                    })
                    .collect(),
                timeout_s: s.timeout.as_ref().map(|t| t.value.value),
                poll_s: poll.as_ref().map_or(DEFAULT_POLL_S, |p| p.value.value),
            }),
            Action::Prompt { message } => push(Op::Prompt {
                message: message.clone(),
            }),
            Action::Log { message } => push(Op::Log {
                message: message.clone(),
            }),
            Action::Invalid => {}
        }
    }

    fn wells_on_deck(&mut self, lh: &str, set: &WellSet) -> Option<usize> {
        let li = self.labware_index(&set.labware)?;
        self.reachable(lh, li, set.span).then_some(li)
    }

    fn transfer(&mut self, lh: &str, t: &Transfer, ops: &mut Vec<Operation>) {
        let (Some(src), Some(dst)) = (
            self.labware_index(&t.from.labware),
            self.labware_index(&t.to.labware),
        ) else {
            return;
        };
        let (n_from, n_to) = (t.from.wells.len(), t.to.wells.len());
        let pairs: Vec<(&str, &str)> = if n_from == n_to {
            t.from
                .wells
                .iter()
                .zip(&t.to.wells)
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect()
        } else if n_from == 1 {
            t.to.wells
                .iter()
                .map(|b| (t.from.wells[0].as_str(), b.as_str()))
                .collect()
        } else if n_to == 1 {
            t.from
                .wells
                .iter()
                .map(|a| (a.as_str(), t.to.wells[0].as_str()))
                .collect()
        } else {
            self.error(
                "transfer-shape",
                t.to.span,
                format!("a transfer from {n_from} wells to {n_to} wells has no pairing"),
                Some("use the same number of wells (pairs), one source (distribute) or one destination (pool)".into()),
            );
            return;
        };
        if !self.reachable(lh, src, t.from.span) || !self.reachable(lh, dst, t.to.span) {
            return;
        }
        let volume = t.volume.value.value;
        // The largest volume the tip must hold, and where it was written.
        let needed = [
            Some((volume, t.volume.span)),
            t.mix_before.as_ref().map(|m| (m.volume_ul, m.span)),
            t.mix_after.as_ref().map(|m| (m.volume_ul, m.span)),
        ]
        .into_iter()
        .flatten()
        .fold((0.0, t.volume.span), |a, b| if b.0 > a.0 { b } else { a });
        let rack = match &t.tip_rack {
            Some(r) => self.labware_index(&r.value).map(|li| (li, r.span)),
            None => None,
        };
        let span = t.tips.span;
        let tips = t.tips.value;
        if tips != TipPolicy::Never && self.tips.contains_key(lh) {
            let step = self.tips[lh].step.clone();
            self.error(
                "tip-already-on",
                span,
                format!("{lh} already has a tip on (picked up in step `{step}`)"),
                Some("drop it first, or use tips = \"never\" to pipette with it".into()),
            );
            return;
        }
        // When no tip can be had, the step stops here and leaves no tip behind,
        // so later steps are checked as the operator would run them.
        if tips == TipPolicy::Once && !self.pick_up(lh, rack, Some(needed), span, ops) {
            self.tips.remove(lh);
            return;
        }
        for (a, b) in pairs {
            if tips == TipPolicy::Always && !self.pick_up(lh, rack, Some(needed), span, ops) {
                self.tips.remove(lh);
                return;
            }
            if let Some(m) = &t.mix_before {
                self.mix(lh, src, a, m.value, m.span, ops);
            }
            self.aspirate(lh, src, a, volume, t.from.span, ops);
            self.dispense(lh, dst, b, volume, t.to.span, ops);
            if let Some(m) = &t.mix_after {
                self.mix(lh, dst, b, m.value, m.span, ops);
            }
            if tips == TipPolicy::Always {
                self.drop_tip(lh, span, ops);
            }
        }
        if tips == TipPolicy::Once {
            self.drop_tip(lh, span, ops);
        }
    }

    /// Picks up a tip: from `rack` if given, else from the smallest tip that holds
    /// `needed` (or, with no volume known, the first rack with tips left).
    fn pick_up(
        &mut self,
        lh: &str,
        rack: Option<(usize, Span)>,
        needed: Option<(f64, Span)>,
        span: Span,
        ops: &mut Vec<Operation>,
    ) -> bool {
        if let Some(tip) = self.tips.get(lh) {
            let step = tip.step.clone();
            self.error(
                "tip-already-on",
                span,
                format!("picking up a tip while {lh} already has one (from step `{step}`)"),
                Some("drop the tip first".into()),
            );
            return false;
        }
        let racks: Vec<usize> = match rack {
            Some((li, rack_span)) => {
                let def = self.definition(li);
                if !def.is_tiprack {
                    let name = self.p.labware[li].name.clone();
                    self.error(
                        "not-a-tip-rack",
                        rack_span,
                        format!("`{name}` is not a tip rack"),
                        None,
                    );
                    return false;
                }
                if !self.reachable(lh, li, rack_span) {
                    return false;
                }
                if let Some((v, volume_span)) = needed {
                    let cap = def.max_capacity_ul();
                    if v > cap + EPS {
                        let name = self.p.labware[li].name.clone();
                        self.error(
                            "tip-too-small",
                            volume_span,
                            format!(
                                "{} does not fit in a tip of `{name}` ({})",
                                Quantity::volume_ul(v),
                                Quantity::volume_ul(cap)
                            ),
                            Some(
                                "use a larger tip rack, or split the volume over several steps"
                                    .into(),
                            ),
                        );
                        return false;
                    }
                }
                vec![li]
            }
            None => {
                let mut candidates: Vec<(f64, usize)> = self
                    .p
                    .labware
                    .values()
                    .enumerate()
                    .filter(|(li, l)| l.definition.is_tiprack && self.on_deck_of(lh, *li))
                    .map(|(li, l)| (l.definition.max_capacity_ul(), li))
                    .collect();
                if candidates.is_empty() {
                    self.error(
                        "no-tips",
                        span,
                        format!("{lh} has no tip rack on its deck"),
                        Some(format!("place one, e.g. [labware.tips] type = \"opentrons_96_tiprack_300ul\", at = \"{lh}:1\"")),
                    );
                    return false;
                }
                // Stable: equal capacities keep declaration order.
                candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
                match needed {
                    Some((v, volume_span)) => {
                        let Some(&(cap, _)) = candidates.iter().find(|(c, _)| *c + EPS >= v) else {
                            let largest = candidates.last().map_or(0.0, |c| c.0);
                            self.error(
                                "tip-too-small",
                                volume_span,
                                format!(
                                    "{} does not fit in any tip on {lh}'s deck (largest: {})",
                                    Quantity::volume_ul(v),
                                    Quantity::volume_ul(largest)
                                ),
                                Some("place a larger tip rack, or split the volume over several steps".into()),
                            );
                            return false;
                        };
                        candidates
                            .into_iter()
                            .filter(|(c, _)| *c == cap)
                            .map(|(_, li)| li)
                            .collect()
                    }
                    None => {
                        // Declaration order, whatever the size.
                        let mut all: Vec<usize> =
                            candidates.into_iter().map(|(_, li)| li).collect();
                        all.sort_unstable();
                        all
                    }
                }
            }
        };
        for &li in &racks {
            let def = self.definition(li);
            let used = self.tips_used.get(&li).copied().unwrap_or(0);
            if let Some(well) = def.wells_in_order().nth(used) {
                self.tips_used.insert(li, used + 1);
                let capacity = well.capacity_ul;
                ops.push(Operation {
                    repetition: None,
                    op: Op::PickUpTip {
                        rack: self.p.labware[li].name.clone(),
                        well: well.name.clone(),
                        tip_capacity_ul: capacity,
                    },
                });
                self.tips.insert(
                    lh.to_string(),
                    Tip {
                        capacity,
                        volume: 0.0,
                        liquids: Vec::new(),
                        step: self.step_id.clone(),
                    },
                );
                return true;
            }
        }
        let names: Vec<String> = racks
            .iter()
            .map(|&li| format!("`{}`", self.p.labware[li].name))
            .collect();
        let total: usize = racks
            .iter()
            .map(|&li| self.definition(li).wells.len())
            .sum();
        self.error(
            "out-of-tips",
            span,
            format!(
                "out of tips: all {total} tips of {} are used",
                names.join(", ")
            ),
            Some("place another tip rack of this size, or reuse tips with tips = \"once\"".into()),
        );
        // Go on as if a tip were found, so later steps are still checked.
        self.tips.insert(
            lh.to_string(),
            Tip {
                capacity: f64::INFINITY,
                volume: 0.0,
                liquids: Vec::new(),
                step: self.step_id.clone(),
            },
        );
        false
    }

    fn on_deck_of(&self, lh: &str, li: usize) -> bool {
        match &self.locations[li] {
            Some(loc) if loc.role == lh => true,
            Some(loc) => self
                .p
                .devices
                .get(&loc.role)
                .and_then(|d| d.on_deck.as_ref())
                .is_some_and(|at| at.role == lh),
            None => false,
        }
    }

    fn drop_tip(&mut self, lh: &str, span: Span, ops: &mut Vec<Operation>) {
        if self.tips.remove(lh).is_none() {
            self.error(
                "no-tip",
                span,
                format!("{lh} has no tip to drop"),
                Some("pick up a tip first".into()),
            );
            return;
        }
        ops.push(Operation {
            repetition: None,
            op: Op::DropTip,
        });
    }

    fn tip_or_error(&mut self, lh: &str, span: Span, doing: &str) -> bool {
        if self.tips.contains_key(lh) {
            return true;
        }
        self.error(
            "no-tip",
            span,
            format!("{doing} without a tip on {lh}"),
            Some(
                "pick up a tip first (pick_up_tip), or use a transfer with tips = \"once\"".into(),
            ),
        );
        // Assume one, so the rest of the protocol is still checked.
        self.tips.insert(
            lh.to_string(),
            Tip {
                capacity: f64::INFINITY,
                volume: 0.0,
                liquids: Vec::new(),
                step: self.step_id.clone(),
            },
        );
        false
    }

    fn aspirate(
        &mut self,
        lh: &str,
        li: usize,
        well: &str,
        volume: f64,
        span: Span,
        ops: &mut Vec<Operation>,
    ) {
        self.tip_or_error(lh, span, "aspirating");
        let name = self.p.labware[li].name.clone();
        let Some((_, state)) = self.well_state(li, well) else {
            return;
        };
        let available = state.volume;
        let initial = state.initial;
        let liquids = state.liquids.clone();
        if volume > available + EPS {
            let hint = if initial <= EPS && available <= EPS {
                format!(
                    "nothing was put in it; declare what it holds: [labware.{name}] contents = {{ {well} = \"<volume> <liquid>\" }}"
                )
            } else if available + EPS < initial {
                format!(
                    "it started with {}; earlier aspirations took {}. Put more in `contents` or lower the volume",
                    Quantity::volume_ul(initial),
                    Quantity::volume_ul(initial - available)
                )
            } else if initial > EPS {
                "lower the volume, or declare more in `contents`".into()
            } else {
                "lower the volume, or put more into the well first".into()
            };
            self.error(
                "insufficient-volume",
                span,
                format!(
                    "aspirating {} from {name}:{well}, which holds only {}",
                    Quantity::volume_ul(volume),
                    Quantity::volume_ul(available)
                ),
                Some(hint),
            );
        }
        if let Some((_, state)) = self.well_state(li, well) {
            state.volume = (state.volume - volume).max(0.0);
            if state.volume <= EPS {
                state.liquids.clear();
            }
        }
        if let Some(tip) = self.tips.get_mut(lh) {
            tip.volume += volume;
            for l in liquids {
                if !tip.liquids.contains(&l) {
                    tip.liquids.push(l);
                }
            }
            if tip.volume > tip.capacity + EPS {
                // Not clamped: the dispense that follows should see what was asked for.
                let (v, c) = (tip.volume, tip.capacity);
                self.error(
                    "tip-overfill",
                    span,
                    format!(
                        "aspirating {} from {name}:{well} puts {} in a {} tip",
                        Quantity::volume_ul(volume),
                        Quantity::volume_ul(v),
                        Quantity::volume_ul(c)
                    ),
                    Some("dispense first, or use a larger tip".into()),
                );
            }
        }
        ops.push(Operation {
            repetition: None,
            op: Op::Aspirate {
                labware: name,
                well: well.to_string(),
                volume_ul: volume,
            },
        });
    }

    fn dispense(
        &mut self,
        lh: &str,
        li: usize,
        well: &str,
        volume: f64,
        span: Span,
        ops: &mut Vec<Operation>,
    ) {
        self.tip_or_error(lh, span, "dispensing");
        let name = self.p.labware[li].name.clone();
        let mut liquids = Vec::new();
        if let Some(tip) = self.tips.get_mut(lh) {
            let held = tip.volume;
            tip.volume = (tip.volume - volume).max(0.0);
            liquids = tip.liquids.clone();
            if tip.volume <= EPS {
                tip.liquids.clear();
            }
            if volume > held + EPS {
                self.error(
                    "tip-underfill",
                    span,
                    format!(
                        "dispensing {} into {name}:{well} but the tip holds only {}",
                        Quantity::volume_ul(volume),
                        Quantity::volume_ul(held)
                    ),
                    Some("aspirate at least as much as you dispense".into()),
                );
            }
        }
        let Some((_, state)) = self.well_state(li, well) else {
            return;
        };
        state.volume += volume;
        for l in liquids {
            if !state.liquids.contains(&l) {
                state.liquids.push(l);
            }
        }
        let (v, cap) = (state.volume, state.capacity);
        if v > cap + EPS {
            state.volume = cap;
            self.error(
                "overfill",
                span,
                format!(
                    "dispensing {} into {name}:{well} makes {}, more than its capacity of {}",
                    Quantity::volume_ul(volume),
                    Quantity::volume_ul(v),
                    Quantity::volume_ul(cap)
                ),
                Some("lower the volume or use a larger well".into()),
            );
        }
        ops.push(Operation {
            repetition: None,
            op: Op::Dispense {
                labware: name,
                well: well.to_string(),
                volume_ul: volume,
            },
        });
    }

    fn mix(
        &mut self,
        lh: &str,
        li: usize,
        well: &str,
        mix: MixSpec,
        span: Span,
        ops: &mut Vec<Operation>,
    ) {
        self.tip_or_error(lh, span, "mixing");
        let name = self.p.labware[li].name.clone();
        let Some((_, state)) = self.well_state(li, well) else {
            return;
        };
        let available = state.volume;
        if mix.volume_ul > available + EPS {
            self.error(
                "insufficient-volume",
                span,
                format!(
                    "mixing {} in {name}:{well}, which holds only {}",
                    Quantity::volume_ul(mix.volume_ul),
                    Quantity::volume_ul(available)
                ),
                Some("mix with a volume smaller than what the well holds".into()),
            );
        }
        if let Some(tip) = self.tips.get(lh)
            && mix.volume_ul + tip.volume > tip.capacity + EPS
        {
            let cap = tip.capacity;
            self.error(
                "tip-overfill",
                span,
                format!(
                    "mixing {} does not fit in a {} tip",
                    Quantity::volume_ul(mix.volume_ul),
                    Quantity::volume_ul(cap)
                ),
                Some("lower the mix volume".into()),
            );
        }
        ops.push(Operation {
            repetition: None,
            op: Op::Mix {
                labware: name,
                well: well.to_string(),
                volume_ul: mix.volume_ul,
                cycles: mix.cycles,
            },
        });
    }

    fn load(
        &mut self,
        inc: &str,
        labware: &crate::source::Sp<String>,
        slot: Option<(u32, Span)>,
        ops: &mut Vec<Operation>,
    ) {
        let Some(li) = self.labware_index(&labware.value) else {
            return;
        };
        let Some(from) = self.locations[li].clone() else {
            self.error(
                "not-placed",
                labware.span,
                format!("labware `{}` is used before it is placed", labware.value),
                Some(format!("give [labware.{}] an `at`", labware.value)),
            );
            return;
        };
        if from.role == inc {
            self.error(
                "already-loaded",
                labware.span,
                format!(
                    "`{}` is already in {inc} (slot {})",
                    labware.value, from.slot
                ),
                None,
            );
            return;
        }
        let kind = self.p.devices.get(inc).map(|d| d.kind);
        let slots = kind.map_or(0, |k| self.lab.slots(inc, k));
        let target = match slot {
            Some((s, span)) => {
                let loc = Location {
                    role: inc.to_string(),
                    slot: s,
                };
                if let Some(&other) = self.occupancy.get(&loc) {
                    let other = self.p.labware[other].name.clone();
                    self.error(
                        "slot-taken",
                        span,
                        format!("{inc} slot {s} already holds `{other}`"),
                        None,
                    );
                    return;
                }
                loc
            }
            None => match (1..=slots)
                .map(|s| Location {
                    role: inc.to_string(),
                    slot: s,
                })
                .find(|l| !self.occupancy.contains_key(l))
            {
                Some(l) => l,
                None => {
                    self.error(
                        "no-free-slot",
                        labware.span,
                        format!("{inc} has no free slot (all {slots} hold labware)"),
                        None,
                    );
                    return;
                }
            },
        };
        self.move_labware(li, from, target, ops);
    }

    fn unload(
        &mut self,
        inc: &str,
        labware: &crate::source::Sp<String>,
        to: &crate::source::Sp<Location>,
        ops: &mut Vec<Operation>,
    ) {
        let Some(li) = self.labware_index(&labware.value) else {
            return;
        };
        let from = self.locations[li].clone();
        let Some(from) = from.filter(|f| f.role == inc) else {
            let at = self.locations[li]
                .as_ref()
                .map_or("not placed".to_string(), |l| format!("at {l}"));
            self.error(
                "not-loaded",
                labware.span,
                format!("`{}` is not in {inc} ({at})", labware.value),
                Some(format!("load it into {inc} first")),
            );
            return;
        };
        if let Some(&other) = self.occupancy.get(&to.value)
            && other != li
        {
            let other = self.p.labware[other].name.clone();
            self.error(
                "slot-taken",
                to.span,
                format!("{} already holds `{other}`", to.value),
                Some("choose a free slot".into()),
            );
            return;
        }
        self.move_labware(li, from, to.value.clone(), ops);
    }

    fn move_labware(&mut self, li: usize, from: Location, to: Location, ops: &mut Vec<Operation>) {
        self.occupancy.remove(&from);
        self.occupancy.insert(to.clone(), li);
        self.locations[li] = Some(to.clone());
        ops.push(Operation {
            repetition: None,
            op: Op::MoveLabware {
                labware: self.p.labware[li].name.clone(),
                from: from.to_string(),
                to: to.to_string(),
            },
        });
    }

    fn changed_wells(&self) -> Vec<WellVolume> {
        let mut keys: Vec<&(usize, usize)> = self
            .wells
            .iter()
            .filter(|(_, s)| (s.volume - s.initial).abs() > EPS || s.liquids != s.initial_liquids)
            .map(|(k, _)| k)
            .collect();
        // Labware in declaration order, wells column by column.
        keys.sort_by_key(|&&(li, wi)| {
            let def = self.definition(li);
            let name = &def.wells[wi].name;
            (
                li,
                def.grid_position(name)
                    .map(|(r, c)| (c, r))
                    .unwrap_or((usize::MAX, wi)),
            )
        });
        keys.into_iter()
            .map(|&(li, wi)| {
                let s = &self.wells[&(li, wi)];
                WellVolume {
                    labware: self.p.labware[li].name.clone(),
                    well: self.definition(li).wells[wi].name.clone(),
                    volume_ul: (s.volume * 1e6).round() / 1e6,
                    liquids: s.liquids.iter().map(|l| l.to_string()).collect(),
                }
            })
            .collect()
    }
}

/// One line per operation, for `biofoundry plan`.
pub fn describe(op: &Op) -> String {
    let v = |ul: f64| Quantity::volume_ul(ul).to_string();
    match op {
        Op::PickUpTip {
            rack,
            well,
            tip_capacity_ul,
        } => format!("pick up tip {rack}:{well} ({})", v(*tip_capacity_ul)),
        Op::Aspirate {
            labware,
            well,
            volume_ul,
        } => format!("aspirate {} from {labware}:{well}", v(*volume_ul)),
        Op::Dispense {
            labware,
            well,
            volume_ul,
        } => format!("dispense {} into {labware}:{well}", v(*volume_ul)),
        Op::Mix {
            labware,
            well,
            volume_ul,
            cycles,
        } => format!("mix {} x{cycles} in {labware}:{well}", v(*volume_ul)),
        Op::DropTip => "drop tip".into(),
        Op::MoveLabware { labware, from, to } => format!("move {labware} from {from} to {to}"),
        Op::Set { setpoints, wait } => {
            let list: Vec<String> = setpoints
                .iter()
                .map(|s| format!("{} = {}", s.name, s.value))
                .collect();
            let mut text = format!("set {}", list.join(", "));
            if *wait {
                text.push_str(" and wait until reached");
            }
            text
        }
        Op::Feed {
            pump,
            volume_ul,
            rate_ml_min,
            duration_s,
        } => match (volume_ul, rate_ml_min, duration_s) {
            (Some(vol), _, _) => format!("feed {} with pump {pump}", v(*vol)),
            (_, Some(r), Some(d)) => format!(
                "feed with pump {pump} at {} mL/min for {}",
                trim(*r),
                Quantity::seconds(*d)
            ),
            _ => format!("feed with pump {pump}"),
        },
        Op::PumpDispense { volume_ul, .. } => format!("pump {}", v(*volume_ul)),
        Op::Sample { read } => format!("sample {}", read.join(", ")),
        Op::Command { name } => name.replace('_', " "),
        Op::Wait { duration_s } => format!("wait {}", Quantity::seconds(*duration_s)),
        Op::WaitUntil {
            condition,
            timeout_s,
            poll_s,
            ..
        } => {
            let mut text = format!(
                "wait until {condition} (every {}",
                Quantity::seconds(*poll_s)
            );
            if let Some(t) = timeout_s {
                text.push_str(&format!(", at most {}", Quantity::seconds(*t)));
            }
            text.push(')');
            text
        }
        Op::Prompt { message } => format!("ask the operator: {message}"),
        Op::Log { message } => format!("log: {message}"),
    }
}
