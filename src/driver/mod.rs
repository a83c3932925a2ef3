//! The profile interpreter: implements the device API (`crate::device`) for any
//! instrument described by a profile, over a serial link or a Modbus bus.
//!
//! The runtime calls `read`, `set`, `command` ...; the driver finds the signal,
//! setpoint or action in the profile, renders its templates, runs its steps on
//! the link, and turns replies into numbers or typed errors. Setpoints are
//! checked against the profile's limits before anything is sent. Kinds that
//! keep state the instrument does not report (what is in which incubator slot,
//! what is on a liquid handler's deck) keep it here.

mod bioreactor;

pub use bioreactor::CompositeBioreactor;

use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{
    DeckLabware, Device, DeviceError, DeviceHandle, DeviceResult, HeaterShaker, Incubator,
    LiquidHandler, Pump, Sensor, TemperatureModule,
};
use crate::profile::codec::{DataType, Encoding, RegisterKind, WordOrder};
use crate::profile::expr::{Scope, Template};
use crate::profile::{LinkDef, Profile, RegisterDef, StepDef};
use crate::sim::liquid_handler::LiquidHandlerModel;
use crate::transport::modbus::{ModbusBus, ModbusError, RequestPolicy};
use crate::transport::serial::{LineConfig, LinkError, SerialLink};
use crate::units::{Limits, Quantity, trim};
use async_trait::async_trait;
use indexmap::IndexMap;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How the driver reaches its instrument.
pub enum Link {
    Serial {
        line: Arc<tokio::sync::Mutex<SerialLink>>,
        config: LineConfig,
    },
    Modbus {
        bus: ModbusBus,
        unit: u8,
        policy: RequestPolicy,
        word_order: WordOrder,
    },
}

impl Link {
    /// The link a profile describes, on an open line or bus.
    pub fn serial(profile: &Profile, line: Arc<tokio::sync::Mutex<SerialLink>>) -> Option<Link> {
        match profile.doc.link.get_ref() {
            LinkDef::Serial(s) => Some(Link::Serial {
                line,
                config: LineConfig::of(s),
            }),
            LinkDef::Modbus(_) => None,
        }
    }

    pub fn modbus(profile: &Profile, bus: ModbusBus, unit: Option<u8>) -> Option<Link> {
        match profile.doc.link.get_ref() {
            LinkDef::Modbus(m) => Some(Link::Modbus {
                bus,
                unit: unit.unwrap_or(m.unit),
                policy: RequestPolicy {
                    timeout: m.timeout.std(),
                    busy_retries: m.busy_retries,
                    busy_retry_wait: m.busy_retry_wait.std(),
                    min_gap: m.min_gap.std(),
                },
                word_order: m.word_order,
            }),
            LinkDef::Serial(_) => None,
        }
    }
}

/// Sequences calling actions calling actions: deeper than this is a loop.
const MAX_ACTION_DEPTH: usize = 8;
/// `poll` and `read … equals` without a timeout give up after this long.
const DEFAULT_POLL_TIMEOUT_S: f64 = 60.0;
/// `wait_until_reached` without a timeout in the profile.
const DEFAULT_REACH_TIMEOUT_S: f64 = 4.0 * 3600.0;

#[derive(Default)]
struct DriverState {
    /// Last value written per setpoint, canonical units.
    targets: BTreeMap<String, f64>,
    /// Incubators: storage slot → labware.
    stored: BTreeMap<u32, String>,
    /// Liquid handlers: the deck as the driver knows it.
    deck: LiquidHandlerModel,
    /// The profile's states (`latch`, `door`) as the controller's own actions
    /// left them; back to their initial values on every connect.
    states: BTreeMap<String, String>,
}

/// One instrument driven through its profile.
pub struct ProfileDevice {
    id: String,
    profile: Arc<Profile>,
    settings: IndexMap<String, f64>,
    link: Link,
    state: Mutex<DriverState>,
    /// The lab clock, for what the protocol times (a dispense at a rate);
    /// the instrument's own timing (replies, profile waits) stays real.
    clock: Clock,
}

/// Settings and parameters in scope for a template.
struct Vars<'a> {
    settings: &'a IndexMap<String, f64>,
    params: &'a [(String, f64)],
}

impl Scope for Vars<'_> {
    fn get(&self, name: &str) -> Option<f64> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .or_else(|| self.settings.get(name).copied())
    }
}

impl ProfileDevice {
    /// `overrides` are the lab file's settings for this instance.
    pub fn new(
        id: impl Into<String>,
        profile: Arc<Profile>,
        overrides: &IndexMap<String, f64>,
        link: Link,
    ) -> Self {
        let mut settings = profile.doc.settings.clone();
        for (k, v) in overrides {
            settings.insert(k.clone(), *v);
        }
        let states = profile.initial_states();
        ProfileDevice {
            id: id.into(),
            profile,
            settings,
            link,
            state: Mutex::new(DriverState {
                states,
                ..DriverState::default()
            }),
            clock: Clock::new(1.0),
        }
    }

    /// The lab clock (a simulated lab may run faster than real time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }

    /// The driver as the handle of its kind.
    pub fn handle(self: Arc<Self>) -> DeviceHandle {
        match self.profile.kind {
            DeviceKind::LiquidHandler => DeviceHandle::LiquidHandler(self),
            DeviceKind::Incubator => DeviceHandle::Incubator(self),
            DeviceKind::Pump => DeviceHandle::Pump(self),
            DeviceKind::TemperatureModule => DeviceHandle::TemperatureModule(self),
            DeviceKind::HeaterShaker => DeviceHandle::HeaterShaker(self),
            DeviceKind::Sensor | DeviceKind::Bioreactor => DeviceHandle::Sensor(self),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DriverState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refused(&self, reason: impl Into<String>) -> DeviceError {
        DeviceError::Refused {
            device: self.id.clone(),
            reason: reason.into(),
        }
    }

    fn fault(&self, reason: impl Into<String>) -> DeviceError {
        DeviceError::Fault {
            device: self.id.clone(),
            reason: reason.into(),
        }
    }

    fn link_error(&self, e: LinkError) -> DeviceError {
        match e {
            LinkError::Timeout(seconds) => DeviceError::Timeout {
                device: self.id.clone(),
                seconds,
            },
            LinkError::Disconnected(reason) => DeviceError::Disconnected {
                device: self.id.clone(),
                reason,
            },
            LinkError::Malformed(reason) => self.fault(reason),
        }
    }

    fn modbus_error(&self, e: ModbusError) -> DeviceError {
        match e {
            ModbusError::Timeout(seconds) => DeviceError::Timeout {
                device: self.id.clone(),
                seconds,
            },
            ModbusError::Disconnected(reason) => DeviceError::Disconnected {
                device: self.id.clone(),
                reason,
            },
            other => self.fault(other.to_string()),
        }
    }

    fn number(&self, t: &Template, params: &[(String, f64)], what: &str) -> DeviceResult<f64> {
        t.number(&Vars {
            settings: &self.settings,
            params,
        })
        .map_err(|e| self.refused(format!("{what}: {e}")))
    }

    fn render(&self, t: &Template, params: &[(String, f64)]) -> DeviceResult<String> {
        t.render(&Vars {
            settings: &self.settings,
            params,
        })
        .map_err(|e| self.refused(format!("`{}`: {e}", t.as_str())))
    }

    fn address(&self, t: &Template, params: &[(String, f64)]) -> DeviceResult<u16> {
        let a = self.number(t, params, "register address")?;
        if a.fract() != 0.0 || !(0.0..=65535.0).contains(&a) {
            return Err(self.refused(format!("register address {a} is not 0..65535")));
        }
        Ok(a as u16)
    }

    fn encoding(&self, r: RegisterDef<'_>, link_order: WordOrder) -> DeviceResult<Encoding> {
        Ok(Encoding {
            data_type: r.data_type,
            word_order: r.word_order.unwrap_or(link_order),
            scale: match r.scale {
                Some(t) => self.number(t, &[], "scale")?,
                None => 1.0,
            },
            offset: match r.offset {
                Some(t) => self.number(t, &[], "offset")?,
                None => 0.0,
            },
        })
    }

    /// One serial exchange with the profile's error table applied: device
    /// errors worth retrying are retried, others become faults.
    async fn exchange(&self, command: &str, expect_reply: bool) -> DeviceResult<String> {
        let Link::Serial { line, config } = &self.link else {
            return Err(self.refused("a serial step on a Modbus device"));
        };
        // Borrowed, not cloned: a cloned regex starts with no cache and
        // builds one on its first match, on every exchange.
        let reply_end = match self.profile.doc.link.get_ref() {
            LinkDef::Serial(s) => s.reply_end.as_ref(),
            LinkDef::Modbus(_) => None,
        };
        let errors = &self.profile.doc.errors;
        let complete = |line: &str| {
            reply_end.as_ref().is_none_or(|p| p.0.is_match(line))
                || errors.iter().any(|e| e.get_ref().pattern.0.is_match(line))
        };
        let mut attempt = 0;
        loop {
            let lines = {
                let mut link = line.lock().await;
                link.exchange(config, command, expect_reply, &complete)
                    .await
                    .map_err(|e| self.link_error(e))?
            };
            let reply = lines.join("\n");
            let Some((message, retry)) = self.device_error(&lines) else {
                return Ok(reply);
            };
            if let Some((retries, wait)) = retry
                && attempt < retries
            {
                attempt += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(self.fault(format!("`{command}`: {message}")));
        }
    }

    /// The first reply line the error table recognises: its message, and the
    /// retry budget if the code is worth retrying.
    fn device_error(&self, lines: &[String]) -> Option<(String, Option<(u32, Duration)>)> {
        for line in lines {
            for rule in &self.profile.doc.errors {
                let rule = rule.get_ref();
                // `is_match` first: most lines are no error, and `captures`
                // allocates its slots before it searches.
                if !rule.pattern.0.is_match(line) {
                    continue;
                }
                let Some(caps) = rule.pattern.0.captures(line) else {
                    continue;
                };
                let code = caps.name("code").map(|m| m.as_str().to_string());
                let message = match code.as_deref().and_then(|c| rule.messages.get(c)) {
                    Some(m) => format!("error {}: {m}", code.as_deref().unwrap_or("")),
                    None => format!("error reply `{}`", line.trim()),
                };
                let retry = code
                    .filter(|c| rule.retry.iter().any(|r| r == c))
                    .map(|_| (rule.retries, rule.retry_wait.std()));
                return Some((message, retry));
            }
        }
        None
    }

    async fn read_registers(
        &self,
        kind: RegisterKind,
        address: u16,
        count: u16,
    ) -> DeviceResult<Vec<u16>> {
        let Link::Modbus {
            bus, unit, policy, ..
        } = &self.link
        else {
            return Err(self.refused("a Modbus step on a serial device"));
        };
        bus.read(*unit, kind, address, count, *policy)
            .await
            .map_err(|e| self.modbus_error(e))
    }

    async fn write_registers(&self, address: u16, words: &[u16]) -> DeviceResult<()> {
        let Link::Modbus {
            bus, unit, policy, ..
        } = &self.link
        else {
            return Err(self.refused("a Modbus step on a serial device"));
        };
        bus.write(*unit, address, words, *policy)
            .await
            .map_err(|e| self.modbus_error(e))
    }

    fn link_word_order(&self) -> WordOrder {
        match &self.link {
            Link::Modbus { word_order, .. } => *word_order,
            Link::Serial { .. } => WordOrder::Big,
        }
    }

    /// Reads a signal in the instrument's own unit.
    async fn read_raw(&self, name: &str) -> DeviceResult<f64> {
        let Some(sig) = self.profile.doc.signals.get(name) else {
            return Err(self.refused(format!("the profile has no signal `{name}`")));
        };
        let sig = sig.get_ref();
        let register = sig.register_def();
        let value = if let (Some(query), Some(pattern)) = (&sig.query, &sig.reply) {
            let command = self.render(query, &[])?;
            let reply = self.exchange(&command, true).await?;
            let capture = sig.capture.as_deref().unwrap_or("value");
            let number = pattern
                .0
                .captures(&reply)
                .and_then(|c| c.name(capture))
                .and_then(|m| m.as_str().trim().parse::<f64>().ok())
                .filter(|v| v.is_finite());
            let Some(raw) = number else {
                self.close_link().await;
                return Err(self.fault(format!(
                    "reply `{}` to `{command}` has no {name} reading",
                    reply.escape_debug()
                )));
            };
            let scale = match register.scale {
                Some(t) => self.number(t, &[], "scale")?,
                None => 1.0,
            };
            let offset = match register.offset {
                Some(t) => self.number(t, &[], "offset")?,
                None => 0.0,
            };
            raw * scale + offset
        } else {
            let Some(address) = register.address else {
                return Err(self.refused(format!("signal `{name}` has no query or address")));
            };
            let address = self.address(address, &[])?;
            let encoding = self.encoding(register, self.link_word_order())?;
            let n = encoding.data_type.registers();
            let (start, words) = match &sig.block {
                Some(b) => {
                    let start = self.address(&b.start, &[])?;
                    (
                        start,
                        self.read_registers(sig.register, start, b.count).await?,
                    )
                }
                None => (
                    address,
                    self.read_registers(sig.register, address, n).await?,
                ),
            };
            let at = |a: u16, len: u16| -> DeviceResult<&[u16]> {
                let from = usize::from(a.checked_sub(start).ok_or_else(|| {
                    self.refused(format!("register {a} is before the block at {start}"))
                })?);
                words.get(from..from + usize::from(len)).ok_or_else(|| {
                    self.refused(format!("register {a} is outside the block read at {start}"))
                })
            };
            if let Some(status) = &sig.status {
                let a = self.address(&status.address, &[])?;
                let e = Encoding {
                    data_type: status.data_type,
                    word_order: encoding.word_order,
                    scale: 1.0,
                    offset: 0.0,
                };
                let words = match at(a, status.data_type.registers()) {
                    Ok(w) => w.to_vec(),
                    Err(_) => {
                        self.read_registers(sig.register, a, status.data_type.registers())
                            .await?
                    }
                };
                let s = e
                    .decode(&words)
                    .map_err(|err| self.fault(err.to_string()))?;
                if s != status.ok {
                    return Err(
                        self.fault(format!("{name} measurement not valid (status {})", trim(s)))
                    );
                }
            }
            let words = at(address, n)?;
            encoding
                .decode(words)
                .map_err(|e| self.fault(format!("{name}: {e}")))?
        };
        Ok(value)
    }

    async fn close_link(&self) {
        if let Link::Serial { line, .. } = &self.link {
            line.lock().await.close();
        }
    }

    /// A profile's states as they are when the instrument connects.
    pub fn states(&self) -> BTreeMap<String, String> {
        self.state().states.clone()
    }

    /// Writes a setpoint given in canonical units, after the limit and
    /// interlock checks.
    async fn write_setpoint(&self, name: &str, canonical: f64) -> DeviceResult<()> {
        let Some(sp) = self.profile.doc.setpoints.get(name) else {
            return Err(self.refused(format!(
                "{} has no setpoint `{name}`",
                self.profile.doc.profile.name
            )));
        };
        if let Some(l) = self.profile.limits.get(name)
            && !l.contains(canonical)
        {
            return Err(self.refused(format!(
                "{name} {} is outside the instrument's limits {l}",
                Quantity::new(canonical, l.dimension)
            )));
        }
        let states = self.states();
        if let Some(refusal) = self
            .profile
            .setpoint_refusal(name, canonical, &|s| states.get(s).cloned())
        {
            return Err(self.refused(refusal));
        }
        let sp = sp.get_ref();
        let value = self.profile.to_device(name, canonical);
        let params = vec![("value".to_string(), value)];
        if let Some(command) = &sp.command {
            let text = self.render(command, &params)?;
            let reply = self.exchange(&text, true).await?;
            if let Some(expect) = &sp.expect
                && !expect.0.is_match(&reply)
            {
                self.close_link().await;
                return Err(self.fault(format!(
                    "unexpected reply `{}` to `{text}`",
                    reply.escape_debug()
                )));
            }
        } else if !sp.steps.is_empty() {
            self.run_steps(&sp.steps, &params, 0).await?;
        } else if let Some(address) = &sp.address {
            let register = sp.register_def();
            let address = self.address(address, &params)?;
            let words = self
                .encoding(register, self.link_word_order())?
                .encode(value)
                .map_err(|e| self.refused(format!("{name}: {e}")))?;
            self.write_registers(address, &words).await?;
        }
        if let Some(signal) = &sp.readback {
            let back = self.read_raw(signal.get_ref()).await?;
            let tolerance = sp.tolerance.unwrap_or(1e-6_f64.max(value.abs() * 1e-3));
            if (back - value).abs() > tolerance {
                return Err(self.fault(format!(
                    "{name} set to {} but reads back {}",
                    trim(value),
                    trim(back)
                )));
            }
        }
        self.state().targets.insert(name.to_string(), canonical);
        Ok(())
    }

    /// Runs a profile action with named parameters.
    pub async fn run_action(&self, name: &str, params: &[(String, f64)]) -> DeviceResult<()> {
        let Some(action) = self.profile.doc.actions.get(name) else {
            return Err(self.refused(format!(
                "{} has no action `{name}`",
                self.profile.doc.profile.name
            )));
        };
        let states = self.states();
        if let Some(refusal) = self
            .profile
            .action_refusal(name, &|s| states.get(s).cloned())
        {
            return Err(self.refused(refusal));
        }
        self.run_steps(&action.get_ref().steps, params, 1).await?;
        let sets = self.profile.action_sets(name);
        if !sets.is_empty() {
            self.state().states.extend(sets);
        }
        Ok(())
    }

    pub fn has_action(&self, name: &str) -> bool {
        self.profile.doc.actions.contains_key(name)
    }

    fn run_steps<'a>(
        &'a self,
        steps: &'a [toml::Spanned<StepDef>],
        params: &'a [(String, f64)],
        depth: usize,
    ) -> futures::future::BoxFuture<'a, DeviceResult<()>> {
        Box::pin(async move {
            if depth > MAX_ACTION_DEPTH {
                return Err(self.refused("actions call each other too deeply"));
            }
            for step in steps {
                self.run_step(step.get_ref(), params, depth).await?;
            }
            Ok(())
        })
    }

    async fn run_step(
        &self,
        st: &StepDef,
        params: &[(String, f64)],
        depth: usize,
    ) -> DeviceResult<()> {
        if let Some(send) = &st.send {
            let command = self.render(send, params)?;
            let reply = self.exchange(&command, st.reply != Some(false)).await?;
            if let Some(expect) = &st.expect
                && !expect.0.is_match(&reply)
            {
                self.close_link().await;
                return Err(self.fault(format!(
                    "unexpected reply `{}` to `{command}`",
                    reply.escape_debug()
                )));
            }
        } else if let Some(poll) = &st.poll {
            let command = self.render(poll, params)?;
            let every = st.every.map_or(1.0, |d| d.0).max(0.001);
            let timeout = st.timeout.map_or(DEFAULT_POLL_TIMEOUT_S, |d| d.0);
            let started = tokio::time::Instant::now();
            loop {
                let reply = self.exchange(&command, true).await?;
                if st.until.as_ref().is_none_or(|u| u.0.is_match(&reply)) {
                    break;
                }
                if started.elapsed().as_secs_f64() >= timeout {
                    return Err(DeviceError::Timeout {
                        device: self.id.clone(),
                        seconds: timeout,
                    });
                }
                tokio::time::sleep(Duration::from_secs_f64(every)).await;
            }
        } else if let Some(address) = &st.write {
            let address = self.address(address, params)?;
            let value = match &st.value {
                Some(v) => self.number(v, params, "value")?,
                None => return Err(self.refused("a write step needs a value")),
            };
            let e = Encoding {
                data_type: st.data_type.unwrap_or(DataType::U16),
                word_order: st.word_order.unwrap_or(self.link_word_order()),
                scale: 1.0,
                offset: 0.0,
            };
            let words = e.encode(value).map_err(|e| self.refused(e.to_string()))?;
            self.write_registers(address, &words).await?;
        } else if let Some(address) = &st.read {
            let address = self.address(address, params)?;
            let data_type = st.data_type.unwrap_or(DataType::U16);
            let e = Encoding {
                data_type,
                word_order: st.word_order.unwrap_or(self.link_word_order()),
                scale: 1.0,
                offset: 0.0,
            };
            let every = st.every.map_or(1.0, |d| d.0).max(0.001);
            let timeout = st.timeout.map_or(DEFAULT_POLL_TIMEOUT_S, |d| d.0);
            let started = tokio::time::Instant::now();
            loop {
                let words = self
                    .read_registers(st.register, address, data_type.registers())
                    .await?;
                let Some(equals) = &st.equals else {
                    break;
                };
                let want = self.number(equals, params, "equals")?;
                let got = e.decode(&words).map_err(|e| self.fault(e.to_string()))?;
                if (got - want).abs() < 1e-9 {
                    break;
                }
                if started.elapsed().as_secs_f64() >= timeout {
                    return Err(DeviceError::Timeout {
                        device: self.id.clone(),
                        seconds: timeout,
                    });
                }
                tokio::time::sleep(Duration::from_secs_f64(every)).await;
            }
        } else if let Some(wait) = st.wait {
            tokio::time::sleep(wait.std()).await;
        } else if let Some(hold) = st.send_break {
            let Link::Serial { line, .. } = &self.link else {
                return Err(self.refused("send_break on a Modbus device"));
            };
            line.lock()
                .await
                .send_break(hold.std())
                .await
                .map_err(|e| self.link_error(e))?;
        } else if let Some(set) = &st.set {
            let value = match &st.value {
                Some(v) => self.number(v, params, "value")?,
                None => return Err(self.refused("a set step needs a value")),
            };
            let canonical = self.profile.to_canonical(set.get_ref(), value);
            self.write_setpoint(set.get_ref(), canonical).await?;
        } else if let Some(action) = &st.action {
            let Some(a) = self.profile.doc.actions.get(action.get_ref()) else {
                return Err(self.refused(format!("no action `{}`", action.get_ref())));
            };
            self.run_steps(&a.get_ref().steps, params, depth + 1)
                .await?;
        }
        Ok(())
    }

    /// Identity and one reading, for `devices probe`.
    pub async fn identify(&self) -> DeviceResult<String> {
        let Some(step) = &self.profile.doc.identify else {
            return Ok(format!(
                "{} {}",
                self.profile.doc.profile.vendor, self.profile.doc.profile.model
            ));
        };
        let st = step.get_ref();
        if let Some(send) = &st.send {
            let command = self.render(send, &[])?;
            return self.exchange(&command, true).await;
        }
        if let Some(address) = &st.read {
            let address = self.address(address, &[])?;
            let words = self
                .read_registers(
                    st.register,
                    address,
                    st.data_type.unwrap_or(DataType::U16).registers(),
                )
                .await?;
            return Ok(format!("registers at {address}: {words:?}"));
        }
        self.run_step(st, &[], 0).await?;
        Ok(self.profile.doc.profile.model.clone())
    }

    fn liquid_handler_position(
        &self,
        labware: &str,
        well: &str,
        top: bool,
    ) -> DeviceResult<[(String, f64); 3]> {
        let deck = self
            .profile
            .doc
            .deck
            .as_ref()
            .ok_or_else(|| self.refused("the profile has no [deck]"))?;
        let state = self.state();
        let (slot, definition) = state
            .deck
            .placed(labware)
            .ok_or_else(|| self.refused(format!("{labware} is not on the deck")))?;
        let origin = deck
            .get_ref()
            .slots
            .get(&slot.to_string())
            .ok_or_else(|| self.refused(format!("the deck has no slot {slot}")))?;
        let w = definition
            .well(well)
            .ok_or_else(|| self.refused(format!("{labware} has no well {well}")))?;
        let z = origin[2] + w.z_mm + if top { w.depth_mm } else { 0.0 };
        Ok([
            ("x".to_string(), origin[0] + w.x_mm),
            ("y".to_string(), origin[1] + w.y_mm),
            ("z".to_string(), z),
        ])
    }

    /// Aspirate or dispense at a well: its position, the volume and what the tip
    /// already holds are the action's parameters.
    async fn pipette(
        &self,
        action: &str,
        labware: &str,
        well: &str,
        volume_ul: f64,
        check: impl FnOnce(&mut LiquidHandlerModel) -> Result<(), String>,
    ) -> DeviceResult<()> {
        let mut params = self.liquid_handler_position(labware, well, false)?.to_vec();
        let held = self.state().deck.tip_volume_ul().unwrap_or(0.0);
        params.push(("volume".into(), volume_ul));
        params.push(("held".into(), held));
        self.deck_operation(check, action, params).await
    }

    /// Checks an operation against the deck model, runs `action`, and keeps
    /// the model's new state only if the instrument did it.
    async fn deck_operation(
        &self,
        check: impl FnOnce(&mut LiquidHandlerModel) -> Result<(), String>,
        action: &str,
        params: Vec<(String, f64)>,
    ) -> DeviceResult<()> {
        let mut after = self.state().deck.clone();
        check(&mut after).map_err(|reason| self.refused(reason))?;
        self.run_action(action, &params).await?;
        self.state().deck = after;
        Ok(())
    }
}

#[async_trait]
impl Device for ProfileDevice {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> DeviceKind {
        self.profile.kind
    }

    async fn connect(&self) -> DeviceResult<()> {
        // After a reconnect the controller no longer knows the latch or door.
        self.state().states = self.profile.initial_states();
        if let Link::Serial { line, .. } = &self.link {
            line.lock().await.open().map_err(|e| self.link_error(e))?;
        }
        self.run_steps(&self.profile.doc.connect, &[], 0).await?;
        // The instrument must answer: identity, or its first signal.
        if self.profile.doc.identify.is_some() {
            self.identify().await?;
        } else if let Some(name) = self.profile.doc.signals.keys().next() {
            self.read_raw(name).await?;
        }
        Ok(())
    }

    async fn read(&self, signal: &str) -> DeviceResult<Quantity> {
        let raw = self.read_raw(signal).await?;
        let dimension = self
            .profile
            .kind
            .spec()
            .signal(signal)
            .map_or(crate::units::Dimension::Unitless, |s| s.dimension);
        Ok(Quantity::new(
            self.profile.to_canonical(signal, raw),
            dimension,
        ))
    }

    async fn set(&self, setpoint: &str, value: Quantity) -> DeviceResult<()> {
        self.write_setpoint(setpoint, value.value).await
    }

    async fn wait_until_reached(&self, setpoint: &str) -> DeviceResult<()> {
        let Some(target) = self.state().targets.get(setpoint).copied() else {
            return Ok(());
        };
        let sp = self.profile.doc.setpoints.get(setpoint);
        let reached = sp
            .and_then(|s| s.get_ref().reached.as_ref())
            .map(|r| r.get_ref());
        let (signal, within, poll, timeout) = match reached {
            Some(r) => (
                r.signal.get_ref().clone(),
                r.within,
                r.poll.0,
                r.timeout.map_or(DEFAULT_REACH_TIMEOUT_S, |t| t.0),
            ),
            // Without a rule, a signal of the same name within 0.5 of the target.
            None if self.profile.doc.signals.contains_key(setpoint) => {
                (setpoint.to_string(), 0.5, 1.0, DEFAULT_REACH_TIMEOUT_S)
            }
            None => return Ok(()),
        };
        let started = tokio::time::Instant::now();
        loop {
            let now = self.read(&signal).await?.value;
            if (now - target).abs() <= within {
                return Ok(());
            }
            if started.elapsed().as_secs_f64() >= timeout {
                return Err(DeviceError::Timeout {
                    device: self.id.clone(),
                    seconds: timeout,
                });
            }
            tokio::time::sleep(Duration::from_secs_f64(poll.max(0.01))).await;
        }
    }

    async fn command(&self, name: &str) -> DeviceResult<()> {
        self.run_action(name, &[]).await?;
        // A shaker or pump that stops has no speed target any more.
        let mut state = self.state();
        match name {
            "stop_shaking" => {
                state.targets.remove("speed");
                state.targets.remove("shaking");
            }
            "stop" => {
                state.targets.remove("rate");
            }
            "deactivate" => {
                state.targets.clear();
            }
            _ => {}
        }
        Ok(())
    }

    async fn safe_state(&self) -> DeviceResult<()> {
        self.run_steps(&self.profile.doc.safe_state, &[], 0).await
    }

    fn limits(&self, setpoint: &str) -> Option<Limits> {
        self.profile.limits.get(setpoint).copied()
    }

    fn slots(&self) -> u32 {
        self.profile.slots()
    }
}

#[async_trait]
impl LiquidHandler for ProfileDevice {
    fn deck_state(&self) -> crate::device::DeckState {
        crate::device::DeckState(self.state().deck.clone())
    }

    async fn restore_deck(&self, deck: crate::device::DeckState) -> DeviceResult<()> {
        self.state().deck = deck.0;
        Ok(())
    }

    async fn configure_deck(&self, deck: Vec<DeckLabware>) -> DeviceResult<()> {
        let mut model = self.state().deck.clone();
        model
            .configure(&deck)
            .map_err(|reason| self.refused(reason))?;
        self.state().deck = model;
        Ok(())
    }

    async fn pick_up_tip(&self, rack: &str, well: &str) -> DeviceResult<()> {
        let at = self.liquid_handler_position(rack, well, true)?;
        self.deck_operation(
            |m| m.pick_up_tip(rack, well).map(|_| ()),
            "pick_up_tip",
            at.to_vec(),
        )
        .await
    }

    async fn aspirate(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()> {
        self.pipette("aspirate", labware, well, volume_ul, |m| {
            m.aspirate(labware, well, volume_ul).map(|_| ())
        })
        .await
    }

    async fn dispense(&self, labware: &str, well: &str, volume_ul: f64) -> DeviceResult<()> {
        self.pipette("dispense", labware, well, volume_ul, |m| {
            m.dispense(labware, well, volume_ul).map(|_| ())
        })
        .await
    }

    async fn mix(
        &self,
        labware: &str,
        well: &str,
        volume_ul: f64,
        cycles: u32,
    ) -> DeviceResult<()> {
        if !self.has_action("mix") {
            // Mixing is aspirating and dispensing in place.
            for _ in 0..cycles {
                self.aspirate(labware, well, volume_ul).await?;
                LiquidHandler::dispense(self, labware, well, volume_ul).await?;
            }
            return Ok(());
        }
        let mut params = self.liquid_handler_position(labware, well, false)?.to_vec();
        params.push(("volume".into(), volume_ul));
        params.push(("cycles".into(), f64::from(cycles)));
        self.deck_operation(
            |m| m.mix(labware, well, volume_ul, cycles).map(|_| ()),
            "mix",
            params,
        )
        .await
    }

    async fn drop_tip(&self) -> DeviceResult<()> {
        let trash = self
            .profile
            .doc
            .deck
            .as_ref()
            .map(|d| d.get_ref().trash)
            .ok_or_else(|| self.refused("the profile has no [deck] trash"))?;
        let params = vec![
            ("x".to_string(), trash[0]),
            ("y".to_string(), trash[1]),
            ("z".to_string(), trash[2]),
        ];
        self.deck_operation(|m| m.drop_tip().map(|_| ()), "drop_tip", params)
            .await
    }

    async fn remove_labware(&self, labware: &str) -> DeviceResult<()> {
        let mut model = self.state().deck.clone();
        model.remove(labware).map_err(|r| self.refused(r))?;
        self.state().deck = model;
        Ok(())
    }

    async fn place_labware(&self, labware: DeckLabware) -> DeviceResult<()> {
        let mut model = self.state().deck.clone();
        model.place(&labware).map_err(|r| self.refused(r))?;
        self.state().deck = model;
        Ok(())
    }
}

#[async_trait]
impl Incubator for ProfileDevice {
    async fn restore_storage(&self, stored: Vec<(u32, String)>) -> DeviceResult<()> {
        self.state().stored = stored.into_iter().collect();
        Ok(())
    }

    async fn load(&self, labware: &str, slot: u32) -> DeviceResult<()> {
        if slot == 0 || slot > self.slots() {
            return Err(self.refused(format!("slot {slot} is not 1..{}", self.slots())));
        }
        if let Some(other) = self.state().stored.get(&slot) {
            return Err(self.refused(format!("slot {slot} holds {other}")));
        }
        self.run_action("load", &[("slot".into(), f64::from(slot))])
            .await?;
        self.state().stored.insert(slot, labware.to_string());
        Ok(())
    }

    async fn unload(&self, labware: &str, slot: u32) -> DeviceResult<()> {
        let slot = {
            let state = self.state();
            match (slot, state.stored.get(&slot)) {
                (0, _) => state
                    .stored
                    .iter()
                    .find(|(_, l)| l.as_str() == labware)
                    .map(|(s, _)| *s)
                    .ok_or_else(|| self.refused(format!("{labware} is not in {}", self.id)))?,
                (_, Some(held)) if held == labware => slot,
                (_, Some(held)) => {
                    return Err(self.refused(format!("slot {slot} holds {held}, not {labware}")));
                }
                (_, None) => {
                    return Err(
                        self.refused(format!("{labware} is not in slot {slot} of {}", self.id))
                    );
                }
            }
        };
        self.run_action("unload", &[("slot".into(), f64::from(slot))])
            .await?;
        self.state().stored.remove(&slot);
        Ok(())
    }
}

#[async_trait]
impl Pump for ProfileDevice {
    async fn dispense(&self, volume_ul: f64, rate_ml_min: Option<f64>) -> DeviceResult<()> {
        if !(volume_ul.is_finite() && volume_ul > 0.0) {
            return Err(self.refused(format!("invalid volume {volume_ul} uL")));
        }
        let limits = self.limits("rate");
        let rate = rate_ml_min
            .or_else(|| self.settings.get("default_rate_ml_min").copied())
            .or_else(|| limits.map(|l| l.max / 2.0))
            .unwrap_or(1.0);
        if rate <= 0.0 {
            return Err(self.refused("a dispense needs a rate above 0"));
        }
        let duration_s = volume_ul / 1000.0 / rate * 60.0;
        if self.has_action("dispense") {
            let params = vec![
                ("volume".to_string(), volume_ul),
                ("rate".to_string(), rate),
                ("duration".to_string(), duration_s),
            ];
            return self.run_action("dispense", &params).await;
        }
        self.write_setpoint("rate", rate).await?;
        self.clock.sleep(duration_s.min(1e7)).await;
        Device::command(self, "stop").await
    }
}

impl Sensor for ProfileDevice {}
impl TemperatureModule for ProfileDevice {}
impl HeaterShaker for ProfileDevice {}
