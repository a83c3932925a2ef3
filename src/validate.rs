//! Structural checks across a parsed protocol: step ids and `after`
//! dependencies, roles, deck slots, and device limits.
//!
//! Limits come from a [`DeviceLimits`] source: the kind catalogue's simulated
//! lab when no lab file is given, the lab's device profiles otherwise.

use crate::catalogue::DeviceKind;
use crate::diagnostics::{Diagnostic, did_you_mean};
use crate::protocol::{Action, Location, Protocol};
use crate::source::{Sp, Span};
use crate::units::Limits;
use std::collections::HashMap;

/// Where setpoint limits and slot counts come from.
pub trait DeviceLimits {
    /// Limits of `setpoint` on the device bound to `role`, if it has that setpoint.
    fn setpoint_limits(&self, role: &str, kind: DeviceKind, setpoint: &str) -> Option<Limits>;
    /// Labware positions of the device bound to `role`.
    fn slots(&self, role: &str, kind: DeviceKind) -> u32;
    /// Names the source in messages, e.g. "the built-in simulated lab".
    fn description(&self) -> String;
    /// Why the device bound to `role` cannot do `what`, if it cannot (a lab's
    /// instrument may lack what its kind allows: an incubator without a shaker).
    fn lacks(&self, _role: &str, _kind: DeviceKind, _what: Capability<'_>) -> Option<String> {
        None
    }
}

/// Something a step or monitor asks of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability<'a> {
    Setpoint(&'a str),
    Signal(&'a str),
    Command(&'a str),
    Pump(&'a str),
}

/// The built-in simulated lab: one device of each kind, with the catalogue's limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimulatedLab;

impl DeviceLimits for SimulatedLab {
    fn setpoint_limits(&self, _role: &str, kind: DeviceKind, setpoint: &str) -> Option<Limits> {
        kind.spec().setpoint(setpoint).map(|s| s.limits())
    }
    fn slots(&self, _role: &str, kind: DeviceKind) -> u32 {
        kind.spec().slots
    }
    fn description(&self) -> String {
        "the built-in simulated lab".into()
    }
}

pub fn validate(p: &Protocol, lab: &dyn DeviceLimits) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    step_ids_and_dependencies(p, &mut out);
    unused_declarations(p, &mut out);
    places(p, lab, &mut out);
    setpoint_limits(p, lab, &mut out);
    capabilities(p, lab, &mut out);
    out
}

/// Every setpoint, signal, command and pump a protocol uses exists on the
/// device its role is bound to.
fn capabilities(p: &Protocol, lab: &dyn DeviceLimits, out: &mut Vec<Diagnostic>) {
    let mut need = |role: &str, what: Capability<'_>, span: Span| {
        let Some(device) = p.devices.get(role) else {
            return;
        };
        if let Some(reason) = lab.lacks(role, device.kind, what) {
            out.push(
                Diagnostic::error("not-on-device", span, reason)
                    .with_hint(format!("in {}", lab.description())),
            );
        }
    };
    for s in &p.steps {
        for group in match &s.action {
            Action::WaitUntil { condition, .. } => condition.any.as_slice(),
            _ => &[],
        } {
            for c in group {
                need(&c.role, Capability::Signal(&c.signal), c.span);
            }
        }
        let Some(role) = &s.role else { continue };
        match &s.action {
            Action::Set { setpoints, .. } => {
                for sp in setpoints {
                    need(
                        &role.value,
                        Capability::Setpoint(sp.setpoint),
                        sp.value.span,
                    );
                }
            }
            Action::Sample { read } => {
                for r in read {
                    need(&role.value, Capability::Signal(&r.value), r.span);
                }
            }
            Action::Command { name } => {
                need(&role.value, Capability::Command(name), s.action_name.span)
            }
            Action::Feed { pump, .. } => {
                need(&role.value, Capability::Pump(&pump.value), pump.span)
            }
            _ => {}
        }
    }
    for m in &p.monitors {
        for r in &m.read {
            need(&m.role.value, Capability::Signal(&r.value), r.span);
        }
    }
}

fn step_ids_and_dependencies(p: &Protocol, out: &mut Vec<Diagnostic>) {
    let mut by_id: HashMap<&str, usize> = HashMap::with_capacity(p.steps.len());
    for (i, s) in p.steps.iter().enumerate() {
        if let Some(&first) = by_id.get(s.id.value.as_str()) {
            out.push(
                Diagnostic::error(
                    "duplicate-id",
                    s.id.span,
                    format!("step id `{}` is used twice", s.id.value),
                )
                .with_related(p.steps[first].id.span, "first used here")
                .with_hint("give every step a unique id"),
            );
        } else {
            by_id.insert(&s.id.value, i);
        }
    }
    // Edges: step -> the steps it waits for (explicit `after` only; the implicit
    // "previous step" always points backwards and cannot close a cycle).
    let mut edges: Vec<Vec<(usize, Span)>> = vec![Vec::new(); p.steps.len()];
    for (i, s) in p.steps.iter().enumerate() {
        for dep in s.after.iter().flatten() {
            match by_id.get(dep.value.as_str()) {
                Some(&j) if j == i => out.push(
                    Diagnostic::error(
                        "after-cycle",
                        dep.span,
                        format!("step `{}` waits for itself", s.id.value),
                    )
                    .with_hint("remove it from `after`"),
                ),
                Some(&j) => edges[i].push((j, dep.span)),
                None => out.push(
                    Diagnostic::error(
                        "unknown-step",
                        dep.span,
                        format!("`after` names an unknown step `{}`", dep.value),
                    )
                    .with_optional_hint(did_you_mean(&dep.value, by_id.keys().copied())),
                ),
            }
        }
    }
    for m in &p.monitors {
        for (key, step) in [("after", &m.after), ("until", &m.until)] {
            if let Some(step) = step
                && !by_id.contains_key(step.value.as_str())
            {
                out.push(
                    Diagnostic::error(
                        "unknown-step",
                        step.span,
                        format!(
                            "monitor `{}`: `{key}` names an unknown step `{}`",
                            m.id, step.value
                        ),
                    )
                    .with_optional_hint(did_you_mean(&step.value, by_id.keys().copied())),
                );
            }
        }
    }
    // Iterative DFS for cycles (recursion could overflow on 100k-step files).
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut mark = vec![Mark::New; p.steps.len()];
    for start in 0..p.steps.len() {
        if mark[start] != Mark::New {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Active;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(dep, span)) = edges[node].get(*next) {
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Active;
                        stack.push((dep, 0));
                    }
                    Mark::Active => {
                        let mut cycle: Vec<&str> = stack
                            .iter()
                            .skip_while(|(n, _)| *n != dep)
                            .map(|(n, _)| p.steps[*n].id.value.as_str())
                            .collect();
                        cycle.push(&p.steps[dep].id.value);
                        out.push(
                            Diagnostic::error(
                                "after-cycle",
                                span,
                                format!(
                                    "steps wait for each other in a cycle: {}",
                                    cycle.join(" -> ")
                                ),
                            )
                            .with_hint("one of these steps must not wait for the others"),
                        );
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
}

fn unused_declarations(p: &Protocol, out: &mut Vec<Diagnostic>) {
    for (name, role) in &p.devices {
        if !p.role_uses.iter().any(|u| &u.value == name) {
            out.push(
                Diagnostic::warning(
                    "unused-role",
                    role.span,
                    format!("role `{name}` is declared but never used"),
                )
                .with_hint("remove it, or the lab must still provide a device for it"),
            );
        }
    }
    for (name, param) in &p.params {
        if !param.used {
            out.push(
                Diagnostic::warning(
                    "unused-param",
                    param.span,
                    format!("parameter `{name}` is never used"),
                )
                .with_hint(format!("use it as \"${{{name}}}\" or remove it")),
            );
        }
    }
}

/// Whether `slot` exists on the device bound to `role`; reports if not.
fn slot_exists(
    p: &Protocol,
    lab: &dyn DeviceLimits,
    role: &str,
    slot: u32,
    span: Span,
    out: &mut Vec<Diagnostic>,
) -> bool {
    let Some(device) = p.devices.get(role) else {
        // An undeclared role was reported where it was written.
        return false;
    };
    let slots = lab.slots(role, device.kind);
    if slots == 0 {
        out.push(
            Diagnostic::error(
                "bad-slot",
                span,
                format!(
                    "{role} is {}, which has no slots for labware",
                    device.kind.with_article()
                ),
            )
            .with_hint(
                "labware goes on a liquid handler, incubator, temperature module or heater-shaker",
            ),
        );
        return false;
    }
    if slot == 0 || slot > slots {
        out.push(
            Diagnostic::error(
                "bad-slot",
                span,
                format!("{role} has no slot {slot}: its slots are 1..{slots}"),
            )
            .with_hint(format!("{role} ({}) in {}", device.kind, lab.description())),
        );
        return false;
    }
    true
}

fn places(p: &Protocol, lab: &dyn DeviceLimits, out: &mut Vec<Diagnostic>) {
    let mut occupied: HashMap<Location, (String, Span)> = HashMap::new();
    let mut place = |what: String, loc: &Sp<Location>, out: &mut Vec<Diagnostic>| {
        if !slot_exists(p, lab, &loc.role, loc.slot, loc.span, out) {
            return;
        }
        if let Some((other, first)) = occupied.get(&loc.value) {
            out.push(
                Diagnostic::error(
                    "slot-taken",
                    loc.span,
                    format!("{} slot {} already holds {other}", loc.role, loc.slot),
                )
                .with_related(*first, "placed here")
                .with_hint("each slot holds one labware; choose a free slot"),
            );
            return;
        }
        occupied.insert(loc.value.clone(), (what, loc.span));
    };
    for (name, d) in &p.devices {
        let Some(at) = &d.on_deck else { continue };
        if !matches!(
            d.kind,
            DeviceKind::TemperatureModule | DeviceKind::HeaterShaker
        ) {
            out.push(
                Diagnostic::error(
                    "bad-slot",
                    at.span,
                    format!("{} does not sit on a deck", d.kind.with_article()),
                )
                .with_hint("only temperature modules and heater-shakers take `at`"),
            );
        } else if p
            .devices
            .get(&at.role)
            .is_some_and(|h| h.kind != DeviceKind::LiquidHandler)
        {
            out.push(
                Diagnostic::error(
                    "bad-slot",
                    at.span,
                    format!("module `{name}` can only sit on a liquid handler's deck"),
                )
                .with_hint("at = \"<liquid handler role>:<slot>\""),
            );
        } else {
            place(format!("module `{name}`"), at, out);
        }
    }
    for lw in p.labware.values() {
        if let Some(at) = &lw.at {
            place(format!("`{}`", lw.name), at, out);
        }
    }
    // Slots named by load/unload steps exist on their device (occupancy changes
    // as the run goes; the planner tracks it).
    for s in &p.steps {
        match &s.action {
            Action::Unload { to, .. } => {
                slot_exists(p, lab, &to.role, to.slot, to.span, out);
            }
            Action::Load {
                slot: Some(slot), ..
            } => {
                if let Some(role) = &s.role {
                    slot_exists(p, lab, &role.value, slot.value, slot.span, out);
                }
            }
            _ => {}
        }
    }
}

fn setpoint_limits(p: &Protocol, lab: &dyn DeviceLimits, out: &mut Vec<Diagnostic>) {
    for s in &p.steps {
        let Some(role) = &s.role else { continue };
        let Some(device) = p.devices.get(&role.value) else {
            continue;
        };
        let mut check = |setpoint: &str, q: &Sp<crate::units::Quantity>| match lab.setpoint_limits(
            &role.value,
            device.kind,
            setpoint,
        ) {
            Some(limits) if !limits.contains(q.value.value) => out.push(
                Diagnostic::error(
                    "out-of-limits",
                    q.span,
                    format!(
                        "{setpoint} {} is outside the limits of {} ({}): {limits}",
                        q.value, role.value, device.kind
                    ),
                )
                .with_hint(format!(
                    "{} accepts {limits} for {setpoint} in {}",
                    role.value,
                    lab.description()
                )),
            ),
            _ => {}
        };
        match &s.action {
            Action::Set { setpoints, .. } => {
                for sp in setpoints {
                    check(sp.setpoint, &sp.value);
                }
            }
            Action::Feed {
                rate: Some(rate), ..
            } => check("pump_rate", rate),
            Action::PumpDispense {
                rate: Some(rate), ..
            } => check("rate", rate),
            _ => {}
        }
    }
}
