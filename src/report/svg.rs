//! Small helpers for writing HTML and SVG by hand: escaping, number
//! formatting, axis ticks, and a linear scale that survives any input.

use std::fmt::Write;

/// Escapes text for HTML and SVG, in element content and in quoted attributes.
/// Control characters (other than tab and line feed) become U+FFFD, so no
/// journal text can end an element, open a tag or break the document.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    esc_into(&mut out, s);
    out
}

pub fn esc_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' => out.push(c),
            '\r' => out.push('\n'),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// A coordinate with one decimal, without "-0.0" or exponents.
pub fn coord(out: &mut String, v: f64) {
    let v = if v.is_finite() {
        v.clamp(-1e6, 1e6)
    } else {
        0.0
    };
    let r = (v * 10.0).round() / 10.0;
    if r == r.trunc() {
        let _ = write!(out, "{}", r as i64);
    } else {
        let _ = write!(out, "{r:.1}");
    }
}

pub fn c(v: f64) -> String {
    let mut s = String::new();
    coord(&mut s, v);
    s
}

/// A value for people: up to `decimals` decimals, trailing zeros dropped;
/// very large or small magnitudes in exponent form; non-finite as text.
pub fn num(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "∞".into()
        } else {
            "-∞".into()
        };
    }
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e9).contains(&a) {
        return format!("{v:.3e}");
    }
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" { "0".into() } else { s }
}

/// A reading with a sensible number of significant digits.
pub fn reading(v: f64) -> String {
    if !v.is_finite() {
        return num(v, 0);
    }
    let a = v.abs();
    let decimals = if a >= 1000.0 {
        1
    } else if a >= 10.0 {
        2
    } else if a >= 1.0 {
        3
    } else {
        4
    };
    num(v, decimals)
}

/// Ticks at 1-2-5 steps covering `[lo, hi]`, about `target` of them (never
/// more than 60), and the decimals their labels need. Degenerate or
/// non-finite ranges give the ends only.
pub fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        let v: Vec<f64> = [lo, hi].into_iter().filter(|x| x.is_finite()).collect();
        return (v, 3);
    }
    let span = hi / 2.0 - lo / 2.0; // halves: no overflow at ±f64::MAX
    let raw = span * 2.0 / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return (vec![lo, hi], 3);
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    if !(step.is_finite() && step > 0.0) {
        return (vec![lo, hi], 3);
    }
    let first = (lo / step).ceil();
    let mut out = Vec::new();
    for i in 0..60 {
        let v = (first + i as f64) * step;
        if v > hi + step * 1e-9 {
            break;
        }
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
    }
    // As many decimals as the step needs (2.5 needs one, 0.05 two).
    let decimals = (0..8)
        .find(|d| {
            let scaled = step * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(8) as usize;
    (out, decimals)
}

/// A linear map from a data range to a pixel range, safe for any input:
/// non-finite values go to the near end, huge ranges do not overflow.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
    pub from_px: f64,
    pub to_px: f64,
}

impl Scale {
    /// A degenerate or non-finite range is widened so the scale still works.
    pub fn new(lo: f64, hi: f64, from_px: f64, to_px: f64) -> Scale {
        let (mut lo, mut hi) = (
            if lo.is_finite() { lo } else { 0.0 },
            if hi.is_finite() { hi } else { 1.0 },
        );
        if hi < lo {
            std::mem::swap(&mut lo, &mut hi);
        }
        if hi / 2.0 - lo / 2.0 <= 0.0 {
            let pad = (lo.abs() * 0.05).max(1.0);
            lo -= pad;
            hi += pad;
        }
        Scale {
            lo,
            hi,
            from_px,
            to_px,
        }
    }

    pub fn px(&self, v: f64) -> f64 {
        if !v.is_finite() {
            return if v > 0.0 { self.to_px } else { self.from_px };
        }
        let f = (v / 2.0 - self.lo / 2.0) / (self.hi / 2.0 - self.lo / 2.0);
        let f = if f.is_finite() {
            f.clamp(-2.0, 3.0)
        } else {
            0.0
        };
        self.from_px + f * (self.to_px - self.from_px)
    }
}

/// Lab time as `h:mm:ss` (`d h:mm:ss` past a day), with tenths under a minute.
pub fn clock(t: f64) -> String {
    if !t.is_finite() {
        return "?".into();
    }
    let neg = t < 0.0;
    let a = t.abs().min(1e12);
    let total = a.floor() as u64;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    let sign = if neg { "-" } else { "" };
    if h >= 24 {
        format!("{sign}{}d {:02}:{m:02}:{s:02}", h / 24, h % 24)
    } else {
        format!("{sign}{h}:{m:02}:{s:02}")
    }
}

/// A duration for people: `2 h 5 min`, `42 s`, `0.3 s`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    if s < 60.0 {
        return format!("{} s", num(s, 1));
    }
    let total = s.min(1e12).round() as u64;
    let (d, h, m, sec) = (
        total / 86_400,
        (total / 3600) % 24,
        (total / 60) % 60,
        total % 60,
    );
    let mut parts = Vec::new();
    if d > 0 {
        parts.push(format!("{d} d"));
    }
    if h > 0 {
        parts.push(format!("{h} h"));
    }
    if m > 0 && d == 0 {
        parts.push(format!("{m} min"));
    }
    if sec > 0 && d == 0 && h == 0 {
        parts.push(format!("{sec} s"));
    }
    if parts.is_empty() {
        parts.push("0 s".into());
    }
    parts.join(" ")
}

/// Wall-clock time (RFC 3339, milliseconds); out-of-range values as the number.
pub fn wall(unix_ms: u64) -> String {
    // Up to the year 9999, which humantime formats.
    if unix_ms <= 253_402_300_799_999 {
        crate::mqtt::publisher::timestamp(unix_ms)
    } else {
        format!("{unix_ms} ms")
    }
}

/// The unit of a time axis for a run of `span` seconds: (divisor, label).
pub fn time_unit(span: f64) -> (f64, &'static str) {
    if span <= 180.0 {
        (1.0, "s")
    } else if span <= 3.0 * 3600.0 {
        (60.0, "min")
    } else if span <= 10.0 * 86_400.0 {
        (3600.0, "h")
    } else {
        (86_400.0, "d")
    }
}

/// The x axis of lab time along the bottom of a plot area: grid lines,
/// tick labels, and the axis title. `top` and `bottom` bound the plot area.
pub fn time_axis(out: &mut String, x: &Scale, top: f64, bottom: f64, with_title: bool) {
    let (div, unit) = time_unit(x.hi - x.lo);
    let (ts, decimals) = ticks(x.lo / div, x.hi / div, 8);
    for t in ts {
        let px = x.px(t * div);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>",
            c(px),
            c(top),
            c(px),
            c(bottom)
        );
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            c(px),
            c(bottom + 14.0),
            num(t, decimals)
        );
    }
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>",
        c(x.from_px),
        c(bottom),
        c(x.to_px),
        c(bottom)
    );
    if with_title {
        let _ = write!(
            out,
            "<text class=\"label\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">lab time since start ({unit})</text>",
            c((x.from_px + x.to_px) / 2.0),
            c(bottom + 32.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        let s = esc("<script>alert('x')</script> & \"q\" \u{0}\u{1b}");
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('"') && !s.contains('\''));
        assert!(s.contains("&lt;script&gt;") && s.contains("&amp;"));
        assert!(!s.contains('\u{0}') && !s.contains('\u{1b}'));
    }

    #[test]
    fn ticks_are_round_and_bounded() {
        let (t, d) = ticks(0.0, 48.0, 8);
        assert_eq!(t, vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        assert_eq!(d, 0);
        let (t, d) = ticks(6.78, 7.42, 5);
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert_eq!(d, 1);
        assert_eq!(ticks(0.0, 10.0, 4), (vec![0.0, 2.5, 5.0, 7.5, 10.0], 1));
        assert!(ticks(-f64::MAX, f64::MAX, 5).0.len() <= 60);
        assert!(ticks(f64::NAN, 1.0, 5).0.len() <= 2);
        assert!(ticks(1.0, 1.0, 5).0.len() <= 2);
        assert!(ticks(0.0, 1e-300, 5).0.len() <= 60);
    }

    #[test]
    fn scales_survive_any_input() {
        let s = Scale::new(-f64::MAX, f64::MAX, 0.0, 100.0);
        assert!(s.px(0.0).is_finite() && (s.px(0.0) - 50.0).abs() < 1e-6);
        let s = Scale::new(5.0, 5.0, 0.0, 100.0);
        assert!((s.px(5.0) - 50.0).abs() < 1e-6);
        let s = Scale::new(f64::NAN, f64::INFINITY, 0.0, 100.0);
        assert!(s.px(f64::NAN).is_finite());
        assert_eq!(c(f64::NAN), "0");
        assert_eq!(c(-0.04), "0");
        assert_eq!(c(12.25), "12.3");
    }

    #[test]
    fn numbers_and_times_read_well() {
        assert_eq!(num(7.0, 2), "7");
        assert_eq!(num(7.126, 2), "7.13");
        assert_eq!(num(f64::NAN, 2), "NaN");
        assert_eq!(num(1e12, 2), "1.000e12");
        assert_eq!(clock(3725.4), "1:02:05");
        assert_eq!(clock(90_000.0), "1d 01:00:00");
        assert_eq!(duration(172_800.0), "2 d");
        assert_eq!(duration(3900.0), "1 h 5 min");
        assert_eq!(duration(0.26), "0.3 s");
        assert_eq!(wall(u64::MAX), format!("{} ms", u64::MAX));
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
