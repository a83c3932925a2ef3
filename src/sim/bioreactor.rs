//! A stirred-tank bioreactor (about 1 L working volume) with a growing
//! culture: logistic growth, acidification and pH control, oxygen transfer
//! and demand, jacket temperature, and four pumps (feed, base, acid,
//! antifoam). The state is integrated lazily up to the time it is read, in
//! steps of at most a minute that end exactly where a pump starts or stops.
//! Equations and constants: `docs/simulated-lab.md`.

use super::core::{Model, Sim, Step};
use super::sim_device;
use super::thermal::{BIOREACTOR_RATES, Thermal};
use super::{SimOptions, SimTiming};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{Bioreactor, DeviceResult};
use crate::units::trim;
use async_trait::async_trait;

/// OD600 of the culture at t = 0.
pub(crate) const OD0: f64 = 0.1;
/// Carrying capacity (OD600) of the batch medium.
pub(crate) const CAPACITY0: f64 = 10.0;
/// Feeding never raises the capacity above this (oxygen/mixing limits).
pub(crate) const CAPACITY_MAX: f64 = 60.0;
/// Capacity gained per mL of the `feed` pump.
pub(crate) const CAPACITY_PER_FEED_ML: f64 = 0.5;
/// Specific growth rate (1/h): ln(99/4) / 6 h, so that OD600 goes from 0.1
/// to 2.0 in 6 h with a capacity of 10.
pub(crate) const MU_PER_H: f64 = 0.534_804_248_169_116_5;

/// Initial pH and the pH drop per OD600 unit of growth (acid production).
const PH0: f64 = 7.0;
const PH_PER_OD_GROWN: f64 = 0.08;
/// pH change per mL of base (+) or acid (-) in 1 L of culture.
const PH_PER_ML_PER_L: f64 = 0.1;
const PH_RANGE: (f64, f64) = (2.0, 12.0);
/// The pH controller doses when outside setpoint ± this, at most at this rate.
const PH_DEADBAND: f64 = 0.02;
const PH_CONTROL_MAX_ML_MIN: f64 = 1.0;

/// Oxygen transfer coefficient kLa (1/h) = surface + per rpm + per mL/min of air.
const KLA_SURFACE_PER_H: f64 = 10.0;
const KLA_PER_RPM: f64 = 0.12;
const KLA_PER_ML_MIN_AIR: f64 = 0.06;
/// Oxygen demand (% of air saturation per hour): per OD600 unit grown, and
/// for maintenance per OD600 unit present.
const O2_PER_OD_GROWN: f64 = 1000.0;
const O2_MAINTENANCE_PER_OD_H: f64 = 20.0;

const VOLUME0_UL: f64 = 1_000_000.0;
/// Maximum working volume: feeds that would pass it are refused.
const VOLUME_MAX_UL: f64 = 2_000_000.0;
/// Feed rate when a feed gives only a volume (the `pump_rate` setpoint).
const DEFAULT_PUMP_RATE_ML_MIN: f64 = 10.0;
/// Longest integration step.
const STEP_S: f64 = 60.0;
/// Steps per advance before the rest is taken in one (exact for growth) step.
const MAX_STEPS: u32 = 1_000_000;

fn ul_per_s(ml_min: f64) -> f64 {
    ml_min * 1000.0 / 60.0
}

/// Exact solution of dOD/dt = mu OD (1 - OD/K) after `mu_t` = mu * t.
fn logistic(od: f64, capacity: f64, mu_t: f64) -> f64 {
    if od <= 0.0 || capacity <= 0.0 {
        return od.max(0.0);
    }
    capacity / (1.0 + (capacity / od - 1.0) * (-mu_t).exp())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Feed,
    Base,
    Acid,
    Antifoam,
}

impl Line {
    fn parse(name: &str) -> Option<Line> {
        match name {
            "feed" => Some(Line::Feed),
            "base" => Some(Line::Base),
            "acid" => Some(Line::Acid),
            "antifoam" => Some(Line::Antifoam),
            _ => None,
        }
    }
}

/// A pump running from `start` to `end`.
#[derive(Debug, Clone, Copy)]
struct PumpRun {
    line: Line,
    start: f64,
    end: f64,
    ul_per_s: f64,
}

/// Liquid added during a step, µL per line.
#[derive(Debug, Default)]
struct Additions {
    feed: f64,
    base: f64,
    acid: f64,
    antifoam: f64,
}

impl Additions {
    fn of(line: Line, ul: f64) -> Self {
        let mut a = Additions::default();
        a.add(line, ul);
        a
    }

    fn add(&mut self, line: Line, ul: f64) {
        match line {
            Line::Feed => self.feed += ul,
            Line::Base => self.base += ul,
            Line::Acid => self.acid += ul,
            Line::Antifoam => self.antifoam += ul,
        }
    }

    fn total(&self) -> f64 {
        self.feed + self.base + self.acid + self.antifoam
    }
}

pub(crate) struct BioreactorModel {
    instant: bool,
    /// Time the culture state below is for.
    t: f64,
    od: f64,
    capacity: f64,
    ph: f64,
    dissolved_oxygen: f64,
    volume_ul: f64,
    thermal: Thermal,
    stirrer_rpm: f64,
    airflow_ml_min: f64,
    ph_setpoint: Option<f64>,
    do_setpoint: Option<f64>,
    pump_rate_ml_min: f64,
    runs: Vec<PumpRun>,
}

impl BioreactorModel {
    fn new(instant: bool) -> Self {
        BioreactorModel {
            instant,
            t: 0.0,
            od: OD0,
            capacity: CAPACITY0,
            ph: PH0,
            dissolved_oxygen: 100.0,
            volume_ul: VOLUME0_UL,
            thermal: Thermal::new(&BIOREACTOR_RATES, instant),
            stirrer_rpm: 0.0,
            airflow_ml_min: 0.0,
            ph_setpoint: None,
            do_setpoint: None,
            pump_rate_ml_min: DEFAULT_PUMP_RATE_ML_MIN,
            runs: Vec::new(),
        }
    }

    fn advance(&mut self, now: f64) {
        let mut steps = 0;
        while self.t < now && steps < MAX_STEPS {
            // Steps end where a pump starts or stops, so each pump runs for a
            // whole step or not at all.
            let mut next = (self.t + STEP_S).min(now);
            for r in &self.runs {
                for edge in [r.start, r.end] {
                    if edge > self.t && edge < next {
                        next = edge;
                    }
                }
            }
            self.step(next - self.t);
            self.t = next;
            self.runs.retain(|r| r.end > next);
            steps += 1;
        }
        if self.t < now {
            self.step(now - self.t);
            self.t = now;
            self.runs.retain(|r| r.end > now);
        }
        self.thermal.value(now);
    }

    fn step(&mut self, dt: f64) {
        if dt <= 0.0 {
            return;
        }
        let (t0, t1) = (self.t, self.t + dt);
        let mut added = Additions::default();
        for r in &self.runs {
            let overlap = (r.end.min(t1) - r.start.max(t0)).max(0.0);
            added.add(r.line, r.ul_per_s * overlap);
        }
        let before = self.od;
        self.od = logistic(self.od, self.capacity, MU_PER_H * dt / 3600.0);
        self.ph -= PH_PER_OD_GROWN * (self.od - before).max(0.0);
        self.add(&added);
        self.control_ph(dt);
        self.relax_oxygen(dt);
    }

    /// Mixes liquid in: dilutes the cells, shifts the pH (base/acid), and the
    /// feed raises the capacity.
    fn add(&mut self, added: &Additions) {
        let total = added.total();
        if total <= 0.0 {
            return;
        }
        let before = self.volume_ul;
        self.volume_ul += total;
        let litres = self.volume_ul / 1e6;
        self.ph += PH_PER_ML_PER_L * (added.base - added.acid) / 1000.0 / litres;
        self.ph = self.ph.clamp(PH_RANGE.0, PH_RANGE.1);
        self.od *= before / self.volume_ul;
        self.capacity =
            (self.capacity + CAPACITY_PER_FEED_ML * added.feed / 1000.0).min(CAPACITY_MAX);
    }

    /// The built-in controller: outside the deadband it doses base (or acid)
    /// towards the setpoint, limited by its pump's rate.
    fn control_ph(&mut self, dt: f64) {
        let Some(setpoint) = self.ph_setpoint else {
            return;
        };
        let line = if self.ph < setpoint - PH_DEADBAND {
            Line::Base
        } else if self.ph > setpoint + PH_DEADBAND {
            Line::Acid
        } else {
            return;
        };
        let needed_ml = (setpoint - self.ph).abs() / PH_PER_ML_PER_L * self.volume_ul / 1e6;
        let dose_ml = needed_ml.min(PH_CONTROL_MAX_ML_MIN * dt / 60.0);
        self.add(&Additions::of(line, dose_ml * 1000.0));
    }

    /// Oxygen uptake, % of air saturation per hour.
    fn oxygen_demand(&self) -> f64 {
        let growth = if self.capacity > 0.0 {
            MU_PER_H * self.od * (1.0 - self.od / self.capacity).max(0.0)
        } else {
            0.0
        };
        O2_PER_OD_GROWN * growth + O2_MAINTENANCE_PER_OD_H * self.od
    }

    /// The stirrer speed: its setpoint, raised by the DO cascade (when a DO
    /// setpoint is given) to the speed whose kLa holds that setpoint.
    fn stirrer(&self) -> f64 {
        let max = Self::KIND
            .spec()
            .setpoint("stirrer")
            .map_or(1200.0, |s| s.max);
        let Some(setpoint) = self.do_setpoint else {
            return self.stirrer_rpm;
        };
        let needed = if setpoint >= 100.0 {
            max
        } else {
            let kla = self.oxygen_demand() / (100.0 - setpoint);
            (kla - KLA_SURFACE_PER_H - KLA_PER_ML_MIN_AIR * self.airflow_ml_min) / KLA_PER_RPM
        };
        self.stirrer_rpm.max(needed).min(max)
    }

    fn kla_per_h(&self) -> f64 {
        KLA_SURFACE_PER_H + KLA_PER_RPM * self.stirrer() + KLA_PER_ML_MIN_AIR * self.airflow_ml_min
    }

    /// dDO/dt = kLa (100 - DO) - demand, solved over the step with the
    /// demand of its end: DO relaxes towards 100 - demand / kLa.
    fn relax_oxygen(&mut self, dt: f64) {
        let kla = self.kla_per_h();
        let equilibrium = (100.0 - self.oxygen_demand() / kla).clamp(0.0, 100.0);
        self.dissolved_oxygen =
            equilibrium + (self.dissolved_oxygen - equilibrium) * (-kla * dt / 3600.0).exp();
        self.dissolved_oxygen = self.dissolved_oxygen.clamp(0.0, 100.0);
    }

    fn feed(
        &mut self,
        pump: &str,
        volume_ul: Option<f64>,
        rate_ml_min: Option<f64>,
        duration_s: Option<f64>,
        now: f64,
    ) -> Result<Step, String> {
        let line = Line::parse(pump)
            .ok_or_else(|| format!("no pump `{pump}` (feed, base, acid, antifoam)"))?;
        for x in [volume_ul, rate_ml_min, duration_s].into_iter().flatten() {
            if !(x.is_finite() && x > 0.0) {
                return Err(format!("feed amounts must be positive, not {x}"));
            }
        }
        // `volume` (at the pump rate, a given rate, or over a duration) blocks
        // until added; `rate` + `duration` runs the pump in the background.
        let (rate, volume, blocking) = match (volume_ul, rate_ml_min, duration_s) {
            (Some(v), Some(r), None) => (r, v, true),
            (Some(v), None, Some(d)) => (v / 1000.0 / (d / 60.0), v, true),
            (Some(v), None, None) => (self.pump_rate_ml_min, v, true),
            (None, Some(r), Some(d)) => (r, ul_per_s(r) * d, false),
            _ => {
                return Err(
                    "give `volume` (alone, with `rate` or with `duration`), or `rate` and `duration`"
                        .into(),
                );
            }
        };
        let limits = Self::KIND
            .spec()
            .setpoint("pump_rate")
            .map(|s| s.limits())
            .ok_or("no pump rate limits")?;
        if !(rate > 0.0 && limits.contains(rate)) {
            return Err(format!(
                "pump rate {} mL/min is not within {limits} (or is zero)",
                trim(rate)
            ));
        }
        self.advance(now);
        if self.runs.iter().any(|r| r.line == line) {
            return Err(format!("the {pump} pump is already running"));
        }
        let pending: f64 = self
            .runs
            .iter()
            .map(|r| r.ul_per_s * (r.end - r.start.max(now)).max(0.0))
            .sum();
        if self.volume_ul + pending + volume > VOLUME_MAX_UL + 1e-6 {
            return Err(format!(
                "{} mL more would pass the {} mL working volume",
                trim(volume / 1000.0),
                trim(VOLUME_MAX_UL / 1000.0)
            ));
        }
        let seconds = volume / ul_per_s(rate);
        if self.instant {
            self.add(&Additions::of(line, volume));
        } else {
            self.runs.push(PumpRun {
                line,
                start: now,
                end: now + seconds,
                ul_per_s: ul_per_s(rate),
            });
        }
        Ok(if blocking {
            Step::new(seconds, format!("feed {pump} {}", trim(volume)))
        } else {
            Step::new(
                0.0,
                format!("feed {pump} {} mL/min {} s", trim(rate), trim(seconds)),
            )
        })
    }
}

impl BioreactorModel {
    fn stop_feed(&mut self, pump: &str, now: f64) -> Result<Step, String> {
        let line = Line::parse(pump)
            .ok_or_else(|| format!("no pump `{pump}` (feed, base, acid, antifoam)"))?;
        self.advance(now);
        self.runs.retain(|r| r.line != line);
        Ok(Step::new(0.0, format!("stop {pump}")))
    }
}

impl Model for BioreactorModel {
    const KIND: DeviceKind = DeviceKind::Bioreactor;

    fn value(&mut self, signal: &str, now: f64) -> Option<f64> {
        self.advance(now);
        match signal {
            "ph" => Some(self.ph),
            "dissolved_oxygen" => Some(self.dissolved_oxygen),
            "temperature" => Some(self.thermal.value(now)),
            "od600" => Some(self.od),
            "stirrer" => Some(self.stirrer()),
            "airflow" => Some(self.airflow_ml_min),
            "volume" => Some(self.volume_ul),
            _ => None,
        }
    }

    fn noise(&self, signal: &str, value: f64) -> f64 {
        match signal {
            "ph" => 0.02,
            "dissolved_oxygen" => 1.0,
            "temperature" => 0.1,
            "od600" => 0.01 * value,
            _ => 0.0,
        }
    }

    fn set(&mut self, setpoint: &str, value: f64, now: f64) -> Result<(), String> {
        self.advance(now);
        match setpoint {
            "temperature" => self.thermal.set(Some(value), now),
            "ph" => self.ph_setpoint = Some(value),
            "dissolved_oxygen" => self.do_setpoint = Some(value),
            "stirrer" => self.stirrer_rpm = value,
            "airflow" => self.airflow_ml_min = value,
            "pump_rate" => self.pump_rate_ml_min = value,
            other => return Err(format!("{other} cannot be set")),
        }
        Ok(())
    }

    fn settle_s(&mut self, setpoint: &str, now: f64) -> f64 {
        self.advance(now);
        match (setpoint, self.ph_setpoint) {
            ("temperature", _) => self.thermal.settle_s(now),
            // The controller's dosing time at full rate (growth neglected).
            ("ph", Some(sp)) => {
                let gap = (sp - self.ph).abs() - PH_DEADBAND;
                let ml = gap.max(0.0) / PH_PER_ML_PER_L * self.volume_ul / 1e6;
                ml / PH_CONTROL_MAX_ML_MIN * 60.0
            }
            _ => 0.0,
        }
    }

    fn safe_state(&mut self, now: f64) -> f64 {
        self.advance(now);
        self.thermal.set(None, now);
        self.stirrer_rpm = 0.0;
        self.airflow_ml_min = 0.0;
        self.ph_setpoint = None;
        self.do_setpoint = None;
        self.runs.clear();
        0.0
    }
}

/// A simulated bioreactor with a culture growing from OD600 0.1 at t = 0.
pub struct SimBioreactor {
    sim: Sim<BioreactorModel>,
}

impl SimBioreactor {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        let model = BioreactorModel::new(options.timing == SimTiming::Instant);
        SimBioreactor {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }

    /// The current carrying capacity (OD600), raised by feeding.
    pub fn capacity(&self) -> f64 {
        self.sim.with_model(|m, now| {
            m.advance(now);
            m.capacity
        })
    }
}

sim_device!(SimBioreactor, BioreactorModel);

#[async_trait]
impl Bioreactor for SimBioreactor {
    async fn feed(
        &self,
        pump: &str,
        volume_ul: Option<f64>,
        rate_ml_min: Option<f64>,
        duration_s: Option<f64>,
    ) -> DeviceResult<()> {
        self.sim
            .op(|m, now| m.feed(pump, volume_ul, rate_ml_min, duration_s, now))
            .await
    }

    async fn stop_feed(&self, pump: &str) -> DeviceResult<()> {
        self.sim.op(|m, now| m.stop_feed(pump, now)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError};
    use crate::units::{Dimension, Quantity};

    const HOUR: f64 = 3600.0;

    fn reactor(clock: Clock, seed: u64) -> SimBioreactor {
        SimBioreactor::new(
            "bioreactor",
            clock,
            SimOptions {
                seed,
                timing: SimTiming::Realistic,
            },
        )
    }

    async fn read(br: &SimBioreactor, signal: &str) -> f64 {
        br.read(signal).await.unwrap().value
    }

    fn q(value: f64, dimension: Dimension) -> Quantity {
        Quantity::new(value, dimension)
    }

    #[test]
    fn growth_rate_gives_od_2_at_6_hours() {
        assert!((MU_PER_H - (99.0f64 / 4.0).ln() / 6.0).abs() < 1e-15);
        assert!((logistic(OD0, CAPACITY0, MU_PER_H * 6.0) - 2.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn od600_follows_logistic_growth() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 1);
        let od0 = read(&br, "od600").await;
        assert!(od0 < 0.15 && od0 > 0.05, "{od0}");
        clock.sleep(6.0 * HOUR).await;
        let od6 = read(&br, "od600").await;
        assert!((od6 - 2.0).abs() / 2.0 < 0.15, "{od6}");
        // Reading in many small steps or one jump gives the same culture.
        let other = reactor(clock, 1);
        assert!(
            (other.true_value("od600").unwrap() - br.true_value("od600").unwrap()).abs() < 1e-9
        );
        clock.sleep(42.0 * HOUR).await;
        assert!((read(&br, "od600").await - CAPACITY0).abs() < 0.2);
    }

    #[tokio::test(start_paused = true)]
    async fn base_raises_ph_and_acid_lowers_it() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 2);
        let before = br.true_value("ph").unwrap();
        let noisy_before = read(&br, "ph").await;
        let start = clock.now_s();
        br.feed("base", Some(2000.0), None, None).await.unwrap();
        // 2 mL at the default 10 mL/min: 12 s.
        assert!((clock.now_s() - start - 12.0).abs() < 0.01);
        let after = br.true_value("ph").unwrap();
        assert!((after - before - 0.2).abs() < 0.01, "{before} -> {after}");
        assert!(read(&br, "ph").await > noisy_before + 0.1);
        assert!((read(&br, "volume").await - 1_002_000.0).abs() < 1e-6);
        br.feed("acid", Some(1000.0), Some(20.0), None)
            .await
            .unwrap();
        assert!(br.true_value("ph").unwrap() < after - 0.09);
    }

    #[tokio::test(start_paused = true)]
    async fn ph_control_holds_the_setpoint_against_acidification() {
        let clock = Clock::new(1.0);
        let free = reactor(clock, 3);
        let held = reactor(clock, 3);
        held.set("ph", q(7.0, Dimension::Unitless)).await.unwrap();
        clock.sleep(8.0 * HOUR).await;
        let drift = free.true_value("ph").unwrap();
        assert!(drift < 6.75, "growth acidifies: {drift}");
        let ph = held.true_value("ph").unwrap();
        assert!((ph - 7.0).abs() <= PH_DEADBAND + 0.005, "{ph}");
        // The base added shows in the volume.
        assert!(held.true_value("volume").unwrap() > 1_003_000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn dissolved_oxygen_falls_with_growth_and_rises_with_stirring() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 4);
        assert!(read(&br, "dissolved_oxygen").await > 98.0);
        clock.sleep(HOUR).await;
        let early = read(&br, "dissolved_oxygen").await;
        clock.sleep(5.0 * HOUR).await;
        let late = read(&br, "dissolved_oxygen").await;
        assert!(late < early - 20.0, "{early} -> {late}");
        br.set("stirrer", q(800.0, Dimension::Speed)).await.unwrap();
        clock.sleep(600.0).await;
        let stirred = read(&br, "dissolved_oxygen").await;
        assert!(stirred > late + 20.0, "{late} -> {stirred}");
        assert_eq!(read(&br, "stirrer").await, 800.0);
        br.set("airflow", q(2000.0, Dimension::Flow)).await.unwrap();
        clock.sleep(600.0).await;
        assert!(read(&br, "dissolved_oxygen").await > stirred);
        assert_eq!(read(&br, "airflow").await, 2000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_do_cascade_raises_the_stirrer() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 5);
        br.set("stirrer", q(100.0, Dimension::Speed)).await.unwrap();
        br.set("dissolved_oxygen", q(80.0, Dimension::Percent))
            .await
            .unwrap();
        clock.sleep(6.0 * HOUR).await;
        let stirrer = read(&br, "stirrer").await;
        assert!(stirrer > 200.0, "{stirrer}");
        let dissolved = br.true_value("dissolved_oxygen").unwrap();
        assert!((dissolved - 80.0).abs() < 3.0, "{dissolved}");
    }

    #[tokio::test(start_paused = true)]
    async fn feeding_raises_capacity_and_volume() {
        let clock = Clock::new(1.0);
        let fed = reactor(clock, 6);
        let start = clock.now_s();
        fed.feed("feed", Some(20_000.0), None, None).await.unwrap();
        // 20 mL at 10 mL/min.
        assert!((clock.now_s() - start - 120.0).abs() < 0.01);
        assert!((fed.capacity() - 20.0).abs() < 1e-9);
        assert!((fed.true_value("volume").unwrap() - 1_020_000.0).abs() < 1e-6);
        clock.sleep(48.0 * HOUR).await;
        let od = fed.true_value("od600").unwrap();
        assert!((od - 20.0).abs() < 0.5, "{od}");

        // Rate + duration: returns at once, the pump runs in the background.
        let start = clock.now_s();
        fed.feed("feed", None, Some(6.0), Some(600.0))
            .await
            .unwrap();
        assert_eq!(clock.now_s(), start);
        let e = fed
            .feed("feed", Some(1000.0), None, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already running"), "{e}");
        clock.sleep(300.0).await;
        let v = fed.true_value("volume").unwrap();
        assert!((v - 1_050_000.0).abs() < 1.0, "{v}");
        clock.sleep(600.0).await;
        let v = fed.true_value("volume").unwrap();
        assert!((v - 1_080_000.0).abs() < 1.0, "{v}");
        assert!((fed.capacity() - 50.0).abs() < 1e-6);

        // safe_state stops a running pump.
        fed.feed("antifoam", None, Some(1.0), Some(3600.0))
            .await
            .unwrap();
        clock.sleep(60.0).await;
        fed.safe_state().await.unwrap();
        clock.sleep(HOUR).await;
        let v = fed.true_value("volume").unwrap();
        assert!((v - 1_081_000.0).abs() < 1.0, "{v}");
    }

    #[tokio::test(start_paused = true)]
    async fn impossible_feeds_and_setpoints_are_refused() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 7);
        let refusals = [
            br.feed("glucose", Some(1000.0), None, None).await,
            br.feed("feed", None, Some(5.0), None).await,
            br.feed("feed", None, None, Some(60.0)).await,
            br.feed("feed", Some(1000.0), Some(5.0), Some(60.0)).await,
            br.feed("feed", Some(-1.0), None, None).await,
            br.feed("feed", None, Some(60.0), Some(60.0)).await,
            br.feed("feed", Some(1_500_000.0), Some(50.0), None).await,
            br.set("ph", q(9.0, Dimension::Unitless)).await,
            br.set("stirrer", q(500.0, Dimension::Flow)).await,
            br.set("speed", q(500.0, Dimension::Speed)).await,
            br.set("pump_rate", q(60.0, Dimension::Flow)).await,
            br.command("stop").await,
        ];
        for r in refusals {
            assert!(matches!(r, Err(DeviceError::Refused { .. })), "{r:?}");
        }
        assert_eq!(br.operations(), 0);
        assert!(br.read("speed").await.is_err());
        assert_eq!(br.true_value("volume"), Some(VOLUME0_UL));
        assert_eq!(br.true_value("stirrer"), Some(0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn temperature_ramps_at_0_02_c_per_s() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 8);
        assert!((read(&br, "temperature").await - 22.0).abs() <= 0.1);
        let start = clock.now_s();
        br.set("temperature", q(37.0, Dimension::Temperature))
            .await
            .unwrap();
        br.wait_until_reached("temperature").await.unwrap();
        let expected = (37.0 - 0.7 - 22.0) / 0.02;
        assert!((clock.now_s() - start - expected).abs() / expected < 0.01);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_readings() {
        let clock = Clock::new(1.0);
        let a = reactor(clock, 9);
        let b = reactor(clock, 9);
        let c = reactor(clock, 10);
        let (mut ra, mut rb, mut rc) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10 {
            clock.sleep(600.0).await;
            for s in ["ph", "od600", "dissolved_oxygen", "temperature"] {
                ra.push(read(&a, s).await);
                rb.push(read(&b, s).await);
                rc.push(read(&c, s).await);
            }
        }
        assert_eq!(ra, rb);
        assert_ne!(ra, rc);
    }

    #[tokio::test(start_paused = true)]
    async fn instant_timing_takes_no_lab_time() {
        let clock = Clock::new(1.0);
        let br = SimBioreactor::new(
            "bioreactor",
            clock,
            SimOptions {
                seed: 0,
                timing: SimTiming::Instant,
            },
        );
        br.set("temperature", q(37.0, Dimension::Temperature))
            .await
            .unwrap();
        br.wait_until_reached("temperature").await.unwrap();
        br.feed("feed", Some(10_000.0), None, None).await.unwrap();
        br.feed("base", None, Some(1.0), Some(600.0)).await.unwrap();
        assert_eq!(clock.now_s(), 0.0);
        assert_eq!(br.true_value("temperature"), Some(37.0));
        assert!((br.true_value("volume").unwrap() - 1_020_000.0).abs() < 1e-6);
    }

    /// The shipped fed-batch protocol's conditions stay inside its monitors'
    /// limits (pH 6.7..7.3, volume below 1.9 L) and the OD trigger is reached.
    #[tokio::test(start_paused = true)]
    async fn fed_batch_scenario_stays_in_bounds() {
        let clock = Clock::new(1.0);
        let br = reactor(clock, 11);
        br.set("temperature", q(37.0, Dimension::Temperature))
            .await
            .unwrap();
        br.set("ph", q(7.0, Dimension::Unitless)).await.unwrap();
        br.set("dissolved_oxygen", q(30.0, Dimension::Percent))
            .await
            .unwrap();
        br.set("stirrer", q(500.0, Dimension::Speed)).await.unwrap();
        br.set("airflow", q(1000.0, Dimension::Flow)).await.unwrap();
        br.feed("antifoam", Some(200.0), None, None).await.unwrap();
        let mut hours = 0.0;
        while br.true_value("od600").unwrap() < 8.0 {
            clock.sleep(600.0).await;
            hours += 600.0 / HOUR;
            assert!(hours < 16.0, "the OD trigger is never reached");
        }
        br.feed("feed", None, Some(0.5), Some(24.0 * HOUR))
            .await
            .unwrap();
        for _ in 0..(25 * 2) {
            clock.sleep(HOUR / 2.0).await;
            let ph = read(&br, "ph").await;
            assert!((6.7..=7.3).contains(&ph), "{ph}");
            assert!(read(&br, "volume").await < 1_900_000.0);
        }
        let od = br.true_value("od600").unwrap();
        assert!(od > 20.0, "fed-batch reaches a high density: {od}");
    }
}
