//! The serial simulator: answers one serial profile's requests from its
//! `[[simulation.respond]]` rules, on a physical model.
//!
//! Requests are split into lines on `\r` or `\n` (empty lines are ignored: the
//! Opentrons host ends commands with `\r\n\r\n`). For each line:
//!
//! 1. with `link.echo`, the line is sent back first;
//! 2. the first rule whose `request` pattern matches is applied. Its named
//!    captures that hold numbers are available to its templates and are
//!    remembered across requests (Liconic: `WR DM5 00007` remembers `slot`,
//!    then `ST 1904` loads it); `set` writes a setpoint of the model (`value`,
//!    default the `value` capture, in the setpoint's device unit), `command`
//!    runs a command of the model with every remembered number as arguments.
//!    With `wait = true` the reply waits until the command has finished (an
//!    instrument that answers at the end of a motion); otherwise it comes at
//!    once, while the command runs. If the model refuses, the next matching
//!    rule is tried — a catch-all
//!    rule last (`request = '.*'`) gives the instrument's error reply;
//! 3. each `reply` template is rendered and sent, each line followed by
//!    `link.reply_terminator`, after `simulation.reply_delay`.
//!
//! Names in templates, first match wins: the rule's captures, remembered
//! numbers, the settings (with the lab file's overrides), `target.<setpoint>`
//! (the last value set, in the setpoint's device unit, 0 if never set), the
//! profile's signals read from the model (in the signal's device unit), and
//! the model's own values (`busy`, `ready`, `error`, or any signal of the
//! model in its canonical unit). A request no rule answers gets no reply, as
//! a real instrument that does not understand stays silent.
//!
//! The G-code liquid handler (`simulation.model = "liquid_handler"`) is
//! answered by [`super::gcode`] instead.

use super::gcode::{self, GcodeMachine};
use super::physics::Physics;
use super::{Fault, FaultHandle, PIPE_BYTES, garbage, reply_after};
use crate::clock::Clock;
use crate::profile::expr::{Scope, Template};
use crate::profile::{LinkDef, Profile, RespondRule, SerialLinkDef};
use indexmap::IndexMap;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest request line; longer input is discarded up to the next line end.
pub const MAX_LINE: usize = 1024;
/// Longest wait for a command with `wait = true`, lab seconds.
const MAX_WAIT_S: f64 = 600.0;
/// At most this many numbers are remembered (a flood of distinct captures is bounded).
const MAX_VARS: usize = 256;

struct MapScope<'a>(&'a HashMap<String, f64>);

impl Scope for MapScope<'_> {
    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

/// One simulated serial instrument.
pub struct SerialSimulator {
    profile: Arc<Profile>,
    physics: Arc<dyn Physics>,
    settings: IndexMap<String, f64>,
    clock: Clock,
    faults: FaultHandle,
    vars: Mutex<HashMap<String, f64>>,
    gcode: Option<tokio::sync::Mutex<GcodeMachine>>,
    requests: AtomicU64,
    shutdown: CancellationToken,
}

impl SerialSimulator {
    /// `settings_overrides` replace the profile's settings of the same name
    /// (as a lab file's per-device settings do).
    pub fn new(
        profile: Arc<Profile>,
        physics: Arc<dyn Physics>,
        settings_overrides: IndexMap<String, f64>,
        clock: Clock,
    ) -> Self {
        let mut settings = profile.doc.settings.clone();
        settings.extend(settings_overrides);
        let is_gcode = profile
            .doc
            .simulation
            .as_ref()
            .and_then(|s| s.get_ref().model.as_ref())
            .is_some_and(|m| m.get_ref() == "liquid_handler");
        let gcode = is_gcode.then(|| tokio::sync::Mutex::new(GcodeMachine::new(&settings)));
        SerialSimulator {
            profile,
            physics,
            settings,
            clock,
            faults: FaultHandle::new(),
            vars: Mutex::new(HashMap::new()),
            gcode,
            requests: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
        }
    }

    /// Uses these faults (e.g. a handle shared with a test) instead of its own.
    pub fn with_faults(mut self, faults: FaultHandle) -> Self {
        self.faults = faults;
        self
    }

    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }

    pub fn physics(&self) -> &Arc<dyn Physics> {
        &self.physics
    }

    /// A G-code liquid handler's tip as a resumed run knows it (see
    /// [`GcodeMachine::restore_tip`]); nothing for other instruments.
    pub async fn restore_tip(&self, held_ul: Option<f64>) {
        if let Some(machine) = &self.gcode {
            machine.lock().await.restore_tip(held_ul);
        }
    }

    /// The G-code machine's state, for the liquid handler.
    pub async fn gcode_state(&self) -> Option<GcodeMachine> {
        match &self.gcode {
            Some(m) => Some(m.lock().await.clone()),
            None => None,
        }
    }

    fn link(&self) -> Option<&SerialLinkDef> {
        match self.profile.doc.link.get_ref() {
            LinkDef::Serial(s) => Some(s),
            LinkDef::Modbus(_) => None,
        }
    }

    fn terminator(&self) -> &str {
        self.link().map_or("\r\n", |l| l.reply_terminator.as_str())
    }

    /// Ends every in-process connection ([`SerialSimulator::connect`]).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A new in-process connection (for `sim://`): the returned end is the
    /// controller's; the simulator serves the other until either is dropped.
    /// Refused while a disconnect fault lasts.
    pub fn connect(self: &Arc<Self>) -> io::Result<DuplexStream> {
        if self.faults.is_offline() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the simulated instrument is unplugged",
            ));
        }
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let me = self.clone();
        let cancel = self.shutdown.child_token();
        let disconnects = self.faults.disconnects();
        tokio::spawn(async move {
            let _ = me.serve_until(ours, cancel, disconnects).await;
        });
        Ok(theirs)
    }

    /// Serves requests from `stream` until it closes, `cancel` fires or a
    /// disconnect fault is injected.
    pub async fn serve<S>(&self, stream: S, cancel: CancellationToken) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.serve_until(stream, cancel, self.faults.disconnects())
            .await
    }

    /// [`SerialSimulator::serve`], ending at the next change of `disconnects`.
    pub(crate) async fn serve_until<S>(
        &self,
        mut stream: S,
        cancel: CancellationToken,
        mut disconnects: watch::Receiver<u64>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut line: Vec<u8> = Vec::new();
        let mut overflow = false;
        let mut scratch = [0u8; 512];
        loop {
            let n = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = disconnects.changed() => return Ok(()),
                r = stream.read(&mut scratch) => r?,
            };
            if n == 0 {
                return Ok(());
            }
            for &b in &scratch[..n] {
                if b == b'\r' || b == b'\n' {
                    if !line.is_empty() && !overflow {
                        let request = String::from_utf8_lossy(&line).into_owned();
                        let reply = tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = disconnects.changed() => return Ok(()),
                            r = self.answer(&request) => r,
                        };
                        if !reply.is_empty() {
                            stream.write_all(&reply).await?;
                            stream.flush().await?;
                        }
                    }
                    line.clear();
                    overflow = false;
                } else if line.len() < MAX_LINE {
                    line.push(b);
                } else {
                    overflow = true;
                }
            }
        }
    }

    /// The bytes answering one request line (empty: silence), after the reply
    /// delay and any injected fault.
    pub async fn answer(&self, request: &str) -> Vec<u8> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let terminator = self.terminator().to_string();
        let delay = self
            .profile
            .doc
            .simulation
            .as_ref()
            .map_or(Duration::ZERO, |s| s.get_ref().reply_delay.std());
        let mut lines: Vec<String> = Vec::new();
        let echo = self.link().is_some_and(|l| l.echo);
        match self.faults.take() {
            Some(Fault::NoReply | Fault::Exception(_) | Fault::Disconnect(_)) => {
                return Vec::new();
            }
            Some(Fault::Garbage | Fault::Corrupt) => {
                reply_after(delay).await;
                let mut bytes = garbage(n);
                bytes.extend_from_slice(terminator.as_bytes());
                return bytes;
            }
            Some(Fault::Busy) => {
                let busy = self
                    .profile
                    .doc
                    .simulation
                    .as_ref()
                    .map(|s| s.get_ref().busy_reply.clone())
                    .unwrap_or_default();
                if busy.is_empty() {
                    return Vec::new();
                }
                if echo {
                    lines.push(request.to_string());
                }
                lines.extend(busy);
                reply_after(delay).await;
                return join(&lines, &terminator);
            }
            Some(Fault::Slow(extra)) => tokio::time::sleep(extra).await,
            None => {}
        }
        let reply = self.respond(request).await;
        if reply.is_none() && !echo {
            return Vec::new();
        }
        if echo {
            lines.push(request.to_string());
        }
        lines.extend(reply.unwrap_or_default());
        reply_after(delay).await;
        join(&lines, &terminator)
    }

    /// The reply lines to a request (`None`: no rule answers it).
    pub async fn respond(&self, request: &str) -> Option<Vec<String>> {
        if let Some(machine) = &self.gcode {
            return Some(vec![gcode::run(machine, request, self.clock).await]);
        }
        let sim = self.profile.doc.simulation.as_ref()?.get_ref();
        for rule in &sim.respond {
            let rule = rule.get_ref();
            let Some(caps) = rule.request.0.captures(request) else {
                continue;
            };
            let mut captured = HashMap::new();
            for name in rule.request.0.capture_names().flatten() {
                if let Some(v) = caps
                    .name(name)
                    .and_then(|m| m.as_str().trim().parse::<f64>().ok())
                    .filter(|v| v.is_finite())
                {
                    captured.insert(name.to_string(), v);
                }
            }
            {
                let mut vars = self.vars.lock().unwrap_or_else(PoisonError::into_inner);
                for (k, v) in &captured {
                    if vars.len() < MAX_VARS || vars.contains_key(k) {
                        vars.insert(k.clone(), *v);
                    }
                }
            }
            match self.apply(rule, &captured).await {
                Ok(lines) => return Some(lines),
                Err(e) => {
                    tracing::debug!("simulated {}: `{request}`: {e}", self.profile.id);
                    continue;
                }
            }
        }
        None
    }

    async fn apply(
        &self,
        rule: &RespondRule,
        captured: &HashMap<String, f64>,
    ) -> Result<Vec<String>, String> {
        if let Some(setpoint) = &rule.set {
            let device_value = match &rule.value {
                Some(t) => {
                    let names = self.resolve(&t.names(), captured).await;
                    t.number(&MapScope(&names)).map_err(|e| e.to_string())?
                }
                None => *captured
                    .get("value")
                    .ok_or("the rule sets a setpoint but has no `value` capture")?,
            };
            let canonical = self.profile.to_canonical(setpoint, device_value);
            self.physics.set(setpoint, canonical).await?;
        }
        if let Some(command) = &rule.command {
            let mut args: Vec<(String, f64)> = self
                .vars
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            for (k, v) in captured {
                args.retain(|(n, _)| n != k);
                args.push((k.clone(), *v));
            }
            self.physics.command(command, &args).await?;
            if rule.wait {
                self.wait_idle().await;
            }
        }
        let mut wanted = BTreeSet::new();
        for t in &rule.reply {
            wanted.extend(t.names());
        }
        let names = self.resolve(&wanted, captured).await;
        rule.reply
            .iter()
            .map(|t: &Template| t.render(&MapScope(&names)).map_err(|e| e.to_string()))
            .collect()
    }

    /// Waits (on the clock) until the model's running command has ended,
    /// at most [`MAX_WAIT_S`] of lab time.
    async fn wait_idle(&self) {
        let mut waited = 0.0;
        while waited < MAX_WAIT_S && self.physics.read("busy").await.is_ok_and(|b| b > 0.0) {
            self.clock.sleep(0.1).await;
            waited += 0.1;
        }
    }

    /// Values of the names templates use; names with no value are left out
    /// (rendering then fails and the rule is skipped).
    async fn resolve(
        &self,
        wanted: &BTreeSet<String>,
        captured: &HashMap<String, f64>,
    ) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        for name in wanted {
            if let Some(v) = captured.get(name) {
                out.insert(name.clone(), *v);
                continue;
            }
            let remembered = self
                .vars
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name)
                .copied();
            if let Some(v) = remembered.or_else(|| self.settings.get(name).copied()) {
                out.insert(name.clone(), v);
                continue;
            }
            if let Some(setpoint) = name.strip_prefix("target.") {
                let v = self.physics.target(setpoint).unwrap_or(0.0);
                out.insert(name.clone(), self.profile.to_device(setpoint, v));
                continue;
            }
            match self.physics.read(name).await {
                Ok(v) if self.profile.doc.signals.contains_key(name) => {
                    out.insert(name.clone(), self.profile.to_device(name, v));
                }
                Ok(v) => {
                    out.insert(name.clone(), v);
                }
                Err(e) => tracing::debug!("simulated {}: {name}: {e}", self.profile.id),
            }
        }
        out
    }
}

fn join(lines: &[String], terminator: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(terminator.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::DeviceKind;
    use crate::sim::{SimOptions, SimTiming};
    use crate::source::SourceFile;
    use crate::wiresim::physics::DevicePhysics;
    use crate::wiresim::{Times, physics::NoPhysics};
    use tokio::time::timeout;

    const INCUBATOR: &str = r#"
format = "biofoundry.profile/1"
[profile]
name = "I"
vendor = "V"
model = "M"
kind = "incubator"
source = "test"
[link]
type = "serial"
baud = 9600
echo = true
[signals.temperature]
unit = "C"
query = "RD DM982"
reply = '^(?<value>[0-9]+)$'
[setpoints.temperature]
unit = "C"
limits = "4..50 C"
command = "WR DM890 {value * 10:05}"
[actions.load]
steps = [{ send = "WR DM5 {slot:05}" }, { send = "ST 1904" }]
[actions.unload]
steps = [{ send = "WR DM5 {slot:05}" }, { send = "ST 1905" }]
[simulation]
busy_reply = ["BUSY"]
[[simulation.respond]]
request = '^WR DM5 (?<slot>[0-9]+)$'
reply = ["OK"]
[[simulation.respond]]
request = '^ST 1904$'
command = "load"
reply = ["OK"]
[[simulation.respond]]
request = '^WR DM890 (?<value>[0-9]+)$'
set = "temperature"
value = "{value / 10}"
reply = ["OK"]
[[simulation.respond]]
request = '^RD DM890$'
reply = ["{target.temperature * 10:05}"]
[[simulation.respond]]
request = '^RD 1915$'
reply = ["{ready}"]
[[simulation.respond]]
request = '.*'
reply = ["E1"]
"#;

    fn simulator(text: &str, kind: DeviceKind, clock: Clock) -> Arc<SerialSimulator> {
        let (p, d) = crate::profile::parse(SourceFile::new("t.toml", text));
        assert!(d.is_empty(), "{d:?}");
        let physics: Arc<dyn Physics> = if kind == DeviceKind::LiquidHandler {
            Arc::new(NoPhysics)
        } else {
            Arc::new(DevicePhysics::for_kind(
                kind,
                "dev",
                clock,
                SimOptions {
                    seed: 1,
                    timing: SimTiming::Realistic,
                },
            ))
        };
        Arc::new(SerialSimulator::new(
            Arc::new(p.unwrap()),
            physics,
            IndexMap::new(),
            clock,
        ))
    }

    async fn ask(stream: &mut DuplexStream, request: &str, expect_lines: usize) -> Vec<String> {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 256];
        while got.matches("\r\n").count() < expect_lines {
            let n = timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("a reply")
                .unwrap();
            assert!(n > 0, "closed");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got.split("\r\n")
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn rules_remember_captures_and_drive_the_model() {
        let clock = Clock::new(1.0);
        let sim = simulator(INCUBATOR, DeviceKind::Incubator, clock);
        let mut s = sim.connect().unwrap();
        // Echo first; empty lines are ignored.
        assert_eq!(
            ask(&mut s, "WR DM5 00007\r\n\r\n", 2).await,
            ["WR DM5 00007", "OK"]
        );
        assert_eq!(ask(&mut s, "ST 1904\r", 2).await, ["ST 1904", "OK"]);
        assert_eq!(ask(&mut s, "RD 1915\r", 2).await, ["RD 1915", "0"]);
        clock.sleep(30.0).await;
        assert_eq!(ask(&mut s, "RD 1915\r", 2).await, ["RD 1915", "1"]);
        // Slot 7 is occupied now: the model refuses, the catch-all answers.
        assert_eq!(ask(&mut s, "ST 1904\r", 2).await, ["ST 1904", "E1"]);
        assert_eq!(ask(&mut s, "WR DM890 00370\r", 2).await[1], "OK");
        assert_eq!(ask(&mut s, "RD DM890\r", 2).await[1], "00370");
        // Out of the model's limits: refused.
        assert_eq!(ask(&mut s, "WR DM890 00990\r", 2).await[1], "E1");
        assert_eq!(ask(&mut s, "XYZ\r", 2).await[1], "E1");
    }

    #[tokio::test(start_paused = true)]
    async fn faults_change_the_answer() {
        let clock = Clock::new(1.0);
        let sim = simulator(INCUBATOR, DeviceKind::Incubator, clock);
        let faults = sim.faults();
        faults.inject(Fault::Busy, Times::Next(1));
        assert_eq!(sim.answer("RD 1915").await, b"RD 1915\r\nBUSY\r\n");
        faults.inject(Fault::NoReply, Times::Next(1));
        assert!(sim.answer("RD 1915").await.is_empty());
        faults.inject(Fault::Garbage, Times::Next(1));
        let g = sim.answer("RD 1915").await;
        assert!(g.ends_with(b"\r\n") && !g.starts_with(b"RD"));
        faults.inject(Fault::Slow(Duration::from_secs(3)), Times::UntilCleared);
        let start = tokio::time::Instant::now();
        assert_eq!(sim.answer("RD 1915").await, b"RD 1915\r\n1\r\n");
        assert!(start.elapsed() >= Duration::from_secs(3));
        faults.clear();

        let mut s = sim.connect().unwrap();
        faults.inject(Fault::Disconnect(Duration::from_secs(5)), Times::Next(1));
        let mut buf = [0u8; 16];
        let n = timeout(Duration::from_secs(1), s.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
        assert!(sim.connect().is_err());
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut s = sim.connect().unwrap();
        assert_eq!(ask(&mut s, "RD 1915\r", 2).await[1], "1");
    }

    #[tokio::test(start_paused = true)]
    async fn long_lines_and_bad_bytes_do_not_break_it() {
        let clock = Clock::new(1.0);
        let sim = simulator(INCUBATOR, DeviceKind::Incubator, clock);
        let mut s = sim.connect().unwrap();
        let mut long = vec![b'A'; 5000];
        long.push(b'\r');
        s.write_all(&long).await.unwrap();
        s.write_all(&[0xFF, 0x00, 0xC3, b'\r']).await.unwrap();
        // The overlong line is dropped; the binary one gets the catch-all.
        assert_eq!(ask(&mut s, "RD 1915\r", 4).await.len(), 4);
    }
}
