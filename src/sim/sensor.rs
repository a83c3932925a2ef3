//! A stand-alone probe: steady readings around typical values, with noise.

use super::core::{Model, Sim};
use super::sim_device;
use super::{SimOptions, thermal::AMBIENT_C};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::Sensor;

pub(crate) struct SensorModel;

impl Model for SensorModel {
    const KIND: DeviceKind = DeviceKind::Sensor;

    fn value(&mut self, signal: &str, _now: f64) -> Option<f64> {
        match signal {
            "temperature" => Some(AMBIENT_C),
            "ph" => Some(7.0),
            "dissolved_oxygen" => Some(95.0),
            "od600" => Some(0.05),
            _ => None,
        }
    }

    fn noise(&self, signal: &str, value: f64) -> f64 {
        match signal {
            "temperature" => 0.1,
            "ph" => 0.02,
            "dissolved_oxygen" => 1.0,
            // OD is read to about 1 % of the value.
            "od600" => 0.01 * value,
            _ => 0.0,
        }
    }
}

/// A simulated probe: temperature about 22 C, pH 7.0, DO 95 %, OD600 0.05.
pub struct SimSensor {
    sim: Sim<SensorModel>,
}

impl SimSensor {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        SimSensor {
            sim: Sim::new(id.into(), clock, &options, SensorModel),
        }
    }
}

sim_device!(SimSensor, SensorModel);
impl Sensor for SimSensor {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::sim::SimTiming;

    fn options(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            timing: SimTiming::Realistic,
        }
    }

    async fn readings(sensor: &SimSensor) -> Vec<f64> {
        let mut values = Vec::new();
        for _ in 0..20 {
            for s in ["temperature", "ph", "dissolved_oxygen", "od600"] {
                values.push(sensor.read(s).await.unwrap().value);
            }
        }
        values
    }

    #[tokio::test(start_paused = true)]
    async fn readings_are_noisy_within_bands_and_seeded() {
        let clock = Clock::new(1.0);
        let a = readings(&SimSensor::new("sensor", clock, options(5))).await;
        let b = readings(&SimSensor::new("sensor", clock, options(5))).await;
        let c = readings(&SimSensor::new("sensor", clock, options(6))).await;
        assert_eq!(a, b, "the same seed gives the same readings");
        assert_ne!(a, c);
        for chunk in a.chunks(4) {
            let [t, ph, d, od] = chunk else { panic!() };
            assert!((t - 22.0).abs() <= 0.1 && (ph - 7.0).abs() <= 0.02);
            assert!((d - 95.0).abs() <= 1.0 && (od - 0.05).abs() <= 0.0005);
        }
        assert!(
            a.chunks(4).any(|c| c.first() != Some(&22.0)),
            "there is noise"
        );
        let s = SimSensor::new("sensor", clock, options(5));
        assert!(s.read("volume").await.is_err());
        assert!(s.command("sample").await.is_err());
        assert!(s.wait_until_reached("temperature").await.is_err());
        assert!(s.safe_state().await.is_ok());
    }
}
