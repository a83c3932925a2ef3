//! `check --lab`: the profiles' interlocks against a protocol's plan. Each
//! device's states are followed through the plan in execution order, from the
//! values they have when the instrument connects, through the actions the
//! protocol runs; a setpoint write or action an interlock would refuse at run
//! time is an error here, at the step that does it.

use super::{LabDevice, LabFile};
use crate::diagnostics::Diagnostic;
use crate::plan::{Op, Plan};
use crate::profile::Profile;
use crate::protocol::Protocol;
use crate::runtime::recovery::split_place;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Every interlock the plan would break, at the step that would break it.
pub fn check(
    protocol: &Protocol,
    plan: &Plan,
    lab: &LabFile,
    bindings: &HashMap<String, String>,
) -> Vec<Diagnostic> {
    let mut profiles: HashMap<&str, Arc<Profile>> = HashMap::new();
    for (role, id) in bindings {
        if let Some(LabDevice::Instrument(i)) = lab.devices.get(id)
            && !i.profile.interlocks.is_empty()
        {
            profiles.insert(role.as_str(), Arc::clone(&i.profile));
        }
    }
    if profiles.is_empty() {
        return Vec::new();
    }
    let mut states: HashMap<&str, BTreeMap<String, String>> = profiles
        .iter()
        .map(|(role, p)| (*role, p.initial_states()))
        .collect();
    let spans: HashMap<&str, crate::source::Span> = protocol
        .steps
        .iter()
        .map(|s| (s.id.value.as_str(), s.span))
        .collect();
    let mut out = Vec::new();
    for step in &plan.steps {
        let Some(role) = step.device.as_deref() else {
            continue;
        };
        let Some(profile) = profiles.get(role) else {
            continue;
        };
        let at = spans.get(step.id.as_str()).copied().unwrap_or_default();
        let mut refused = None;
        for operation in &step.operations {
            let now = states.entry(role).or_default();
            let lookup = |s: &str| now.get(s).cloned();
            let (refusal, action) = match &operation.op {
                Op::Set { setpoints, .. } => (
                    setpoints
                        .iter()
                        .find_map(|sp| profile.setpoint_refusal(&sp.name, sp.value.value, &lookup)),
                    None,
                ),
                Op::Command { name } => (profile.action_refusal(name, &lookup), Some(name.clone())),
                Op::MoveLabware { to, .. } => {
                    let action = if split_place(to).0 == role {
                        "load"
                    } else {
                        "unload"
                    };
                    (
                        profile.action_refusal(action, &lookup),
                        Some(action.to_string()),
                    )
                }
                _ => (None, None),
            };
            if refusal.is_some() {
                refused = refusal;
                break;
            }
            if let Some(action) = action {
                now.extend(profile.action_sets(&action));
            }
        }
        if let Some(refusal) = refused {
            out.push(
                Diagnostic::error(
                    "interlock",
                    at,
                    format!("step `{}` would be refused: {refusal}", step.id),
                )
                .with_optional_hint(remedy(profile, role, &refusal)),
            );
        }
    }
    out
}

/// An action of the profile that sets a state the refusal names.
fn remedy(profile: &Profile, role: &str, refusal: &str) -> Option<String> {
    let interlock = profile
        .interlocks
        .iter()
        .find(|i| refusal.starts_with(&format!("interlock `{}`", i.id)))?;
    interlock.requires.iter().find_map(|(state, value)| {
        profile.doc.actions.iter().find_map(|(name, a)| {
            (a.get_ref().sets.get(state) == Some(value)).then(|| {
                format!(
                    "add a step `do = \"{role}.{name}\"` before it (it makes {state} `{value}`)"
                )
            })
        })
    })
}
