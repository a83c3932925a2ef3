//! The simulated lab: one in-process implementation of every device kind.
//!
//! The devices implement the same traits as real drivers (`crate::device`), so
//! a protocol runs unchanged on either. All time goes through the [`Clock`]:
//! operations sleep on it and the physics are evaluated lazily from
//! `clock.now_s()` (the state and its time are stored and advanced when read),
//! which is what lets `simulate` run a 48-hour protocol on tokio's paused
//! clock in milliseconds. The models, their equations and constants are
//! described in `docs/simulated-lab.md`.
//!
//! Every simulated device also takes injected faults ([`Injectable`]) and
//! keeps a count and a log of the operations it performed, for tests of the
//! runtime.

mod bioreactor;
mod core;
mod incubator;
pub(crate) mod liquid_handler;
mod modules;
mod pump;
mod sensor;
mod thermal;

pub use bioreactor::SimBioreactor;
pub use incubator::SimIncubator;
pub use liquid_handler::SimLiquidHandler;
pub use modules::{SimHeaterShaker, SimTemperatureModule};
pub use pump::SimPump;
pub use sensor::SimSensor;

use crate::clock::Clock;
use crate::device::{DeviceHandle, Lab};
use std::sync::Arc;

/// How the simulated devices behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOptions {
    /// Seeds the measurement noise: the same seed gives the same readings.
    pub seed: u64,
    pub timing: SimTiming,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 0,
            timing: SimTiming::Realistic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimTiming {
    /// Operations take their documented time and temperatures ramp at the
    /// documented rates.
    Realistic,
    /// Every operation and every ramp takes zero lab time: used to measure the
    /// runtime's own overhead.
    Instant,
}

/// A fault to inject into a simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// The next `count` operations (every method except `connect`, `read`,
    /// `limits`, `slots`, `safe_state` and the run-setup call
    /// `configure_deck`) fail with `error`, without side effects.
    FailNext { count: u32, error: FaultKind },
    /// Every call, `connect` and `read` included, fails with
    /// `DeviceError::Disconnected` until `Clear`.
    Offline,
    /// Removes pending failures and brings the device back online.
    Clear,
}

/// Which `DeviceError` an injected failure produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Refused,
    Timeout,
    Fault,
}

/// Fault injection, implemented by every simulated device.
pub trait Injectable {
    fn inject(&self, fault: InjectedFault);
}

/// The built-in simulated lab: one device of each kind, each with the kind's
/// name as its id.
pub fn simulated_lab(clock: Clock, options: SimOptions) -> Lab {
    let mut lab = Lab::default();
    lab.add(DeviceHandle::LiquidHandler(Arc::new(
        SimLiquidHandler::new("liquid_handler", clock, options.clone()),
    )));
    lab.add(DeviceHandle::Incubator(Arc::new(SimIncubator::new(
        "incubator",
        clock,
        options.clone(),
    ))));
    lab.add(DeviceHandle::Bioreactor(Arc::new(SimBioreactor::new(
        "bioreactor",
        clock,
        options.clone(),
    ))));
    lab.add(DeviceHandle::Pump(Arc::new(SimPump::new(
        "pump",
        clock,
        options.clone(),
    ))));
    lab.add(DeviceHandle::Sensor(Arc::new(SimSensor::new(
        "sensor",
        clock,
        options.clone(),
    ))));
    lab.add(DeviceHandle::TemperatureModule(Arc::new(
        SimTemperatureModule::new("temperature_module", clock, options.clone()),
    )));
    lab.add(DeviceHandle::HeaterShaker(Arc::new(SimHeaterShaker::new(
        "heater_shaker",
        clock,
        options,
    ))));
    lab
}

/// Implements `Device`, `Injectable` and the inspection methods of a public
/// simulated device type `$ty { sim: Sim<$model> }` by delegating to the
/// generic core, so the seven kinds share one implementation of faults,
/// logging, validation against the catalogue and noise.
macro_rules! sim_device {
    ($ty:ident, $model:ty) => {
        impl $ty {
            /// Operations performed so far (refused and failed ones excluded).
            pub fn operations(&self) -> u64 {
                self.sim.operations()
            }

            /// The operations performed, in order, e.g. `aspirate plate:A1 100`.
            pub fn log(&self) -> Vec<String> {
                self.sim.log()
            }

            /// A signal's physical value now, without measurement noise (and
            /// without using the noise generator, so readings are unaffected).
            pub fn true_value(&self, signal: &str) -> Option<f64> {
                self.sim.true_value(signal)
            }
        }

        impl $crate::sim::Injectable for $ty {
            fn inject(&self, fault: $crate::sim::InjectedFault) {
                self.sim.inject(fault);
            }
        }

        #[async_trait::async_trait]
        impl $crate::device::Device for $ty {
            fn id(&self) -> &str {
                self.sim.id()
            }
            fn kind(&self) -> $crate::catalogue::DeviceKind {
                <$model as $crate::sim::core::Model>::KIND
            }
            async fn connect(&self) -> $crate::device::DeviceResult<()> {
                self.sim.connect()
            }
            async fn read(
                &self,
                signal: &str,
            ) -> $crate::device::DeviceResult<$crate::units::Quantity> {
                self.sim.read(signal)
            }
            async fn set(
                &self,
                setpoint: &str,
                value: $crate::units::Quantity,
            ) -> $crate::device::DeviceResult<()> {
                self.sim.set(setpoint, value).await
            }
            async fn wait_until_reached(&self, setpoint: &str) -> $crate::device::DeviceResult<()> {
                self.sim.wait_until_reached(setpoint).await
            }
            async fn command(&self, name: &str) -> $crate::device::DeviceResult<()> {
                self.sim.command(name).await
            }
            async fn safe_state(&self) -> $crate::device::DeviceResult<()> {
                self.sim.safe_state().await
            }
            fn limits(&self, setpoint: &str) -> Option<$crate::units::Limits> {
                <$model as $crate::sim::core::Model>::KIND
                    .spec()
                    .setpoint(setpoint)
                    .map(|s| s.limits())
            }
            fn slots(&self) -> u32 {
                <$model as $crate::sim::core::Model>::KIND.spec().slots
            }
        }
    };
}
pub(crate) use sim_device;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::DeviceKind;
    use crate::device::DeviceError;

    #[tokio::test(start_paused = true)]
    async fn the_simulated_lab_has_one_device_of_each_kind() {
        let lab = simulated_lab(Clock::new(1.0), SimOptions::default());
        assert_eq!(lab.devices.len(), DeviceKind::ALL.len());
        for kind in DeviceKind::ALL {
            let handle = lab.get(kind.name()).unwrap();
            assert_eq!(handle.kind(), kind);
            let device = handle.device();
            assert_eq!(device.id(), kind.name());
            device.connect().await.unwrap();
            assert_eq!(device.slots(), kind.spec().slots);
            for s in kind.spec().signals {
                let q = device.read(s.name).await.unwrap();
                assert_eq!(q.dimension, s.dimension, "{kind}.{}", s.name);
                assert!(q.value.is_finite());
            }
            for sp in kind.spec().setpoints {
                assert_eq!(device.limits(sp.name), Some(sp.limits()));
            }
            assert!(matches!(
                device.read("nonsense").await,
                Err(DeviceError::Refused { .. })
            ));
            assert!(device.command("nonsense").await.is_err());
            device.safe_state().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offline_until_cleared() {
        let clock = Clock::new(1.0);
        let inc = SimIncubator::new("incubator", clock, SimOptions::default());
        inc.inject(InjectedFault::Offline);
        use crate::device::{Device, Incubator};
        assert!(matches!(
            inc.connect().await,
            Err(DeviceError::Disconnected { .. })
        ));
        assert!(matches!(
            inc.read("temperature").await,
            Err(DeviceError::Disconnected { .. })
        ));
        assert!(matches!(
            inc.load("plate", 1).await,
            Err(DeviceError::Disconnected { .. })
        ));
        assert!(inc.stored().is_empty());
        inc.inject(InjectedFault::Clear);
        inc.connect().await.unwrap();
        inc.load("plate", 1).await.unwrap();
        // FailNext counts operations only, and Clear drops what is left.
        inc.inject(InjectedFault::FailNext {
            count: 3,
            error: FaultKind::Refused,
        });
        inc.read("co2").await.unwrap();
        assert!(inc.command("open_door").await.is_err());
        inc.inject(InjectedFault::Clear);
        inc.command("open_door").await.unwrap();
        assert_eq!(inc.log(), ["load plate 1", "open_door"]);
        assert_eq!(inc.operations(), 2);
    }
}
