//! Every shipped profile driven by the controller's own driver
//! (`lab::connect_lab` → `ProfileDevice` / `CompositeBioreactor`) through its
//! real transport — tokio-serial on pseudo-terminals, tokio-modbus RTU on a
//! pseudo-terminal, tokio-modbus TCP on a loopback port — against the
//! profile's simulator, served by `lab::serve_lab` from the same lab file.
//!
//! Each test writes its lab file into a folder of its own under the system's
//! temporary folder (the PTY symlinks live there too) and picks free loopback
//! ports, so the tests run in parallel. The simulators run on a sped-up
//! clock, so ramps and moves take milliseconds; the driver's own poll
//! intervals are real time. Every wait is bounded.
//!
//! "Refused before anything is sent" is proven by arming a one-request
//! `Fault::NoReply` on the instrument first: the call must come back
//! `Refused` at once, and the fault must still be pending afterwards (no
//! request reached the simulator).

use biofoundry::clock::Clock;
use biofoundry::device::{DeckLabware, DeviceError, DeviceHandle, DeviceResult};
use biofoundry::lab::{self, LabRuntime, SimBacking, SimulatedWorkcell};
use biofoundry::labware::builtin::builtin;
use biofoundry::profile::Profile;
use biofoundry::sim::{SimOptions, SimTiming};
use biofoundry::source::SourceFile;
use biofoundry::units::{Dimension, Quantity};
use biofoundry::wiresim::{Fault, FaultHandle, Times};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Bound of one device call. The longest reply timeout of a shipped profile
/// is the G-code handler's 30 s; nothing here should come near it.
const CALL: Duration = Duration::from_secs(40);
/// A refusal is decided before any I/O.
const AT_ONCE: Duration = Duration::from_millis(300);
/// How long a test waits for an unplugged instrument to answer again.
const RECOVERY: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh folder of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "biofoundry-drivers-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn call<T>(what: &str, f: impl Future<Output = DeviceResult<T>>) -> DeviceResult<T> {
    match timeout(CALL, f).await {
        Ok(r) => r,
        Err(_) => panic!("{what}: no result within {CALL:?}"),
    }
}

async fn ok<T>(what: &str, f: impl Future<Output = DeviceResult<T>>) -> T {
    match call(what, f).await {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// A lab file's simulators served on PTYs and ports, and the controller's
/// drivers for the same file.
struct Bench {
    dir: PathBuf,
    runtime: LabRuntime,
    cell: Option<SimulatedWorkcell>,
}

impl Bench {
    /// `devices` are `[[device]]` tables; `{dir}` stands for the test's folder.
    async fn start(name: &str, devices: &str, speed: f64) -> Bench {
        let dir = scratch(name);
        let text = format!(
            "format = \"biofoundry.lab/1\"\n\n[controller]\nsite = \"test\"\ncell = \"drivers\"\n\
             id = \"{name}\"\n\n{}",
            devices.replace("{dir}", dir.to_str().unwrap())
        );
        let path = dir.join("lab.toml");
        std::fs::write(&path, &text).unwrap();
        let (lab, diagnostics) = lab::parse(SourceFile::new(&path, text));
        assert!(
            !diagnostics.iter().any(|d| d.is_error()),
            "{diagnostics:#?}"
        );
        let lab = lab.unwrap();
        let backing = SimBacking {
            clock: Clock::new(speed),
            options: SimOptions {
                seed: 7,
                timing: SimTiming::Realistic,
            },
        };
        let cell = lab::serve_lab(&lab, &backing).await.unwrap();
        let runtime = lab::connect_lab(&lab, &backing).unwrap();
        Bench {
            dir,
            runtime,
            cell: Some(cell),
        }
    }

    fn cell(&self) -> &SimulatedWorkcell {
        self.cell.as_ref().unwrap()
    }

    fn handle(&self, id: &str) -> &DeviceHandle {
        self.runtime
            .lab
            .get(id)
            .unwrap_or_else(|| panic!("no device {id}"))
    }

    /// An instrument (`device` or `device.part`) as the driver of its kind.
    fn instrument(&self, id: &str) -> DeviceHandle {
        Arc::clone(&self.runtime.instruments[id]).handle()
    }

    fn profile(&self, id: &str) -> Arc<Profile> {
        Arc::clone(self.runtime.instruments[id].profile())
    }

    /// The faults of an instrument or of a line.
    fn faults(&self, target: &str) -> &FaultHandle {
        let cell = self.cell();
        cell.faults
            .get(target)
            .or_else(|| cell.line_faults.get(target))
            .unwrap_or_else(|| panic!("no simulated instrument or line {target}"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn finish(mut self) {
        if let Some(cell) = self.cell.take() {
            timeout(CALL, cell.shutdown())
                .await
                .expect("the simulators stop");
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------- checks

/// The simulator's start state, per signal: every reading falls inside.
fn plausible(signal: &str) -> (f64, f64) {
    match signal {
        // Ambient 22 C, with noise.
        "temperature" => (21.0, 23.0),
        "ph" => (6.9, 7.1),
        "dissolved_oxygen" => (80.0, 100.0),
        // A lone probe reads 0.05; a fresh culture 0.1.
        "od600" => (0.04, 0.2),
        "humidity" => (35.0, 45.0),
        "co2" => (0.0, 0.1),
        // Pumps, shakers and gas flows start stopped.
        "rate" | "speed" | "shaking" | "airflow" => (0.0, 0.0),
        other => panic!("no start range for `{other}`"),
    }
}

fn dimension(p: &Profile, setpoint: &str) -> Dimension {
    p.kind
        .spec()
        .setpoint(setpoint)
        .map_or(Dimension::Unitless, |s| s.dimension)
}

/// A whole value 60 % of the way through both the profile's limits and the
/// simulated lab's (so the simulator accepts it too).
fn inside(p: &Profile, setpoint: &str) -> f64 {
    let l = p.limits[setpoint];
    let (lo, hi) = match p.kind.spec().setpoint(setpoint).map(|s| s.limits()) {
        Some(c) => (l.min.max(c.min), l.max.min(c.max)),
        None => (l.min, l.max),
    };
    (lo + (hi - lo) * 0.6).round()
}

/// A value above the profile's limits.
fn outside(p: &Profile, setpoint: &str) -> f64 {
    let l = p.limits[setpoint];
    l.max + (l.max - l.min).max(2.0) * 0.5
}

/// Values outside the profile's limits: above, and below (negative when the
/// limits start at 0).
fn outside_both(p: &Profile, setpoint: &str) -> [f64; 2] {
    let l = p.limits[setpoint];
    [
        outside(p, setpoint),
        l.min - (l.max - l.min).max(2.0) * 0.25,
    ]
}

/// How close a setpoint's signal is once reached: the profile's rule (or the
/// driver's default 0.5), plus the simulator's noise and display rounding.
fn reached_within(p: &Profile, setpoint: &str) -> f64 {
    let within = p.doc.setpoints[setpoint]
        .get_ref()
        .reached
        .as_ref()
        .map_or(0.5, |r| r.get_ref().within);
    within + 0.3
}

/// Actions the driver runs with `Device::command`: those without parameters
/// (incubator moves and pipetting steps have their own trait methods).
fn parameterless(p: &Profile) -> Vec<String> {
    const WITH_PARAMETERS: [&str; 7] = [
        "load",
        "unload",
        "pick_up_tip",
        "drop_tip",
        "aspirate",
        "dispense",
        "mix",
    ];
    p.doc
        .actions
        .iter()
        .filter(|(name, a)| {
            a.get_ref().params.is_empty() && !WITH_PARAMETERS.contains(&name.as_str())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// `op` must be refused at once, and no request may reach the simulator: a
/// one-request `NoReply` armed before is still pending after.
async fn refused_before_sending<T: std::fmt::Debug>(
    faults: &FaultHandle,
    what: &str,
    op: impl Future<Output = DeviceResult<T>>,
) -> String {
    faults.clear();
    faults.inject(Fault::NoReply, Times::Next(1));
    let started = Instant::now();
    let r = call(what, op).await;
    let took = started.elapsed();
    // A request sent without waiting for a reply would still reach the
    // simulator shortly after the call returned.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pending = faults.take();
    faults.clear();
    let reason = match r {
        Err(DeviceError::Refused { reason, .. }) => reason,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    assert!(took < AT_ONCE, "{what}: refused only after {took:?}");
    assert_eq!(
        pending,
        Some(Fault::NoReply),
        "{what}: a request reached the instrument before the refusal ({reason})"
    );
    reason
}

/// Connects an instrument and drives everything its profile has through the
/// generic device API: every signal, every setpoint (in and out of limits),
/// every parameter-less action, the safe state.
async fn exercise(b: &Bench, id: &str) {
    let p = b.profile(id);
    let handle = b.instrument(id);
    let dev = handle.device();
    ok(&format!("{id}: connect"), dev.connect()).await;
    for signal in p.doc.signals.keys() {
        let q = ok(&format!("{id}: read {signal}"), dev.read(signal)).await;
        let (lo, hi) = plausible(signal);
        assert!(
            q.value.is_finite() && (lo..=hi).contains(&q.value),
            "{id}: {signal} reads {} at start, expected {lo}..{hi}",
            q.value
        );
    }
    // What the profile's interlocks require, made so by its own actions.
    for interlock in &p.interlocks {
        for (state, value) in &interlock.requires {
            if let Some((action, _)) = p
                .doc
                .actions
                .iter()
                .find(|(_, a)| a.get_ref().sets.get(state) == Some(value))
            {
                ok(&format!("{id}: {action}"), dev.command(action)).await;
            }
        }
    }
    for setpoint in p.doc.setpoints.keys() {
        let v = inside(&p, setpoint);
        let d = dimension(&p, setpoint);
        ok(
            &format!("{id}: set {setpoint} {v}"),
            dev.set(setpoint, Quantity::new(v, d)),
        )
        .await;
        ok(
            &format!("{id}: wait until {setpoint} reaches {v}"),
            dev.wait_until_reached(setpoint),
        )
        .await;
        if p.doc.signals.contains_key(setpoint.as_str()) {
            let now = ok(&format!("{id}: read {setpoint}"), dev.read(setpoint)).await;
            assert!(
                (now.value - v).abs() <= reached_within(&p, setpoint),
                "{id}: {setpoint} set to {v}, reads {}",
                now.value
            );
        }
        for bad in outside_both(&p, setpoint) {
            let reason = refused_before_sending(
                b.faults(id),
                &format!("{id}: set {setpoint} {bad}"),
                dev.set(setpoint, Quantity::new(bad, d)),
            )
            .await;
            assert!(reason.contains("limits"), "{id}: {reason}");
        }
    }
    let reason = refused_before_sending(
        b.faults(id),
        &format!("{id}: an unknown setpoint"),
        dev.set("warp_factor", Quantity::new(1.0, Dimension::Unitless)),
    )
    .await;
    assert!(reason.contains("warp_factor"), "{reason}");
    for action in parameterless(&p) {
        ok(&format!("{id}: {action}"), dev.command(&action)).await;
    }
    ok(&format!("{id}: safe state"), dev.safe_state()).await;
}

// ------------------------------------------------------ serial instruments

/// Loads and unloads through the driver; occupied and unknown slots are
/// refused by the driver, and the simulator's storage agrees (a plate loaded
/// into a slot the simulator still held would be an error reply).
async fn load_and_unload(b: &Bench, id: &str) {
    let DeviceHandle::Incubator(inc) = b.handle(id).clone() else {
        panic!("{id} is not an incubator");
    };
    let faults = b.faults(id);
    ok("load plate-a 3", inc.load("plate-a", 3)).await;
    let reason =
        refused_before_sending(faults, "load into a full slot", inc.load("plate-b", 3)).await;
    assert!(reason.contains("plate-a"), "{reason}");
    refused_before_sending(faults, "load into slot 0", inc.load("plate-b", 0)).await;
    let beyond = inc.slots() + 1;
    refused_before_sending(faults, "load beyond the slots", inc.load("plate-b", beyond)).await;
    ok("load plate-b 4", inc.load("plate-b", 4)).await;
    ok("unload plate-a", inc.unload("plate-a", 3)).await;
    refused_before_sending(faults, "unload what left", inc.unload("plate-a", 3)).await;
    // Slot 3 is free again, for the simulator too.
    ok("load plate-c 3", inc.load("plate-c", 3)).await;
    ok("unload plate-b", inc.unload("plate-b", 4)).await;
    ok("unload plate-c", inc.unload("plate-c", 3)).await;
    // Two runs' plates of one name: each is unloaded from its own slot.
    ok("load plate 5", inc.load("plate", 5)).await;
    ok("load plate 6", inc.load("plate", 6)).await;
    ok("unload plate from 6", inc.unload("plate", 6)).await;
    let reason =
        refused_before_sending(faults, "unload from 6 again", inc.unload("plate", 6)).await;
    assert!(reason.contains("not in slot 6"), "{reason}");
    ok("load plate-d 6", inc.load("plate-d", 6)).await;
    let reason =
        refused_before_sending(faults, "unload the wrong name", inc.unload("plate", 6)).await;
    assert!(reason.contains("slot 6 holds plate-d"), "{reason}");
    ok("unload plate from 5", inc.unload("plate", 5)).await;
    ok("unload plate-d from 6", inc.unload("plate-d", 6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liconic_stx_on_a_pty() {
    let b = Bench::start(
        "liconic",
        r#"
[[device]]
id = "inc1"
profile = "liconic-stx"
transport = "serial://{dir}/liconic"
"#,
        1000.0,
    )
    .await;
    exercise(&b, "inc1").await;
    load_and_unload(&b, "inc1").await;
    // The door interlock: no plate moves while the door is open.
    let DeviceHandle::Incubator(inc) = b.instrument("inc1") else {
        panic!("inc1 is an incubator");
    };
    ok("load plate-d", inc.load("plate-d", 4)).await;
    ok("open the door", inc.command("open_door")).await;
    for (what, r) in [
        (
            "load with the door open",
            refused_before_sending(b.faults("inc1"), "load", inc.load("plate-e", 5)).await,
        ),
        (
            "unload with the door open",
            refused_before_sending(b.faults("inc1"), "unload", inc.unload("plate-d", 4)).await,
        ),
    ] {
        assert!(r.contains("door is `open`, needs `closed`"), "{what}: {r}");
    }
    ok("close the door", inc.command("close_door")).await;
    ok("unload with the door closed", inc.unload("plate-d", 4)).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thermo_cytomat_on_a_pty() {
    let b = Bench::start(
        "cytomat",
        r#"
[[device]]
id = "inc2"
profile = "thermo-cytomat"
transport = "serial://{dir}/cytomat"
"#,
        1000.0,
    )
    .await;
    exercise(&b, "inc2").await;
    load_and_unload(&b, "inc2").await;
    // Spurious "er 01" busy replies are retried by the error table.
    b.faults("inc2").inject(Fault::Busy, Times::Next(3));
    let t = ok(
        "read through busy replies",
        b.handle("inc2").device().read("temperature"),
    )
    .await;
    assert!((21.0..=23.0).contains(&t.value), "{}", t.value);
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentrons_modules_on_ptys() {
    let b = Bench::start(
        "opentrons",
        r#"
[[device]]
id = "tm1"
profile = "opentrons-temperature-module"
transport = "serial://{dir}/tempdeck"

[[device]]
id = "hs1"
profile = "opentrons-heater-shaker"
transport = "serial://{dir}/heatershaker"
"#,
        1000.0,
    )
    .await;
    tokio::join!(exercise(&b, "tm1"), exercise(&b, "hs1"));
    // The profile's interlock: no shaking unless the controller closed the
    // latch; refused before anything is sent. Stopping is always allowed.
    let hs = b.handle("hs1").device();
    ok("open the latch", hs.command("open_latch")).await;
    let reason = refused_before_sending(
        b.faults("hs1"),
        "shake with the latch open",
        hs.set("speed", Quantity::new(500.0, Dimension::Speed)),
    )
    .await;
    assert!(
        reason.contains("interlock `latch_closed_to_shake`") && reason.contains("latch is `open`"),
        "{reason}"
    );
    ok("stopping with the latch open", hs.command("stop_shaking")).await;
    ok("close the latch", hs.command("close_latch")).await;
    ok(
        "shake with the latch closed",
        hs.set("speed", Quantity::new(500.0, Dimension::Speed)),
    )
    .await;
    // A reconnect forgets the latch: it must be closed again.
    ok("reconnect", hs.connect()).await;
    let reason = refused_before_sending(
        b.faults("hs1"),
        "shake after a reconnect",
        hs.set("speed", Quantity::new(500.0, Dimension::Speed)),
    )
    .await;
    assert!(reason.contains("latch is `unknown`"), "{reason}");
    ok("stop", hs.command("stop_shaking")).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcode_liquid_handler_pipettes_on_a_pty() {
    let b = Bench::start(
        "gcode",
        r#"
[[device]]
id = "lh1"
profile = "gcode-liquid-handler"
transport = "serial://{dir}/gcode"
"#,
        1000.0,
    )
    .await;
    exercise(&b, "lh1").await;
    let DeviceHandle::LiquidHandler(lh) = b.handle("lh1").clone() else {
        panic!("not a liquid handler");
    };
    let faults = b.faults("lh1");
    let definition = |name: &str| Arc::new(builtin(name).unwrap().clone());
    ok(
        "configure the deck",
        lh.configure_deck(vec![
            DeckLabware {
                name: "tips".into(),
                definition: definition("opentrons_96_tiprack_300ul"),
                slot: 1,
                contents: vec![],
            },
            DeckLabware {
                name: "plate".into(),
                definition: definition("corning_96_wellplate_360ul_flat"),
                slot: 2,
                contents: vec![("A1".into(), 200.0)],
            },
        ]),
    )
    .await;
    let reason = refused_before_sending(
        faults,
        "aspirate without a tip",
        lh.aspirate("plate", "A1", 50.0),
    )
    .await;
    assert!(reason.contains("no tip"), "{reason}");
    refused_before_sending(faults, "drop a tip that is not on", lh.drop_tip()).await;
    refused_before_sending(faults, "a tip from a plate", lh.pick_up_tip("plate", "A1")).await;
    ok("pick up a tip", lh.pick_up_tip("tips", "A1")).await;
    refused_before_sending(faults, "a second tip", lh.pick_up_tip("tips", "A2")).await;
    let reason = refused_before_sending(
        faults,
        "more than the well holds",
        lh.aspirate("plate", "A1", 250.0),
    )
    .await;
    assert!(reason.contains("holds 200"), "{reason}");
    ok("aspirate", lh.aspirate("plate", "A1", 100.0)).await;
    let reason = refused_before_sending(
        faults,
        "more than the tip holds",
        lh.dispense("plate", "B1", 150.0),
    )
    .await;
    assert!(reason.contains("tip holds 100"), "{reason}");
    ok("dispense", lh.dispense("plate", "B1", 60.0)).await;
    ok("dispense the rest", lh.dispense("plate", "C1", 40.0)).await;
    ok("mix", lh.mix("plate", "A1", 50.0, 2)).await;
    ok("drop the tip", lh.drop_tip()).await;
    // The driver's deck model kept the volumes: A1 holds 100 uL now.
    ok("another tip", lh.pick_up_tip("tips", "A2")).await;
    let reason = refused_before_sending(
        faults,
        "the emptied source",
        lh.aspirate("plate", "A1", 120.0),
    )
    .await;
    assert!(reason.contains("holds 100"), "{reason}");
    ok("drop the second tip", lh.drop_tip()).await;
    let reason = refused_before_sending(faults, "a used tip", lh.pick_up_tip("tips", "A1")).await;
    assert!(reason.contains("used"), "{reason}");
    b.finish().await;
}

/// A pump: rate, then a small volume.
async fn pump_dispenses(b: &Bench, id: &str) {
    let DeviceHandle::Pump(pump) = b.instrument(id) else {
        panic!("{id} is not a pump");
    };
    ok(&format!("{id}: dispense"), pump.dispense(200.0, None)).await;
    let rate = ok(&format!("{id}: read rate"), pump.read("rate")).await;
    assert_eq!(rate.value, 0.0, "{id}: the pump stops after a dispense");
    let p = b.profile(id);
    let too_fast = outside(&p, "rate");
    refused_before_sending(
        b.faults(id),
        &format!("{id}: dispense too fast"),
        pump.dispense(200.0, Some(too_fast)),
    )
    .await;
    refused_before_sending(
        b.faults(id),
        &format!("{id}: dispense nothing"),
        pump.dispense(0.0, None),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_pumps_on_ptys() {
    let b = Bench::start(
        "serial-pumps",
        r#"
[[device]]
id = "wm1"
profile = "watson-marlow-520"
transport = "serial://{dir}/wm520"

[[device]]
id = "mfc1"
profile = "alicat-mfc"
transport = "serial://{dir}/alicat"
"#,
        1000.0,
    )
    .await;
    tokio::join!(exercise(&b, "wm1"), exercise(&b, "mfc1"));
    tokio::join!(pump_dispenses(&b, "wm1"), pump_dispenses(&b, "mfc1"));
    b.finish().await;
}

// ------------------------------------------------------ Modbus instruments

/// The five Modbus profiles, as instruments of one line or gateway.
fn modbus_instruments(url: &dyn Fn(u8) -> String) -> String {
    format!(
        r#"
[[device]]
id = "ph1"
profile = "hamilton-arc-ph"
transport = "{}"

[[device]]
id = "do1"
profile = "hamilton-visiferm-do"
transport = "{}"

[[device]]
id = "od1"
profile = "hamilton-arc-od"
transport = "{}"

[[device]]
id = "tc1"
profile = "eurotherm-3200"
transport = "{}"

[[device]]
id = "pump1"
profile = "agrowtek-pump"
transport = "{}"
settings = {{ channel = 2 }}
"#,
        url(1),
        url(2),
        url(3),
        url(4),
        url(5)
    )
}

const MODBUS_IDS: [&str; 5] = ["ph1", "do1", "od1", "tc1", "pump1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_profiles_share_one_rtu_line() {
    // One RS-485 line: every unit at the Hamilton probes' 19200 8N2.
    let devices = modbus_instruments(&|unit| {
        format!("modbus-rtu://{{dir}}/rs485?baud=19200&parity=none&stop=2&unit={unit}")
    });
    let b = Bench::start("rtu", &devices, 1000.0).await;
    // The units answer in turn on the shared line, whatever the callers do.
    let all = MODBUS_IDS.map(|id| exercise(&b, id));
    futures::future::join_all(all).await;
    pump_dispenses(&b, "pump1").await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_profiles_behind_one_tcp_gateway() {
    use tokio_modbus::prelude::*;
    let port = free_port();
    let devices = modbus_instruments(&|unit| format!("modbus-tcp://127.0.0.1:{port}?unit={unit}"));
    let b = Bench::start("tcp", &devices, 1000.0).await;
    for id in MODBUS_IDS {
        exercise(&b, id).await;
    }
    pump_dispenses(&b, "pump1").await;
    // Channel 2 is register 102: a second client on the gateway sees the
    // speed the driver wrote there.
    let pump = b.handle("pump1").device();
    ok(
        "run channel 2",
        pump.set("rate", Quantity::new(30.0, Dimension::Flow)),
    )
    .await;
    let mut ctx = tcp::connect_slave(([127, 0, 0, 1], port).into(), Slave(5))
        .await
        .unwrap();
    let words = timeout(CALL, ctx.read_holding_registers(102, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(words, [30], "channel 2 runs at 30 %");
    ok("stop", pump.command("stop")).await;
    let words = timeout(CALL, ctx.read_holding_registers(102, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(words, [0]);
    drop(ctx);
    b.finish().await;
}

// ------------------------------------------------ a bioreactor of parts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bioreactor_parts_over_rtu_tcp_and_serial() {
    let port = free_port();
    let devices = format!(
        r#"
[[device]]
id = "br1"
kind = "bioreactor"
[device.parts.ph]
profile = "hamilton-arc-ph"
transport = "modbus-rtu://{{dir}}/rs485?unit=1"
[device.parts.dissolved_oxygen]
profile = "hamilton-visiferm-do"
transport = "modbus-rtu://{{dir}}/rs485?unit=2"
[device.parts.temperature]
profile = "eurotherm-3200"
transport = "modbus-rtu://{{dir}}/rs485?baud=19200&stop=2&unit=3"
[device.parts.od600]
profile = "hamilton-arc-od"
transport = "modbus-tcp://127.0.0.1:{port}?unit=2"
[device.parts.base]
profile = "agrowtek-pump"
transport = "modbus-tcp://127.0.0.1:{port}?unit=1"
settings = {{ channel = 2 }}
[device.parts.feed]
profile = "watson-marlow-520"
transport = "serial://{{dir}}/wm520"
[device.parts.airflow]
profile = "alicat-mfc"
transport = "serial://{{dir}}/alicat"
"#
    );
    // Slower than the other benches: the culture grows on this clock.
    let b = Bench::start("bioreactor", &devices, 100.0).await;
    let DeviceHandle::Bioreactor(br) = b.handle("br1").clone() else {
        panic!("br1 is not a bioreactor");
    };
    ok("connect every part", br.connect()).await;
    for signal in ["ph", "dissolved_oxygen", "od600", "temperature", "airflow"] {
        let q = ok(&format!("read {signal}"), br.read(signal)).await;
        let (lo, hi) = plausible(signal);
        assert!(
            (lo..=hi).contains(&q.value),
            "{signal} reads {} at start, expected {lo}..{hi}",
            q.value
        );
    }
    // Temperature through the Eurotherm on the RS-485 line.
    ok(
        "set temperature",
        br.set("temperature", Quantity::new(30.0, Dimension::Temperature)),
    )
    .await;
    ok("reach temperature", br.wait_until_reached("temperature")).await;
    let t = ok("read temperature", br.read("temperature")).await;
    assert!((t.value - 30.0).abs() <= 0.8, "{}", t.value);
    refused_before_sending(
        b.faults("br1.temperature"),
        "a jacket temperature beyond the controller's limits",
        br.set("temperature", Quantity::new(150.0, Dimension::Temperature)),
    )
    .await;
    // Airflow through the Alicat on its own serial line.
    ok(
        "set airflow",
        br.set("airflow", Quantity::new(1000.0, Dimension::Flow)),
    )
    .await;
    ok("reach airflow", br.wait_until_reached("airflow")).await;
    let air = ok("read airflow", br.read("airflow")).await;
    assert!((air.value - 1000.0).abs() < 0.01, "{}", air.value);
    refused_before_sending(
        b.faults("br1.airflow"),
        "more gas than the controller meters",
        br.set("airflow", Quantity::new(9000.0, Dimension::Flow)),
    )
    .await;
    // No part sets the pH: the vessel's own controller would.
    let e = call(
        "set ph",
        br.set("ph", Quantity::new(7.2, Dimension::Unitless)),
    )
    .await;
    assert!(matches!(e, Err(DeviceError::Refused { .. })), "{e:?}");

    // Feeds: a volume from the serial feed pump, then base from the Modbus
    // TCP pump, which the RTU pH probe sees in the same culture.
    ok("feed 200 uL", br.feed("feed", Some(200.0), None, None)).await;
    let feed = b.instrument("br1.feed");
    let rate = ok("feed rate", feed.device().read("rate")).await;
    assert_eq!(rate.value, 0.0, "the feed pump stopped");
    let before = ok("read ph", br.read("ph")).await.value;
    ok("dose base", br.feed("base", Some(200.0), None, None)).await;
    let after = ok("read ph", br.read("ph")).await.value;
    // The dose is timed on the lab clock: 200 uL, not what the pump would
    // pass in that many real seconds (a hundred times more here).
    assert!(
        after > before + 0.05 && after < before + 0.5,
        "base raises the pH: {before} -> {after}"
    );
    let base = b.instrument("br1.base");
    let rate = ok("base rate", base.device().read("rate")).await;
    assert_eq!(rate.value, 0.0, "the base pump stopped");
    // A timed feed runs on after the call and stops by itself, on the lab
    // clock: 100 lab seconds are 1 s here.
    ok(
        "feed at 5 mL/min for 100 s",
        br.feed("feed", None, Some(5.0), Some(100.0)),
    )
    .await;
    let rate = ok("feed rate", feed.device().read("rate")).await;
    assert!((rate.value - 5.0).abs() < 0.05, "{}", rate.value);
    let stopped = timeout(CALL, async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if ok("feed rate", feed.device().read("rate")).await.value == 0.0 {
                break;
            }
        }
    })
    .await;
    assert!(stopped.is_ok(), "the timed feed stops");
    // Stopped by the controller before its time (a resumed run whose feed
    // ran out while the controller was away).
    ok(
        "feed at 5 mL/min for 10 h",
        br.feed("feed", None, Some(5.0), Some(36_000.0)),
    )
    .await;
    ok("stop the feed", br.stop_feed("feed")).await;
    let rate = ok("feed rate", feed.device().read("rate")).await;
    assert_eq!(rate.value, 0.0, "stopped");
    let e = call("feed acid", br.feed("acid", Some(10.0), None, None)).await;
    assert!(matches!(e, Err(DeviceError::Refused { .. })), "{e:?}");

    ok("safe state", br.safe_state()).await;
    let air = ok("read airflow", br.read("airflow")).await;
    assert_eq!(air.value, 0.0, "the safe state stops the gas");
    b.finish().await;
}

// ------------------------------------------------- link-level promises

/// Reads `signal` until it answers again, within [`RECOVERY`].
async fn answers_again(dev: &DeviceHandle, signal: &str) -> f64 {
    let started = Instant::now();
    loop {
        match timeout(CALL, dev.device().read(signal)).await {
            Ok(Ok(q)) => return q.value,
            Ok(Err(e)) => assert!(
                started.elapsed() < RECOVERY,
                "still failing after {RECOVERY:?}: {e}"
            ),
            Err(_) => panic!("a read took longer than {CALL:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a PTY symlink is gone (the instrument is unplugged).
async fn unplugged(path: &Path) {
    timeout(RECOVERY, async {
        while path.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the pseudo-terminal goes away");
}

fn in_range(what: &str, v: f64, (lo, hi): (f64, f64)) {
    assert!(
        (lo..=hi).contains(&v),
        "{what} reads {v}, expected {lo}..{hi}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_link_recovers_without_stale_replies() {
    // The Liconic answers a bare number to every read, so a reply taken for
    // the wrong request would pass for a reading: temperature 22, humidity 40.
    let b = Bench::start(
        "serial-link",
        r#"
[[device]]
id = "inc1"
profile = "liconic-stx"
transport = "serial://{dir}/liconic"
"#,
        1000.0,
    )
    .await;
    let dev = b.handle("inc1").clone();
    let faults = b.faults("inc1");
    ok("connect", dev.device().connect()).await;
    let read = |s: &'static str| {
        let dev = dev.clone();
        async move { call(s, dev.device().read(s)).await }
    };

    faults.inject(Fault::NoReply, Times::Next(1));
    let e = read("temperature").await;
    assert!(matches!(e, Err(DeviceError::Timeout { .. })), "{e:?}");
    in_range(
        "humidity",
        read("humidity").await.unwrap().value,
        plausible("humidity"),
    );
    in_range(
        "temperature",
        read("temperature").await.unwrap().value,
        plausible("temperature"),
    );

    faults.inject(Fault::Garbage, Times::Next(1));
    let e = read("temperature").await;
    assert!(
        matches!(
            e,
            Err(DeviceError::Fault { .. } | DeviceError::Timeout { .. })
        ),
        "{e:?}"
    );
    in_range(
        "humidity",
        read("humidity").await.unwrap().value,
        plausible("humidity"),
    );

    // A reply later than the timeout arrives while the driver waits for the
    // next one: it must not be taken for it.
    faults.inject(Fault::Slow(Duration::from_millis(2500)), Times::Next(1));
    let e = read("temperature").await;
    assert!(matches!(e, Err(DeviceError::Timeout { .. })), "{e:?}");
    in_range(
        "humidity",
        read("humidity").await.unwrap().value,
        plausible("humidity"),
    );
    in_range(
        "temperature",
        read("temperature").await.unwrap().value,
        plausible("temperature"),
    );

    // Unplugged for a second: errors, then it answers again by itself.
    faults.inject(Fault::Disconnect(Duration::from_secs(1)), Times::Next(1));
    unplugged(&b.path("liconic")).await;
    let e = read("temperature").await;
    assert!(
        matches!(
            e,
            Err(DeviceError::Disconnected { .. } | DeviceError::Timeout { .. })
        ),
        "{e:?}"
    );
    in_range(
        "humidity",
        answers_again(&dev, "humidity").await,
        plausible("humidity"),
    );
    in_range(
        "temperature",
        read("temperature").await.unwrap().value,
        plausible("temperature"),
    );
    b.finish().await;
}

/// pH (7) and DO (100 %) probes answer the same register block, so a late
/// or misrouted reply would pass for a reading of the other.
async fn modbus_link_promises(b: &Bench, line: &str, pty: Option<&Path>) {
    let ph = b.handle("ph1").clone();
    let dox = b.handle("do1").clone();
    let faults = b.faults("ph1");
    ok("connect ph", ph.device().connect()).await;
    ok("connect do", dox.device().connect()).await;
    let read = |dev: &DeviceHandle, s: &'static str| {
        let dev = dev.clone();
        async move { call(s, dev.device().read(s)).await }
    };
    let check_both = || async {
        in_range(
            "do",
            read(&dox, "dissolved_oxygen").await.unwrap().value,
            plausible("dissolved_oxygen"),
        );
        in_range("ph", read(&ph, "ph").await.unwrap().value, plausible("ph"));
    };

    faults.inject(Fault::NoReply, Times::Next(1));
    let e = read(&ph, "ph").await;
    assert!(
        matches!(e, Err(DeviceError::Timeout { .. })),
        "no reply: {e:?}"
    );
    check_both().await;

    faults.inject(Fault::Garbage, Times::Next(1));
    let e = read(&ph, "ph").await;
    assert!(e.is_err(), "garbage: {e:?}");
    check_both().await;

    faults.inject(Fault::Slow(Duration::from_millis(1500)), Times::Next(1));
    let e = read(&ph, "ph").await;
    assert!(
        matches!(e, Err(DeviceError::Timeout { .. })),
        "late reply: {e:?}"
    );
    check_both().await;

    faults.inject(Fault::Corrupt, Times::Next(1));
    let e = read(&ph, "ph").await;
    assert!(e.is_err(), "corrupt frame: {e:?}");
    check_both().await;

    // Busy twice: within busy_retries (3), so the caller never sees it.
    faults.inject(Fault::Busy, Times::Next(2));
    in_range(
        "ph through busy",
        read(&ph, "ph").await.unwrap().value,
        plausible("ph"),
    );
    // Busy for good: after the retries, a fault naming the exception.
    faults.inject(Fault::Busy, Times::UntilCleared);
    let e = read(&ph, "ph").await;
    faults.clear();
    match e {
        Err(DeviceError::Fault { reason, .. }) => {
            assert!(reason.contains("06") && reason.contains("busy"), "{reason}")
        }
        other => panic!("busy for good: {other:?}"),
    }

    faults.inject(Fault::Exception(2), Times::Next(1));
    match read(&ph, "ph").await {
        Err(DeviceError::Fault { reason, .. }) => assert!(
            reason.contains("02") && reason.contains("illegal data address"),
            "{reason}"
        ),
        other => panic!("exception 02: {other:?}"),
    }
    check_both().await;

    // The whole line unplugged for a second.
    b.faults(line)
        .inject(Fault::Disconnect(Duration::from_secs(1)), Times::Next(1));
    if let Some(path) = pty {
        unplugged(path).await;
    }
    let e = read(&ph, "ph").await;
    assert!(
        matches!(
            e,
            Err(DeviceError::Disconnected { .. }
                | DeviceError::Timeout { .. }
                | DeviceError::Fault { .. })
        ),
        "unplugged: {e:?}"
    );
    in_range("ph", answers_again(&ph, "ph").await, plausible("ph"));
    check_both().await;

    // One unit unplugged: it times out, the other answers on.
    faults.inject(Fault::Disconnect(Duration::from_secs(1)), Times::Next(1));
    let e = read(&ph, "ph").await;
    assert!(matches!(e, Err(DeviceError::Timeout { .. })), "{e:?}");
    in_range(
        "do",
        read(&dox, "dissolved_oxygen").await.unwrap().value,
        plausible("dissolved_oxygen"),
    );
    in_range("ph", answers_again(&ph, "ph").await, plausible("ph"));
}

const PROBES: &str = r#"
[[device]]
id = "ph1"
profile = "hamilton-arc-ph"
transport = "URL?unit=1"

[[device]]
id = "do1"
profile = "hamilton-visiferm-do"
transport = "URL?unit=2"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_rtu_link_recovers_without_stale_replies() {
    let b = Bench::start(
        "rtu-link",
        &PROBES.replace("URL", "modbus-rtu://{dir}/rs485"),
        1000.0,
    )
    .await;
    let line = b.path("rs485");
    modbus_link_promises(&b, line.to_str().unwrap(), Some(&line)).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_tcp_link_recovers_without_stale_replies() {
    let port = free_port();
    let b = Bench::start(
        "tcp-link",
        &PROBES.replace("URL", &format!("modbus-tcp://127.0.0.1:{port}")),
        1000.0,
    )
    .await;
    modbus_link_promises(&b, &format!("127.0.0.1:{port}"), None).await;
    b.finish().await;
}

// ------------------------------------------------ sim:// for comparison

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_simulators_behave_like_the_wire() {
    // The same instrument twice: in process (`sim://`) and on a PTY.
    let b = Bench::start(
        "sim-vs-pty",
        r#"
[[device]]
id = "tm-sim"
profile = "opentrons-temperature-module"
transport = "sim://"

[[device]]
id = "tm-pty"
profile = "opentrons-temperature-module"
transport = "serial://{dir}/tempdeck"
"#,
        1000.0,
    )
    .await;
    assert_eq!(b.cell().faults.len(), 1, "sim:// is not served outside");
    assert_eq!(b.runtime.sim_faults.len(), 1);
    let sim = b.handle("tm-sim").clone();
    let pty = b.handle("tm-pty").clone();
    for dev in [&sim, &pty] {
        let d = dev.device();
        ok("connect", d.connect()).await;
        let t = ok("read", d.read("temperature")).await.value;
        in_range(d.id(), t, plausible("temperature"));
        ok(
            "set",
            d.set("temperature", Quantity::new(30.0, Dimension::Temperature)),
        )
        .await;
        ok("reach", d.wait_until_reached("temperature")).await;
        let t = ok("read", d.read("temperature")).await.value;
        assert!((t - 30.0).abs() <= 1.0, "{}: {t}", d.id());
        let e = call(
            "refuse",
            d.set("temperature", Quantity::new(120.0, Dimension::Temperature)),
        )
        .await;
        assert!(matches!(e, Err(DeviceError::Refused { .. })), "{e:?}");
    }
    // The in-process link takes the same faults, and recovers the same way.
    let faults = &b.runtime.sim_faults["tm-sim"];
    faults.inject(Fault::NoReply, Times::Next(1));
    let e = call("no reply", sim.device().read("temperature")).await;
    assert!(matches!(e, Err(DeviceError::Timeout { .. })), "{e:?}");
    let t = ok("read again", sim.device().read("temperature"))
        .await
        .value;
    assert!((t - 30.0).abs() <= 1.0, "{t}");
    faults.inject(Fault::Disconnect(Duration::from_secs(1)), Times::Next(1));
    let e = call("unplugged", sim.device().read("temperature")).await;
    assert!(e.is_err(), "{e:?}");
    let t = answers_again(&sim, "temperature").await;
    assert!((t - 30.0).abs() <= 1.0, "{t}");
    ok("safe state", sim.device().safe_state()).await;
    ok("safe state", pty.device().safe_state()).await;
    b.finish().await;
}
