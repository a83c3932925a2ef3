//! Transport benchmarks (results and command in BENCHMARKS.md): the
//! controller's device layer (`ProfileDevice` → serial link or Modbus bus
//! owner → tokio-serial / tokio-modbus) against a bare tokio-serial or
//! tokio-modbus loop, side by side, against the same simulator.
//!
//! - Modbus TCP on 127.0.0.1: `read("ph")` of devices/hamilton-arc-ph.toml
//!   versus `read_holding_registers(2089, 10)` in a loop;
//! - serial on a PTY: `read("temperature")` of
//!   devices/opentrons-temperature-module.toml versus writing `M105` and
//!   reading until the reply's end (`ok`, `ok`);
//! - Modbus RTU on a PTY: the same pH reads, as fast as the PTY carries them,
//!   then with the simulator pacing its bytes at 19200 baud 8N2
//!   (`wiresim::ModbusBus::pace_rtu`), against the wire time of a real line.
//!
//! For TCP and serial a third side runs the transport layer alone
//! (`ModbusBus::read`, `SerialLink::exchange`), to tell the driver's share
//! from the transport's. Sides that need a port of their own (ports open
//! exclusively) get their own PTY, served by the same simulator.
//!
//! The simulators run on a runtime of their own (one worker thread), as an
//! instrument would be another machine; the controller side runs on a
//! 2-worker multi-thread runtime, as `biofoundry run` does, each loop in a
//! task of its own. The simulated instruments answer at once (their
//! profiles' `reply_delay` is set to 0), except in the "turnaround" row, so
//! what is measured is the transport and the controller's code. Windows of
//! the sides alternate (every other round backwards); each figure is the
//! median of the windows, and device / bare the median of the rounds' ratios.
//!
//! `cargo bench --bench transport [-- tcp serial rtu paced]` (all four parts:
//! about 70 s); prints a Markdown table.

use biofoundry::clock::Clock;
use biofoundry::device::Device;
use biofoundry::driver::{Link, ProfileDevice};
use biofoundry::profile::codec::RegisterKind;
use biofoundry::profile::{LinkDef, Profile};
use biofoundry::sim::{SimOptions, SimTiming};
use biofoundry::transport::SerialSettings;
use biofoundry::transport::modbus::{Endpoint, ModbusBus, RequestPolicy};
use biofoundry::transport::serial::{LineConfig, Opener, SerialLink};
use biofoundry::wiresim::{
    self, LinePacing, ModbusUnit, PtyHost, SerialSimulator, TcpHost, physics_for,
};
use indexmap::IndexMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::Slave;
use tokio_modbus::client::Reader;
use tokio_serial::SerialPortBuilderExt;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PH: &str = "devices/hamilton-arc-ph.toml";
const TEMPERATURE: &str = "devices/opentrons-temperature-module.toml";
/// The pH sensor's block: PMC1 at PDU address 2089, 10 registers.
const BLOCK: (u16, u16) = (2089, 10);
/// The temperature module's query as the driver sends it, and its reply's end.
const M105: &[u8] = b"M105 \r\n\r\n";
const REPLY_END: &[u8] = b"ok\r\nok\r\n";

/// Windows per side: fast loops, and paced ones (tens of reads a second).
const FAST: (Duration, usize) = (Duration::from_millis(250), 16);
const PACED: (Duration, usize) = (Duration::from_millis(3000), 3);
const WARM_UP: Duration = Duration::from_millis(300);

/// The profile, with the simulated instrument's reply delay replaced.
fn profile(file: &str, reply_delay: Option<Duration>) -> Arc<Profile> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let mut p = biofoundry::profile::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    if let (Some(sim), Some(d)) = (p.doc.simulation.as_mut(), reply_delay) {
        sim.get_mut().reply_delay = biofoundry::profile::model::Duration(d.as_secs_f64());
    }
    Arc::new(p)
}

fn physics(p: &Profile) -> Arc<dyn wiresim::Physics> {
    let options = SimOptions {
        seed: 1,
        timing: SimTiming::Realistic,
    };
    physics_for(p, &p.id, Clock::new(1.0), options, None).unwrap()
}

/// A one-unit simulated Modbus bus for `p`, optionally paced.
fn sim_bus(p: &Arc<Profile>, pacing: Option<LinePacing>) -> Arc<wiresim::ModbusBus> {
    let unit = ModbusUnit::new(Arc::clone(p), physics(p), IndexMap::new());
    let mut bus = wiresim::ModbusBus::new();
    bus.add(unit.default_unit(), unit);
    bus.pace_rtu(pacing);
    Arc::new(bus)
}

fn modbus_device(p: &Arc<Profile>, endpoint: Endpoint) -> Arc<ProfileDevice> {
    let link = Link::modbus(p, ModbusBus::spawn(endpoint), None).unwrap();
    Arc::new(ProfileDevice::new(
        "dev",
        Arc::clone(p),
        &IndexMap::new(),
        link,
    ))
}

fn pty(host: &PtyHost) -> String {
    host.path().unwrap().to_string_lossy().into_owned()
}

/// One side of a comparison: a task on the controller's runtime that runs
/// its loop for the windows it is sent and answers with reads per second.
struct Side {
    windows: mpsc::Sender<(Duration, oneshot::Sender<f64>)>,
    rates: Vec<f64>,
}

impl Side {
    fn run(&mut self, rt: &Runtime, window: Duration) {
        let rate = rt.block_on(async {
            let (tx, rx) = oneshot::channel();
            self.windows.send((window, tx)).await.unwrap();
            rx.await.expect("the loop failed")
        });
        self.rates.push(rate);
    }

    fn median(&self) -> f64 {
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }

    fn range(&self) -> (f64, f64) {
        let min = self.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.rates.iter().copied().fold(0.0, f64::max);
        (min, max)
    }
}

/// Spawns a side: `$setup` (an async block) gives the loop's state, `$step`
/// is one round trip on it (`$s` names the state).
macro_rules! side {
    ($rt:expr, $setup:expr, |$s:ident| $step:expr) => {{
        let (windows, mut rx) = mpsc::channel::<(Duration, oneshot::Sender<f64>)>(1);
        $rt.spawn(async move {
            #[allow(unused_mut)]
            let mut $s = $setup.await;
            while let Some((window, done)) = rx.recv().await {
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < window {
                    $step;
                    n += 1;
                }
                let _ = done.send(n as f64 / start.elapsed().as_secs_f64());
            }
        });
        Side {
            windows,
            rates: Vec::new(),
        }
    }};
}

/// Warms the sides up, then runs their windows in turns.
fn compare(rt: &Runtime, sides: &mut [&mut Side], (window, rounds): (Duration, usize)) {
    for s in sides.iter_mut() {
        s.run(rt, WARM_UP);
        s.rates.clear();
    }
    // Every other round backwards, so no side always comes first.
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            sides[i].run(rt, window);
        }
    }
}

/// The median of `a`'s rate over `b`'s, round by round (the machine's speed
/// drifts between rounds more than within one).
fn ratio(a: &Side, b: &Side) -> f64 {
    let mut r: Vec<f64> = a.rates.iter().zip(&b.rates).map(|(x, y)| x / y).collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// The request settings a profile's `[link]` gives its driver.
fn policy(p: &Profile) -> RequestPolicy {
    match p.doc.link.get_ref() {
        LinkDef::Modbus(m) => RequestPolicy {
            timeout: m.timeout.std(),
            busy_retries: m.busy_retries,
            busy_retry_wait: m.busy_retry_wait.std(),
            min_gap: m.min_gap.std(),
        },
        LinkDef::Serial(_) => unreachable!("a Modbus profile"),
    }
}

async fn read_ph(d: &ProfileDevice) {
    let ph = d.read("ph").await.expect("read ph").value;
    assert!((0.0..14.0).contains(&ph), "pH {ph}");
}

async fn read_block(ctx: &mut tokio_modbus::client::Context) {
    let words = ctx
        .read_holding_registers(BLOCK.0, BLOCK.1)
        .await
        .expect("transport")
        .expect("exception");
    assert_eq!(words.len(), usize::from(BLOCK.1));
}

async fn rtu_context(path: String, settings: SerialSettings) -> tokio_modbus::client::Context {
    let port = Opener::open_port(&path, &settings).unwrap();
    tokio_modbus::client::rtu::attach_slave(port, Slave(1))
}

struct Row {
    what: &'static str,
    device: (f64, (f64, f64)),
    transport: Option<(f64, (f64, f64))>,
    bare: (f64, (f64, f64)),
    /// Device layer over bare client, the median of the rounds' ratios.
    ratio: f64,
    note: String,
}

fn row(
    what: &'static str,
    device: &Side,
    transport: Option<&Side>,
    bare: &Side,
    note: String,
) -> Row {
    let figures = |s: &Side| (s.median(), s.range());
    Row {
        what,
        device: figures(device),
        transport: transport.map(figures),
        bare: figures(bare),
        ratio: ratio(device, bare),
        note,
    }
}

/// The two runtimes: the simulators' and the controller's.
struct Runtimes {
    sim: Runtime,
    ctl: Runtime,
}

/// Modbus TCP on loopback: one simulator, a connection per side.
fn tcp(rts: &Runtimes, ph: &Arc<Profile>) -> Row {
    let rt = &rts.ctl;
    let host = rts
        .sim
        .block_on(TcpHost::modbus(sim_bus(ph, None), 0))
        .unwrap();
    let port = host.port();
    let mut device = {
        let _g = rt.enter();
        let d = modbus_device(
            ph,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
        );
        side!(rt, async move { d }, |d| read_ph(&d).await)
    };
    let mut bus = {
        let _g = rt.enter();
        let bus = ModbusBus::spawn(Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        });
        let policy = policy(ph);
        side!(rt, async move { bus }, |bus| {
            let words = bus
                .read(1, RegisterKind::Holding, BLOCK.0, BLOCK.1, policy)
                .await
                .expect("bus read");
            assert_eq!(words.len(), usize::from(BLOCK.1));
        })
    };
    let mut bare = side!(
        rt,
        async move {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            tokio_modbus::client::tcp::connect_slave(addr, Slave(1))
                .await
                .unwrap()
        },
        |ctx| read_block(&mut ctx).await
    );
    compare(rt, &mut [&mut device, &mut bus, &mut bare], FAST);
    rts.sim.block_on(host.shutdown());
    row(
        "Modbus TCP, 127.0.0.1: `read(\"ph\")` / `ModbusBus::read` / `read_holding_registers(2089, 10)`",
        &device,
        Some(&bus),
        &bare,
        String::new(),
    )
}

/// Serial on a PTY: one simulator, served on a PTY per side (ports open
/// exclusively, so each side has its own).
fn serial(rts: &Runtimes) -> Row {
    let rt = &rts.ctl;
    let temperature = profile(TEMPERATURE, Some(Duration::ZERO));
    let sim = Arc::new(SerialSimulator::new(
        Arc::clone(&temperature),
        physics(&temperature),
        IndexMap::new(),
        Clock::new(1.0),
    ));
    let (a, b, c) = rts.sim.block_on(async {
        (
            PtyHost::serial(Arc::clone(&sim), None).await.unwrap(),
            PtyHost::serial(Arc::clone(&sim), None).await.unwrap(),
            PtyHost::serial(Arc::clone(&sim), None).await.unwrap(),
        )
    });
    let settings = SerialSettings::of(&temperature);
    let mut device = {
        let line = SerialLink::new(Opener::Port {
            path: pty(&a),
            settings,
        });
        let link = Link::serial(&temperature, Arc::new(tokio::sync::Mutex::new(line))).unwrap();
        let d = ProfileDevice::new("tm", Arc::clone(&temperature), &IndexMap::new(), link);
        side!(rt, async move { d }, |d| {
            let c = d.read("temperature").await.expect("read temperature").value;
            assert!((-10.0..100.0).contains(&c), "{c} C");
        })
    };
    let mut link = {
        let link = SerialLink::new(Opener::Port {
            path: pty(&c),
            settings,
        });
        let config = match temperature.doc.link.get_ref() {
            LinkDef::Serial(s) => LineConfig::of(s),
            LinkDef::Modbus(_) => unreachable!("a serial profile"),
        };
        side!(rt, async move { (link, config) }, |s| {
            let (link, config) = &mut s;
            let lines = link
                .exchange(config, "M105", true, &|l: &str| l == "ok")
                .await
                .expect("exchange");
            assert_eq!(lines.len(), 2);
        })
    };
    let path = pty(&b);
    let mut bare = side!(
        rt,
        async move {
            let port = tokio_serial::new(&path, settings.baud)
                .open_native_async()
                .unwrap();
            (port, Vec::<u8>::with_capacity(256))
        },
        |s| {
            let (port, buf) = &mut s;
            port.write_all(M105).await.unwrap();
            buf.clear();
            let mut scratch = [0u8; 256];
            while !buf.ends_with(REPLY_END) {
                let n = port.read(&mut scratch).await.unwrap();
                assert!(n > 0, "the simulator hung up");
                buf.extend_from_slice(&scratch[..n]);
            }
        }
    );
    compare(rt, &mut [&mut device, &mut link, &mut bare], FAST);
    for host in [a, b, c] {
        rts.sim.block_on(host.shutdown());
    }
    row(
        "Serial, PTY: `read(\"temperature\")` / `SerialLink::exchange` / `M105` until `ok`",
        &device,
        Some(&link),
        &bare,
        String::new(),
    )
}

/// Modbus RTU on two PTYs served by one simulated bus, paced or not; `note`
/// turns the device layer's median into the row's note.
fn rtu(
    rts: &Runtimes,
    p: &Arc<Profile>,
    pacing: Option<LinePacing>,
    windows: (Duration, usize),
    what: &'static str,
    note: impl Fn(f64) -> String,
) -> Row {
    let rt = &rts.ctl;
    let settings = SerialSettings::of(p);
    let bus = sim_bus(p, pacing);
    let (a, b) = rts.sim.block_on(async {
        (
            PtyHost::modbus_rtu(Arc::clone(&bus), None).await.unwrap(),
            PtyHost::modbus_rtu(Arc::clone(&bus), None).await.unwrap(),
        )
    });
    let mut device = {
        let _g = rt.enter();
        let d = modbus_device(
            p,
            Endpoint::Rtu {
                path: pty(&a),
                settings,
            },
        );
        side!(rt, async move { d }, |d| read_ph(&d).await)
    };
    let path = pty(&b);
    let mut bare = side!(rt, rtu_context(path, settings), |ctx| read_block(&mut ctx)
        .await);
    compare(rt, &mut [&mut device, &mut bare], windows);
    for host in [a, b] {
        rts.sim.block_on(host.shutdown());
    }
    row(what, &device, None, &bare, note(device.median()))
}

fn main() {
    // `cargo bench --bench transport -- NAME...` runs only the named parts:
    // tcp, serial, rtu, paced (cargo adds `--bench`, which is ignored).
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let rts = Runtimes {
        sim: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("simulator")
            .enable_all()
            .build()
            .unwrap(),
        ctl: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    let ph = profile(PH, Some(Duration::ZERO));

    if wanted("tcp") {
        rows.push(tcp(&rts, &ph));
    }
    if wanted("serial") {
        rows.push(serial(&rts));
    }
    if wanted("rtu") {
        rows.push(rtu(
            &rts,
            &ph,
            None,
            FAST,
            "Modbus RTU, PTY, unpaced: same pH reads",
            |_| String::new(),
        ));
    }
    // The profile's line: 19200 baud, 8N2 (11 bits a character).
    let line = LinePacing::new(SerialSettings::of(&ph).baud, 11);
    let reply = 5 + 2 * usize::from(BLOCK.1);
    let wire = line.exchange_time(8, reply);
    let wire_175 = line.frame_time(8 + reply) + Duration::from_micros(2 * 1750);
    if wanted("paced") {
        let turnaround = Duration::from_millis(10);
        for (delay, what) in [
            (
                Duration::ZERO,
                "Modbus RTU, PTY paced at 19200 8N2: same pH reads",
            ),
            (
                turnaround,
                "… and a 10 ms device turnaround (the profile's `reply_delay`)",
            ),
        ] {
            let max = 1.0 / (wire + delay).as_secs_f64();
            let max_175 = 1.0 / (wire_175 + delay).as_secs_f64();
            let note = |got: f64| {
                format!(
                    "line max {max:.1}/s ({:.1} ms a read): {:.0} % of it; \
                     {max_175:.1}/s with 1.75 ms gaps: {:.0} %",
                    (wire + delay).as_secs_f64() * 1e3,
                    100.0 * got / max,
                    100.0 * got / max_175,
                )
            };
            rows.push(rtu(
                &rts,
                &profile(PH, Some(delay)),
                Some(line),
                PACED,
                what,
                note,
            ));
        }
    }

    println!();
    println!(
        "Transports: device layer vs bare client, reads (round trips) per second, \
         median of {} windows of {:?} ({} of {:?} paced), min..max in brackets; \
         device / bare is the median of the rounds' ratios",
        FAST.1, FAST.0, PACED.1, PACED.0
    );
    println!(
        "RTU wire time at 19200 baud, 11-bit characters: request 8 + reply {reply} bytes, \
         t3.5 = {:.3} ms after each frame: {:.2} ms ({:.2} ms with 1.75 ms gaps)",
        line.t35().as_secs_f64() * 1e3,
        wire.as_secs_f64() * 1e3,
        wire_175.as_secs_f64() * 1e3,
    );
    println!();
    println!(
        "| transport | device layer | transport layer only | bare client | device / bare | note |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let f = |(v, (lo, hi)): (f64, (f64, f64))| {
            if r.device.0 < 1000.0 {
                format!("{v:.1} ({lo:.1}..{hi:.1})")
            } else {
                format!("{v:.0} ({lo:.0}..{hi:.0})")
            }
        };
        println!(
            "| {} | {} | {} | {} | {:.0} % | {} |",
            r.what,
            f(r.device),
            r.transport.map_or("—".into(), f),
            f(r.bare),
            100.0 * r.ratio,
            r.note
        );
    }
    println!();
    println!("(whole run {:.0} s)", started.elapsed().as_secs_f64());
    rts.ctl.shutdown_timeout(Duration::from_secs(1));
    rts.sim.shutdown_timeout(Duration::from_secs(1));
}
