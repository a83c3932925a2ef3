//! An automated plate incubator (Liconic STX / Cytomat class): climate
//! (temperature, CO2, humidity), a shaker, 44 storage slots served from a
//! transfer station, and a door.

use super::core::{Model, Sim, Step};
use super::sim_device;
use super::thermal::{FirstOrder, INCUBATOR_RATES, Thermal};
use super::{SimOptions, SimTiming};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{DeviceResult, Incubator};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashSet};

/// Transfer station <-> storage slot, each way.
const MOVE_S: f64 = 25.0;
/// Opening or closing the door.
const DOOR_S: f64 = 4.0;
/// CO2 and humidity approach their setpoints with this time constant.
const CLIMATE_TAU_S: f64 = 300.0;
/// Room air.
const AMBIENT_CO2: f64 = 0.04;
const AMBIENT_HUMIDITY: f64 = 40.0;
/// "Reached" for CO2 and humidity.
const CO2_TOLERANCE: f64 = 0.1;
const HUMIDITY_TOLERANCE: f64 = 1.0;

pub(crate) struct IncubatorModel {
    thermal: Thermal,
    co2: FirstOrder,
    humidity: FirstOrder,
    shaking_rpm: f64,
    door_open: bool,
    /// Storage slot (1-based) -> labware name.
    stored: BTreeMap<u32, String>,
    /// Labware this incubator has loaded or unloaded.
    seen: HashSet<String>,
    slots: u32,
}

impl IncubatorModel {
    /// The plate handler does not move with the door open or the shaker on
    /// (the shaker must stop for plate access).
    fn handler_free(&self) -> Result<(), String> {
        if self.door_open {
            return Err("the door is open".into());
        }
        if self.shaking_rpm > 0.0 {
            return Err("the shaker is running; stop it first".into());
        }
        Ok(())
    }

    fn load(&mut self, labware: &str, slot: u32) -> Result<Step, String> {
        self.handler_free()?;
        if let Some((s, _)) = self.stored.iter().find(|(_, l)| l.as_str() == labware) {
            return Err(format!("{labware} is already stored in slot {s}"));
        }
        let slot = if slot == 0 {
            (1..=self.slots)
                .find(|s| !self.stored.contains_key(s))
                .ok_or("every storage slot is occupied")?
        } else {
            slot
        };
        if slot > self.slots {
            return Err(format!("slot {slot} does not exist (1..{})", self.slots));
        }
        if let Some(other) = self.stored.get(&slot) {
            return Err(format!("slot {slot} is occupied by {other}"));
        }
        self.stored.insert(slot, labware.to_string());
        self.seen.insert(labware.to_string());
        Ok(Step::new(MOVE_S, format!("load {labware} {slot}")))
    }

    /// The device API cannot declare what is stored when a run starts
    /// (`at = "inc:1"` in a protocol), so labware never seen before is taken
    /// to have been stored before the run. Labware that was unloaded and not
    /// loaded again is refused.
    fn unload(&mut self, labware: &str, slot: u32) -> Result<Step, String> {
        self.handler_free()?;
        let slot = match (slot, self.stored.get(&slot)) {
            (0, _) => self
                .stored
                .iter()
                .find(|(_, l)| l.as_str() == labware)
                .map(|(s, _)| *s),
            (_, Some(held)) if held == labware => Some(slot),
            (_, Some(held)) => return Err(format!("slot {slot} holds {held}, not {labware}")),
            (_, None) => None,
        };
        match slot {
            Some(slot) => {
                self.stored.remove(&slot);
            }
            None if self.seen.contains(labware) => {
                return Err(format!("{labware} is not stored here"));
            }
            None => {}
        }
        self.seen.insert(labware.to_string());
        Ok(Step::new(MOVE_S, format!("unload {labware}")))
    }
}

impl Model for IncubatorModel {
    const KIND: DeviceKind = DeviceKind::Incubator;

    fn value(&mut self, signal: &str, now: f64) -> Option<f64> {
        match signal {
            "temperature" => Some(self.thermal.value(now)),
            "co2" => Some(self.co2.value(now)),
            "humidity" => Some(self.humidity.value(now)),
            "shaking" => Some(self.shaking_rpm),
            _ => None,
        }
    }

    fn noise(&self, signal: &str, _value: f64) -> f64 {
        match signal {
            "temperature" => 0.1,
            "co2" => 0.05,
            "humidity" => 0.5,
            _ => 0.0,
        }
    }

    fn set(&mut self, setpoint: &str, value: f64, now: f64) -> Result<(), String> {
        match setpoint {
            "temperature" => self.thermal.set(Some(value), now),
            "co2" => self.co2.set(Some(value), now),
            "humidity" => self.humidity.set(Some(value), now),
            "shaking" => self.shaking_rpm = value,
            other => return Err(format!("{other} cannot be set")),
        }
        Ok(())
    }

    fn settle_s(&mut self, setpoint: &str, now: f64) -> f64 {
        match setpoint {
            "temperature" => self.thermal.settle_s(now),
            "co2" => self.co2.settle_s(now),
            "humidity" => self.humidity.settle_s(now),
            _ => 0.0,
        }
    }

    fn command(&mut self, name: &str, _now: f64) -> Result<f64, String> {
        match name {
            "open_door" | "close_door" => {
                let open = name == "open_door";
                let seconds = if self.door_open == open { 0.0 } else { DOOR_S };
                self.door_open = open;
                Ok(seconds)
            }
            "stop_shaking" => {
                self.shaking_rpm = 0.0;
                Ok(0.0)
            }
            other => Err(format!("{other} is not supported")),
        }
    }

    /// Heater and shaker off. CO2 and humidity stay controlled: they are no
    /// hazard, and stored cultures need them.
    fn safe_state(&mut self, now: f64) -> f64 {
        self.thermal.set(None, now);
        self.shaking_rpm = 0.0;
        0.0
    }
}

/// A simulated automated incubator: 4..50 C, 44 slots, load/unload 25 s,
/// door 4 s.
pub struct SimIncubator {
    sim: Sim<IncubatorModel>,
}

impl SimIncubator {
    pub fn new(id: impl Into<String>, clock: Clock, options: SimOptions) -> Self {
        let instant = options.timing == SimTiming::Instant;
        let model = IncubatorModel {
            thermal: Thermal::new(&INCUBATOR_RATES, instant),
            co2: FirstOrder::new(AMBIENT_CO2, CLIMATE_TAU_S, CO2_TOLERANCE, instant),
            humidity: FirstOrder::new(AMBIENT_HUMIDITY, CLIMATE_TAU_S, HUMIDITY_TOLERANCE, instant),
            shaking_rpm: 0.0,
            door_open: false,
            stored: BTreeMap::new(),
            seen: HashSet::new(),
            slots: DeviceKind::Incubator.spec().slots,
        };
        SimIncubator {
            sim: Sim::new(id.into(), clock, &options, model),
        }
    }

    /// What is stored where: (slot, labware), by slot.
    pub fn stored(&self) -> Vec<(u32, String)> {
        self.sim
            .with_model(|m, _| m.stored.iter().map(|(s, l)| (*s, l.clone())).collect())
    }

    pub fn door_open(&self) -> bool {
        self.sim.with_model(|m, _| m.door_open)
    }
}

sim_device!(SimIncubator, IncubatorModel);

#[async_trait]
impl Incubator for SimIncubator {
    async fn restore_storage(&self, stored: Vec<(u32, String)>) -> DeviceResult<()> {
        self.sim
            .with_model(|m, _| m.stored = stored.into_iter().collect());
        Ok(())
    }

    async fn load(&self, labware: &str, slot: u32) -> DeviceResult<()> {
        self.sim.op(|m, _| m.load(labware, slot)).await
    }

    async fn unload(&self, labware: &str, slot: u32) -> DeviceResult<()> {
        self.sim.op(|m, _| m.unload(labware, slot)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError};
    use crate::units::{Dimension, Quantity};

    #[tokio::test(start_paused = true)]
    async fn storage_slots_and_timing() {
        let clock = Clock::new(1.0);
        let inc = SimIncubator::new("incubator", clock, SimOptions::default());
        assert_eq!(inc.slots(), 44);
        let start = clock.now_s();
        inc.load("plate", 0).await.unwrap();
        assert!((clock.now_s() - start - 25.0).abs() < 0.01);
        inc.load("other", 7).await.unwrap();
        assert_eq!(
            inc.stored(),
            [(1, "plate".to_string()), (7, "other".to_string())]
        );
        let before = inc.operations();
        for e in [
            inc.load("third", 7).await.unwrap_err(),  // occupied
            inc.load("third", 45).await.unwrap_err(), // no such slot
            inc.load("plate", 3).await.unwrap_err(),  // already stored
        ] {
            assert!(matches!(e, DeviceError::Refused { .. }), "{e}");
        }
        assert_eq!(inc.operations(), before);
        inc.unload("plate", 0).await.unwrap();
        // Unloaded, so no longer stored.
        let e = inc.unload("plate", 0).await.unwrap_err();
        assert!(e.to_string().contains("not stored"), "{e}");
        assert_eq!(inc.operations(), before + 1);
        // Never seen: stored before the run (e.g. `at = "inc:1"`).
        inc.unload("preloaded", 0).await.unwrap();
        assert!(inc.unload("preloaded", 0).await.is_err());
        inc.load("third", 0).await.unwrap();
        assert_eq!(inc.stored().first(), Some(&(1, "third".to_string())));

        // Door 4 s; no plate handling with the door open or while shaking.
        let start = clock.now_s();
        inc.command("open_door").await.unwrap();
        assert!((clock.now_s() - start - 4.0).abs() < 0.01);
        assert!(inc.unload("other", 0).await.is_err());
        inc.command("close_door").await.unwrap();
        inc.set("shaking", Quantity::new(300.0, Dimension::Speed))
            .await
            .unwrap();
        assert_eq!(inc.read("shaking").await.unwrap().value, 300.0);
        assert!(inc.unload("other", 0).await.is_err());
        inc.command("stop_shaking").await.unwrap();
        inc.unload("other", 0).await.unwrap();
        assert!(inc.command("deactivate").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn climate_ramps() {
        let clock = Clock::new(1.0);
        let inc = SimIncubator::new("incubator", clock, SimOptions::default());
        let start = clock.now_s();
        inc.set("temperature", Quantity::new(37.0, Dimension::Temperature))
            .await
            .unwrap();
        inc.wait_until_reached("temperature").await.unwrap();
        // 1 C/min from 22 C to within 0.7 C of 37 C.
        let expected = (37.0 - 0.7 - 22.0) * 60.0;
        assert!((clock.now_s() - start - expected).abs() / expected < 0.01);

        inc.set("co2", Quantity::new(5.0, Dimension::Percent))
            .await
            .unwrap();
        clock.sleep(300.0).await;
        // One time constant: 63 % of the way.
        let co2 = inc.true_value("co2").unwrap();
        let one_tau = 5.0 + (0.04 - 5.0) * (-1.0f64).exp();
        assert!((co2 - one_tau).abs() < 1e-6, "{co2}");
        inc.wait_until_reached("co2").await.unwrap();
        assert!((inc.true_value("co2").unwrap() - 5.0).abs() <= 0.1 + 1e-9);

        inc.safe_state().await.unwrap();
        let t0 = inc.true_value("temperature").unwrap();
        clock.sleep(60.0).await;
        let cooled = t0 - inc.true_value("temperature").unwrap();
        assert!((cooled - 0.5).abs() < 1e-6, "cools at 0.5 C/min: {cooled}");
        assert!(inc.log().iter().any(|l| l == "safe_state"));
    }
}
