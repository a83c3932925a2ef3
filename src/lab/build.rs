//! From a checked lab file to live device handles: one serial link per serial
//! line, one bus owner per Modbus line or TCP endpoint, a profile driver per
//! instrument, composites for bioreactors. `sim://` instruments get their
//! profile's simulator in process, behind the same drivers.

use super::{Instrument, LabDevice, LabFile};
use crate::clock::Clock;
use crate::device::{DeviceHandle, Lab};
use crate::driver::{CompositeBioreactor, Link, ProfileDevice};
use crate::sim::{SimBioreactor, SimOptions};
use crate::transport::Transport;
use crate::transport::modbus::{Endpoint, ModbusBus};
use crate::transport::serial::{Opener, PipeOpener, SerialLink};
use crate::wiresim::{FaultHandle, ModbusUnit, SerialSimulator, part_physics, physics_for};
use indexmap::IndexMap;
use std::collections::HashMap;
use std::sync::Arc;

/// How `sim://` instruments are simulated.
#[derive(Debug, Clone)]
pub struct SimBacking {
    pub clock: Clock,
    pub options: SimOptions,
}

impl Default for SimBacking {
    fn default() -> Self {
        SimBacking {
            clock: Clock::new(1.0),
            options: SimOptions::default(),
        }
    }
}

/// A lab's live devices, with the profile drivers kept for `devices probe`.
pub struct LabRuntime {
    pub lab: Lab,
    /// Instruments by id (`device` or `device.part`).
    pub instruments: IndexMap<String, Arc<ProfileDevice>>,
    /// Fault injection into the `sim://` instruments, by instrument id.
    pub sim_faults: IndexMap<String, FaultHandle>,
    /// The simulated devices behind `sim://` instruments, by instrument id.
    pub simulators: IndexMap<String, DeviceHandle>,
    /// The wire simulators of serial `sim://` instruments, by instrument id.
    pub serial_simulators: IndexMap<String, Arc<SerialSimulator>>,
}

impl LabRuntime {
    /// A `sim://` instrument lives in the controller's process, so a
    /// controller that stopped took its state along, where a real instrument
    /// keeps its deck and storage. A resumed run gives the simulators what the
    /// journal says a real instrument would have kept.
    pub async fn restore_simulators(
        &self,
        resumption: &crate::runtime::recovery::Resumption,
        setup: &crate::runtime::executor::RunSetup,
    ) -> Result<(), String> {
        let simulator = |role: &str| {
            setup
                .bindings
                .get(role)
                .and_then(|h| self.simulators.get(h.device().id()))
        };
        for (role, deck) in &resumption.decks {
            if let Some(DeviceHandle::LiquidHandler(lh)) = simulator(role) {
                lh.restore_deck(deck.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if let Some(wire) = setup
                .bindings
                .get(role)
                .and_then(|h| self.serial_simulators.get(h.device().id()))
            {
                wire.restore_tip(deck.tip_volume_ul()).await;
            }
        }
        for (role, stored) in &resumption.storage {
            if let Some(DeviceHandle::Incubator(inc)) = simulator(role) {
                inc.restore_storage(stored.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// The physics behind a `sim://` instrument: its own simulated device, or a
/// part (by its role in the lab file) of a simulated culture shared by a
/// bioreactor's parts.
type SimSource = Option<(Arc<SimBioreactor>, String)>;

/// Builds the drivers of every device of a lab. Nothing is opened yet: links
/// open on `connect` (and reopen by themselves after a failure).
pub fn connect_lab(lab: &LabFile, backing: &SimBacking) -> Result<LabRuntime, String> {
    let mut lines: HashMap<String, Arc<tokio::sync::Mutex<SerialLink>>> = HashMap::new();
    let mut buses: HashMap<String, ModbusBus> = HashMap::new();
    let mut instruments = IndexMap::new();
    let mut sim_faults = IndexMap::new();
    let mut simulators = IndexMap::new();
    let mut serial_simulators = IndexMap::new();
    let mut out = Lab::default();
    let mut make = |id: &str,
                    instrument: &Instrument,
                    sim: Option<SimSource>|
     -> Result<Arc<ProfileDevice>, String> {
        let profile = Arc::clone(&instrument.profile);
        let link = match &instrument.transport {
            Transport::Serial { path, settings } => {
                let line = lines
                    .entry(path.clone())
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Mutex::new(SerialLink::new(Opener::Port {
                            path: path.clone(),
                            settings: *settings,
                        })))
                    })
                    .clone();
                Link::serial(&profile, line)
            }
            Transport::ModbusRtu {
                path,
                settings,
                unit,
            } => {
                let bus = buses
                    .entry(path.clone())
                    .or_insert_with(|| {
                        ModbusBus::spawn(Endpoint::Rtu {
                            path: path.clone(),
                            settings: *settings,
                        })
                    })
                    .clone();
                Link::modbus(&profile, bus, *unit)
            }
            Transport::ModbusTcp { host, port, unit } => {
                let bus = buses
                    .entry(format!("{host}:{port}"))
                    .or_insert_with(|| {
                        ModbusBus::spawn(Endpoint::Tcp {
                            host: host.clone(),
                            port: *port,
                        })
                    })
                    .clone();
                Link::modbus(&profile, bus, *unit)
            }
            Transport::Sim { unit } => {
                let source = sim.ok_or_else(|| format!("{id}: no simulator"))?;
                let (clock, options) = (backing.clock, backing.options.clone());
                let physics = match source {
                    Some((reactor, role)) => {
                        part_physics(&profile, id, &role, clock, options, reactor)?
                    }
                    None => physics_for(&profile, id, clock, options, None)?,
                };
                if let Some(device) = physics.simulated() {
                    simulators.insert(id.to_string(), device);
                }
                if profile.is_modbus() {
                    let unit_id = unit.unwrap_or(1);
                    let mut bus = crate::wiresim::ModbusBus::new();
                    let sim_unit = bus.add(
                        unit_id,
                        ModbusUnit::new(Arc::clone(&profile), physics, instrument.settings.clone()),
                    );
                    sim_faults.insert(id.to_string(), sim_unit.faults());
                    let sim = Arc::new(bus);
                    let opener: PipeOpener = Arc::new(move || sim.connect());
                    Link::modbus(
                        &profile,
                        ModbusBus::spawn(Endpoint::Pipe(opener)),
                        Some(unit_id),
                    )
                } else {
                    let sim = Arc::new(SerialSimulator::new(
                        Arc::clone(&profile),
                        physics,
                        instrument.settings.clone(),
                        backing.clock,
                    ));
                    sim_faults.insert(id.to_string(), sim.faults());
                    serial_simulators.insert(id.to_string(), Arc::clone(&sim));
                    let opener: PipeOpener = Arc::new(move || sim.connect());
                    let line = SerialLink::new(Opener::Pipe(opener));
                    Link::serial(&profile, Arc::new(tokio::sync::Mutex::new(line)))
                }
            }
        };
        let link = link.ok_or_else(|| format!("{id}: the transport does not fit the profile"))?;
        Ok(Arc::new(
            ProfileDevice::new(id, profile, &instrument.settings, link).with_clock(backing.clock),
        ))
    };
    for (id, device) in &lab.devices {
        match device {
            LabDevice::Instrument(i) => {
                let sim = matches!(i.transport, Transport::Sim { .. }).then_some(None);
                let d = make(id, i, sim)?;
                instruments.insert(id.clone(), Arc::clone(&d));
                out.add(d.handle());
            }
            LabDevice::Bioreactor { parts } => {
                // Simulated parts of one bioreactor act on one simulated culture.
                let reactor = Arc::new(SimBioreactor::new(
                    id.clone(),
                    backing.clock,
                    backing.options.clone(),
                ));
                let mut handles = IndexMap::new();
                for (role, i) in parts {
                    let part_id = format!("{id}.{role}");
                    let sim = matches!(i.transport, Transport::Sim { .. })
                        .then(|| Some((Arc::clone(&reactor), role.clone())));
                    let d = make(&part_id, i, sim)?;
                    instruments.insert(part_id, Arc::clone(&d));
                    handles.insert(role.clone(), d.handle());
                }
                out.add(DeviceHandle::Bioreactor(Arc::new(
                    CompositeBioreactor::new(id.clone(), handles, backing.clock),
                )));
            }
        }
    }
    Ok(LabRuntime {
        lab: out,
        instruments,
        sim_faults,
        simulators,
        serial_simulators,
    })
}
