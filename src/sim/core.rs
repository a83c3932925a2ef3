//! What every simulated device shares: injected faults, the operation log,
//! validation against the kind catalogue, measurement noise and waiting on the
//! clock. A kind only supplies its [`Model`]: plain synchronous state that is
//! advanced to `now` when touched.

use super::{FaultKind, InjectedFault, SimOptions, SimTiming};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{DeviceError, DeviceResult};
use crate::units::{Dimension, Quantity, trim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Nominal wait reported by an injected timeout (the failure itself is immediate).
const INJECTED_TIMEOUT_S: f64 = 30.0;
/// Longest single wait (about 30 years): a valid but absurdly slow request
/// (a feed at 1e-300 mL/min) must not overflow the timer.
const MAX_WAIT_S: f64 = 1e9;

/// The physics and bookkeeping of one kind, without any waiting: every method
/// runs under the device's lock and returns how long the operation takes.
pub(crate) trait Model: Send + 'static {
    const KIND: DeviceKind;

    /// The physical (noise-free) value of a catalogue signal at `now`.
    fn value(&mut self, _signal: &str, _now: f64) -> Option<f64> {
        None
    }

    /// Half-width of the measurement noise of a signal with this value.
    fn noise(&self, _signal: &str, _value: f64) -> f64 {
        0.0
    }

    /// Applies a setpoint already checked against the catalogue (name,
    /// dimension, limits); may still refuse for reasons of state (an interlock).
    fn set(&mut self, setpoint: &str, _value: f64, _now: f64) -> Result<(), String> {
        Err(format!("{setpoint} cannot be set"))
    }

    /// Seconds from `now` until the setpoint is reached (0 if it is, or if it
    /// has no settling dynamics).
    fn settle_s(&mut self, _setpoint: &str, _now: f64) -> f64 {
        0.0
    }

    /// An argument-less catalogue action; returns its duration in seconds.
    fn command(&mut self, name: &str, _now: f64) -> Result<f64, String> {
        Err(format!("{name} is not supported"))
    }

    /// Heaters, shakers, pumps and stirring off; returns how long that takes.
    fn safe_state(&mut self, _now: f64) -> f64 {
        0.0
    }
}

/// An accepted operation: how long it takes and how it is logged.
pub(crate) struct Step {
    pub seconds: f64,
    pub log: String,
}

impl Step {
    pub fn new(seconds: f64, log: impl Into<String>) -> Self {
        Step {
            seconds,
            log: log.into(),
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    offline: bool,
    fail_next: u32,
    error: Option<FaultKind>,
}

struct State<M> {
    model: M,
    faults: Faults,
    rng: StdRng,
    operations: u64,
    log: Vec<String>,
}

/// A simulated device of model `M`. One mutex guards everything; it is never
/// held across an `.await` (operations decide and apply under the lock, then
/// sleep without it).
pub(crate) struct Sim<M> {
    id: String,
    clock: Clock,
    instant: bool,
    state: Mutex<State<M>>,
}

impl<M: Model> Sim<M> {
    pub fn new(id: String, clock: Clock, options: &SimOptions, model: M) -> Self {
        // Each device gets its own noise stream, fixed by the seed and its id.
        let rng = StdRng::seed_from_u64(options.seed ^ fnv1a(id.as_bytes()));
        Sim {
            id,
            clock,
            instant: options.timing == SimTiming::Instant,
            state: Mutex::new(State {
                model,
                faults: Faults::default(),
                rng,
                operations: 0,
                log: Vec::new(),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A poisoned lock only means another thread panicked while holding it;
    /// the state is still usable, so recover it rather than propagate.
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn inject(&self, fault: InjectedFault) {
        let mut s = self.lock();
        match fault {
            InjectedFault::FailNext { count, error } => {
                s.faults.fail_next = count;
                s.faults.error = Some(error);
            }
            InjectedFault::Offline => s.faults.offline = true,
            InjectedFault::Clear => s.faults = Faults::default(),
        }
    }

    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Runs `f` on the model at the current lab time, under the lock.
    pub fn with_model<T>(&self, f: impl FnOnce(&mut M, f64) -> T) -> T {
        let now = self.clock.now_s();
        f(&mut self.lock().model, now)
    }

    pub fn true_value(&self, signal: &str) -> Option<f64> {
        M::KIND.spec().signal(signal)?;
        self.with_model(|m, now| m.value(signal, now))
    }

    pub fn refused(&self, reason: impl Into<String>) -> DeviceError {
        DeviceError::Refused {
            device: self.id.clone(),
            reason: reason.into(),
        }
    }

    fn disconnected(&self) -> DeviceError {
        DeviceError::Disconnected {
            device: self.id.clone(),
            reason: "offline (injected fault)".into(),
        }
    }

    /// The injected failure for the next operation, if any (and counts it down).
    fn injected(&self, faults: &mut Faults) -> Option<DeviceError> {
        if faults.offline {
            return Some(self.disconnected());
        }
        if faults.fail_next == 0 {
            return None;
        }
        faults.fail_next -= 1;
        let reason = "injected fault".to_string();
        Some(match faults.error.unwrap_or(FaultKind::Fault) {
            FaultKind::Refused => self.refused(reason),
            FaultKind::Timeout => DeviceError::Timeout {
                device: self.id.clone(),
                seconds: INJECTED_TIMEOUT_S,
            },
            FaultKind::Fault => DeviceError::Fault {
                device: self.id.clone(),
                reason,
            },
        })
    }

    /// One operation: injected faults first, then `f` decides (refusing
    /// without side effects, or applying its effect) under the lock; then the
    /// operation's duration passes on the clock, without the lock.
    pub async fn op(
        &self,
        f: impl FnOnce(&mut M, f64) -> Result<Step, String> + Send,
    ) -> DeviceResult<()> {
        let seconds = {
            let mut s = self.lock();
            if let Some(e) = self.injected(&mut s.faults) {
                return Err(e);
            }
            let now = self.clock.now_s();
            let step = f(&mut s.model, now).map_err(|r| self.refused(r))?;
            s.operations += 1;
            s.log.push(step.log);
            step.seconds
        };
        self.wait(seconds).await;
        Ok(())
    }

    async fn wait(&self, seconds: f64) {
        if !self.instant && seconds.is_finite() {
            self.clock.sleep(seconds.min(MAX_WAIT_S)).await;
        }
    }

    /// Like [`Sim::op`] but immune to `FailNext` (run setup, not an operation).
    pub fn setup(&self, f: impl FnOnce(&mut M, f64) -> Result<Step, String>) -> DeviceResult<()> {
        let mut s = self.lock();
        if s.faults.offline {
            return Err(self.disconnected());
        }
        let now = self.clock.now_s();
        let step = f(&mut s.model, now).map_err(|r| self.refused(r))?;
        s.operations += 1;
        s.log.push(step.log);
        Ok(())
    }

    pub fn connect(&self) -> DeviceResult<()> {
        if self.lock().faults.offline {
            return Err(self.disconnected());
        }
        Ok(())
    }

    pub fn read(&self, signal: &str) -> DeviceResult<Quantity> {
        let mut s = self.lock();
        if s.faults.offline {
            return Err(self.disconnected());
        }
        let Some(spec) = M::KIND.spec().signal(signal) else {
            return Err(self.refused(format!(
                "{} has no signal `{signal}`",
                M::KIND.with_article()
            )));
        };
        let now = self.clock.now_s();
        let value = s
            .model
            .value(signal, now)
            .ok_or_else(|| self.refused(format!("`{signal}` cannot be read")))?;
        let amplitude = s.model.noise(signal, value);
        let mut reading = value;
        if amplitude > 0.0 {
            reading += amplitude * bounded_noise(&mut s.rng);
        }
        // Noise must not produce impossible readings.
        reading = match spec.dimension {
            Dimension::Temperature => reading,
            Dimension::Percent => reading.clamp(0.0, 100.0),
            _ => reading.max(0.0),
        };
        Ok(Quantity::new(reading, spec.dimension))
    }

    pub async fn set(&self, name: &str, value: Quantity) -> DeviceResult<()> {
        self.op(|m, now| {
            let spec = M::KIND
                .spec()
                .setpoint(name)
                .ok_or_else(|| format!("{} has no setpoint `{name}`", M::KIND.with_article()))?;
            if value.dimension != spec.dimension {
                return Err(format!(
                    "{name} is a {}, not a {}",
                    spec.dimension.name(),
                    value.dimension.name()
                ));
            }
            let limits = spec.limits();
            if !limits.contains(value.value) {
                return Err(format!("{name} {value} is outside {limits}"));
            }
            m.set(name, value.value, now)?;
            Ok(Step::new(0.0, format!("set {name} {}", trim(value.value))))
        })
        .await
    }

    pub async fn wait_until_reached(&self, name: &str) -> DeviceResult<()> {
        self.op(|m, now| {
            if M::KIND.spec().setpoint(name).is_none() {
                return Err(format!(
                    "{} has no setpoint `{name}`",
                    M::KIND.with_article()
                ));
            }
            Ok(Step::new(m.settle_s(name, now), format!("wait {name}")))
        })
        .await
    }

    pub async fn command(&self, name: &str) -> DeviceResult<()> {
        self.op(|m, now| {
            let argument_less = M::KIND
                .spec()
                .action(name)
                .is_some_and(|a| a.args.is_empty());
            if !argument_less {
                return Err(format!(
                    "`{name}` is not a command of {}",
                    M::KIND.with_article()
                ));
            }
            Ok(Step::new(m.command(name, now)?, name))
        })
        .await
    }

    pub async fn safe_state(&self) -> DeviceResult<()> {
        let seconds = {
            let mut s = self.lock();
            if s.faults.offline {
                return Err(self.disconnected());
            }
            let now = self.clock.now_s();
            let seconds = s.model.safe_state(now);
            s.operations += 1;
            s.log.push("safe_state".into());
            seconds
        };
        self.wait(seconds).await;
        Ok(())
    }
}

/// Gaussian-like noise in [-1, 1]: the Irwin–Hall sum of four uniforms,
/// rescaled (standard deviation about 0.29), so a reading never leaves the
/// documented band.
fn bounded_noise(rng: &mut StdRng) -> f64 {
    let sum: f64 = (0..4).map(|_| rng.random::<f64>()).sum();
    (sum - 2.0) / 2.0
}

/// FNV-1a: a stable hash (unlike `DefaultHasher`) to derive per-device seeds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_bounded_and_centred() {
        let mut rng = StdRng::seed_from_u64(1);
        let samples: Vec<f64> = (0..10_000).map(|_| bounded_noise(&mut rng)).collect();
        assert!(samples.iter().all(|x| (-1.0..=1.0).contains(x)));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
    }

    #[test]
    fn seeds_differ_per_device() {
        assert_ne!(fnv1a(b"pump"), fnv1a(b"sensor"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
