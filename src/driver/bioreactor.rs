//! A bioreactor assembled from parts in the lab file: probes, a temperature
//! controller, pumps and a gas mass-flow controller, each its own instrument
//! with its own profile and transport.
//!
//! A part is named after what it does for the vessel: a signal or setpoint of
//! the bioreactor kind (`ph`, `dissolved_oxygen`, `temperature`, `od600`,
//! `stirrer`, `airflow`) or one of its pumps (`feed`, `base`, `acid`,
//! `antifoam`). Reading a signal reads the part of that name; a pump part's
//! rate is the flow. Control loops (pH by base dosing, DO by stirrer cascade)
//! belong to the vessel's own controller; a setpoint no part provides is refused.

use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{Bioreactor, Device, DeviceError, DeviceHandle, DeviceResult};
use crate::units::{Limits, Quantity};
use async_trait::async_trait;
use indexmap::IndexMap;
use std::sync::{Arc, Mutex, PoisonError};

pub struct CompositeBioreactor {
    id: String,
    parts: IndexMap<String, DeviceHandle>,
    /// Timed feeds running in the background, by pump: stopped when replaced.
    feeds: Mutex<IndexMap<String, tokio::task::JoinHandle<()>>>,
    /// The lab clock that times feeds.
    clock: Clock,
}

impl CompositeBioreactor {
    pub fn new(id: impl Into<String>, parts: IndexMap<String, DeviceHandle>, clock: Clock) -> Self {
        CompositeBioreactor {
            id: id.into(),
            parts,
            feeds: Mutex::new(IndexMap::new()),
            clock,
        }
    }

    /// Forgets the timer of a pump's timed feed, if one runs.
    fn cancel_timer(&self, pump: &str) {
        if let Some(task) = self
            .feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shift_remove(pump)
        {
            task.abort();
        }
    }

    pub fn parts(&self) -> &IndexMap<String, DeviceHandle> {
        &self.parts
    }

    fn refused(&self, reason: String) -> DeviceError {
        DeviceError::Refused {
            device: self.id.clone(),
            reason,
        }
    }

    /// The part for a signal or setpoint, and the name it has on that part.
    fn part(&self, name: &str) -> DeviceResult<(&DeviceHandle, &'static str)> {
        let Some(part) = self.parts.get(name) else {
            return Err(self.refused(format!(
                "no part of this bioreactor provides `{name}` (parts: {})",
                self.parts.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let on_part = match part.kind() {
            DeviceKind::Pump => "rate",
            DeviceKind::TemperatureModule => "temperature",
            DeviceKind::HeaterShaker => "speed",
            _ => DeviceKind::Bioreactor
                .spec()
                .signal(name)
                .map(|s| s.name)
                .unwrap_or("value"),
        };
        Ok((part, on_part))
    }

    fn pump(&self, pump: &str) -> DeviceResult<&Arc<dyn crate::device::Pump>> {
        match self.parts.get(pump) {
            Some(DeviceHandle::Pump(p)) => Ok(p),
            Some(_) => Err(self.refused(format!("part `{pump}` is not a pump"))),
            None => Err(self.refused(format!("this bioreactor has no `{pump}` pump"))),
        }
    }
}

#[async_trait]
impl Device for CompositeBioreactor {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::Bioreactor
    }

    async fn connect(&self) -> DeviceResult<()> {
        for part in self.parts.values() {
            part.device().connect().await?;
        }
        Ok(())
    }

    async fn read(&self, signal: &str) -> DeviceResult<Quantity> {
        let (part, name) = self.part(signal)?;
        let q = part.device().read(name).await?;
        let dimension = DeviceKind::Bioreactor
            .spec()
            .signal(signal)
            .map_or(q.dimension, |s| s.dimension);
        Ok(Quantity::new(q.value, dimension))
    }

    async fn set(&self, setpoint: &str, value: Quantity) -> DeviceResult<()> {
        let (part, name) = self.part(setpoint)?;
        part.device().set(name, value).await
    }

    async fn wait_until_reached(&self, setpoint: &str) -> DeviceResult<()> {
        let (part, name) = self.part(setpoint)?;
        part.device().wait_until_reached(name).await
    }

    async fn command(&self, name: &str) -> DeviceResult<()> {
        Err(self.refused(format!("a bioreactor has no command `{name}`")))
    }

    async fn safe_state(&self) -> DeviceResult<()> {
        for (_, task) in self
            .feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
        // Every part is made safe even if one of them fails; the first error is reported.
        let mut first = None;
        for part in self.parts.values() {
            if let Err(e) = part.device().safe_state().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn limits(&self, setpoint: &str) -> Option<Limits> {
        let (part, name) = self.part(setpoint).ok()?;
        part.device().limits(name)
    }

    fn slots(&self) -> u32 {
        0
    }
}

#[async_trait]
impl Bioreactor for CompositeBioreactor {
    async fn feed(
        &self,
        pump: &str,
        volume_ul: Option<f64>,
        rate_ml_min: Option<f64>,
        duration_s: Option<f64>,
    ) -> DeviceResult<()> {
        let part = Arc::clone(self.pump(pump)?);
        self.cancel_timer(pump);
        match (volume_ul, rate_ml_min, duration_s) {
            (Some(v), rate, _) => part.dispense(v, rate).await,
            (None, Some(rate), duration) => {
                part.set("rate", Quantity::new(rate, crate::units::Dimension::Flow))
                    .await?;
                if let Some(d) = duration {
                    // The feed runs on; the pump stops when its (lab) time is
                    // up. A controller that stops meanwhile takes this timer
                    // along; the resumed run starts it again.
                    let clock = self.clock;
                    let task = tokio::spawn(async move {
                        clock.sleep(d.clamp(0.0, 1e7)).await;
                        if let Err(e) = part.command("stop").await {
                            tracing::error!(error = %e, "a timed feed could not stop its pump");
                        }
                    });
                    self.feeds
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(pump.to_string(), task);
                }
                Ok(())
            }
            (None, None, _) => Err(self.refused("a feed needs a volume or a rate".into())),
        }
    }

    async fn stop_feed(&self, pump: &str) -> DeviceResult<()> {
        let part = Arc::clone(self.pump(pump)?);
        self.cancel_timer(pump);
        part.command("stop").await
    }
}
