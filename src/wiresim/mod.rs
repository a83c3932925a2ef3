//! Wire-protocol simulators: one simulated instrument serves one profile's
//! protocol — the serial lines or Modbus frames the real instrument speaks —
//! backed by a physical model ([`physics`]), so the controller's real serial
//! and Modbus driver code is what tests exercise.
//!
//! - [`SerialSimulator`] answers a serial profile from its
//!   `[[simulation.respond]]` rules (or, for the G-code liquid handler, from a
//!   small machine model in [`gcode`]).
//! - [`ModbusBus`] holds the units of one RS-485 line (or one TCP server); the
//!   register map of each unit is derived from its profile. The frame level
//!   (RTU with CRC, Modbus TCP) is written by hand in [`modbus`], so the
//!   simulator can corrupt frames, answer late and stay silent.
//! - [`host`] serves either on a pseudo-terminal (optionally behind a symlink)
//!   or on a TCP port; [`SerialSimulator::connect`] and [`ModbusBus::connect`]
//!   give in-process byte streams for `sim://` transports.
//! - [`FaultHandle`] injects faults, at start or while running.
//!
//! No input bytes panic a simulator, and every loop ends when its peer goes
//! away or its host is shut down.

pub mod gcode;
pub mod host;
pub mod modbus;
pub mod physics;
pub mod serial;

pub use host::{PtyHost, TcpHost};
pub use modbus::{LinePacing, ModbusBus, ModbusUnit};
pub use physics::{
    BioreactorPart, DevicePhysics, NoPhysics, PartRole, Physics, part_physics, physics_for,
};
pub use serial::SerialSimulator;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Size of the in-process pipes (`sim://`).
pub const PIPE_BYTES: usize = 64 * 1024;

/// A misbehaviour of the simulated instrument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answers, but this much later than usual.
    Slow(Duration),
    /// Does not answer at all.
    NoReply,
    /// Sends bytes that are not a reply (line noise, a confused firmware).
    Garbage,
    /// Modbus: the reply with a wrong CRC (RTU) or a wrong length (TCP).
    /// Serial: like `Garbage`.
    Corrupt,
    /// Modbus: answers with this exception code. Serial: like `NoReply`.
    Exception(u8),
    /// Modbus: exception 06 (server busy). Serial: the profile's
    /// `simulation.busy_reply`, or silence without one.
    Busy,
    /// Unplugged for this long, then back (see [`FaultHandle::inject`]).
    Disconnect(Duration),
}

/// How long an injected fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    /// The next N requests.
    Next(u32),
    /// Every request until [`FaultHandle::clear`].
    UntilCleared,
}

#[derive(Debug, Default)]
struct FaultState {
    active: Vec<(Fault, Times)>,
    offline_until: Option<Instant>,
}

/// Faults of one simulated instrument (or of one bus), shared by its hosts
/// and settable while it runs. Cloning gives another handle to the same faults.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    state: Arc<Mutex<FaultState>>,
    /// Bumped on every disconnect, so the hosts drop their connections.
    epoch: Arc<watch::Sender<u64>>,
}

impl Default for FaultHandle {
    fn default() -> Self {
        FaultHandle::new()
    }
}

impl FaultHandle {
    pub fn new() -> Self {
        FaultHandle {
            state: Arc::new(Mutex::new(FaultState::default())),
            epoch: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Injects a fault. `Disconnect(d)` acts at once, whatever `times`: the
    /// connections close, a PTY disappears (and comes back at the same symlink
    /// after `d`, as a re-enumerated USB adapter does), a TCP port refuses
    /// connections for `d`. Other faults apply to the next requests.
    pub fn inject(&self, fault: Fault, times: Times) {
        if let Fault::Disconnect(d) = fault {
            // A duration too long for the clock is "until cleared" (a year).
            let until = Instant::now()
                .checked_add(d.min(Duration::from_secs(365 * 24 * 3600)))
                .unwrap_or_else(Instant::now);
            self.lock().offline_until = Some(until);
            self.epoch.send_modify(|e| *e += 1);
            return;
        }
        if times == Times::Next(0) {
            return;
        }
        self.lock().active.push((fault, times));
    }

    /// Removes every pending fault and ends a disconnection early.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.active.clear();
        s.offline_until = None;
    }

    /// The fault for the request now being answered, if any (counts it down).
    pub fn take(&self) -> Option<Fault> {
        let mut s = self.lock();
        let i = s.active.iter().position(|(_, t)| *t != Times::Next(0))?;
        let (fault, times) = s.active[i];
        if let Times::Next(n) = times {
            if n <= 1 {
                s.active.remove(i);
            } else {
                s.active[i].1 = Times::Next(n - 1);
            }
        }
        Some(fault)
    }

    /// When the instrument comes back, if it is unplugged now.
    pub fn offline_until(&self) -> Option<Instant> {
        let mut s = self.lock();
        match s.offline_until {
            Some(t) if t > Instant::now() => Some(t),
            _ => {
                s.offline_until = None;
                None
            }
        }
    }

    pub fn is_offline(&self) -> bool {
        self.offline_until().is_some()
    }

    /// Changes whenever a disconnection starts.
    pub fn disconnects(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }
}

/// A serial simulator of `profile` on `physics`, and a first in-process
/// connection to it (for `sim://`; call [`SerialSimulator::connect`] again
/// after the controller rebuilds its link).
pub fn serve_serial_in_process(
    profile: Arc<crate::profile::Profile>,
    physics: Arc<dyn Physics>,
    settings_overrides: indexmap::IndexMap<String, f64>,
    clock: crate::clock::Clock,
) -> std::io::Result<(Arc<SerialSimulator>, tokio::io::DuplexStream)> {
    let sim = Arc::new(SerialSimulator::new(
        profile,
        physics,
        settings_overrides,
        clock,
    ));
    let stream = sim.connect()?;
    Ok((sim, stream))
}

/// A one-unit Modbus bus for `profile` on `physics` (at the profile's unit
/// id), and a first in-process connection speaking Modbus TCP framing, for
/// `tokio_modbus::client::tcp::attach`.
pub fn serve_modbus_in_process(
    profile: Arc<crate::profile::Profile>,
    physics: Arc<dyn Physics>,
    settings_overrides: indexmap::IndexMap<String, f64>,
) -> std::io::Result<(Arc<ModbusBus>, tokio::io::DuplexStream)> {
    let unit = ModbusUnit::new(profile, physics, settings_overrides);
    let mut bus = ModbusBus::new();
    bus.add(unit.default_unit(), unit);
    let bus = Arc::new(bus);
    let stream = bus.connect()?;
    Ok((bus, stream))
}

/// Waits out a simulated instrument's reply delay. No delay sets no timer:
/// tokio's timers tick in whole milliseconds, so even a zero-length sleep
/// would hold the reply until the next tick.
pub(crate) async fn reply_after(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Bytes that are not a reply, as a confused instrument or a noisy line sends.
pub(crate) fn garbage(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..7)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // Never a line end, so it cannot pass for a (partial) reply line.
            match (x >> 33) as u8 {
                b'\r' | b'\n' => 0xFF,
                b => b,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn faults_count_down_and_clear() {
        let f = FaultHandle::new();
        assert_eq!(f.take(), None);
        f.inject(Fault::NoReply, Times::Next(2));
        f.inject(Fault::Busy, Times::UntilCleared);
        assert_eq!(f.take(), Some(Fault::NoReply));
        assert_eq!(f.take(), Some(Fault::NoReply));
        assert_eq!(f.take(), Some(Fault::Busy));
        assert_eq!(f.take(), Some(Fault::Busy));
        f.clear();
        assert_eq!(f.take(), None);
        f.inject(Fault::Garbage, Times::Next(0));
        assert_eq!(f.take(), None);

        let mut epoch = f.disconnects();
        f.inject(Fault::Disconnect(Duration::from_secs(2)), Times::Next(1));
        assert!(epoch.has_changed().unwrap());
        epoch.mark_unchanged();
        assert!(f.is_offline());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!f.is_offline());
    }

    #[tokio::test(start_paused = true)]
    async fn in_process_modbus_serves_the_tokio_modbus_tcp_client() {
        use crate::source::SourceFile;
        use tokio_modbus::prelude::*;
        let text = r#"
format = "biofoundry.profile/1"
[profile]
name = "TC"
vendor = "V"
model = "M"
kind = "temperature_module"
source = "test"
[link]
type = "modbus"
unit = 4
[signals.temperature]
unit = "C"
address = 1
type = "i16"
scale = 0.1
[setpoints.temperature]
unit = "C"
limits = "4..95 C"
address = 2
type = "i16"
scale = 0.1
[actions.deactivate]
steps = [{ write = 3, value = 0 }]
"#;
        let (p, d) = crate::profile::parse(SourceFile::new("tc.toml", text));
        assert!(d.is_empty(), "{d:?}");
        let clock = crate::clock::Clock::new(1.0);
        let physics = Arc::new(DevicePhysics::for_kind(
            crate::catalogue::DeviceKind::TemperatureModule,
            "tc",
            clock,
            crate::sim::SimOptions::default(),
        ));
        let (bus, stream) =
            serve_modbus_in_process(Arc::new(p.unwrap()), physics, Default::default()).unwrap();
        let mut ctx = tokio_modbus::client::tcp::attach_slave(stream, Slave(4));
        ctx.write_single_register(2, 370).await.unwrap().unwrap();
        assert_eq!(
            ctx.read_holding_registers(2, 1).await.unwrap().unwrap(),
            [370]
        );
        bus.unit(4)
            .unwrap()
            .faults()
            .inject(Fault::Exception(4), Times::Next(1));
        assert_eq!(
            ctx.read_holding_registers(1, 1).await.unwrap(),
            Err(tokio_modbus::ExceptionCode::ServerDeviceFailure)
        );
        let pv = ctx.read_holding_registers(1, 1).await.unwrap().unwrap();
        assert!((200..=240).contains(&pv[0]), "{pv:?}");
    }

    #[test]
    fn garbage_has_no_line_ends() {
        for seed in 0..1000 {
            let g = garbage(seed);
            assert!(!g.contains(&b'\r') && !g.contains(&b'\n'));
        }
    }
}
