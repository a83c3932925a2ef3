//! One plot per device and signal: the readings of every `sample` entry against
//! lab time, drawn min/max per pixel column (so 17 000 readings cost no more
//! than a few thousand points), with the monitors' limit bands, the
//! `wait_until` thresholds on the signal and the alarms as vertical markers.

use super::svg::{Scale, c, clock, esc, num, reading, ticks, time_axis, truncate};
use super::{Ev, Run};
use crate::plan::Op;
use crate::units::Dimension;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write;

/// The readings' line; the integration test looks for it in a screenshot.
pub const LINE: &str = "#1a56db";
/// The limit band's fill (opaque, so it renders as exactly this colour).
pub const BAND: &str = "#cdeccd";
const THRESHOLD: &str = "#7c3aed";
const ALARM: &str = "#d62828";
const CLEARED: &str = "#2f8f46";
const OTHER_ALARM: &str = "#9aa1ab";

const W: f64 = 960.0;
const H: f64 = 270.0;
const ML: f64 = 78.0;
const MR: f64 = 18.0;
const MT: f64 = 36.0;
const MB: f64 = 46.0;
/// Readings up to this many are also drawn as dots.
const DOTS: usize = 300;
/// Alarm markers per plot.
const MAX_MARKERS: usize = 400;
/// Plots per report (a journal could name any number of signals).
const MAX_PLOTS: usize = 64;

/// A quantity's value (when it is a finite number) and its unit's symbol in
/// canonical units (`uL`, `C`, `%`, or empty), from its JSON:
/// `{"value": 37.0, "dimension": "temperature"}` (or an explicit `"unit"`).
pub fn quantity(q: &Value) -> (Option<f64>, String) {
    let value = q
        .get("value")
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite());
    let unit = match q.get("unit").and_then(Value::as_str) {
        Some(u) => u.to_string(),
        None => q
            .get("dimension")
            .and_then(|d| Dimension::deserialize(d).ok())
            .map(|d| d.canonical_unit().to_string())
            .unwrap_or_default(),
    };
    (value, unit)
}

/// A unit as people write it.
pub fn unit_label(unit: &str) -> String {
    match unit {
        "uL" => "µL".into(),
        "C" => "°C".into(),
        u => u.to_string(),
    }
}

/// The unit a plot shows (large volumes and flows in mL and L/min) and the
/// divisor from canonical units.
fn display_unit(unit: &str, max_abs: f64) -> (String, f64) {
    match unit {
        "uL" if max_abs >= 10_000.0 => ("mL".into(), 1000.0),
        "mL/min" if max_abs >= 10_000.0 => ("L/min".into(), 1000.0),
        u => (unit_label(u), 1.0),
    }
}

struct Series<'a> {
    device: &'a str,
    signal: &'a str,
    unit: String,
    /// (lab time, value in canonical units), sorted by time.
    points: Vec<(f64, f64)>,
    /// Readings without a finite value or time.
    skipped: usize,
    /// The monitors and steps that took the readings.
    sources: Vec<&'a str>,
}

struct Band {
    min: f64,
    max: f64,
    monitor: String,
    policy: String,
}

struct Threshold {
    value: f64,
    op: &'static str,
    step: String,
}

fn collect_series<'a>(run: &'a Run) -> (Vec<Series<'a>>, usize) {
    let mut series: Vec<Series> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut dropped = 0usize;
    for e in run.events.iter().filter(|e| e.kind == "sample") {
        let device = e.s("device");
        let source = e.s("source");
        let Some(values) = e.v.get("values").and_then(Value::as_array) else {
            continue;
        };
        for pair in values {
            let Some(signal) = pair.get(0).and_then(Value::as_str) else {
                continue;
            };
            let q = pair.get(1).unwrap_or(&Value::Null);
            let i = match index.get(&(device, signal)) {
                Some(i) => *i,
                None => {
                    if series.len() >= MAX_PLOTS {
                        dropped += 1;
                        continue;
                    }
                    index.insert((device, signal), series.len());
                    series.push(Series {
                        device,
                        signal,
                        unit: quantity(q).1,
                        points: Vec::new(),
                        skipped: 0,
                        sources: Vec::new(),
                    });
                    series.len() - 1
                }
            };
            let s = &mut series[i];
            if !s.sources.contains(&source) && s.sources.len() < 16 {
                s.sources.push(source);
            }
            let value = q
                .get("value")
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite());
            match (e.t, value) {
                (Some(t), Some(v)) => s.points.push((t, v)),
                _ => s.skipped += 1,
            }
        }
    }
    for s in &mut series {
        if !s.points.is_sorted_by(|a, b| a.0 <= b.0) {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    (series, dropped)
}

fn bands(run: &Run, s: &Series) -> Vec<Band> {
    let Some(p) = run.checked.as_ref().and_then(|c| c.protocol.as_ref()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in &p.monitors {
        if run.device_of_role(&m.role) != s.device {
            continue;
        }
        for (signal, limits) in &m.limits {
            if signal.value == s.signal && limits.min.is_finite() && limits.max.is_finite() {
                out.push(Band {
                    min: limits.min,
                    max: limits.max,
                    monitor: m.id.clone(),
                    policy: format!("{:?}", m.on_violation).to_lowercase(),
                });
            }
        }
    }
    out
}

fn thresholds(run: &Run, s: &Series) -> Vec<Threshold> {
    let Some(plan) = run.checked.as_ref().and_then(|c| c.plan.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<Threshold> = Vec::new();
    for step in &plan.steps {
        for op in step.operations.iter().take(1) {
            let Op::WaitUntil { any, .. } = &op.op else {
                continue;
            };
            for term in any.iter().flatten() {
                if term.signal == s.signal
                    && run.device_of_role(&term.role) == s.device
                    && term.value.is_finite()
                    && !out
                        .iter()
                        .any(|t| t.value == term.value && t.op == term.op.symbol())
                    && out.len() < 8
                {
                    out.push(Threshold {
                        value: term.value,
                        op: term.op.symbol(),
                        step: step.id.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Which plots an alarm belongs to: `<monitor>.<signal>` to that signal of the
/// devices the monitor sampled, `<monitor>.read` to all of them; others to all.
fn alarm_matches(alarm: &Ev, s: &Series) -> Option<bool> {
    let id = alarm.s("alarm_id");
    let (monitor, what) = id.rsplit_once('.')?;
    if !s.sources.contains(&monitor) {
        return None;
    }
    Some(what == s.signal || what == "read")
}

pub fn section(out: &mut String, run: &Run) {
    let (series, dropped) = collect_series(run);
    if series.is_empty() {
        out.push_str("<p>No samples in this run.</p>\n");
        return;
    }
    let _ = writeln!(
        out,
        "<p class=\"note\">Every reading of every <code>sample</code> entry, per device and signal (drawn min/max per pixel), \
         against lab time. <span class=\"sw line\"></span>readings <span class=\"sw band\"></span>monitor limits \
         <span class=\"sw thr\"></span><code>wait_until</code> threshold <span class=\"sw alarm\"></span>alarm raised \
         <span class=\"sw cleared\"></span>alarm cleared</p>"
    );
    // Alarms that belong to no plot in particular are drawn on every plot.
    let alarms: Vec<&Ev> = run.events.iter().filter(|e| e.kind == "alarm").collect();
    let unmatched: Vec<bool> = alarms
        .iter()
        .map(|a| !series.iter().any(|s| alarm_matches(a, s) == Some(true)))
        .collect();
    let x = Scale::new(run.t_lo, run.t_hi, ML, W - MR);
    for s in &series {
        let mine: Vec<(&Ev, bool)> = alarms
            .iter()
            .zip(&unmatched)
            .filter_map(|(a, global)| {
                if alarm_matches(a, s) == Some(true) {
                    Some((*a, true))
                } else if *global {
                    Some((*a, false))
                } else {
                    None
                }
            })
            .collect();
        plot(out, run, s, &x, &mine);
    }
    if dropped > 0 {
        let _ = writeln!(
            out,
            "<p class=\"warn\">Only the first {MAX_PLOTS} signals are drawn; {dropped} readings of others are not.</p>"
        );
    }
}

fn plot(out: &mut String, run: &Run, s: &Series, x: &Scale, alarms: &[(&Ev, bool)]) {
    let bands = bands(run, s);
    let thresholds = thresholds(run, s);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, v) in &s.points {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let (data_lo, data_hi) = (lo, hi);
    for b in &bands {
        lo = lo.min(b.min);
        hi = hi.max(b.max);
    }
    for t in &thresholds {
        lo = lo.min(t.value);
        hi = hi.max(t.value);
    }
    let (unit, div) = display_unit(&s.unit, lo.abs().max(hi.abs()));
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        let pad = (hi / 2.0 - lo / 2.0) * 0.12;
        (lo / div - pad / div, hi / div + pad / div)
    } else {
        (0.0, 1.0)
    };
    let y = Scale::new(lo, hi, H - MB, MT);

    let title = format!("{} · {}", truncate(s.device, 80), truncate(s.signal, 80));
    let _ = writeln!(out, "<figure class=\"plot\">\n<h3>{}</h3>", esc(&title));
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{} against lab time\">",
        esc(&title)
    );
    let _ = write!(
        out,
        "<rect x=\"{ML}\" y=\"{MT}\" width=\"{}\" height=\"{}\" fill=\"#fbfcfd\" stroke=\"none\"/>",
        W - ML - MR,
        H - MT - MB
    );
    for b in &bands {
        let (top, bottom) = (y.px(b.max / div), y.px(b.min / div));
        let _ = write!(
            out,
            "<rect class=\"band\" x=\"{ML}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{BAND}\"><title>limits {}..{} {} (monitor {}, on violation: {})</title></rect>",
            c(top),
            W - ML - MR,
            c((bottom - top).max(1.0)),
            num(b.min / div, 6),
            num(b.max / div, 6),
            esc(&unit),
            esc(&b.monitor),
            esc(&b.policy)
        );
    }
    // y grid and ticks
    let (ys, decimals) = ticks(y.lo, y.hi, 5);
    for v in ys {
        let py = y.px(v);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{ML}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\"/><text class=\"tick\" x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{4}</text>",
            c(py),
            W - MR,
            ML - 6.0,
            c(py + 4.0),
            num(v, decimals)
        );
    }
    time_axis(out, x, MT, H - MB, true);
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{ML}\" y1=\"{MT}\" x2=\"{ML}\" y2=\"{}\"/>",
        H - MB
    );
    let ylabel = if unit.is_empty() {
        s.signal.to_string()
    } else {
        format!("{} ({unit})", s.signal)
    };
    let _ = write!(
        out,
        "<text class=\"label\" transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        c((MT + H - MB) / 2.0),
        esc(&truncate(&ylabel, 40))
    );
    for t in &thresholds {
        let py = y.px(t.value / div);
        let what = format!(
            "{} {} {}{}{}",
            s.signal,
            t.op,
            num(t.value / div, 6),
            if unit.is_empty() { "" } else { " " },
            unit
        );
        let _ = write!(
            out,
            "<g class=\"threshold\"><title>wait_until in step {step}: {what}</title>\
             <line x1=\"{ML}\" y1=\"{py}\" x2=\"{x2}\" y2=\"{py}\" stroke=\"{THRESHOLD}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
             <text class=\"small\" x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" fill=\"{THRESHOLD}\">{step}: {what}</text></g>",
            step = esc(&truncate(&t.step, 60)),
            what = esc(&what),
            py = c(py),
            x2 = W - MR,
            tx = W - MR - 4.0,
            ty = c(py - 4.0),
        );
    }
    // The readings.
    let picked = m4(&s.points, x);
    let gap = gap_threshold(&s.points);
    // gaps[k]: how many pauses longer than `gap` come before reading k, so a
    // pause between two drawn readings breaks the line even when the readings
    // between them are not drawn.
    let mut gaps = Vec::with_capacity(s.points.len());
    let mut n = 0u32;
    for (k, p) in s.points.iter().enumerate() {
        if k > 0 && p.0 - s.points[k - 1].0 > gap {
            n += 1;
        }
        gaps.push(n);
    }
    let mut runs: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    for k in 1..=picked.len() {
        if k == picked.len() || gaps[picked[k]] != gaps[picked[k - 1]] {
            runs.push(&picked[start..k]);
            start = k;
        }
    }
    let mut d = String::with_capacity(picked.len() * 12);
    let point = |d: &mut String, i: usize| {
        let (t, v) = s.points[i];
        super::svg::coord(d, x.px(t));
        d.push(' ');
        super::svg::coord(d, y.px(v / div));
    };
    for run in runs {
        d.push('M');
        point(&mut d, run[0]);
        if run.len() == 1 {
            // A zero-length segment: the round cap draws a dot.
            d.push_str("h0");
            continue;
        }
        // After the first line-to, further pairs are implicit line-tos.
        d.push('L');
        for (k, &i) in run[1..].iter().enumerate() {
            if k > 0 {
                d.push(' ');
            }
            point(&mut d, i);
        }
    }
    if !d.is_empty() {
        let _ = write!(
            out,
            "<path class=\"line\" d=\"{d}\" fill=\"none\" stroke=\"{LINE}\" stroke-width=\"2\" stroke-linejoin=\"round\" stroke-linecap=\"round\"/>"
        );
    }
    if s.points.len() <= DOTS {
        out.push_str(&format!("<g fill=\"{LINE}\">"));
        for &(t, v) in &s.points {
            let _ = write!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"2.6\"><title>{} {}{}{}</title></circle>",
                c(x.px(t)),
                c(y.px(v / div)),
                clock(t),
                reading(v / div),
                if unit.is_empty() { "" } else { " " },
                esc(&unit)
            );
        }
        out.push_str("</g>");
    }
    alarm_markers(out, x, alarms);
    let _ = writeln!(out, "</svg>");

    // Caption: what was drawn.
    let mut cap = format!(
        "{} reading{} by {}",
        s.points.len(),
        if s.points.len() == 1 { "" } else { "s" },
        s.sources
            .iter()
            .map(|src| truncate(src, 60))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if data_lo.is_finite() {
        let last = s.points.last().map_or(f64::NAN, |p| p.1);
        let u = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        cap.push_str(&format!(
            "; min {}, max {}, last {}{u}",
            reading(data_lo / div),
            reading(data_hi / div),
            reading(last / div)
        ));
    }
    for b in &bands {
        cap.push_str(&format!(
            "; limits {}..{} (monitor {}, on violation: {})",
            num(b.min / div, 6),
            num(b.max / div, 6),
            b.monitor,
            b.policy
        ));
    }
    for t in &thresholds {
        cap.push_str(&format!(
            "; step {} waits for {} {} {}",
            t.step,
            s.signal,
            t.op,
            num(t.value / div, 6)
        ));
    }
    let raised = alarms
        .iter()
        .filter(|(a, mine)| *mine && a.s("state") == "active")
        .count();
    if raised > 0 {
        cap.push_str(&format!(
            "; {raised} alarm{} raised",
            if raised == 1 { "" } else { "s" }
        ));
    }
    if s.skipped > 0 {
        cap.push_str(&format!(
            "; {} reading{} without a finite value or time not drawn",
            s.skipped,
            if s.skipped == 1 { "" } else { "s" }
        ));
    }
    let _ = writeln!(out, "<figcaption>{}</figcaption>\n</figure>", esc(&cap));
}

/// Alarm markers: a vertical line at each alarm's time, labelled above the
/// plot where there is room (in two rows); every marker has its message as a
/// tooltip. Alarms of other signals are thin grey lines without a label.
fn alarm_markers(out: &mut String, x: &Scale, alarms: &[(&Ev, bool)]) {
    let mut label_end = [f64::NEG_INFINITY; 2];
    for (a, mine) in alarms.iter().take(MAX_MARKERS) {
        let Some(t) = a.t else { continue };
        let px = x.px(t);
        let cleared = a.s("state") == "cleared";
        let (colour, dash) = match (mine, cleared) {
            (false, _) => (OTHER_ALARM, " stroke-dasharray=\"2 3\""),
            (true, false) => (ALARM, ""),
            (true, true) => (CLEARED, " stroke-dasharray=\"5 3\""),
        };
        let _ = write!(
            out,
            "<g class=\"alarm\"><title>{when} alarm {id} {state}: {message}</title>\
             <line x1=\"{px}\" y1=\"{top}\" x2=\"{px}\" y2=\"{bottom}\" stroke=\"{colour}\" stroke-width=\"1.5\"{dash}/>",
            when = clock(t),
            id = esc(&truncate(a.s("alarm_id"), 200)),
            state = esc(&truncate(a.s("state"), 40)),
            message = esc(&truncate(a.s("message"), 400)),
            px = c(px),
            top = c(MT - 4.0),
            bottom = c(H - MB),
        );
        if *mine {
            let label = format!(
                "{} {}",
                if cleared { "cleared" } else { "alarm" },
                truncate(a.s("alarm_id"), 28)
            );
            let width = label.chars().count() as f64 * 5.6;
            // Left of the marker near the right edge, else right of it.
            let (anchor, start, end) = if px + width > W - MR {
                ("end", px - 3.0 - width, px - 3.0)
            } else {
                ("start", px + 3.0, px + 3.0 + width)
            };
            if let Some(row) = (0..2).find(|r| label_end[*r] < start) {
                label_end[row] = end + 6.0;
                let _ = write!(
                    out,
                    "<text class=\"small\" x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" fill=\"{colour}\">{}</text>",
                    c(if anchor == "end" { end } else { start }),
                    c(12.0 + row as f64 * 12.0),
                    esc(&label)
                );
            }
        }
        out.push_str("</g>");
    }
    if alarms.len() > MAX_MARKERS {
        let _ = write!(
            out,
            "<text class=\"small\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{} more alarms not marked</text>",
            W - MR,
            H - 4.0,
            alarms.len() - MAX_MARKERS
        );
    }
}

/// Indices of the readings to draw: per pixel column the first, the lowest,
/// the highest and the last, in time order (the M4 reduction: the line looks
/// the same as with every reading).
fn m4(points: &[(f64, f64)], x: &Scale) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let col = x.px(points[i].0).floor();
        let (mut lo, mut hi, mut j) = (i, i, i);
        while j < points.len() && x.px(points[j].0).floor() == col {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut picked = [i, lo, hi, j - 1];
        picked.sort_unstable();
        for (k, &p) in picked.iter().enumerate() {
            if k == 0 || picked[k - 1] != p {
                out.push(p);
            }
        }
        i = j;
    }
    out
}

/// A pause in the readings longer than this (five typical intervals) breaks
/// the line, so a monitor that was stopped does not look like a straight ramp.
fn gap_threshold(points: &[(f64, f64)]) -> f64 {
    if points.len() < 3 {
        return f64::INFINITY;
    }
    let mut dts: Vec<f64> = points
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > 0.0)
        .collect();
    if dts.is_empty() {
        return f64::INFINITY;
    }
    let mid = dts.len() / 2;
    let (_, median, _) = dts.select_nth_unstable_by(mid, f64::total_cmp);
    let g = *median * 5.0;
    if g.is_finite() && g > 0.0 {
        g
    } else {
        f64::INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn m4_keeps_extremes_and_bounds_the_points() {
        let points: Vec<(f64, f64)> = (0..17_280)
            .map(|i| {
                (
                    i as f64 * 10.0,
                    (i as f64 / 50.0).sin() + if i == 9000 { 5.0 } else { 0.0 },
                )
            })
            .collect();
        let x = Scale::new(0.0, 172_800.0, 0.0, 870.0);
        let picked = m4(&points, &x);
        assert!(picked.len() <= 4 * 871, "{}", picked.len());
        assert!(picked.contains(&9000), "the spike is kept");
        assert!(picked.windows(2).all(|w| w[0] < w[1]), "in time order");
        assert_eq!(m4(&[], &x), Vec::<usize>::new());
        assert_eq!(m4(&[(1.0, 1.0)], &x), vec![0]);
    }

    #[test]
    fn gaps_break_the_line() {
        let mut points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 0.0)).collect();
        points.push((100.0, 0.0));
        assert_eq!(gap_threshold(&points), 5.0);
        assert_eq!(gap_threshold(&points[..2]), f64::INFINITY);
    }

    #[test]
    fn a_pause_in_the_readings_breaks_the_line_and_a_lone_reading_is_a_dot() {
        use crate::report::tests::entry;
        let mut entries = vec![entry(
            0,
            serde_json::json!({"type": "run", "header": {"run_id": "g"}}),
        )];
        let times: Vec<f64> = (0..=10)
            .map(f64::from)
            .chain((100..=110).map(f64::from))
            .chain([500.0])
            .collect();
        for (i, t) in times.iter().enumerate() {
            entries.push(entry(
                i as u64 + 1,
                serde_json::json!({"type": "sample", "seq": i + 1, "t_s": t, "device": "d", "source": "m",
                    "values": [["x", {"value": t.sin(), "dimension": "unitless"}]]}),
            ));
        }
        let run = crate::report::read_run(&entries);
        let mut out = String::new();
        section(&mut out, &run);
        let d = out
            .split("class=\"line\" d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(d.matches('M').count(), 3, "{d}");
        assert!(d.ends_with("h0"), "{d}");
    }

    #[test]
    fn quantities_read_their_unit() {
        let q: Value = serde_json::json!({"value": 37.5, "dimension": "temperature"});
        assert_eq!(quantity(&q), (Some(37.5), "C".into()));
        let q: Value = serde_json::json!({"value": null, "dimension": "volume"});
        assert_eq!(quantity(&q), (None, "uL".into()));
        assert_eq!(quantity(&Value::Null), (None, String::new()));
        assert_eq!(display_unit("uL", 1_050_000.0), ("mL".into(), 1000.0));
        assert_eq!(display_unit("C", 37.0), ("°C".into(), 1.0));
    }
}
