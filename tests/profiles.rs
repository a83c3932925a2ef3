//! Every shipped profile in devices/ loads without a diagnostic, and its
//! simulator answers the profile's own wire messages: each signal's query
//! (or register block), a write of each setpoint, the connect and identify
//! sequences, and the actions a driver runs. The messages are built here from
//! the profile, byte by byte and frame by frame, independently of the driver.
//! A few tests also serve simulators on pseudo-terminals and TCP ports and
//! talk to them with tokio-serial and the tokio-modbus client.

use biofoundry::clock::Clock;
use biofoundry::profile::codec::{DataType, Encoding, RegisterKind, WordOrder};
use biofoundry::profile::expr::{Scope, Template};
use biofoundry::profile::{LinkDef, Profile, SerialLinkDef, StepDef};
use biofoundry::sim::{SimBioreactor, SimOptions, SimTiming};
use biofoundry::wiresim::modbus::{crc16, rtu_frame, tcp_frame};
use biofoundry::wiresim::{
    Fault, ModbusBus, ModbusUnit, PtyHost, SerialSimulator, TcpHost, Times, physics_for,
};
use indexmap::IndexMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(10);

fn devices() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("devices")
}

fn all_profiles() -> Vec<Profile> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(devices())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| match biofoundry::profile::load(f) {
            Ok(p) => p,
            Err(e) => panic!("{}: {e}: {e:?}", f.display()),
        })
        .collect()
}

fn profile(name: &str) -> Arc<Profile> {
    Arc::new(biofoundry::profile::load(&devices().join(format!("{name}.toml"))).unwrap())
}

fn options() -> SimOptions {
    SimOptions {
        seed: 3,
        timing: SimTiming::Realistic,
    }
}

struct Names(HashMap<String, f64>);

impl Scope for Names {
    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

fn names(p: &Profile, params: &[(&str, f64)]) -> Names {
    let mut m: HashMap<String, f64> = p.doc.settings.clone().into_iter().collect();
    for (k, v) in params {
        m.insert(k.to_string(), *v);
    }
    Names(m)
}

/// A setpoint value inside both the profile's limits and the simulated
/// lab's, in the device's unit.
fn test_value(p: &Profile, setpoint: &str) -> f64 {
    let l = p.limits[setpoint];
    let c = p.kind.spec().setpoint(setpoint).map(|s| s.limits());
    let (lo, hi) = match c {
        Some(c) => (l.min.max(c.min), l.max.min(c.max)),
        None => (l.min, l.max),
    };
    p.to_device(setpoint, lo + (hi - lo) * 0.4)
}

#[test]
fn every_profile_loads_cleanly() {
    let profiles = all_profiles();
    assert!(profiles.len() >= 12, "{}", profiles.len());
    let kinds: Vec<&str> = profiles.iter().map(|p| p.kind.name()).collect();
    for kind in [
        "liquid_handler",
        "incubator",
        "pump",
        "sensor",
        "temperature_module",
        "heater_shaker",
    ] {
        assert!(kinds.contains(&kind), "no {kind} profile");
    }
    for p in &profiles {
        let sim = p.doc.simulation.as_ref().expect("a [simulation]");
        assert!(sim.get_ref().model.is_some(), "{}: simulation.model", p.id);
        assert!(!p.doc.profile.source.trim().is_empty());
        // A busy reply is one the error table retries.
        for line in &sim.get_ref().busy_reply {
            let retried = p.doc.errors.iter().any(|e| {
                let e = e.get_ref();
                e.pattern
                    .0
                    .captures(line)
                    .and_then(|c| c.name("code").map(|m| m.as_str().to_string()))
                    .is_some_and(|c| e.retry.contains(&c))
            });
            assert!(retried, "{}: busy reply `{line}` is not retried", p.id);
        }
    }
}

// ---------------------------------------------------------------- serial

/// A client speaking a serial profile's line protocol, as a driver would.
struct Line<S> {
    stream: S,
    link: SerialLinkDef,
    profile: Arc<Profile>,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Line<S> {
    fn new(stream: S, profile: Arc<Profile>) -> Self {
        let LinkDef::Serial(link) = profile.doc.link.get_ref().clone() else {
            panic!("not serial")
        };
        Line {
            stream,
            link,
            profile,
            buffer: Vec::new(),
        }
    }

    async fn line(&mut self) -> String {
        let t = self.link.reply_terminator.as_bytes().to_vec();
        loop {
            if let Some(i) = self.buffer.windows(t.len()).position(|w| w == t) {
                let line: Vec<u8> = self.buffer.drain(..i + t.len()).collect();
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            let mut scratch = [0u8; 256];
            let n = timeout(STEP, self.stream.read(&mut scratch))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "the simulator closed the link");
            self.buffer.extend_from_slice(&scratch[..n]);
        }
    }

    /// Sends a command; returns the reply lines (echo removed), up to the
    /// line that completes the reply.
    async fn exchange(&mut self, command: &str, expect_reply: bool) -> Vec<String> {
        self.buffer.clear();
        let bytes = format!("{command}{}", self.link.send_terminator);
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
        if !expect_reply {
            if self.link.echo {
                assert_eq!(self.line().await.trim(), command.trim());
            }
            return Vec::new();
        }
        let mut lines = Vec::new();
        let mut echo = self.link.echo;
        loop {
            let l = self.line().await;
            if echo {
                assert_eq!(l.trim(), command.trim(), "echo");
                echo = false;
                continue;
            }
            if l.trim().is_empty() {
                continue;
            }
            let error = self
                .profile
                .doc
                .errors
                .iter()
                .any(|e| e.get_ref().pattern.0.is_match(&l));
            let done = error
                || self
                    .link
                    .reply_end
                    .as_ref()
                    .is_none_or(|p| p.0.is_match(&l));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    fn render(&self, t: &Template, params: &[(&str, f64)]) -> String {
        t.render(&names(&self.profile, params)).unwrap()
    }

    async fn steps(&mut self, steps: &[toml::Spanned<StepDef>], params: &[(&str, f64)]) {
        for step in steps {
            let st = step.get_ref();
            if let Some(send) = &st.send {
                let command = self.render(send, params);
                let reply = self.exchange(&command, st.reply != Some(false)).await;
                if let Some(expect) = &st.expect {
                    let text = reply.join("\n");
                    assert!(
                        expect.0.is_match(&text),
                        "{}: `{command}` got {reply:?}, expected /{}/",
                        self.profile.id,
                        expect.0.as_str()
                    );
                }
            } else if let Some(poll) = &st.poll {
                let command = self.render(poll, params);
                let until = st.until.as_ref().unwrap();
                let every = st.every.map_or(Duration::from_millis(100), |d| d.std());
                let mut tries = 0;
                loop {
                    let reply = self.exchange(&command, true).await.join("\n");
                    if until.0.is_match(&reply) {
                        break;
                    }
                    tries += 1;
                    assert!(
                        tries < 1000,
                        "{}: `{command}` never matched",
                        self.profile.id
                    );
                    tokio::time::sleep(every).await;
                }
            } else if let Some(action) = &st.action {
                let a = self.profile.doc.actions[action.get_ref()]
                    .get_ref()
                    .steps
                    .clone();
                Box::pin(self.steps(&a, params)).await;
            }
            // wait, send_break: nothing to exchange (a PTY has no break).
        }
    }

    async fn read_signal(&mut self, name: &str) -> f64 {
        let sig = self.profile.doc.signals[name].get_ref().clone();
        let command = self.render(sig.query.as_ref().unwrap(), &[]);
        let reply = self.exchange(&command, true).await.join("\n");
        let capture = sig.capture.as_deref().unwrap_or("value");
        let raw: f64 = sig
            .reply
            .as_ref()
            .unwrap()
            .0
            .captures(&reply)
            .and_then(|c| c.name(capture))
            .and_then(|m| m.as_str().trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: {name}: reply `{reply}`", self.profile.id));
        let n = names(&self.profile, &[]);
        let scale = sig.scale.as_ref().map_or(1.0, |t| t.number(&n).unwrap());
        let offset = sig.offset.as_ref().map_or(0.0, |t| t.number(&n).unwrap());
        raw * scale + offset
    }

    async fn write_setpoint(&mut self, name: &str, value: f64) {
        let sp = self.profile.doc.setpoints[name].get_ref().clone();
        if let Some(command) = &sp.command {
            let text = self.render(command, &[("value", value)]);
            let reply = self.exchange(&text, true).await.join("\n");
            if let Some(expect) = &sp.expect {
                assert!(
                    expect.0.is_match(&reply),
                    "{}: `{text}` -> `{reply}`",
                    self.profile.id
                );
            }
        } else {
            self.steps(&sp.steps, &[("value", value)]).await;
        }
    }
}

fn serial_sim(p: &Arc<Profile>, clock: Clock) -> Arc<SerialSimulator> {
    let physics = physics_for(p, &p.id, clock, options(), None).unwrap();
    Arc::new(SerialSimulator::new(
        p.clone(),
        physics,
        IndexMap::new(),
        clock,
    ))
}

/// Connect, identify, read every signal, write every setpoint (and read it
/// back where the instrument reports its target).
async fn exercise_serial(p: Arc<Profile>) {
    let clock = Clock::new(1.0);
    let sim = serial_sim(&p, clock);
    let mut line = Line::new(sim.connect().unwrap(), p.clone());
    line.steps(&p.doc.connect, &[]).await;
    if let Some(i) = &p.doc.identify {
        line.steps(std::slice::from_ref(i), &[]).await;
    }
    for name in p.doc.signals.keys() {
        let v = line.read_signal(name).await;
        assert!(v.is_finite(), "{}: {name} = {v}", p.id);
    }
    for name in p.doc.setpoints.keys() {
        let value = test_value(&p, name);
        line.write_setpoint(name, value).await;
        let target = sim.physics().target(name).unwrap_or(f64::NAN);
        assert!(
            (p.to_device(name, target) - value).abs() <= value.abs() * 0.01 + 0.05,
            "{}: {name} set to {value}, the model has {target}",
            p.id
        );
    }
    for (name, _) in &p.doc.actions {
        if p.kind.name() == "liquid_handler" || matches!(name.as_str(), "load" | "unload") {
            continue;
        }
        let steps = p.doc.actions[name].get_ref().steps.clone();
        line.steps(&steps, &[]).await;
    }
    line.steps(&p.doc.safe_state, &[]).await;
}

#[tokio::test(start_paused = true)]
async fn serial_profiles_answer_their_own_messages() {
    for p in all_profiles() {
        if !p.is_modbus() {
            timeout(Duration::from_secs(3600), exercise_serial(Arc::new(p)))
                .await
                .expect("bounded");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn incubators_load_and_unload_through_their_sequences() {
    for name in ["liconic-stx", "thermo-cytomat"] {
        let p = profile(name);
        let clock = Clock::new(1.0);
        let sim = serial_sim(&p, clock);
        let mut line = Line::new(sim.connect().unwrap(), p.clone());
        line.steps(&p.doc.connect, &[]).await;
        let load = p.doc.actions["load"].get_ref().steps.clone();
        let unload = p.doc.actions["unload"].get_ref().steps.clone();
        let start = clock.now_s();
        timeout(
            Duration::from_secs(600),
            line.steps(&load, &[("slot", 7.0)]),
        )
        .await
        .unwrap();
        // The plate handler takes its time: the sequence waited for it.
        assert!(
            clock.now_s() - start >= 20.0,
            "{name}: {}",
            clock.now_s() - start
        );
        timeout(
            Duration::from_secs(600),
            line.steps(&unload, &[("slot", 7.0)]),
        )
        .await
        .unwrap();
    }
    // Slot 7 is taken twice on the Liconic: the second load is an E1.
    let p = profile("liconic-stx");
    let clock = Clock::new(1.0);
    let sim = serial_sim(&p, clock);
    let mut line = Line::new(sim.connect().unwrap(), p.clone());
    assert_eq!(line.exchange("WR DM5 00007", true).await, ["OK"]);
    assert_eq!(line.exchange("ST 1904", true).await, ["OK"]);
    clock.sleep(60.0).await;
    assert_eq!(line.exchange("ST 1904", true).await, ["E1"]);
    assert_eq!(line.exchange("RD DM890", true).await, ["00000"]);
}

#[tokio::test(start_paused = true)]
async fn cytomat_busy_replies_are_its_retried_error() {
    let p = profile("thermo-cytomat");
    let clock = Clock::new(1.0);
    let sim = serial_sim(&p, clock);
    let mut line = Line::new(sim.connect().unwrap(), p.clone());
    sim.faults().inject(Fault::Busy, Times::Next(2));
    assert_eq!(line.exchange("ch:bs", true).await, ["er 01"]);
    assert_eq!(line.exchange("ch:bs", true).await, ["er 01"]);
    assert_eq!(line.exchange("ch:bs", true).await, ["bs 02"]);
    assert_eq!(line.exchange("xx:yy", true).await, ["er 02"]);
}

#[tokio::test(start_paused = true)]
async fn the_gcode_liquid_handler_pipettes() {
    let p = profile("gcode-liquid-handler");
    let clock = Clock::new(1.0);
    let sim = serial_sim(&p, clock);
    let mut line = Line::new(sim.connect().unwrap(), p.clone());
    line.steps(&p.doc.connect, &[]).await;
    let action = |n: &str| p.doc.actions[n].get_ref().steps.clone();
    let deck = p.doc.deck.as_ref().unwrap().get_ref();
    let [sx, sy, sz] = deck.slots["1"];
    // A tip in a rack in slot 1 (top 64 mm), a well in slot 2 (bottom 2 mm).
    let tip = [("x", sx + 14.4), ("y", sy + 74.2), ("z", sz + 64.0)];
    let [wx, wy, wz] = deck.slots["2"];
    let well = |volume: f64, held: f64| {
        [
            ("x", wx + 14.4),
            ("y", wy + 74.2),
            ("z", wz + 2.0),
            ("volume", volume),
            ("held", held),
        ]
    };
    let start = clock.now_s();
    line.steps(&action("pick_up_tip"), &tip).await;
    assert!(clock.now_s() > start, "moves take time");
    line.steps(&action("aspirate"), &well(100.0, 0.0)).await;
    line.steps(&action("aspirate"), &well(50.0, 100.0)).await;
    let state = sim.gcode_state().await.unwrap();
    assert!(
        (state.held_ul() - 150.0).abs() < 0.01,
        "{}",
        state.held_ul()
    );
    line.steps(&action("dispense"), &well(150.0, 150.0)).await;
    // Beyond the tip: refused with the profile's error.
    let cmd = "G1 B25.0000 F600";
    let reply = line.exchange(cmd, true).await;
    assert!(reply[0].starts_with("error:3"), "{reply:?}");
    let b = 301.0 * p.setting("mm_per_ul").unwrap();
    let reply = line.exchange(&format!("G1 B{b:.4}"), true).await;
    assert!(reply[0].starts_with("error:5"), "{reply:?}");
    let [tx, ty, tz] = deck.trash;
    line.steps(&action("drop_tip"), &[("x", tx), ("y", ty), ("z", tz)])
        .await;
    assert!(!sim.gcode_state().await.unwrap().has_tip());
    let reply = line.exchange("G1 B1", true).await;
    assert!(reply[0].starts_with("error:4"), "no tip: {reply:?}");
    let reply = line.exchange("M114", true).await;
    assert!(reply[0].starts_with("ok C: X:330.000"), "{reply:?}");
}

// ---------------------------------------------------------------- Modbus

/// A Modbus client written against the frames, RTU or TCP.
struct Frames<S> {
    stream: S,
    rtu: bool,
    unit: u8,
    transaction: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Frames<S> {
    /// Sends a PDU; returns the answer PDU.
    async fn call(&mut self, pdu: &[u8]) -> Vec<u8> {
        self.transaction = self.transaction.wrapping_add(1);
        let frame = if self.rtu {
            rtu_frame(self.unit, pdu)
        } else {
            tcp_frame(self.transaction, self.unit, pdu)
        };
        self.stream.write_all(&frame).await.unwrap();
        let header = if self.rtu { 2 } else { 8 };
        let mut head = vec![0u8; header];
        timeout(STEP, self.stream.read_exact(&mut head))
            .await
            .expect("an answer")
            .unwrap();
        let function = head[header - 1];
        let rest = if function & 0x80 != 0 {
            1
        } else if matches!(function, 3 | 4) {
            let mut n = [0u8; 1];
            self.stream.read_exact(&mut n).await.unwrap();
            head.push(n[0]);
            usize::from(n[0])
        } else {
            4
        };
        let mut tail = vec![0u8; rest + if self.rtu { 2 } else { 0 }];
        timeout(STEP, self.stream.read_exact(&mut tail))
            .await
            .unwrap()
            .unwrap();
        let mut all = head;
        all.extend_from_slice(&tail);
        if self.rtu {
            let n = all.len();
            assert_eq!(crc16(&all[..n - 2]).to_le_bytes(), all[n - 2..], "CRC");
            assert_eq!(all[0], self.unit);
            all[1..n - 2].to_vec()
        } else {
            assert_eq!(u16::from_be_bytes([all[0], all[1]]), self.transaction);
            all[7..].to_vec()
        }
    }

    async fn read(&mut self, kind: RegisterKind, address: u16, count: u16) -> Vec<u16> {
        let function = if kind == RegisterKind::Input { 4 } else { 3 };
        let mut pdu = vec![function];
        pdu.extend_from_slice(&address.to_be_bytes());
        pdu.extend_from_slice(&count.to_be_bytes());
        let answer = self.call(&pdu).await;
        assert_eq!(
            answer[0], function,
            "exception {answer:?} reading {address}+{count}"
        );
        answer[2..]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    async fn write(&mut self, address: u16, words: &[u16]) -> Vec<u8> {
        let pdu = if words.len() == 1 {
            let mut p = vec![6];
            p.extend_from_slice(&address.to_be_bytes());
            p.extend_from_slice(&words[0].to_be_bytes());
            p
        } else {
            let mut p = vec![16];
            p.extend_from_slice(&address.to_be_bytes());
            p.extend_from_slice(&(words.len() as u16).to_be_bytes());
            p.push((words.len() * 2) as u8);
            for w in words {
                p.extend_from_slice(&w.to_be_bytes());
            }
            p
        };
        self.call(&pdu).await
    }
}

fn modbus_link(p: &Profile) -> (u8, WordOrder) {
    match p.doc.link.get_ref() {
        LinkDef::Modbus(m) => (m.unit, m.word_order),
        LinkDef::Serial(_) => panic!("not Modbus"),
    }
}

fn number(t: Option<&Template>, p: &Profile, default: f64) -> f64 {
    t.map_or(default, |t| t.number(&names(p, &[])).unwrap())
}

async fn read_signal<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Frames<S>,
    p: &Profile,
    name: &str,
) -> f64 {
    let (_, order) = modbus_link(p);
    let sig = p.doc.signals[name].get_ref();
    let n = names(p, &[]);
    let address = sig.address.as_ref().unwrap().number(&n).unwrap() as u16;
    let e = Encoding {
        data_type: sig.data_type,
        word_order: sig.word_order.unwrap_or(order),
        scale: number(sig.scale.as_ref(), p, 1.0),
        offset: number(sig.offset.as_ref(), p, 0.0),
    };
    let (start, words) = match &sig.block {
        Some(b) => {
            let start = b.start.number(&n).unwrap() as u16;
            (start, c.read(sig.register, start, b.count).await)
        }
        None => (
            address,
            c.read(sig.register, address, sig.data_type.registers())
                .await,
        ),
    };
    if let Some(st) = &sig.status {
        let a = usize::from(st.address.number(&n).unwrap() as u16 - start);
        let s = Encoding {
            data_type: st.data_type,
            word_order: e.word_order,
            scale: 1.0,
            offset: 0.0,
        }
        .decode(&words[a..])
        .unwrap();
        assert_eq!(s, st.ok, "{}: {name} status", p.id);
    }
    let at = usize::from(address - start);
    e.decode(&words[at..]).unwrap()
}

async fn write_setpoint<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Frames<S>,
    p: &Profile,
    name: &str,
    value: f64,
) {
    let (_, order) = modbus_link(p);
    let sp = p.doc.setpoints[name].get_ref();
    if let Some(a) = &sp.address {
        let address = a.number(&names(p, &[])).unwrap() as u16;
        let words = Encoding {
            data_type: sp.data_type,
            word_order: sp.word_order.unwrap_or(order),
            scale: number(sp.scale.as_ref(), p, 1.0),
            offset: number(sp.offset.as_ref(), p, 0.0),
        }
        .encode(value)
        .unwrap();
        let answer = c.write(address, &words).await;
        assert!(
            answer[0] & 0x80 == 0,
            "{}: {name}: exception {answer:?}",
            p.id
        );
    } else {
        write_steps(c, p, &sp.steps, &[("value", value)]).await;
    }
}

async fn write_steps<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Frames<S>,
    p: &Profile,
    steps: &[toml::Spanned<StepDef>],
    params: &[(&str, f64)],
) {
    let (_, order) = modbus_link(p);
    let n = names(p, params);
    for step in steps {
        let st = step.get_ref();
        let e = Encoding {
            data_type: st.data_type.unwrap_or(DataType::U16),
            word_order: st.word_order.unwrap_or(order),
            scale: 1.0,
            offset: 0.0,
        };
        if let Some(w) = &st.write {
            let address = w.number(&n).unwrap() as u16;
            let value = st.value.as_ref().unwrap().number(&n).unwrap();
            let answer = c.write(address, &e.encode(value).unwrap()).await;
            assert!(
                answer[0] & 0x80 == 0,
                "{}: write {address}: {answer:?}",
                p.id
            );
        } else if let Some(r) = &st.read {
            let address = r.number(&n).unwrap() as u16;
            c.read(st.register, address, e.data_type.registers()).await;
        }
    }
}

async fn exercise_modbus(p: Arc<Profile>, rtu: bool) {
    let clock = Clock::new(1.0);
    let physics = physics_for(&p, &p.id, clock, options(), None).unwrap();
    let (unit_id, _) = modbus_link(&p);
    let mut bus = ModbusBus::new();
    bus.add(
        unit_id,
        ModbusUnit::new(p.clone(), physics.clone(), IndexMap::new()),
    );
    let bus = Arc::new(bus);
    let stream = if rtu {
        bus.connect_rtu().unwrap()
    } else {
        bus.connect().unwrap()
    };
    let mut c = Frames {
        stream,
        rtu,
        unit: unit_id,
        transaction: 0,
    };
    write_steps(&mut c, &p, &p.doc.connect, &[]).await;
    if let Some(i) = &p.doc.identify {
        write_steps(&mut c, &p, std::slice::from_ref(i), &[]).await;
    }
    for name in p.doc.signals.keys() {
        let v = read_signal(&mut c, &p, name).await;
        assert!(v.is_finite(), "{}: {name} = {v}", p.id);
    }
    for name in p.doc.setpoints.keys() {
        let value = test_value(&p, name);
        write_setpoint(&mut c, &p, name, value).await;
        let target = p.to_device(name, physics.target(name).unwrap());
        assert!(
            (target - value).abs() <= value.abs() * 0.02 + 0.1,
            "{}: {name}",
            p.id
        );
    }
    for (_, action) in &p.doc.actions {
        write_steps(&mut c, &p, &action.get_ref().steps, &[]).await;
    }
    write_steps(&mut c, &p, &p.doc.safe_state, &[]).await;
}

#[tokio::test(start_paused = true)]
async fn modbus_profiles_answer_their_own_frames() {
    for p in all_profiles() {
        if p.is_modbus() {
            let p = Arc::new(p);
            timeout(Duration::from_secs(600), exercise_modbus(p.clone(), true))
                .await
                .expect("bounded");
            timeout(Duration::from_secs(600), exercise_modbus(p, false))
                .await
                .expect("bounded");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn agrowtek_speed_reads_back_and_stop_halts() {
    let p = profile("agrowtek-pump");
    let clock = Clock::new(1.0);
    let physics = physics_for(&p, "pump", clock, options(), None).unwrap();
    let mut bus = ModbusBus::new();
    let mut settings = IndexMap::new();
    settings.insert("channel".to_string(), 3.0);
    bus.add(1, ModbusUnit::new(p.clone(), physics.clone(), settings));
    let bus = Arc::new(bus);
    let mut c = Frames {
        stream: bus.connect_rtu().unwrap(),
        rtu: true,
        unit: 1,
        transaction: 0,
    };
    // Channel 3: register 103, 40 % of 100 mL/min.
    assert_eq!(c.write(103, &[40]).await, [6, 0, 103, 0, 40]);
    assert_eq!(c.read(RegisterKind::Holding, 103, 1).await, [40]);
    assert_eq!(physics.read("rate").await.unwrap(), 40.0);
    assert_eq!(
        c.write(101, &[40]).await,
        [0x86, 2],
        "channel 1 is another unit"
    );
    assert_eq!(c.write(103, &[0]).await, [6, 0, 103, 0, 0]);
    assert_eq!(physics.read("rate").await.unwrap(), 0.0);
    let id = c.read(RegisterKind::Holding, 19, 2).await;
    assert_eq!(id[1] >> 8, u16::from(b'6'), "3rd character: channel count");
}

// ------------------------------------------- one culture, many instruments

#[tokio::test(start_paused = true)]
async fn bioreactor_parts_act_on_one_culture() {
    let clock = Clock::new(1.0);
    let reactor = Arc::new(SimBioreactor::new("br", clock, options()));
    let part = |name: &str| {
        let p = profile(name);
        let physics = physics_for(&p, name, clock, options(), Some(reactor.clone())).unwrap();
        (p, physics)
    };
    let (ph, ph_physics) = part("hamilton-arc-ph");
    let (tc, tc_physics) = part("eurotherm-3200");
    let (mfc, mfc_physics) = part("alicat-mfc");
    let (wm, wm_physics) = part("watson-marlow-520");
    let mut bus = ModbusBus::new();
    bus.add(1, ModbusUnit::new(ph.clone(), ph_physics, IndexMap::new()));
    bus.add(2, ModbusUnit::new(tc.clone(), tc_physics, IndexMap::new()));
    let bus = Arc::new(bus);
    let mut c = Frames {
        stream: bus.connect_rtu().unwrap(),
        rtu: true,
        unit: 1,
        transaction: 0,
    };
    let v = read_signal(&mut c, &ph, "ph").await;
    assert!((v - 7.0).abs() < 0.1, "{v}");
    c.unit = 2;
    write_setpoint(&mut c, &tc, "temperature", 37.0).await;
    let mfc_sim = Arc::new(SerialSimulator::new(
        mfc.clone(),
        mfc_physics,
        IndexMap::new(),
        clock,
    ));
    let mut m = Line::new(mfc_sim.connect().unwrap(), mfc.clone());
    m.write_setpoint("rate", 1000.0).await;
    let wm_sim = Arc::new(SerialSimulator::new(
        wm.clone(),
        wm_physics,
        IndexMap::new(),
        clock,
    ));
    let mut w = Line::new(wm_sim.connect().unwrap(), wm.clone());
    w.write_setpoint("rate", 10.0).await;
    clock.sleep(3600.0).await;
    let t = read_signal(&mut c, &tc, "temperature").await;
    assert!((t - 37.0).abs() < 1.0, "{t}");
    assert_eq!(reactor.true_value("airflow"), Some(1000.0));
    assert!((m.read_signal("rate").await - 1000.0).abs() < 0.01);
    let fed = reactor.true_value("volume").unwrap() - 1_000_000.0;
    // 10 mL/min (at the 0.22 mL/rev rounding of the speed) for an hour.
    assert!((fed - 600_000.0).abs() < 6_000.0, "{fed}");
    assert!((w.read_signal("rate").await - 10.0).abs() < 0.05);
    w.steps(&wm.doc.actions["stop"].get_ref().steps, &[]).await;
    let before = reactor.true_value("volume").unwrap();
    clock.sleep(600.0).await;
    assert!(reactor.true_value("volume").unwrap() - before < 1_000.0);
}

// ---------------------------------------------- PTYs and TCP, real clients

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("biofoundry-wiresim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn open_port(path: &Path, baud: u32) -> tokio_serial::SerialStream {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path.to_string_lossy(), baud)
        .open_native_async()
        .unwrap()
}

#[tokio::test]
async fn a_serial_simulator_on_a_pty_survives_an_unplug() {
    let p = profile("opentrons-temperature-module");
    let clock = Clock::new(1.0);
    let sim = serial_sim(&p, clock);
    let link = temp_path("tempdeck");
    // A stale link from an earlier run is replaced.
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
    let host = PtyHost::serial(sim.clone(), Some(link.clone()))
        .await
        .unwrap();
    assert_eq!(host.path(), Some(link.clone()));
    {
        let mut line = Line::new(open_port(&link, 115_200), p.clone());
        line.write_setpoint("temperature", 37.0).await;
        let reply = line.exchange("M105", true).await;
        assert!(reply[0].starts_with("T:37.0 C:"), "{reply:?}");
    }
    // Closed and reopened by the controller: still there.
    let mut line = Line::new(open_port(&link, 115_200), p.clone());
    assert_eq!(line.exchange("M18", true).await, ["ok"]);
    drop(line);
    // Unplugged for 300 ms: the link goes, then comes back.
    sim.faults().inject(
        Fault::Disconnect(Duration::from_millis(300)),
        Times::Next(1),
    );
    timeout(STEP, async {
        while link.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the link disappears");
    timeout(STEP, async {
        while !link.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the link comes back");
    let mut line = Line::new(open_port(&link, 115_200), p.clone());
    let reply = line.exchange("M105", true).await;
    assert!(reply[0].starts_with("T:"), "{reply:?}");
    drop(line);
    host.shutdown().await;
    assert!(!link.exists(), "the link is removed at shutdown");
}

#[tokio::test]
async fn modbus_rtu_on_a_pty_serves_the_tokio_modbus_client() {
    use tokio_modbus::prelude::*;
    let clock = Clock::new(1.0);
    let mut bus = ModbusBus::new();
    for (unit, name) in [(1, "hamilton-arc-ph"), (2, "eurotherm-3200")] {
        let p = profile(name);
        let physics = physics_for(&p, name, clock, options(), None).unwrap();
        bus.add(unit, ModbusUnit::new(p, physics, IndexMap::new()));
    }
    let bus = Arc::new(bus);
    let link = temp_path("rs485");
    let host = PtyHost::modbus_rtu(bus.clone(), Some(link.clone()))
        .await
        .unwrap();
    let port = open_port(&link, 19_200);
    let mut ctx = rtu::attach_slave(port, Slave(2));
    let call = Duration::from_secs(5);
    let pv = timeout(call, ctx.read_holding_registers(1, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!((200..=240).contains(&pv[0]), "{pv:?}");
    timeout(call, ctx.write_single_register(2, 375))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    ctx.set_slave(Slave(1));
    let block = timeout(call, ctx.read_holding_registers(2089, 10))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ph = Encoding {
        data_type: DataType::F32,
        word_order: WordOrder::Little,
        scale: 1.0,
        offset: 0.0,
    }
    .decode(&block[2..4])
    .unwrap();
    assert!((ph - 7.0).abs() < 0.05, "{ph}");
    // Only whole blocks: exception 02.
    let e = timeout(call, ctx.read_holding_registers(2091, 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e, Err(ExceptionCode::IllegalDataAddress));
    // A busy unit, retried by the client.
    bus.unit(1)
        .unwrap()
        .faults()
        .inject(Fault::Busy, Times::Next(1));
    let e = timeout(call, ctx.read_holding_registers(2089, 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e, Err(ExceptionCode::ServerDeviceBusy));
    // Unit 7 is not on the line: no answer.
    ctx.set_slave(Slave(7));
    assert!(
        timeout(Duration::from_millis(300), ctx.read_holding_registers(1, 1))
            .await
            .is_err()
    );
    drop(ctx);
    host.shutdown().await;
}

#[tokio::test]
async fn modbus_tcp_serves_the_tokio_modbus_client_and_drops_on_disconnect() {
    use tokio_modbus::prelude::*;
    let clock = Clock::new(1.0);
    let p = profile("hamilton-visiferm-do");
    let physics = physics_for(&p, "do", clock, options(), None).unwrap();
    let mut bus = ModbusBus::new();
    bus.add(1, ModbusUnit::new(p, physics, IndexMap::new()));
    let bus = Arc::new(bus);
    let host = TcpHost::modbus(bus.clone(), 0).await.unwrap();
    assert_ne!(host.port(), 0);
    let call = Duration::from_secs(5);
    let mut ctx = tcp::connect_slave(host.addr(), Slave(1)).await.unwrap();
    let block = timeout(call, ctx.read_holding_registers(2089, 10))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(block[0], 32, "unit bit 5: %-sat");
    bus.faults().inject(
        Fault::Disconnect(Duration::from_millis(500)),
        Times::Next(1),
    );
    let r = timeout(call, ctx.read_holding_registers(2089, 10)).await;
    assert!(matches!(r, Ok(Err(_))), "the connection is closed: {r:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut ctx = tcp::connect_slave(host.addr(), Slave(1)).await.unwrap();
    let r = timeout(call, ctx.read_holding_registers(2089, 10)).await;
    assert!(matches!(r, Ok(Ok(Ok(_)))), "{r:?}");
    host.shutdown().await;
}

#[test]
fn the_documented_examples_load() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/device-profiles.md"),
    )
    .unwrap();
    let mut examples = 0;
    for block in doc.split("```toml\n").skip(1) {
        let text = block.split("```").next().unwrap();
        // Whole profiles only (the shape sketch has `<name>` placeholders).
        if !text.starts_with("format = ") || text.contains("<name>") {
            continue;
        }
        let (p, d) =
            biofoundry::profile::parse(biofoundry::source::SourceFile::new("example.toml", text));
        assert!(d.is_empty(), "{d:?}\n{text}");
        assert!(p.is_some());
        examples += 1;
    }
    assert_eq!(examples, 3);
}
