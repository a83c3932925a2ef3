//! The physical model behind a wire simulator: the in-process simulated lab
//! (`crate::sim`) seen through one narrow trait, so a simulator does not care
//! whether it serves a stand-alone temperature module or the pH probe of a
//! bioreactor shared with five other instruments.
//!
//! Values are in the catalogue's canonical units (C, rpm, %, mL/min, uL, bare
//! numbers). Three pseudo signals are always readable: `busy` (1 while an
//! operation started by a command is still running, else 0), `ready`
//! (`1 - busy`) and `error` (1 when the last such operation failed, until the
//! next command).

use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::DeviceHandle;
use crate::sim::{
    SimBioreactor, SimHeaterShaker, SimIncubator, SimLiquidHandler, SimOptions, SimPump, SimSensor,
    SimTemperatureModule,
};
use crate::units::Quantity;
use async_trait::async_trait;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

/// What a wire simulator asks of its physical model.
#[async_trait]
pub trait Physics: Send + Sync {
    /// A signal's value now, in the catalogue's canonical unit.
    async fn read(&self, signal: &str) -> Result<f64, String>;
    /// Changes a setpoint (canonical unit); refused outside the model's limits.
    async fn set(&self, setpoint: &str, value: f64) -> Result<(), String>;
    /// Runs a command (`stop`, `deactivate`, `load` with a `slot` argument ...).
    /// A command that takes time is started and runs on in the background
    /// (`busy` reads 1 until it ends); a refusal is returned at once.
    async fn command(&self, name: &str, args: &[(String, f64)]) -> Result<(), String>;
    /// The last value set for a setpoint, if any.
    fn target(&self, setpoint: &str) -> Option<f64>;
    /// The simulated device behind this physics, when it is one.
    fn simulated(&self) -> Option<DeviceHandle> {
        None
    }
}

/// Setpoint targets, busy count and last error: what every adapter keeps.
#[derive(Default)]
struct Book {
    targets: Mutex<HashMap<String, f64>>,
    running: Arc<AtomicUsize>,
    failed: Arc<AtomicBool>,
}

impl Book {
    fn target(&self, setpoint: &str) -> Option<f64> {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(setpoint)
            .copied()
    }

    fn remember(&self, setpoint: &str, value: f64) {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(setpoint.to_string(), value);
    }

    fn pseudo(&self, signal: &str) -> Option<f64> {
        let busy = self.running.load(Ordering::SeqCst) > 0;
        match signal {
            "busy" => Some(f64::from(u8::from(busy))),
            "ready" => Some(f64::from(u8::from(!busy))),
            "error" => Some(f64::from(u8::from(self.failed.load(Ordering::SeqCst)))),
            _ => None,
        }
    }

    /// Polls `op` once: a refusal (decided before the operation's first wait)
    /// comes back at once; an accepted operation runs on in a task.
    async fn start(
        &self,
        op: Pin<Box<dyn Future<Output = Result<(), String>> + Send>>,
    ) -> Result<(), String> {
        self.failed.store(false, Ordering::SeqCst);
        let mut op = op;
        let first = std::future::poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let running = self.running.clone();
                let failed = self.failed.clone();
                running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Err(e) = op.await {
                        tracing::debug!("simulated operation failed: {e}");
                        failed.store(true, Ordering::SeqCst);
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                });
                Ok(())
            }
        }
    }
}

fn arg(args: &[(String, f64)], name: &str) -> Option<f64> {
    args.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// The labware name the physics uses for incubator slot `n`.
pub fn slot_labware(slot: u32) -> String {
    format!("slot-{slot}")
}

fn slot_arg(args: &[(String, f64)]) -> Result<u32, String> {
    let slot = arg(args, "slot").ok_or("the command needs a `slot`")?;
    if !(slot.is_finite() && (0.0..=1e6).contains(&slot)) {
        return Err(format!("slot {slot} is not a slot number"));
    }
    Ok(slot.round() as u32)
}

/// Any simulated device of `crate::sim` (or any other `DeviceHandle`) as physics.
pub struct DevicePhysics {
    handle: DeviceHandle,
    book: Book,
}

impl DevicePhysics {
    pub fn new(handle: DeviceHandle) -> Self {
        DevicePhysics {
            handle,
            book: Book::default(),
        }
    }

    /// A fresh simulated device of `kind` with this id.
    pub fn for_kind(kind: DeviceKind, id: &str, clock: Clock, options: SimOptions) -> Self {
        let handle = match kind {
            DeviceKind::LiquidHandler => {
                DeviceHandle::LiquidHandler(Arc::new(SimLiquidHandler::new(id, clock, options)))
            }
            DeviceKind::Incubator => {
                DeviceHandle::Incubator(Arc::new(SimIncubator::new(id, clock, options)))
            }
            DeviceKind::Bioreactor => {
                DeviceHandle::Bioreactor(Arc::new(SimBioreactor::new(id, clock, options)))
            }
            DeviceKind::Pump => DeviceHandle::Pump(Arc::new(SimPump::new(id, clock, options))),
            DeviceKind::Sensor => {
                DeviceHandle::Sensor(Arc::new(SimSensor::new(id, clock, options)))
            }
            DeviceKind::TemperatureModule => DeviceHandle::TemperatureModule(Arc::new(
                SimTemperatureModule::new(id, clock, options),
            )),
            DeviceKind::HeaterShaker => {
                DeviceHandle::HeaterShaker(Arc::new(SimHeaterShaker::new(id, clock, options)))
            }
        };
        DevicePhysics::new(handle)
    }

    pub fn handle(&self) -> &DeviceHandle {
        &self.handle
    }
}

#[async_trait]
impl Physics for DevicePhysics {
    fn simulated(&self) -> Option<DeviceHandle> {
        Some(self.handle.clone())
    }

    async fn read(&self, signal: &str) -> Result<f64, String> {
        if let Some(v) = self.book.pseudo(signal) {
            return Ok(v);
        }
        self.handle
            .device()
            .read(signal)
            .await
            .map(|q| q.value)
            .map_err(|e| e.to_string())
    }

    async fn set(&self, setpoint: &str, value: f64) -> Result<(), String> {
        let kind = self.handle.kind();
        let spec = kind
            .spec()
            .setpoint(setpoint)
            .ok_or_else(|| format!("{} has no setpoint `{setpoint}`", kind.with_article()))?;
        let q = Quantity::new(value, spec.dimension);
        let handle = self.handle.clone();
        let name = setpoint.to_string();
        self.book
            .start(Box::pin(async move {
                handle
                    .device()
                    .set(&name, q)
                    .await
                    .map_err(|e| e.to_string())
            }))
            .await?;
        self.book.remember(setpoint, value);
        Ok(())
    }

    async fn command(&self, name: &str, args: &[(String, f64)]) -> Result<(), String> {
        let handle = self.handle.clone();
        let op: Pin<Box<dyn Future<Output = Result<(), String>> + Send>> = match (&handle, name) {
            (DeviceHandle::Incubator(inc), "load") => {
                let slot = slot_arg(args)?;
                let inc = inc.clone();
                Box::pin(async move {
                    inc.load(&slot_labware(slot), slot)
                        .await
                        .map_err(|e| e.to_string())
                })
            }
            (DeviceHandle::Incubator(inc), "unload") => {
                let slot = slot_arg(args)?;
                let inc = inc.clone();
                Box::pin(async move {
                    inc.unload(&slot_labware(slot), slot)
                        .await
                        .map_err(|e| e.to_string())
                })
            }
            (DeviceHandle::Pump(pump), "dispense") => {
                let volume = arg(args, "volume").ok_or("dispense needs a `volume`")?;
                let rate = arg(args, "rate");
                let pump = pump.clone();
                Box::pin(
                    async move { pump.dispense(volume, rate).await.map_err(|e| e.to_string()) },
                )
            }
            (_, "safe_state") => Box::pin(async move {
                handle
                    .device()
                    .safe_state()
                    .await
                    .map_err(|e| e.to_string())
            }),
            _ => {
                let name = name.to_string();
                Box::pin(async move {
                    handle
                        .device()
                        .command(&name)
                        .await
                        .map_err(|e| e.to_string())
                })
            }
        };
        self.book.start(op).await
    }

    fn target(&self, setpoint: &str) -> Option<f64> {
        self.book.target(setpoint)
    }
}

/// The bioreactor part a profile stands for (`simulation.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartRole {
    /// A probe: reads the culture's pH, dissolved oxygen or OD600 (and its temperature).
    Probe(&'static str),
    /// A temperature controller: reads and sets the vessel temperature.
    Temperature,
    /// A gas mass-flow controller: its `rate` is the vessel's airflow.
    Airflow,
    /// A pump feeding the culture through this line.
    Pump(&'static str),
}

impl PartRole {
    pub const NAMES: [&'static str; 9] = [
        "ph",
        "dissolved_oxygen",
        "od600",
        "temperature",
        "airflow",
        "feed",
        "base",
        "acid",
        "antifoam",
    ];

    pub fn parse(name: &str) -> Option<PartRole> {
        Some(match name {
            "ph" => PartRole::Probe("ph"),
            "dissolved_oxygen" => PartRole::Probe("dissolved_oxygen"),
            "od600" => PartRole::Probe("od600"),
            "temperature" => PartRole::Temperature,
            "airflow" => PartRole::Airflow,
            "feed" => PartRole::Pump("feed"),
            "base" => PartRole::Pump("base"),
            "acid" => PartRole::Pump("acid"),
            "antifoam" => PartRole::Pump("antifoam"),
            _ => return None,
        })
    }
}

/// A pump part keeps the line running in short background feeds.
const FEED_CHUNK_S: f64 = 5.0;

#[derive(Default)]
struct PumpLine {
    rate_ml_min: f64,
    /// Volume pumped before the current run, µL.
    dispensed_ul: f64,
    /// Lab time the current run started.
    since: f64,
    runner: Option<tokio::task::JoinHandle<()>>,
}

impl PumpLine {
    fn dispensed(&self, now: f64) -> f64 {
        self.dispensed_ul + self.rate_ml_min * 1000.0 / 60.0 * (now - self.since).max(0.0)
    }
}

/// One instrument of a bioreactor acting on a shared [`SimBioreactor`]: the pH,
/// DO and OD probes, the temperature controller, the gas MFC and the pumps of
/// one vessel all see (and change) one simulated culture.
pub struct BioreactorPart {
    reactor: Arc<SimBioreactor>,
    role: PartRole,
    clock: Clock,
    book: Book,
    line: Arc<Mutex<PumpLine>>,
}

impl BioreactorPart {
    /// `role` is the profile's `simulation.model`: ph, dissolved_oxygen, od600,
    /// temperature, airflow, feed, base, acid or antifoam.
    pub fn new(reactor: Arc<SimBioreactor>, role: &str, clock: Clock) -> Result<Self, String> {
        let role = PartRole::parse(role).ok_or_else(|| {
            format!(
                "`{role}` is not a bioreactor part ({})",
                PartRole::NAMES.join(", ")
            )
        })?;
        Ok(BioreactorPart {
            reactor,
            role,
            clock,
            book: Book::default(),
            line: Arc::new(Mutex::new(PumpLine::default())),
        })
    }

    pub fn role(&self) -> PartRole {
        self.role
    }

    fn line(&self) -> std::sync::MutexGuard<'_, PumpLine> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn reactor_read(&self, signal: &str) -> Result<f64, String> {
        use crate::device::Device;
        self.reactor
            .read(signal)
            .await
            .map(|q| q.value)
            .map_err(|e| e.to_string())
    }

    async fn reactor_set(&self, setpoint: &str, value: f64) -> Result<(), String> {
        use crate::device::Device;
        let dimension = DeviceKind::Bioreactor
            .spec()
            .setpoint(setpoint)
            .map(|s| s.dimension)
            .ok_or_else(|| format!("a bioreactor has no setpoint `{setpoint}`"))?;
        self.reactor
            .set(setpoint, Quantity::new(value, dimension))
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs the pump line at `rate` (0 stops it).
    async fn run_line(&self, pump: &'static str, rate: f64) -> Result<(), String> {
        use crate::device::Bioreactor;
        let limits = DeviceKind::Bioreactor
            .spec()
            .setpoint("pump_rate")
            .map(|s| s.limits())
            .ok_or("no pump rate limits")?;
        if !(rate.is_finite() && (rate == 0.0 || limits.contains(rate))) {
            return Err(format!("rate {rate} mL/min is outside {limits}"));
        }
        let now = self.clock.now_s();
        {
            let mut line = self.line();
            line.dispensed_ul = line.dispensed(now);
            line.since = now;
            line.rate_ml_min = 0.0;
            if let Some(r) = line.runner.take() {
                r.abort();
            }
        }
        if rate == 0.0 {
            return Ok(());
        }
        // The first chunk is fed here, so a refusal (full vessel) is reported.
        let mut first = Err(String::new());
        for _ in 0..100 {
            first = self
                .reactor
                .feed(pump, None, Some(rate), Some(FEED_CHUNK_S))
                .await
                .map_err(|e| e.to_string());
            match &first {
                Err(e) if e.contains("already running") => {
                    // The previous run's last chunk is still flowing.
                    self.clock.sleep(0.5).await;
                }
                _ => break,
            }
        }
        first?;
        let reactor = self.reactor.clone();
        let clock = self.clock;
        let shared = self.line.clone();
        let runner = tokio::spawn(async move {
            loop {
                clock.sleep(FEED_CHUNK_S).await;
                let mut fed = false;
                for _ in 0..20 {
                    match reactor
                        .feed(pump, None, Some(rate), Some(FEED_CHUNK_S))
                        .await
                    {
                        Ok(()) => {
                            fed = true;
                            break;
                        }
                        Err(e) if e.to_string().contains("already running") => {
                            clock.sleep(0.01).await;
                        }
                        Err(e) => {
                            tracing::debug!("{pump} pump stopped: {e}");
                            break;
                        }
                    }
                }
                if !fed {
                    let now = clock.now_s();
                    let mut line = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    line.dispensed_ul = line.dispensed(now);
                    line.since = now;
                    line.rate_ml_min = 0.0;
                    return;
                }
            }
        });
        let mut line = self.line();
        line.rate_ml_min = rate;
        line.since = now;
        line.runner = Some(runner);
        Ok(())
    }
}

impl Drop for BioreactorPart {
    fn drop(&mut self) {
        if let Some(r) = self.line().runner.take() {
            r.abort();
        }
    }
}

#[async_trait]
impl Physics for BioreactorPart {
    async fn read(&self, signal: &str) -> Result<f64, String> {
        if let Some(v) = self.book.pseudo(signal) {
            return Ok(v);
        }
        match (self.role, signal) {
            (PartRole::Pump(_), "rate") => Ok(self.line().rate_ml_min),
            (PartRole::Pump(_), "dispensed") => Ok(self.line().dispensed(self.clock.now_s())),
            (PartRole::Airflow, "rate") => self.reactor_read("airflow").await,
            (PartRole::Airflow, "dispensed") => Ok(0.0),
            _ => self.reactor_read(signal).await,
        }
    }

    async fn set(&self, setpoint: &str, value: f64) -> Result<(), String> {
        match (self.role, setpoint) {
            (PartRole::Pump(pump), "rate") => self.run_line(pump, value).await?,
            (PartRole::Airflow, "rate") => self.reactor_set("airflow", value).await?,
            (PartRole::Temperature, "temperature") => {
                self.reactor_set("temperature", value).await?
            }
            (_, other) => {
                return Err(format!(
                    "this bioreactor part cannot set `{other}` ({:?})",
                    self.role
                ));
            }
        }
        self.book.remember(setpoint, value);
        Ok(())
    }

    async fn command(&self, name: &str, args: &[(String, f64)]) -> Result<(), String> {
        match (self.role, name) {
            (PartRole::Pump(pump), "stop" | "safe_state") => self.run_line(pump, 0.0).await,
            (PartRole::Pump(pump), "dispense") => {
                use crate::device::Bioreactor;
                let volume = arg(args, "volume").ok_or("dispense needs a `volume`")?;
                let rate = arg(args, "rate");
                let reactor = self.reactor.clone();
                self.book
                    .start(Box::pin(async move {
                        reactor
                            .feed(pump, Some(volume), rate, None)
                            .await
                            .map_err(|e| e.to_string())
                    }))
                    .await
            }
            (PartRole::Airflow, "stop" | "safe_state") => self.reactor_set("airflow", 0.0).await,
            (PartRole::Probe(_), "safe_state") => Ok(()),
            (_, other) => Err(format!(
                "the bioreactor part {:?} has no command `{other}`",
                self.role
            )),
        }
    }

    fn target(&self, setpoint: &str) -> Option<f64> {
        self.book.target(setpoint)
    }
}

/// Physics for a device with no model (the G-code liquid handler keeps its
/// own): every read and change is refused.
pub struct NoPhysics;

#[async_trait]
impl Physics for NoPhysics {
    async fn read(&self, signal: &str) -> Result<f64, String> {
        Err(format!("no model for `{signal}`"))
    }
    async fn set(&self, setpoint: &str, _value: f64) -> Result<(), String> {
        Err(format!("no model for `{setpoint}`"))
    }
    async fn command(&self, name: &str, _args: &[(String, f64)]) -> Result<(), String> {
        Err(format!("no model for `{name}`"))
    }
    fn target(&self, _setpoint: &str) -> Option<f64> {
        None
    }
}

/// The physics for a profile: a bioreactor part on `reactor` when the
/// profile's `simulation.model` names one and a reactor is given; for an
/// `airflow` model without one, the airflow of a vessel of its own; otherwise
/// a fresh simulated device of the profile's kind (none for the G-code liquid
/// handler, which is its own model).
pub fn physics_for(
    profile: &crate::profile::Profile,
    id: &str,
    clock: Clock,
    options: SimOptions,
    reactor: Option<Arc<SimBioreactor>>,
) -> Result<Arc<dyn Physics>, String> {
    let model = profile
        .doc
        .simulation
        .as_ref()
        .and_then(|s| s.get_ref().model.as_ref())
        .map(|m| m.get_ref().clone());
    if let (Some(reactor), Some(role)) = (reactor, model.as_deref())
        && PartRole::parse(role).is_some()
    {
        return Ok(Arc::new(BioreactorPart::new(reactor, role, clock)?));
    }
    // A gas flow controller on its own still meters gas (0..5 L/min), not
    // liquid: it gets a vessel of its own.
    if model.as_deref() == Some("airflow") {
        let vessel = Arc::new(SimBioreactor::new(id, clock, options));
        return Ok(Arc::new(BioreactorPart::new(vessel, "airflow", clock)?));
    }
    if profile.kind == DeviceKind::LiquidHandler {
        return Ok(Arc::new(NoPhysics));
    }
    Ok(Arc::new(DevicePhysics::for_kind(
        profile.kind,
        id,
        clock,
        options,
    )))
}

/// The physics of the bioreactor part named `role` in a lab file, on the
/// vessel's `reactor`. The part's name says what it does for the vessel: a
/// `base` part doses base even when its pump profile's own simulation model
/// is `feed` (one pump profile serves every line). A name that is no part
/// role (`stirrer`) falls back to the profile's model.
pub fn part_physics(
    profile: &crate::profile::Profile,
    id: &str,
    role: &str,
    clock: Clock,
    options: SimOptions,
    reactor: Arc<SimBioreactor>,
) -> Result<Arc<dyn Physics>, String> {
    if PartRole::parse(role).is_some() {
        return Ok(Arc::new(BioreactorPart::new(reactor, role, clock)?));
    }
    physics_for(profile, id, clock, options, Some(reactor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimTiming;

    fn options() -> SimOptions {
        SimOptions {
            seed: 1,
            timing: SimTiming::Realistic,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn device_physics_runs_long_commands_in_the_background() {
        let clock = Clock::new(1.0);
        let p = DevicePhysics::for_kind(DeviceKind::Incubator, "inc", clock, options());
        assert_eq!(p.read("ready").await.unwrap(), 1.0);
        p.command("load", &[("slot".into(), 7.0)]).await.unwrap();
        assert_eq!(p.read("busy").await.unwrap(), 1.0);
        clock.sleep(30.0).await;
        assert_eq!(p.read("busy").await.unwrap(), 0.0);
        // Slot 7 is taken: refused at once.
        assert!(p.command("load", &[("slot".into(), 7.0)]).await.is_err());
        assert!(p.command("load", &[]).await.is_err());
        p.set("temperature", 37.0).await.unwrap();
        assert_eq!(p.target("temperature"), Some(37.0));
        assert!(p.set("temperature", 99.0).await.is_err());
        assert_eq!(p.target("temperature"), Some(37.0));
    }

    #[tokio::test(start_paused = true)]
    async fn parts_share_one_culture() {
        let clock = Clock::new(1.0);
        let reactor = Arc::new(SimBioreactor::new("br", clock, options()));
        let feed = BioreactorPart::new(reactor.clone(), "feed", clock).unwrap();
        let air = BioreactorPart::new(reactor.clone(), "airflow", clock).unwrap();
        let ph = BioreactorPart::new(reactor.clone(), "ph", clock).unwrap();
        assert!(BioreactorPart::new(reactor.clone(), "stirrer", clock).is_err());
        assert!((ph.read("ph").await.unwrap() - 7.0).abs() < 0.05);
        air.set("rate", 1000.0).await.unwrap();
        assert_eq!(reactor.true_value("airflow"), Some(1000.0));
        feed.set("rate", 6.0).await.unwrap();
        clock.sleep(60.0).await;
        assert_eq!(feed.read("rate").await.unwrap(), 6.0);
        feed.set("rate", 0.0).await.unwrap();
        clock.sleep(30.0).await;
        let v = reactor.true_value("volume").unwrap();
        // 6 mL/min for 60 s, plus at most one chunk already flowing.
        assert!(
            (1_006_000.0 - 1.0..=1_006_000.0 + 500.0 + 1.0).contains(&v),
            "{v}"
        );
        assert!((feed.read("dispensed").await.unwrap() - 6000.0).abs() < 1.0);
        assert!(feed.set("rate", 500.0).await.is_err());
    }
}
