//! Quantities with units: `"100 uL"`, `"1 h 30 min"`, `"37 C"`, `"300 rpm"`.
//!
//! Every quantity is stored in one canonical unit per dimension (µL, s, °C, rpm,
//! %, mL/min, or a bare number) so comparisons never mix units.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Volume,
    Time,
    Temperature,
    Speed,
    Percent,
    Flow,
    /// Optical density, pH and other plain numbers.
    Unitless,
}

impl Dimension {
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Volume => "volume",
            Dimension::Time => "duration",
            Dimension::Temperature => "temperature",
            Dimension::Speed => "speed",
            Dimension::Percent => "percentage",
            Dimension::Flow => "flow rate",
            Dimension::Unitless => "number",
        }
    }

    /// An example value, used in hints.
    pub fn example(self) -> &'static str {
        match self {
            Dimension::Volume => "\"10 uL\"",
            Dimension::Time => "\"30 min\"",
            Dimension::Temperature => "\"37 C\"",
            Dimension::Speed => "\"300 rpm\"",
            Dimension::Percent => "\"5 %\"",
            Dimension::Flow => "\"2 mL/min\"",
            Dimension::Unitless => "0.6",
        }
    }

    pub fn units(self) -> &'static str {
        match self {
            Dimension::Volume => "nL, uL, µL, mL, L",
            Dimension::Time => "ms, s, min, h, d",
            Dimension::Temperature => "C, °C",
            Dimension::Speed => "rpm",
            Dimension::Percent => "%",
            Dimension::Flow => "uL/s, uL/min, mL/s, mL/min, mL/h, L/min, L/h",
            Dimension::Unitless => "no unit",
        }
    }

    /// The canonical unit's symbol.
    pub fn canonical_unit(self) -> &'static str {
        match self {
            Dimension::Volume => "uL",
            Dimension::Time => "s",
            Dimension::Temperature => "C",
            Dimension::Speed => "rpm",
            Dimension::Percent => "%",
            Dimension::Flow => "mL/min",
            Dimension::Unitless => "",
        }
    }

    /// Whether a bare number is accepted for this dimension: only where the unit
    /// cannot be mistaken (a plain number, or a percentage).
    pub fn accepts_bare_number(self) -> bool {
        matches!(self, Dimension::Unitless | Dimension::Percent)
    }
}

/// A value in the canonical unit of its dimension.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quantity {
    pub value: f64,
    pub dimension: Dimension,
}

impl Quantity {
    pub fn new(value: f64, dimension: Dimension) -> Self {
        Quantity { value, dimension }
    }
    pub fn volume_ul(ul: f64) -> Self {
        Quantity::new(ul, Dimension::Volume)
    }
    pub fn seconds(s: f64) -> Self {
        Quantity::new(s, Dimension::Time)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.value;
        match self.dimension {
            Dimension::Volume if v.abs() >= 1000.0 => write!(f, "{} mL", trim(v / 1000.0)),
            Dimension::Flow if v.abs() >= 1000.0 => write!(f, "{} L/min", trim(v / 1000.0)),
            Dimension::Time => fmt_duration(v, f),
            Dimension::Unitless => write!(f, "{}", trim(v)),
            Dimension::Percent => write!(f, "{} %", trim(v)),
            d => write!(f, "{} {}", trim(v), d.canonical_unit()),
        }
    }
}

fn fmt_duration(s: f64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if s > 0.0 && s < 1.0 {
        return write!(f, "{} ms", trim(s * 1000.0));
    }
    if s < 60.0 {
        return write!(f, "{} s", trim(s));
    }
    // Whole hours, minutes and seconds: "1 h 30 min", "2 h 5 s", "3 min 20.5 s".
    let hours = (s / 3600.0).floor();
    let minutes = ((s - hours * 3600.0) / 60.0).floor();
    let seconds = s - hours * 3600.0 - minutes * 60.0;
    let mut parts = Vec::new();
    if hours > 0.0 {
        parts.push(format!("{} h", trim(hours)));
    }
    if minutes > 0.0 {
        parts.push(format!("{} min", trim(minutes)));
    }
    if seconds > 1e-6 {
        parts.push(format!("{} s", trim(seconds)));
    }
    f.write_str(&parts.join(" "))
}

/// Formats a number without float noise: 100.0 -> "100", 0.1+0.2 -> "0.3".
pub fn trim(v: f64) -> String {
    let r = (v * 1e6).round() / 1e6;
    let s = format!("{r}");
    if s == "-0" { "0".into() } else { s }
}

/// Why a quantity string was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantityError {
    #[error("{} needs a unit, e.g. {}", .0.name(), .0.example())]
    MissingUnit(Dimension),
    #[error("`{unit}` is not a unit of {}", .expected.name())]
    WrongDimension {
        unit: String,
        expected: Dimension,
        found: Dimension,
    },
    #[error("unknown unit `{unit}`")]
    UnknownUnit { unit: String, expected: Dimension },
    #[error("`{0}` is not a number followed by a unit")]
    Malformed(String),
    #[error("{} must be a finite number", .0.name())]
    NotFinite(Dimension),
    #[error("{} cannot be negative", .0.name())]
    Negative(Dimension),
    #[error("the low end of `{0}` is above the high end")]
    Reversed(String),
}

impl QuantityError {
    pub fn hint(&self) -> String {
        match self {
            QuantityError::MissingUnit(d)
            | QuantityError::WrongDimension { expected: d, .. }
            | QuantityError::UnknownUnit { expected: d, .. } => {
                format!("units of {}: {}", d.name(), d.units())
            }
            QuantityError::NotFinite(d) | QuantityError::Negative(d) => {
                format!("write a {}, e.g. {}", d.name(), d.example())
            }
            QuantityError::Reversed(_) => "write the range low..high, e.g. \"6.8..7.4\"".into(),
            _ => "write a number and a unit, e.g. \"10 uL\", \"30 min\", \"37 C\"".into(),
        }
    }
}

/// Unit symbol -> (dimension, factor to the canonical unit).
fn unit(symbol: &str) -> Option<(Dimension, f64)> {
    use Dimension::*;
    Some(match symbol {
        "nL" | "nl" => (Volume, 1e-3),
        "uL" | "ul" | "µL" | "µl" | "μL" | "μl" => (Volume, 1.0),
        "mL" | "ml" => (Volume, 1e3),
        "L" | "l" => (Volume, 1e6),
        "ms" => (Time, 1e-3),
        "s" | "sec" => (Time, 1.0),
        "min" => (Time, 60.0),
        "h" => (Time, 3600.0),
        "d" => (Time, 86400.0),
        "C" | "°C" | "degC" => (Temperature, 1.0),
        "rpm" => (Speed, 1.0),
        "%" => (Percent, 1.0),
        "uL/s" | "µL/s" | "μL/s" => (Flow, 60.0 / 1000.0),
        "uL/min" | "µL/min" | "μL/min" => (Flow, 1.0 / 1000.0),
        "mL/s" => (Flow, 60.0),
        "mL/min" => (Flow, 1.0),
        "mL/h" => (Flow, 1.0 / 60.0),
        "L/min" => (Flow, 1000.0),
        "L/h" => (Flow, 1000.0 / 60.0),
        _ => return None,
    })
}

/// Parses `"<number> <unit>"` (for time also `"1 h 30 min"`) as the expected dimension.
pub fn parse_quantity(text: &str, expected: Dimension) -> Result<Quantity, QuantityError> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(QuantityError::Malformed(text.to_string()));
    }
    let mut total = 0.0;
    let mut parts = 0;
    while !rest.is_empty() {
        let (number, after) =
            split_number(rest).ok_or_else(|| QuantityError::Malformed(text.to_string()))?;
        let after = after.trim_start();
        let unit_end = after
            .find(|c: char| c.is_whitespace())
            .unwrap_or(after.len());
        let (symbol, tail) = after.split_at(unit_end);
        parts += 1;
        if symbol.is_empty() {
            if parts > 1 || !expected.accepts_bare_number() {
                return Err(QuantityError::MissingUnit(expected));
            }
            total += number;
            rest = tail;
            continue;
        }
        let (dimension, factor) = match unit(symbol) {
            Some(u) => u,
            None if symbol.parse::<f64>().is_ok() => {
                return Err(QuantityError::Malformed(text.to_string()));
            }
            None => {
                return Err(QuantityError::UnknownUnit {
                    unit: symbol.to_string(),
                    expected,
                });
            }
        };
        if dimension != expected {
            return Err(QuantityError::WrongDimension {
                unit: symbol.to_string(),
                expected,
                found: dimension,
            });
        }
        if parts > 1 && dimension != Dimension::Time {
            return Err(QuantityError::Malformed(text.to_string()));
        }
        total += number * factor;
        rest = tail.trim_start();
    }
    if !total.is_finite() {
        return Err(QuantityError::NotFinite(expected));
    }
    // Only temperatures go below zero; a negative volume, time, speed or flow is a typo.
    if total < 0.0 && expected != Dimension::Temperature {
        return Err(QuantityError::Negative(expected));
    }
    Ok(Quantity::new(total, expected))
}

/// A number (optional sign, digits, optional fraction and exponent) at the start of `s`.
fn split_number(s: &str) -> Option<(f64, &str)> {
    let bytes = s.as_bytes();
    let mut i = 0;
    if matches!(bytes.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits_start = i;
    while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    // An exponent only if digits follow it, so "1e" is not taken for a number.
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if matches!(bytes.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if bytes.get(j).is_some_and(u8::is_ascii_digit) {
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            i = j;
        }
    }
    let value: f64 = s[..i].parse().ok()?;
    Some((value, &s[i..]))
}

/// An inclusive range `"6.8..7.4"` or `"36..38 C"` (a unit at the end applies to both ends).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub min: f64,
    pub max: f64,
    pub dimension: Dimension,
}

impl Limits {
    pub fn contains(&self, v: f64) -> bool {
        v >= self.min - 1e-9 && v <= self.max + 1e-9
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Large volumes and flows read better in mL and L/min, like their values.
        let (unit, scale) = match self.dimension {
            Dimension::Volume if self.max >= 1000.0 => ("mL", 1000.0),
            Dimension::Flow if self.max >= 1000.0 => ("L/min", 1000.0),
            d => (d.canonical_unit(), 1.0),
        };
        let (min, max) = (trim(self.min / scale), trim(self.max / scale));
        if unit.is_empty() {
            write!(f, "{min}..{max}")
        } else {
            write!(f, "{min}..{max} {unit}")
        }
    }
}

pub fn parse_limits(text: &str, expected: Dimension) -> Result<Limits, QuantityError> {
    let Some((low, high)) = text.split_once("..") else {
        return Err(QuantityError::Malformed(text.to_string()));
    };
    let high_q = parse_quantity(high, expected)?;
    let low = low.trim();
    // "36..38 C": the low end borrows the unit of the high end.
    let low_q = if split_number(low).is_some_and(|(_, rest)| rest.trim().is_empty()) {
        let unit_part = high
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_digit() || ".+-eE".contains(c))
            .trim();
        parse_quantity(&format!("{low} {unit_part}"), expected)?
    } else {
        parse_quantity(low, expected)?
    };
    if low_q.value > high_q.value {
        return Err(QuantityError::Reversed(text.to_string()));
    }
    Ok(Limits {
        min: low_q.value,
        max: high_q.value,
        dimension: expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_dimension() {
        assert_eq!(
            parse_quantity("100 uL", Dimension::Volume).unwrap().value,
            100.0
        );
        assert_eq!(
            parse_quantity("1.5mL", Dimension::Volume).unwrap().value,
            1500.0
        );
        assert_eq!(
            parse_quantity("1 h 30 min", Dimension::Time).unwrap().value,
            5400.0
        );
        assert_eq!(
            parse_quantity("-20 °C", Dimension::Temperature)
                .unwrap()
                .value,
            -20.0
        );
        assert_eq!(
            parse_quantity("0.6", Dimension::Unitless).unwrap().value,
            0.6
        );
        assert_eq!(parse_quantity("5", Dimension::Percent).unwrap().value, 5.0);
        assert_eq!(
            parse_quantity("2 L/min", Dimension::Flow).unwrap().value,
            2000.0
        );
    }

    #[test]
    fn rejects_with_the_expected_unit_named() {
        let e = parse_quantity("10", Dimension::Volume).unwrap_err();
        assert_eq!(e.to_string(), "volume needs a unit, e.g. \"10 uL\"");
        let e = parse_quantity("10 s", Dimension::Volume).unwrap_err();
        assert_eq!(e.to_string(), "`s` is not a unit of volume");
        let e = parse_quantity("10 gallons", Dimension::Volume).unwrap_err();
        assert_eq!(e.to_string(), "unknown unit `gallons`");
        assert!(parse_quantity("1e999 uL", Dimension::Volume).is_err());
        assert!(parse_quantity("uL", Dimension::Volume).is_err());
        assert!(parse_quantity("10 uL 5 uL", Dimension::Volume).is_err());
    }

    #[test]
    fn limits_share_the_unit() {
        let l = parse_limits("36..38 C", Dimension::Temperature).unwrap();
        assert_eq!((l.min, l.max), (36.0, 38.0));
        let l = parse_limits("6.8..7.4", Dimension::Unitless).unwrap();
        assert!(l.contains(7.0) && !l.contains(7.5));
        assert_eq!(
            parse_limits("38..36 C", Dimension::Temperature)
                .unwrap_err()
                .to_string(),
            "the low end of `38..36 C` is above the high end"
        );
        assert!(parse_limits("36 C", Dimension::Temperature).is_err());
    }

    #[test]
    fn display_uses_readable_units() {
        assert_eq!(Quantity::volume_ul(1500.0).to_string(), "1.5 mL");
        assert_eq!(Quantity::seconds(5400.0).to_string(), "1 h 30 min");
        assert_eq!(Quantity::seconds(0.25).to_string(), "250 ms");
        assert_eq!(Quantity::seconds(123781.0).to_string(), "34 h 23 min 1 s");
        assert_eq!(Quantity::seconds(0.0).to_string(), "0 s");
        assert_eq!(
            Quantity::new(6000.0, Dimension::Flow).to_string(),
            "6 L/min"
        );
        let airflow = Limits {
            min: 0.0,
            max: 5000.0,
            dimension: Dimension::Flow,
        };
        assert_eq!(airflow.to_string(), "0..5 L/min");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            for d in [Dimension::Volume, Dimension::Time, Dimension::Unitless, Dimension::Flow] {
                let _ = parse_quantity(&s, d);
                let _ = parse_limits(&s, d);
            }
        }

        #[test]
        fn volumes_round_trip(v in 0.001f64..1e6, unit in prop::sample::select(vec![("nL", 1e-3), ("uL", 1.0), ("mL", 1e3), ("L", 1e6)])) {
            let q = parse_quantity(&format!("{v} {}", unit.0), Dimension::Volume).unwrap();
            prop_assert!((q.value - v * unit.1).abs() <= 1e-9 * (v * unit.1).abs().max(1.0));
        }

        #[test]
        fn compound_durations_add_up(h in 0u32..100, m in 0u32..60, s in 0u32..60) {
            let q = parse_quantity(&format!("{h} h {m} min {s} s"), Dimension::Time).unwrap();
            prop_assert_eq!(q.value, f64::from(h * 3600 + m * 60 + s));
        }
    }
}
