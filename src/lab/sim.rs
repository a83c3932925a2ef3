//! `biofoundry sim`: the simulators of every instrument of a lab, served where
//! the lab file says the instruments are — serial and Modbus RTU instruments on
//! pseudo-terminals symlinked at their paths, Modbus TCP instruments on their
//! loopback ports — so that `run --lab` on the same file drives them through
//! the real serial and Modbus code.

use super::build::SimBacking;
use super::{Instrument, LabDevice, LabFile};
use crate::sim::SimBioreactor;
use crate::transport::Transport;
use crate::wiresim::{
    Fault, FaultHandle, ModbusBus, ModbusUnit, PtyHost, SerialSimulator, TcpHost, Times,
    part_physics, physics_for,
};
use indexmap::IndexMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A lab's simulators, running.
pub struct SimulatedWorkcell {
    /// Per instrument (`device` or `device.part`): its faults.
    pub faults: IndexMap<String, FaultHandle>,
    /// Per line (serial path, RTU path, TCP address): faults of the whole line
    /// (a Modbus adapter or gateway unplugged).
    pub line_faults: IndexMap<String, FaultHandle>,
    /// What is served where, for people.
    pub endpoints: Vec<String>,
    ptys: Vec<PtyHost>,
    tcp: Vec<TcpHost>,
}

impl SimulatedWorkcell {
    /// Injects a fault by instrument id or line name.
    pub fn inject(&self, target: &str, fault: Fault, times: Times) -> Result<(), String> {
        self.handle(target)?.inject(fault, times);
        Ok(())
    }

    pub fn clear(&self, target: &str) -> Result<(), String> {
        self.handle(target)?.clear();
        Ok(())
    }

    fn handle(&self, target: &str) -> Result<&FaultHandle, String> {
        self.faults
            .get(target)
            .or_else(|| self.line_faults.get(target))
            .ok_or_else(|| {
                format!(
                    "no simulated instrument or line `{target}` (instruments: {})",
                    self.faults.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })
    }

    pub async fn shutdown(self) {
        for p in self.ptys {
            p.shutdown().await;
        }
        for t in self.tcp {
            t.shutdown().await;
        }
    }
}

/// Starts the simulators of every instrument whose transport is a serial path,
/// a Modbus RTU path or a Modbus TCP port on this machine. `sim://` instruments
/// are simulated inside the controller and are skipped here.
pub async fn serve_lab(lab: &LabFile, backing: &SimBacking) -> Result<SimulatedWorkcell, String> {
    let mut faults = IndexMap::new();
    let mut line_faults = IndexMap::new();
    let mut endpoints = Vec::new();
    let mut serial: IndexMap<String, (String, Arc<SerialSimulator>)> = IndexMap::new();
    let mut rtu: IndexMap<String, ModbusBus> = IndexMap::new();
    let mut tcp: IndexMap<(String, u16), ModbusBus> = IndexMap::new();
    // Each instrument, and for a bioreactor part its vessel and role.
    type Part = Option<(Arc<SimBioreactor>, String)>;
    let mut instruments: Vec<(String, &Instrument, Part)> = Vec::new();
    for (id, device) in &lab.devices {
        match device {
            LabDevice::Instrument(i) => instruments.push((id.clone(), i, None)),
            LabDevice::Bioreactor { parts } => {
                // The parts of one bioreactor act on one simulated culture.
                let reactor = Arc::new(SimBioreactor::new(
                    id.clone(),
                    backing.clock,
                    backing.options.clone(),
                ));
                for (role, i) in parts {
                    let part = Some((Arc::clone(&reactor), role.clone()));
                    instruments.push((format!("{id}.{role}"), i, part));
                }
            }
        }
    }
    for (id, i, part) in instruments {
        let (clock, options) = (backing.clock, backing.options.clone());
        let physics = match part {
            Some((reactor, role)) => part_physics(&i.profile, &id, &role, clock, options, reactor)?,
            None => physics_for(&i.profile, &id, clock, options, None)?,
        };
        let unit = |u: &Option<u8>| {
            u.unwrap_or(match i.profile.doc.link.get_ref() {
                crate::profile::LinkDef::Modbus(m) => m.unit,
                crate::profile::LinkDef::Serial(_) => 1,
            })
        };
        match &i.transport {
            Transport::Serial { path, .. } => {
                if let Some((other, _)) = serial.get(path) {
                    return Err(format!(
                        "{id} and {other} share the serial line {path}; the simulator serves one \
                         instrument per serial line"
                    ));
                }
                let sim = Arc::new(SerialSimulator::new(
                    Arc::clone(&i.profile),
                    physics,
                    i.settings.clone(),
                    backing.clock,
                ));
                faults.insert(id.clone(), sim.faults());
                serial.insert(path.clone(), (id, sim));
            }
            Transport::ModbusRtu { path, unit: u, .. } => {
                let bus = rtu.entry(path.clone()).or_default();
                let added = bus.add(
                    unit(u),
                    ModbusUnit::new(Arc::clone(&i.profile), physics, i.settings.clone()),
                );
                faults.insert(id, added.faults());
            }
            Transport::ModbusTcp {
                host,
                port,
                unit: u,
            } => {
                let bus = tcp.entry((host.clone(), *port)).or_default();
                let added = bus.add(
                    unit(u),
                    ModbusUnit::new(Arc::clone(&i.profile), physics, i.settings.clone()),
                );
                faults.insert(id, added.faults());
            }
            Transport::Sim { .. } => {
                endpoints.push(format!("{id}: sim:// (simulated inside the controller)"));
            }
        }
    }
    let mut ptys = Vec::new();
    let mut tcp_hosts = Vec::new();
    for (path, (id, sim)) in serial {
        make_parent(&path)?;
        let host = PtyHost::serial(sim, Some(PathBuf::from(&path)))
            .await
            .map_err(|e| format!("{id}: cannot serve {path}: {e}"))?;
        endpoints.push(format!("{id}: serial on {path}"));
        ptys.push(host);
    }
    for (path, bus) in rtu {
        make_parent(&path)?;
        let units: Vec<String> = bus_units(&faults, &path, lab);
        line_faults.insert(path.clone(), bus.faults());
        let host = PtyHost::modbus_rtu(Arc::new(bus), Some(PathBuf::from(&path)))
            .await
            .map_err(|e| format!("cannot serve Modbus RTU on {path}: {e}"))?;
        endpoints.push(format!("Modbus RTU on {path}: {}", units.join(", ")));
        ptys.push(host);
    }
    for ((host, port), bus) in tcp {
        let ip: std::net::IpAddr = match host.as_str() {
            "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
            h => h
                .parse()
                .map_err(|_| format!("the simulator serves on local addresses, not `{h}`"))?,
        };
        let name = format!("{host}:{port}");
        line_faults.insert(name.clone(), bus.faults());
        let served = TcpHost::modbus_on(Arc::new(bus), (ip, port).into())
            .await
            .map_err(|e| format!("cannot serve Modbus TCP on {name}: {e}"))?;
        endpoints.push(format!("Modbus TCP on {name}"));
        tcp_hosts.push(served);
    }
    Ok(SimulatedWorkcell {
        faults,
        line_faults,
        endpoints,
        ptys,
        tcp: tcp_hosts,
    })
}

fn bus_units(faults: &IndexMap<String, FaultHandle>, path: &str, lab: &LabFile) -> Vec<String> {
    let mut out = Vec::new();
    for id in faults.keys() {
        let (device, part) = match id.split_once('.') {
            Some((d, p)) => (d, Some(p)),
            None => (id.as_str(), None),
        };
        let instrument = match (lab.devices.get(device), part) {
            (Some(LabDevice::Instrument(i)), None) => Some(i),
            (Some(LabDevice::Bioreactor { parts }), Some(p)) => parts.get(p),
            _ => None,
        };
        if let Some(Instrument {
            transport: Transport::ModbusRtu { path: p, unit, .. },
            ..
        }) = instrument
            && p == path
        {
            out.push(format!(
                "{id} (unit {})",
                unit.map_or("default".into(), |u| u.to_string())
            ));
        }
    }
    out
}

fn make_parent(path: &str) -> Result<(), String> {
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    Ok(())
}

/// Parses a fault as written on the command line: `no_reply`, `slow:2s`,
/// `garbage`, `corrupt`, `busy`, `exception:4`, `disconnect:10s`; a `@N`
/// suffix limits it to the next N requests (else until cleared).
pub fn parse_fault(text: &str) -> Result<(Fault, Times), String> {
    let (body, times) = match text.split_once('@') {
        Some((b, n)) => (
            b,
            Times::Next(
                n.parse()
                    .map_err(|_| format!("`@{n}`: the number of requests the fault lasts"))?,
            ),
        ),
        None => (text, Times::UntilCleared),
    };
    let (name, arg) = match body.split_once(':') {
        Some((n, a)) => (n.trim(), Some(a.trim())),
        None => (body.trim(), None),
    };
    let duration = |a: Option<&str>| -> Result<Duration, String> {
        let a = a.ok_or_else(|| format!("`{name}` needs a duration, e.g. {name}:2s"))?;
        let q = crate::units::parse_quantity(a, crate::units::Dimension::Time)
            .map_err(|e| format!("`{a}`: {e}"))?;
        Ok(Duration::from_secs_f64(q.value.clamp(0.0, 86_400.0)))
    };
    let fault = match name {
        "no_reply" => Fault::NoReply,
        "slow" => Fault::Slow(duration(arg)?),
        "garbage" => Fault::Garbage,
        "corrupt" => Fault::Corrupt,
        "busy" => Fault::Busy,
        "exception" => Fault::Exception(
            arg.and_then(|a| a.parse().ok())
                .ok_or("`exception` needs a code, e.g. exception:4")?,
        ),
        "disconnect" => Fault::Disconnect(duration(arg)?),
        other => {
            return Err(format!(
                "unknown fault `{other}` (no_reply, slow:2s, garbage, corrupt, busy, exception:4, disconnect:10s)"
            ));
        }
    };
    Ok((fault, times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(
            parse_fault("no_reply").unwrap(),
            (Fault::NoReply, Times::UntilCleared)
        );
        assert_eq!(
            parse_fault("slow:2 s@3").unwrap(),
            (Fault::Slow(Duration::from_secs(2)), Times::Next(3))
        );
        assert_eq!(parse_fault("exception:6").unwrap().0, Fault::Exception(6));
        assert!(parse_fault("exception").is_err());
        assert!(parse_fault("melt").is_err());
        assert!(parse_fault("disconnect").is_err());
    }
}
