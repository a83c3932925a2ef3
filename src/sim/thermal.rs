//! Lazily evaluated dynamics shared by several kinds:
//! piecewise-linear temperature ramps, first-order approaches (CO2,
//! humidity) and motor speed ramps. Each stores its value and the time it
//! was computed, and advances analytically to the time asked for, so reading
//! after a 48-hour jump costs the same as after one second.

/// Room temperature: where a device drifts when its heater is off.
pub(crate) const AMBIENT_C: f64 = 22.0;

/// Within this of the setpoint a temperature counts as reached: the
/// Opentrons "holding at target" rule.
pub(crate) const TEMPERATURE_TOLERANCE_C: f64 = 0.7;

/// Ramp rates in C/s by temperature band: `heat[i]` and `cool[i]` apply in
/// the band between `breakpoints[i - 1]` and `breakpoints[i]` (so there is one
/// more band than breakpoints).
#[derive(Debug)]
pub(crate) struct RampRates {
    pub breakpoints: &'static [f64],
    pub heat: &'static [f64],
    pub cool: &'static [f64],
}

/// Opentrons Temperature Module, from the duration estimator: 0.0875 C/s below
/// 25 C, 0.2 C/s from 25 to 37 C, 0.36 C/s above 37 C, heating and cooling.
pub(crate) static TEMPERATURE_MODULE_RATES: RampRates = RampRates {
    breakpoints: &[25.0, 37.0],
    heat: &[0.0875, 0.2, 0.36],
    cool: &[0.0875, 0.2, 0.36],
};

/// Plate incubator (Liconic/Cytomat class): about 1 C/min heating, 0.5 C/min cooling.
pub(crate) static INCUBATOR_RATES: RampRates = RampRates {
    breakpoints: &[],
    heat: &[1.0 / 60.0],
    cool: &[0.5 / 60.0],
};

/// Heater-shaker: about 0.1 C/s heating; it has no active cooling (0.03 C/s).
pub(crate) static HEATER_SHAKER_RATES: RampRates = RampRates {
    breakpoints: &[],
    heat: &[0.1],
    cool: &[0.03],
};

/// Jacketed bench-top bioreactor (about 1 L): 0.02 C/s either way.
pub(crate) static BIOREACTOR_RATES: RampRates = RampRates {
    breakpoints: &[],
    heat: &[0.02],
    cool: &[0.02],
};

/// Rates are never zero here, but a model must not divide by zero.
const MIN_RATE: f64 = 1e-6;

impl RampRates {
    /// The band being traversed from `t` in the given direction, and the
    /// breakpoint that ends it (if any).
    fn segment(&self, t: f64, heating: bool) -> (f64, Option<f64>) {
        let (band, boundary, rates) = if heating {
            (
                self.breakpoints.iter().filter(|b| **b <= t).count(),
                self.breakpoints.iter().copied().find(|b| *b > t),
                self.heat,
            )
        } else {
            (
                self.breakpoints.iter().filter(|b| **b < t).count(),
                self.breakpoints.iter().rev().copied().find(|b| *b < t),
                self.cool,
            )
        };
        let rate = rates.get(band).or(rates.last()).copied().unwrap_or(1.0);
        (rate.max(MIN_RATE), boundary)
    }

    /// The temperature `dt` seconds after being at `t` and ramping to `goal`.
    pub fn advance(&self, mut t: f64, goal: f64, mut dt: f64) -> f64 {
        // Each pass ends at a breakpoint or at the goal, so this is enough.
        for _ in 0..self.breakpoints.len() + 2 {
            if dt <= 0.0 || t == goal {
                break;
            }
            let heating = goal > t;
            let (rate, boundary) = self.segment(t, heating);
            let stop = match (heating, boundary) {
                (true, Some(b)) => b.min(goal),
                (false, Some(b)) => b.max(goal),
                (_, None) => goal,
            };
            let need = (stop - t).abs() / rate;
            if need >= dt {
                return if heating {
                    t + rate * dt
                } else {
                    t - rate * dt
                };
            }
            t = stop;
            dt -= need;
        }
        t
    }

    /// Seconds to ramp from `t` to `goal`.
    pub fn time(&self, mut t: f64, goal: f64) -> f64 {
        let mut total = 0.0;
        for _ in 0..self.breakpoints.len() + 2 {
            if t == goal {
                break;
            }
            let heating = goal > t;
            let (rate, boundary) = self.segment(t, heating);
            let stop = match (heating, boundary) {
                (true, Some(b)) => b.min(goal),
                (false, Some(b)) => b.max(goal),
                (_, None) => goal,
            };
            total += (stop - t).abs() / rate;
            t = stop;
        }
        total
    }
}

/// A temperature ramping linearly (per band) to its setpoint, or to ambient
/// when the heater is off.
#[derive(Debug)]
pub(crate) struct Thermal {
    rates: &'static RampRates,
    instant: bool,
    temp: f64,
    at: f64,
    target: Option<f64>,
}

impl Thermal {
    pub fn new(rates: &'static RampRates, instant: bool) -> Self {
        Thermal {
            rates,
            instant,
            temp: AMBIENT_C,
            at: 0.0,
            target: None,
        }
    }

    fn goal(&self) -> f64 {
        self.target.unwrap_or(AMBIENT_C)
    }

    fn advance(&mut self, now: f64) {
        if self.instant {
            self.temp = self.goal();
        } else if now > self.at {
            self.temp = self.rates.advance(self.temp, self.goal(), now - self.at);
        }
        self.at = self.at.max(now);
    }

    pub fn value(&mut self, now: f64) -> f64 {
        self.advance(now);
        self.temp
    }

    /// A new setpoint, or `None` for heater off (drift to ambient).
    pub fn set(&mut self, target: Option<f64>, now: f64) {
        self.advance(now);
        self.target = target;
        if self.instant {
            self.temp = self.goal();
        }
    }

    /// Seconds until the temperature is within `TEMPERATURE_TOLERANCE_C` of
    /// its setpoint (0 without a setpoint).
    pub fn settle_s(&mut self, now: f64) -> f64 {
        self.advance(now);
        let Some(goal) = self.target else { return 0.0 };
        let gap = goal - self.temp;
        if gap.abs() <= TEMPERATURE_TOLERANCE_C {
            return 0.0;
        }
        let edge = goal - TEMPERATURE_TOLERANCE_C * gap.signum();
        self.rates.time(self.temp, edge)
    }
}

/// A first-order approach to a setpoint (time constant `tau_s`), or to the
/// ambient value without one: x(t) = x_sp + (x0 - x_sp) e^(-t/tau).
#[derive(Debug)]
pub(crate) struct FirstOrder {
    instant: bool,
    value: f64,
    at: f64,
    target: Option<f64>,
    ambient: f64,
    tau_s: f64,
    tolerance: f64,
}

impl FirstOrder {
    pub fn new(ambient: f64, tau_s: f64, tolerance: f64, instant: bool) -> Self {
        FirstOrder {
            instant,
            value: ambient,
            at: 0.0,
            target: None,
            ambient,
            tau_s: tau_s.max(MIN_RATE),
            tolerance: tolerance.max(MIN_RATE),
        }
    }

    fn goal(&self) -> f64 {
        self.target.unwrap_or(self.ambient)
    }

    fn advance(&mut self, now: f64) {
        let goal = self.goal();
        if self.instant {
            self.value = goal;
        } else if now > self.at {
            self.value = goal + (self.value - goal) * (-(now - self.at) / self.tau_s).exp();
        }
        self.at = self.at.max(now);
    }

    pub fn value(&mut self, now: f64) -> f64 {
        self.advance(now);
        self.value
    }

    pub fn set(&mut self, target: Option<f64>, now: f64) {
        self.advance(now);
        self.target = target;
        if self.instant {
            self.value = self.goal();
        }
    }

    /// Seconds until within the tolerance of the setpoint: tau ln(|gap| / tol).
    pub fn settle_s(&mut self, now: f64) -> f64 {
        self.advance(now);
        let Some(goal) = self.target else { return 0.0 };
        let gap = (self.value - goal).abs();
        if gap <= self.tolerance {
            0.0
        } else {
            self.tau_s * (gap / self.tolerance).ln()
        }
    }
}

/// A motor speed that goes linearly from where it was to the new setpoint in
/// `ramp_s`, whatever the size of the change.
#[derive(Debug)]
pub(crate) struct SpeedRamp {
    instant: bool,
    from: f64,
    to: f64,
    start: f64,
    ramp_s: f64,
}

impl SpeedRamp {
    pub fn new(ramp_s: f64, instant: bool) -> Self {
        SpeedRamp {
            instant,
            from: 0.0,
            to: 0.0,
            start: 0.0,
            ramp_s: ramp_s.max(MIN_RATE),
        }
    }

    pub fn value(&self, now: f64) -> f64 {
        if self.instant {
            return self.to;
        }
        let fraction = ((now - self.start) / self.ramp_s).clamp(0.0, 1.0);
        self.from + (self.to - self.from) * fraction
    }

    pub fn target(&self) -> f64 {
        self.to
    }

    pub fn set(&mut self, to: f64, now: f64) {
        self.from = self.value(now);
        self.start = now;
        self.to = to;
    }

    /// Seconds until the speed equals its setpoint.
    pub fn settle_s(&self, now: f64) -> f64 {
        if self.instant {
            0.0
        } else {
            (self.start + self.ramp_s - now).max(0.0)
        }
    }

    /// Whether the motor turns now or is about to.
    pub fn moving(&self, now: f64) -> bool {
        self.to > 0.0 || self.value(now) > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_module_ramp_crosses_bands() {
        let r = &TEMPERATURE_MODULE_RATES;
        let expected = 3.0 / 0.0875 + 12.0 / 0.2 + 58.0 / 0.36;
        assert!((r.time(22.0, 95.0) - expected).abs() < 1e-9);
        assert!((r.time(22.0, 4.0) - 18.0 / 0.0875).abs() < 1e-9);
        assert!((r.time(95.0, 22.0) - expected).abs() < 1e-9);
        // Advancing by the ramp time lands on the goal; halfway is consistent.
        assert!((r.advance(22.0, 95.0, expected) - 95.0).abs() < 1e-9);
        assert!((r.advance(22.0, 95.0, 1e6) - 95.0).abs() < 1e-9);
        let t = r.advance(22.0, 95.0, 50.0);
        assert!((r.time(22.0, t) - 50.0).abs() < 1e-9, "{t}");
        // Starting exactly on a breakpoint uses the band being entered.
        assert!((r.advance(25.0, 30.0, 1.0) - 25.2).abs() < 1e-12);
        assert!((r.advance(25.0, 20.0, 1.0) - 24.9125).abs() < 1e-12);
    }

    #[test]
    fn thermal_settles_within_tolerance_and_drifts_to_ambient() {
        let mut t = Thermal::new(&INCUBATOR_RATES, false);
        t.set(Some(37.0), 0.0);
        let s = t.settle_s(0.0);
        assert!((s - (37.0 - 0.7 - 22.0) * 60.0).abs() < 1e-6, "{s}");
        assert!((t.value(s) - 36.3).abs() < 1e-9);
        t.set(None, 2000.0);
        assert_eq!(t.settle_s(2000.0), 0.0);
        assert!((t.value(1e6) - AMBIENT_C).abs() < 1e-9);
        let mut i = Thermal::new(&INCUBATOR_RATES, true);
        i.set(Some(37.0), 0.0);
        assert_eq!(i.value(0.0), 37.0);
        assert_eq!(i.settle_s(0.0), 0.0);
    }

    #[test]
    fn first_order_and_speed_ramps() {
        let mut co2 = FirstOrder::new(0.04, 300.0, 0.1, false);
        co2.set(Some(5.0), 0.0);
        let s = co2.settle_s(0.0);
        assert!((co2.value(s) - 4.9).abs() < 1e-9, "{s}");
        assert!((co2.value(300.0 * 20.0) - 5.0).abs() < 1e-6);
        let mut speed = SpeedRamp::new(2.0, false);
        speed.set(1000.0, 10.0);
        assert_eq!(speed.value(11.0), 500.0);
        assert_eq!(speed.settle_s(10.5), 1.5);
        assert!(speed.moving(20.0));
        speed.set(0.0, 20.0);
        assert!(speed.moving(21.0));
        assert!(!speed.moving(22.0));
    }
}
