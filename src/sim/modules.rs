//! Opentrons-style deck modules: the Temperature Module and the Heater-Shaker.

use super::core::{Model, Sim};
use super::sim_device;
use super::thermal::{HEATER_SHAKER_RATES, SpeedRamp, TEMPERATURE_MODULE_RATES, Thermal};
use super::{SimOptions, SimTiming};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{HeaterShaker, TemperatureModule};

/// Temperature readings: about ±0.1 C.
const TEMPERATURE_NOISE_C: f64 = 0.1;
/// The heater-shaker reaches a new speed (or stops) in about 2 s.
const SHAKER_RAMP_S: f64 = 2.0;
/// Opening or closing the labware latch.
const LATCH_S: f64 = 2.0;

pub(crate) struct TemperatureModuleModel {
    thermal: Thermal,
}

impl Model for TemperatureModuleModel {
    const KIND: DeviceKind = DeviceKind::TemperatureModule;

    fn value(&mut self, signal: &str, now: f64) -> Option<f64> {
        (signal == "temperature").then(|| self.thermal.value(now))
    }

    fn noise(&self, _signal: &str, _value: f64) -> f64 {
        TEMPERATURE_NOISE_C
    }

    fn set(&mut self, setpoint: &str, value: f64, now: f64) -> Result<(), String> {
        match setpoint {
            "temperature" => {
                self.thermal.set(Some(value), now);
                Ok(())
            }
            other => Err(format!("{other} cannot be set")),
        }
    }

    fn settle_s(&mut self, setpoint: &str, now: f64) -> f64 {
        match setpoint {
            "temperature" => self.thermal.settle_s(now),
            _ => 0.0,
        }
    }

    fn command(&mut self, name: &str, now: f64) -> Result<f64, String> {
        match name {
            "deactivate" => {
                self.thermal.set(None, now);
                Ok(0.0)
            }
            other => Err(format!("{other} is not supported")),
        }
    }

    fn safe_state(&mut self, now: f64) -> f64 {
        self.thermal.set(None, now);
        0.0
    }
}

/// A simulated Opentrons Temperature Module (4..95 C).
pub struct SimTemperatureModule {
    sim: Sim<TemperatureModuleModel>,
}

impl SimTemperatureModule {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        let instant = options.timing == SimTiming::Instant;
        let model = TemperatureModuleModel {
            thermal: Thermal::new(&TEMPERATURE_MODULE_RATES, instant),
        };
        SimTemperatureModule {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }
}

sim_device!(SimTemperatureModule, TemperatureModuleModel);
impl TemperatureModule for SimTemperatureModule {}

pub(crate) struct HeaterShakerModel {
    thermal: Thermal,
    speed: SpeedRamp,
    latch_open: bool,
}

impl HeaterShakerModel {
    /// Stops the motor; returns the spin-down time left.
    fn stop(&mut self, now: f64) -> f64 {
        if self.speed.target() > 0.0 {
            self.speed.set(0.0, now);
        }
        self.speed.settle_s(now)
    }
}

impl Model for HeaterShakerModel {
    const KIND: DeviceKind = DeviceKind::HeaterShaker;

    fn value(&mut self, signal: &str, now: f64) -> Option<f64> {
        match signal {
            "temperature" => Some(self.thermal.value(now)),
            "speed" => Some(self.speed.value(now)),
            _ => None,
        }
    }

    fn noise(&self, signal: &str, _value: f64) -> f64 {
        if signal == "temperature" {
            TEMPERATURE_NOISE_C
        } else {
            0.0
        }
    }

    fn set(&mut self, setpoint: &str, value: f64, now: f64) -> Result<(), String> {
        match setpoint {
            "temperature" => {
                self.thermal.set(Some(value), now);
                Ok(())
            }
            // The Opentrons interlock: no shaking with the latch open.
            "speed" if self.latch_open => {
                Err("cannot shake with the labware latch open".to_string())
            }
            "speed" => {
                self.speed.set(value, now);
                Ok(())
            }
            other => Err(format!("{other} cannot be set")),
        }
    }

    fn settle_s(&mut self, setpoint: &str, now: f64) -> f64 {
        match setpoint {
            "temperature" => self.thermal.settle_s(now),
            "speed" => self.speed.settle_s(now),
            _ => 0.0,
        }
    }

    fn command(&mut self, name: &str, now: f64) -> Result<f64, String> {
        match name {
            // Returns once the plate has stopped, so the latch may open next.
            "stop_shaking" => Ok(self.stop(now)),
            "open_latch" if self.speed.moving(now) => {
                Err("cannot open the labware latch while shaking".to_string())
            }
            "open_latch" | "close_latch" => {
                let open = name == "open_latch";
                let seconds = if self.latch_open == open {
                    0.0
                } else {
                    LATCH_S
                };
                self.latch_open = open;
                Ok(seconds)
            }
            "deactivate" => {
                self.thermal.set(None, now);
                Ok(self.stop(now))
            }
            other => Err(format!("{other} is not supported")),
        }
    }

    fn safe_state(&mut self, now: f64) -> f64 {
        self.thermal.set(None, now);
        self.stop(now)
    }
}

/// A simulated Opentrons Heater-Shaker (37..95 C, 200..3000 rpm) with its
/// latch interlock.
pub struct SimHeaterShaker {
    sim: Sim<HeaterShakerModel>,
}

impl SimHeaterShaker {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        let instant = options.timing == SimTiming::Instant;
        let model = HeaterShakerModel {
            thermal: Thermal::new(&HEATER_SHAKER_RATES, instant),
            speed: SpeedRamp::new(SHAKER_RAMP_S, instant),
            latch_open: false,
        };
        SimHeaterShaker {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }

    pub fn latch_open(&self) -> bool {
        self.sim.with_model(|m, _| m.latch_open)
    }
}

sim_device!(SimHeaterShaker, HeaterShakerModel);
impl HeaterShaker for SimHeaterShaker {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError};
    use crate::sim::{FaultKind, Injectable, InjectedFault};
    use crate::units::{Dimension, Quantity};

    fn realistic() -> SimOptions {
        SimOptions {
            seed: 1,
            timing: SimTiming::Realistic,
        }
    }

    fn celsius(c: f64) -> Quantity {
        Quantity::new(c, Dimension::Temperature)
    }

    fn rpm(v: f64) -> Quantity {
        Quantity::new(v, Dimension::Speed)
    }

    /// Lab seconds taken by `set` then `wait_until_reached`.
    async fn time_to_reach(tm: &SimTemperatureModule, clock: Clock, target: f64) -> f64 {
        let start = clock.now_s();
        tm.set("temperature", celsius(target)).await.unwrap();
        tm.wait_until_reached("temperature").await.unwrap();
        clock.now_s() - start
    }

    #[tokio::test(start_paused = true)]
    async fn temperature_module_takes_the_documented_time() {
        // Opentrons rates: 0.0875 C/s below 25 C, 0.2 C/s 25-37 C, 0.36 C/s
        // above; "reached" is within 0.7 C of the target.
        let clock = Clock::new(1.0);
        let tm = SimTemperatureModule::new("tm", clock, realistic());
        let cooling = (22.0 - (4.0 + 0.7)) / 0.0875; // 197.7 s
        let took = time_to_reach(&tm, clock, 4.0).await;
        assert!(
            (took - cooling).abs() / cooling < 0.01,
            "{took} vs {cooling}"
        );
        // The full ramp (18 C at 0.0875 C/s) ends at 4 C.
        clock.sleep(18.0 / 0.0875 - took + 1.0).await;
        let t = tm.read("temperature").await.unwrap().value;
        assert!((t - 4.0).abs() <= 0.1 + 1e-9, "{t}");

        let tm = SimTemperatureModule::new("tm", clock, realistic());
        let heating = 3.0 / 0.0875 + 12.0 / 0.2 + (95.0 - 0.7 - 37.0) / 0.36; // 253.5 s
        let took = time_to_reach(&tm, clock, 95.0).await;
        assert!(
            (took - heating).abs() / heating < 0.01,
            "{took} vs {heating}"
        );
        let t = tm.true_value("temperature").unwrap();
        assert!((t - 94.3).abs() < 0.05, "{t}");

        // Deactivated, it drifts back to ambient.
        tm.command("deactivate").await.unwrap();
        clock.sleep(1000.0).await;
        assert!((tm.true_value("temperature").unwrap() - 22.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_are_refused_before_any_state_change() {
        let clock = Clock::new(1.0);
        let tm = SimTemperatureModule::new("tm", clock, realistic());
        for (name, value) in [
            ("temperature", celsius(3.9)),
            ("temperature", celsius(95.5)),
            ("temperature", celsius(f64::NAN)),
            ("temperature", rpm(37.0)),
            ("speed", rpm(300.0)),
        ] {
            let e = tm.set(name, value).await.unwrap_err();
            assert!(matches!(e, DeviceError::Refused { .. }), "{e}");
        }
        assert_eq!(tm.operations(), 0);
        assert!(tm.log().is_empty());
        clock.sleep(100.0).await;
        assert_eq!(tm.true_value("temperature"), Some(22.0));
        assert!(tm.read("ph").await.is_err());
        assert!(tm.command("open_door").await.is_err());
        assert!(tm.command("set").await.is_err(), "set has arguments");
        assert_eq!(
            tm.limits("temperature").map(|l| (l.min, l.max)),
            Some((4.0, 95.0))
        );
        assert_eq!(tm.slots(), 1);

        let hs = SimHeaterShaker::new("hs", clock, realistic());
        for v in [0.0, 150.0, 3001.0] {
            assert!(hs.set("speed", rpm(v)).await.is_err(), "{v}");
        }
        assert!(hs.set("temperature", celsius(30.0)).await.is_err());
        assert_eq!(hs.operations(), 0);
        assert_eq!(hs.true_value("speed"), Some(0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn heater_shaker_latch_interlock_and_speed_ramp() {
        let clock = Clock::new(1.0);
        let hs = SimHeaterShaker::new("hs", clock, realistic());
        hs.command("open_latch").await.unwrap();
        assert!(hs.latch_open());
        let e = hs.set("speed", rpm(500.0)).await.unwrap_err();
        assert!(e.to_string().contains("latch"), "{e}");
        hs.command("close_latch").await.unwrap();
        hs.set("speed", rpm(1000.0)).await.unwrap();
        clock.sleep(1.0).await;
        assert!((hs.read("speed").await.unwrap().value - 500.0).abs() < 1.0);
        hs.wait_until_reached("speed").await.unwrap();
        assert_eq!(hs.read("speed").await.unwrap().value, 1000.0);
        let e = hs.command("open_latch").await.unwrap_err();
        assert!(e.to_string().contains("shaking"), "{e}");
        assert!(!hs.latch_open());
        // stop_shaking returns once the plate has stopped.
        let before = clock.now_s();
        hs.command("stop_shaking").await.unwrap();
        assert!((clock.now_s() - before - 2.0).abs() < 0.01);
        assert_eq!(hs.true_value("speed"), Some(0.0));
        hs.command("open_latch").await.unwrap();

        // Heating at 0.1 C/s: 22 -> 36.3 C (within 0.7 of 37) in 143 s.
        let start = clock.now_s();
        hs.set("temperature", celsius(37.0)).await.unwrap();
        hs.wait_until_reached("temperature").await.unwrap();
        assert!((clock.now_s() - start - 143.0).abs() < 0.5);
        hs.safe_state().await.unwrap();
        clock.sleep(1000.0).await;
        // Passive cooling at 0.03 C/s: about 480 s back to 22 C.
        assert!((hs.true_value("temperature").unwrap() - 22.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn fault_injection() {
        let clock = Clock::new(1.0);
        let tm = SimTemperatureModule::new("tm", clock, realistic());
        tm.inject(InjectedFault::FailNext {
            count: 2,
            error: FaultKind::Timeout,
        });
        // Reads and connect are not operations: unaffected.
        tm.connect().await.unwrap();
        tm.read("temperature").await.unwrap();
        for _ in 0..2 {
            let e = tm.set("temperature", celsius(40.0)).await.unwrap_err();
            assert!(matches!(e, DeviceError::Timeout { .. }), "{e}");
        }
        // No side effect: still heading to ambient, nothing logged.
        assert_eq!(tm.operations(), 0);
        clock.sleep(10.0).await;
        assert_eq!(tm.true_value("temperature"), Some(22.0));
        tm.set("temperature", celsius(40.0)).await.unwrap();
        assert_eq!(tm.operations(), 1);

        tm.inject(InjectedFault::Offline);
        for e in [
            tm.connect().await.unwrap_err(),
            tm.read("temperature").await.unwrap_err(),
            tm.safe_state().await.unwrap_err(),
            tm.command("deactivate").await.unwrap_err(),
        ] {
            assert!(matches!(e, DeviceError::Disconnected { .. }), "{e}");
        }
        tm.inject(InjectedFault::Clear);
        tm.connect().await.unwrap();
        tm.safe_state().await.unwrap();
        assert_eq!(tm.log(), ["set temperature 40", "safe_state"]);

        tm.inject(InjectedFault::FailNext {
            count: 1,
            error: FaultKind::Fault,
        });
        let e = tm.command("deactivate").await.unwrap_err();
        assert!(e.is_device_fault(), "{e}");
        tm.command("deactivate").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn instant_timing_takes_no_lab_time() {
        let clock = Clock::new(1.0);
        let options = SimOptions {
            seed: 1,
            timing: SimTiming::Instant,
        };
        let tm = SimTemperatureModule::new("tm", clock, options.clone());
        let hs = SimHeaterShaker::new("hs", clock, options);
        let start = clock.now_s();
        tm.set("temperature", celsius(4.0)).await.unwrap();
        tm.wait_until_reached("temperature").await.unwrap();
        hs.set("temperature", celsius(95.0)).await.unwrap();
        hs.wait_until_reached("temperature").await.unwrap();
        hs.set("speed", rpm(3000.0)).await.unwrap();
        hs.wait_until_reached("speed").await.unwrap();
        hs.command("stop_shaking").await.unwrap();
        hs.command("open_latch").await.unwrap();
        assert_eq!(clock.now_s(), start);
        assert_eq!(tm.true_value("temperature"), Some(4.0));
        assert_eq!(hs.true_value("temperature"), Some(95.0));
    }
}
