//! The device API: what the runtime knows of instruments, one async trait per
//! kind. Simulated devices (`crate::sim`) and profile-driven drivers implement
//! the same traits, so a protocol runs unchanged on either.
//!
//! Every method is one atomic operation: when it returns the operation is done
//! (or refused, or failed), which is what makes a pause "safe" between calls.

use crate::catalogue::DeviceKind;
use crate::labware::LabwareDefinition;
use crate::units::{Limits, Quantity};
use async_trait::async_trait;
use serde::Serialize;
use std::sync::Arc;

/// Why a device operation did not happen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// The device (or its driver) refused: a value outside its limits, aspirating
    /// without a tip, an occupied slot. Nothing moved.
    #[error("{device} refused: {reason}")]
    Refused { device: String, reason: String },
    /// No answer in time; the device's state is unknown.
    #[error("{device} did not answer within {seconds} s")]
    Timeout { device: String, seconds: f64 },
    /// The device reported an error of its own.
    #[error("{device} reported a fault: {reason}")]
    Fault { device: String, reason: String },
    /// The link to the device is down.
    #[error("{device} is not connected: {reason}")]
    Disconnected { device: String, reason: String },
}

impl DeviceError {
    /// A fault of the device itself (as opposed to a refused request): the device
    /// goes to `fault` and the run that needs it is held.
    pub fn is_device_fault(&self) -> bool {
        !matches!(self, DeviceError::Refused { .. })
    }
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// Device states, spelled as on MQTT and in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Disconnected,
    Connecting,
    Ready,
    Busy,
    Fault,
}

impl DeviceState {
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Disconnected => "disconnected",
            DeviceState::Connecting => "connecting",
            DeviceState::Ready => "ready",
            DeviceState::Busy => "busy",
            DeviceState::Fault => "fault",
        }
    }
}

/// What every device does, whatever its kind.
#[async_trait]
pub trait Device: Send + Sync {
    fn id(&self) -> &str;
    fn kind(&self) -> DeviceKind;
    /// Opens the link and checks the device answers.
    async fn connect(&self) -> DeviceResult<()>;
    /// Reads one signal (a name from the kind catalogue).
    async fn read(&self, signal: &str) -> DeviceResult<Quantity>;
    /// Changes a setpoint; refused outside the device's limits, before anything is sent.
    async fn set(&self, setpoint: &str, value: Quantity) -> DeviceResult<()>;
    /// Returns when the setpoint has been reached (e.g. within 0.5 C).
    async fn wait_until_reached(&self, setpoint: &str) -> DeviceResult<()>;
    /// An action without arguments: open_door, stop_shaking, deactivate, stop ...
    async fn command(&self, name: &str) -> DeviceResult<()>;
    /// Heaters off, pumps and shakers stopped: run on abort, stop and shutdown.
    async fn safe_state(&self) -> DeviceResult<()>;
    /// This device's limits for a setpoint.
    fn limits(&self, setpoint: &str) -> Option<Limits>;
    /// Labware positions (deck slots, storage slots).
    fn slots(&self) -> u32;
}

/// Labware as placed on a liquid handler's deck when a run starts.
#[derive(Debug, Clone)]
pub struct DeckLabware {
    pub name: String,
    pub definition: Arc<LabwareDefinition>,
    pub slot: u32,
    /// Initial volume per well name, in µL.
    pub contents: Vec<(String, f64)>,
}

/// A liquid handler's deck as the controller knows it: labware and slots,
/// well volumes, used tips, the tip on the head, labware off the deck.
#[derive(Clone, Default)]
pub struct DeckState(pub(crate) crate::sim::liquid_handler::LiquidHandlerModel);

impl DeckState {
    /// The deck as journal records (`device` names the handler).
    pub fn records(&self, device: &str) -> Vec<crate::runtime::events::LabwareRecord> {
        self.0.records(device)
    }

    /// µL in the tip on the head, if a tip is on.
    pub fn tip_volume_ul(&self) -> Option<f64> {
        self.0.tip_volume_ul()
    }
}

#[async_trait]
pub trait LiquidHandler: Device {
    /// The deck as this handler knows it now.
    fn deck_state(&self) -> DeckState;
    /// Gives back a deck known from the journal when a run is resumed:
    /// nothing moves.
    async fn restore_deck(&self, deck: DeckState) -> DeviceResult<()>;
    /// The labware on the deck at the start of a run (replaces what was known).
    async fn configure_deck(&self, deck: Vec<DeckLabware>) -> DeviceResult<()>;
    async fn pick_up_tip(&self, rack: &str, well: &str) -> DeviceResult<()>;
    async fn aspirate(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()>;
    async fn dispense(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()>;
    async fn mix(&self, labware: &str, well: &str, volume_ul: f64, cycles: u32)
    -> DeviceResult<()>;
    async fn drop_tip(&self) -> DeviceResult<()>;
    /// Labware taken off the deck (e.g. into an incubator).
    async fn remove_labware(&self, labware: &str) -> DeviceResult<()>;
    /// Labware put on the deck during a run. Labware that was on this deck before
    /// comes back with the well volumes the handler recorded when it left;
    /// `contents` applies only to labware the handler has not seen.
    async fn place_labware(&self, labware: DeckLabware) -> DeviceResult<()>;
}

#[async_trait]
pub trait Incubator: Device {
    /// Gives back what the journal says is stored (slot, labware) when a run
    /// is resumed: nothing moves.
    async fn restore_storage(&self, stored: Vec<(u32, String)>) -> DeviceResult<()>;
    /// Takes labware from the transfer station into storage `slot`.
    async fn load(&self, labware: &str, slot: u32) -> DeviceResult<()>;
    /// Brings labware from storage `slot` to the transfer station (slot 0:
    /// wherever it is stored). The slot matters: another run may have stored
    /// labware of the same name.
    async fn unload(&self, labware: &str, slot: u32) -> DeviceResult<()>;
}

#[async_trait]
pub trait Bioreactor: Device {
    /// Adds `volume_ul` at the pump's rate, or runs the pump at `rate_ml_min`
    /// for `duration_s` in the background (the call returns once it is started).
    async fn feed(
        &self,
        pump: &str,
        volume_ul: Option<f64>,
        rate_ml_min: Option<f64>,
        duration_s: Option<f64>,
    ) -> DeviceResult<()>;

    /// Stops a pump's feed, if it runs (idempotent).
    async fn stop_feed(&self, pump: &str) -> DeviceResult<()>;
}

#[async_trait]
pub trait Pump: Device {
    async fn dispense(&self, volume_ul: f64, rate_ml_min: Option<f64>) -> DeviceResult<()>;
}

pub trait Sensor: Device {}
pub trait TemperatureModule: Device {}
pub trait HeaterShaker: Device {}

/// A device of some kind, as the runtime holds it.
#[derive(Clone)]
pub enum DeviceHandle {
    LiquidHandler(Arc<dyn LiquidHandler>),
    Incubator(Arc<dyn Incubator>),
    Bioreactor(Arc<dyn Bioreactor>),
    Pump(Arc<dyn Pump>),
    Sensor(Arc<dyn Sensor>),
    TemperatureModule(Arc<dyn TemperatureModule>),
    HeaterShaker(Arc<dyn HeaterShaker>),
}

impl DeviceHandle {
    pub fn device(&self) -> &dyn Device {
        match self {
            DeviceHandle::LiquidHandler(d) => d.as_ref(),
            DeviceHandle::Incubator(d) => d.as_ref(),
            DeviceHandle::Bioreactor(d) => d.as_ref(),
            DeviceHandle::Pump(d) => d.as_ref(),
            DeviceHandle::Sensor(d) => d.as_ref(),
            DeviceHandle::TemperatureModule(d) => d.as_ref(),
            DeviceHandle::HeaterShaker(d) => d.as_ref(),
        }
    }

    pub fn kind(&self) -> DeviceKind {
        self.device().kind()
    }
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.device().id(), self.kind())
    }
}

/// The devices of a workcell, by id.
#[derive(Debug, Clone, Default)]
pub struct Lab {
    pub devices: indexmap::IndexMap<String, DeviceHandle>,
}

impl Lab {
    pub fn add(&mut self, handle: DeviceHandle) {
        self.devices
            .insert(handle.device().id().to_string(), handle);
    }

    pub fn get(&self, id: &str) -> Option<&DeviceHandle> {
        self.devices.get(id)
    }

    /// Devices of a kind, in the order they were added.
    pub fn of_kind(&self, kind: DeviceKind) -> impl Iterator<Item = &DeviceHandle> {
        self.devices.values().filter(move |d| d.kind() == kind)
    }
}
