//! The steps as a Gantt chart: one lane per device (steps without one in the
//! controller's lane), a bar per step from `started` to `completed`, `failed`
//! or `skipped`, coloured by outcome; steps still running at the run's end are
//! drawn to the end and marked. Overlapping steps in a lane get sub-rows.

use super::svg::{Scale, c, clock, duration, esc, time_axis, truncate};
use super::{Run, text};
use std::collections::HashMap;
use std::fmt::Write;

const W: f64 = 960.0;
const LABEL_W: f64 = 170.0;
const MR: f64 = 18.0;
const ROW: f64 = 20.0;
const BAR: f64 = 14.0;
const LANE_GAP: f64 = 8.0;
const TOP: f64 = 8.0;
const AXIS: f64 = 44.0;
/// Sub-rows per lane (more overlapping steps share the last one).
const MAX_ROWS: usize = 12;
/// Lanes (devices named beyond this share one "other devices" lane).
const MAX_LANES: usize = 40;
/// Bars drawn (a journal could have any number of steps).
const MAX_BARS: usize = 5_000;
const CONTROLLER: &str = "controller";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Skipped,
    Unfinished,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Unfinished => "unfinished",
        }
    }
    fn colour(self) -> &'static str {
        match self {
            Outcome::Completed => "#59a869",
            Outcome::Failed => "#d9534f",
            Outcome::Skipped => "#b8bec8",
            Outcome::Unfinished => "#f0b429",
        }
    }
}

struct Bar<'a> {
    step: &'a str,
    action: &'a str,
    repetition: Option<u64>,
    start: f64,
    end: Option<f64>,
    outcome: Outcome,
    detail: String,
    retries: u32,
    then_skipped: bool,
}

fn bars<'a>(run: &'a Run) -> Vec<Bar<'a>> {
    let mut bars: Vec<Bar> = Vec::new();
    let mut open: HashMap<(&str, Option<u64>), usize> = HashMap::new();
    let mut last: HashMap<(&str, Option<u64>), usize> = HashMap::new();
    for e in run.events.iter().filter(|e| e.kind == "step") {
        let Some(t) = e.t else { continue };
        let key = (
            e.s("step_id"),
            e.v.get("repetition").and_then(|r| r.as_u64()),
        );
        let detail = e.s("detail");
        let outcome = match e.s("phase") {
            "started" => {
                if let std::collections::hash_map::Entry::Vacant(slot) = open.entry(key) {
                    slot.insert(bars.len());
                    last.insert(key, bars.len());
                    bars.push(Bar {
                        step: key.0,
                        action: e.s("action"),
                        repetition: key.1,
                        start: t,
                        end: None,
                        outcome: Outcome::Unfinished,
                        detail: String::new(),
                        retries: 0,
                        then_skipped: false,
                    });
                }
                continue;
            }
            "retrying" => {
                if let Some(&i) = open.get(&key) {
                    bars[i].retries = bars[i].retries.saturating_add(1);
                    bars[i].detail = detail.to_string();
                }
                continue;
            }
            "completed" => Outcome::Completed,
            "failed" => Outcome::Failed,
            "skipped" => Outcome::Skipped,
            _ => continue,
        };
        if let Some(i) = open.remove(&key) {
            let b = &mut bars[i];
            b.end = Some(t.max(b.start));
            b.outcome = outcome;
            if !detail.is_empty() {
                b.detail = detail.to_string();
            }
            continue;
        }
        // An end without a start: a failed step given up (skipped after it
        // failed) marks its bar; otherwise a bar of no length.
        if let Some(&i) = last.get(&key)
            && outcome == Outcome::Skipped
            && bars[i].outcome == Outcome::Failed
        {
            bars[i].then_skipped = true;
            continue;
        }
        last.insert(key, bars.len());
        bars.push(Bar {
            step: key.0,
            action: e.s("action"),
            repetition: key.1,
            start: t,
            end: Some(t),
            outcome,
            detail: detail.to_string(),
            retries: 0,
            then_skipped: false,
        });
    }
    bars
}

/// The lane of a step: the device its role is bound to (from the checked
/// plan, else the role before the dot of its action), or the controller.
fn lane_of(
    run: &Run,
    plan_roles: &HashMap<&str, Option<&str>>,
    step: &str,
    action: &str,
) -> (String, String) {
    let role = match plan_roles.get(step) {
        Some(role) => role.map(str::to_string),
        None => action
            .split_once('.')
            .map(|(r, _)| r.to_string())
            .filter(|r| run.bindings.iter().any(|(b, _)| b == r) || run.checked.is_none()),
    };
    match role {
        None => (CONTROLLER.to_string(), CONTROLLER.to_string()),
        Some(role) => {
            let device = run.device_of_role(&role);
            let label = if device == role {
                role
            } else {
                format!("{device} ({role})")
            };
            (device, label)
        }
    }
}

pub fn section(out: &mut String, run: &Run) {
    let mut bars = bars(run);
    if bars.is_empty() {
        out.push_str("<p>No steps started in this run.</p>\n");
        return;
    }
    let total = bars.len();
    bars.truncate(MAX_BARS);
    let plan_roles: HashMap<&str, Option<&str>> = run
        .checked
        .as_ref()
        .and_then(|c| c.plan.as_ref())
        .map(|p| {
            p.steps
                .iter()
                .map(|s| (s.id.as_str(), s.device.as_deref()))
                .collect()
        })
        .unwrap_or_default();

    // Lanes: the bound devices in the protocol's order, then others as they
    // appear, the controller last.
    let mut lanes: Vec<(String, String)> = Vec::new();
    for (role, device) in &run.bindings {
        if !lanes.iter().any(|(d, _)| d == device) {
            let label = if device == role {
                role.clone()
            } else {
                format!("{device} ({role})")
            };
            lanes.push((device.clone(), label));
        }
    }
    let mut lane_of_bar = Vec::with_capacity(bars.len());
    for b in &bars {
        let (key, label) = lane_of(run, &plan_roles, b.step, b.action);
        let i = match lanes.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None if lanes.len() < MAX_LANES => {
                lanes.push((key, label));
                lanes.len() - 1
            }
            None => {
                if lanes.last().map(|l| l.0.as_str()) != Some("\u{0}other") {
                    lanes.push(("\u{0}other".into(), "other devices".into()));
                }
                lanes.len() - 1
            }
        };
        lane_of_bar.push(i);
    }
    // The controller's lane last; lanes without steps are left out.
    let mut order: Vec<usize> = (0..lanes.len())
        .filter(|i| lane_of_bar.contains(i))
        .collect();
    order.sort_by_key(|i| (lanes[*i].0 == CONTROLLER, *i));

    let x = Scale::new(run.t_lo, run.t_hi, LABEL_W, W - MR);
    // Pack each lane's bars into sub-rows, in pixels.
    let mut row_of_bar = vec![0usize; bars.len()];
    let mut rows_of_lane = vec![1usize; lanes.len()];
    let px = |b: &Bar| {
        let s = x.px(b.start);
        let e = x.px(b.end.unwrap_or(run.t_hi)).max(s + 3.0);
        (s, e)
    };
    for (lane, rows) in rows_of_lane.iter_mut().enumerate() {
        let mut idx: Vec<usize> = (0..bars.len())
            .filter(|i| lane_of_bar[*i] == lane)
            .collect();
        idx.sort_by(|a, b| bars[*a].start.total_cmp(&bars[*b].start));
        let mut ends: Vec<f64> = Vec::new();
        for i in idx {
            let (s, e) = px(&bars[i]);
            // Bars that only touch share a row.
            let row = match ends.iter().position(|end| *end <= s + 0.5) {
                Some(r) => r,
                None if ends.len() < MAX_ROWS => {
                    ends.push(f64::NEG_INFINITY);
                    ends.len() - 1
                }
                None => ends.len() - 1,
            };
            ends[row] = e;
            row_of_bar[i] = row;
        }
        *rows = ends.len().max(1);
    }
    let mut lane_top = vec![0.0f64; lanes.len()];
    let mut y = TOP;
    for &l in &order {
        lane_top[l] = y;
        y += rows_of_lane[l] as f64 * ROW + LANE_GAP;
    }
    let plot_bottom = y;
    let h = plot_bottom + AXIS;

    let _ = write!(
        out,
        "<figure class=\"gantt\">\n<svg viewBox=\"0 0 {W} {0}\" width=\"{W}\" height=\"{0}\" role=\"img\" aria-label=\"steps per device against lab time\">",
        c(h)
    );
    // Held and paused times behind the bars.
    for (start, end, what) in held_spans(run) {
        let (s, e) = (x.px(start), x.px(end).max(x.px(start) + 1.0));
        let _ = write!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fbeecd\"><title>run {} {}–{}</title></rect>",
            c(s),
            c(TOP - 4.0),
            c(e - s),
            c(plot_bottom - TOP + 4.0),
            esc(&what),
            clock(start),
            clock(end)
        );
    }
    time_axis(out, &x, TOP - 4.0, plot_bottom, true);
    for (k, &l) in order.iter().enumerate() {
        let top = lane_top[l];
        let height = rows_of_lane[l] as f64 * ROW;
        if k % 2 == 1 {
            let _ = write!(
                out,
                "<rect x=\"0\" y=\"{}\" width=\"{LABEL_W}\" height=\"{}\" fill=\"#f3f5f8\"/>",
                c(top - LANE_GAP / 2.0),
                c(height + LANE_GAP)
            );
        }
        let _ = write!(
            out,
            "<text class=\"label\" x=\"8\" y=\"{}\">{}</text><line class=\"grid\" x1=\"0\" y1=\"{2}\" x2=\"{3}\" y2=\"{2}\"/>",
            c(top + ROW / 2.0 + 4.0),
            esc(&truncate(&lanes[l].1, 26)),
            c(top + height + LANE_GAP / 2.0),
            W - MR
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let (s, e) = px(b);
        let top = lane_top[lane_of_bar[i]] + row_of_bar[i] as f64 * ROW + (ROW - BAR) / 2.0;
        let end = b.end.unwrap_or(run.t_hi);
        let mut tip = format!(
            "{}{} ({}): {}{}, {} → {} ({})",
            b.step,
            b.repetition
                .map(|r| format!(" [repetition {}]", r.saturating_add(1)))
                .unwrap_or_default(),
            b.action,
            b.outcome.name(),
            if b.then_skipped { ", then skipped" } else { "" },
            clock(b.start),
            if b.end.is_some() {
                clock(end)
            } else {
                "still running at the run's end".into()
            },
            duration(end - b.start)
        );
        if b.retries > 0 {
            tip.push_str(&format!(
                "; {} retr{}",
                b.retries,
                if b.retries == 1 { "y" } else { "ies" }
            ));
        }
        if !b.detail.is_empty() {
            tip.push_str(": ");
            tip.push_str(&b.detail);
        }
        let dash = if b.outcome == Outcome::Unfinished {
            " stroke=\"#8a5a00\" stroke-dasharray=\"3 2\""
        } else {
            " stroke=\"#ffffff\" stroke-width=\"0.5\""
        };
        let _ = write!(
            out,
            "<g class=\"bar {}\"><title>{}</title><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{BAR}\" rx=\"2\" fill=\"{}\"{dash}/>",
            b.outcome.name(),
            esc(&truncate(&tip, 600)),
            c(s),
            c(top),
            c(e - s),
            b.outcome.colour()
        );
        if b.outcome == Outcome::Unfinished {
            // An arrow head at the run's end: it went on.
            let _ = write!(
                out,
                "<path d=\"M{} {}l6 {}l-6 {}z\" fill=\"#8a5a00\"/>",
                c(e),
                c(top),
                c(BAR / 2.0),
                c(BAR / 2.0)
            );
        }
        let label = truncate(b.step, 40);
        if (e - s) >= label.chars().count() as f64 * 6.4 + 8.0 {
            let _ = write!(
                out,
                "<text class=\"small\" x=\"{}\" y=\"{}\" fill=\"{}\">{}</text>",
                c(s + 4.0),
                c(top + BAR - 3.5),
                if b.outcome == Outcome::Skipped || b.outcome == Outcome::Unfinished {
                    "#1d2330"
                } else {
                    "#ffffff"
                },
                esc(&label)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>\n<figcaption>");
    for o in [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::Skipped,
        Outcome::Unfinished,
    ] {
        let n = bars.iter().filter(|b| b.outcome == o).count();
        let _ = write!(
            out,
            "<span class=\"sw {}\"></span>{} ({n}) ",
            o.name(),
            o.name()
        );
    }
    out.push_str("<span class=\"sw held\"></span>run held or paused. Hover a bar for its step, times and detail.");
    if total > MAX_BARS {
        let _ = write!(
            out,
            " Only the first {MAX_BARS} of {total} step runs are drawn."
        );
    }
    out.push_str("</figcaption>\n</figure>\n");
}

/// Spans of lab time in which the run was held or paused (until the next
/// state, or the run's end).
fn held_spans(run: &Run) -> Vec<(f64, f64, String)> {
    let mut spans = Vec::new();
    let mut open: Option<(f64, String)> = None;
    for e in run.events.iter().filter(|e| e.kind == "run_state") {
        let Some(t) = e.t else { continue };
        let state = text(&e.v["state"]);
        let stopped = matches!(state.as_str(), "holding" | "held" | "pausing" | "paused");
        match (&open, stopped) {
            (None, true) => {
                let reason = e.s("reason");
                let what = if reason.is_empty() {
                    state
                } else {
                    format!("{state} ({reason})")
                };
                open = Some((t, what));
            }
            (Some(_), false) => {
                if let Some((s, what)) = open.take() {
                    spans.push((s, t, what));
                }
            }
            _ => {}
        }
        if spans.len() >= 1000 {
            break;
        }
    }
    if let Some((s, what)) = open {
        spans.push((s, run.t_hi, what));
    }
    spans
}
