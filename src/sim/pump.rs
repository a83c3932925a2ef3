//! A peristaltic pump: dispenses a volume at a rate, or runs continuously at
//! its `rate` setpoint. `dispensed` integrates the flow lazily.

use super::core::{Model, Sim, Step};
use super::sim_device;
use super::{SimOptions, SimTiming};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{DeviceResult, Pump};
use crate::units::trim;
use async_trait::async_trait;

/// Rate of `dispense` when none is given.
const DEFAULT_RATE_ML_MIN: f64 = 50.0;

/// mL/min to µL/s.
fn ul_per_s(ml_min: f64) -> f64 {
    ml_min * 1000.0 / 60.0
}

pub(crate) struct PumpModel {
    instant: bool,
    /// Volume pumped up to `at`, in µL.
    dispensed_ul: f64,
    at: f64,
    /// Continuous run rate (the `rate` setpoint; 0 when stopped).
    running_ml_min: f64,
    /// A `dispense` in progress: its end time and rate.
    dispensing: Option<(f64, f64)>,
}

impl PumpModel {
    fn advance(&mut self, now: f64) {
        if now <= self.at {
            return;
        }
        let mut t = self.at;
        if let Some((end, rate)) = self.dispensing {
            let until = end.min(now);
            self.dispensed_ul += ul_per_s(rate) * (until - t).max(0.0);
            t = until;
            if end <= now {
                self.dispensing = None;
            }
        }
        if self.dispensing.is_none() {
            self.dispensed_ul += ul_per_s(self.running_ml_min) * (now - t).max(0.0);
        }
        self.at = now;
    }

    fn rate(&mut self, now: f64) -> f64 {
        self.advance(now);
        self.dispensing.map_or(self.running_ml_min, |(_, r)| r)
    }

    fn stop(&mut self, now: f64) {
        self.advance(now);
        self.running_ml_min = 0.0;
        self.dispensing = None;
    }

    fn dispense(&mut self, volume_ul: f64, rate: Option<f64>, now: f64) -> Result<Step, String> {
        if !(volume_ul.is_finite() && volume_ul > 0.0) {
            return Err(format!("cannot dispense {volume_ul} uL"));
        }
        let limits = Self::KIND
            .spec()
            .setpoint("rate")
            .map(|s| s.limits())
            .ok_or("the pump has no rate limits")?;
        let rate = rate.unwrap_or(DEFAULT_RATE_ML_MIN);
        if !(limits.contains(rate) && rate > 0.0) {
            return Err(format!("rate {} mL/min is outside {limits}", trim(rate)));
        }
        if self.rate(now) > 0.0 {
            return Err("the pump is already running".into());
        }
        let seconds = volume_ul / ul_per_s(rate);
        if self.instant {
            self.dispensed_ul += volume_ul;
        } else {
            self.dispensing = Some((now + seconds, rate));
        }
        Ok(Step::new(
            seconds,
            format!("dispense {} {}", trim(volume_ul), trim(rate)),
        ))
    }
}

impl Model for PumpModel {
    const KIND: DeviceKind = DeviceKind::Pump;

    fn value(&mut self, signal: &str, now: f64) -> Option<f64> {
        match signal {
            "rate" => Some(self.rate(now)),
            "dispensed" => {
                self.advance(now);
                Some(self.dispensed_ul)
            }
            _ => None,
        }
    }

    fn set(&mut self, setpoint: &str, value: f64, now: f64) -> Result<(), String> {
        match setpoint {
            // A rate setpoint runs the pump continuously (`run`); 0 stops it.
            "rate" => {
                self.advance(now);
                self.running_ml_min = value;
                Ok(())
            }
            other => Err(format!("{other} cannot be set")),
        }
    }

    fn command(&mut self, name: &str, now: f64) -> Result<f64, String> {
        match name {
            "stop" => {
                self.stop(now);
                Ok(0.0)
            }
            other => Err(format!("{other} is not supported")),
        }
    }

    fn safe_state(&mut self, now: f64) -> f64 {
        self.stop(now);
        0.0
    }
}

/// A simulated pump (0..100 mL/min; `dispense` defaults to 50 mL/min).
pub struct SimPump {
    sim: Sim<PumpModel>,
}

impl SimPump {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        let model = PumpModel {
            instant: options.timing == SimTiming::Instant,
            dispensed_ul: 0.0,
            at: 0.0,
            running_ml_min: 0.0,
            dispensing: None,
        };
        SimPump {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }
}

sim_device!(SimPump, PumpModel);

#[async_trait]
impl Pump for SimPump {
    async fn dispense(&self, volume_ul: f64, rate_ml_min: Option<f64>) -> DeviceResult<()> {
        self.sim
            .op(|m, now| m.dispense(volume_ul, rate_ml_min, now))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::units::{Dimension, Quantity};

    #[tokio::test(start_paused = true)]
    async fn dispense_takes_volume_over_rate_and_accumulates() {
        let clock = Clock::new(1.0);
        let pump = SimPump::new("pump", clock, SimOptions::default());
        let start = clock.now_s();
        pump.dispense(10_000.0, None).await.unwrap();
        // 10 mL at 50 mL/min: 12 s.
        assert!((clock.now_s() - start - 12.0).abs() < 0.01);
        assert!((pump.read("dispensed").await.unwrap().value - 10_000.0).abs() < 1e-6);
        assert_eq!(pump.read("rate").await.unwrap().value, 0.0);
        assert!(pump.dispense(1000.0, Some(150.0)).await.is_err());
        assert!(pump.dispense(-1.0, None).await.is_err());

        // Continuous run at the setpoint until stopped.
        pump.set("rate", Quantity::new(6.0, Dimension::Flow))
            .await
            .unwrap();
        clock.sleep(60.0).await;
        assert_eq!(pump.read("rate").await.unwrap().value, 6.0);
        assert!(
            pump.dispense(1000.0, None).await.is_err(),
            "already running"
        );
        pump.command("stop").await.unwrap();
        let d = pump.read("dispensed").await.unwrap().value;
        assert!((d - 16_000.0).abs() < 1.0, "{d}");
        assert_eq!(pump.log(), ["dispense 10000 50", "set rate 6", "stop"]);
    }
}
