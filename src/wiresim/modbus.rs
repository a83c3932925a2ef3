//! The Modbus simulator, written at the frame level so it can corrupt
//! frames, answer late and stay silent: RTU (CRC-16) over a byte stream (a
//! PTY master or an in-process pipe) and Modbus TCP (MBAP) over a TCP
//! connection or a pipe. Several units share a [`ModbusBus`]; a request for a
//! unit that is not on the bus gets no reply (RS-485 multi-drop), broadcasts
//! (unit 0, RTU) are applied by every unit and answered by none.
//!
//! Function codes 3 and 4 (read holding / input registers), 6 and 16 (write
//! single / multiple registers); others get exception 01. The register map
//! of a unit is derived from its profile:
//! - every signal's registers (address, type, word order, scale and offset,
//!   which may use settings) hold the model's reading, encoded when read;
//! - a signal's `status` register holds its `ok` value;
//! - a `block` must be read whole (exception 02 otherwise), as Hamilton Arc
//!   sensors require; its registers not otherwise defined read 0;
//! - a setpoint's registers read the last value set (0 before) and a write
//!   decodes the value and sets the model (exception 03 if it refuses);
//! - `[[simulation.registers]]` hold fixed values (unit codes, identity);
//! - registers written or read by the profile's steps (a keep-alive read, a
//!   mode register) hold what was last written; a write to a register that
//!   an action's steps write also runs that action on the model (or the
//!   model's safe state, for registers only `safe_state` writes).
//!
//! Any other address is exception 02.
//!
//! RTU can be served at the speed of a real line ([`ModbusBus::pace_rtu`],
//! off by default), for measuring what a bus scheduler achieves at a baud rate.

use super::physics::Physics;
use super::{Fault, FaultHandle, PIPE_BYTES, garbage, reply_after};
use crate::profile::codec::{DataType, Encoding, RegisterKind, WordOrder};
use crate::profile::expr::{Scope, Template};
use crate::profile::{LinkDef, Profile, StepDef};
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest RTU frame (address + PDU + CRC).
pub const MAX_RTU_FRAME: usize = 256;
/// Silence that ends (and discards) an incomplete RTU frame.
pub const RTU_SILENCE: Duration = Duration::from_millis(50);

pub const ILLEGAL_FUNCTION: u8 = 0x01;
pub const ILLEGAL_ADDRESS: u8 = 0x02;
pub const ILLEGAL_VALUE: u8 = 0x03;
pub const DEVICE_FAILURE: u8 = 0x04;
pub const BUSY: u8 = 0x06;
pub const GATEWAY_NO_RESPONSE: u8 = 0x0B;

/// CRC-16/MODBUS: reflected polynomial 0xA001, initial value 0xFFFF; the low
/// byte is sent first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An RTU frame: `unit`, the PDU and the CRC.
pub fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pdu.len() + 3);
    out.push(unit);
    out.extend_from_slice(pdu);
    let crc = crc16(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A Modbus TCP frame: MBAP header (transaction, protocol 0, length, unit) and the PDU.
pub fn tcp_frame(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pdu.len() + 7);
    out.extend_from_slice(&transaction.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    let len = u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

/// What the start of a buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame of `len` bytes.
    Frame {
        unit: u8,
        transaction: u16,
        pdu: Vec<u8>,
        len: usize,
    },
    /// Not enough bytes yet.
    Incomplete,
    /// Not a frame: drop this many bytes (RTU resynchronises; TCP closes).
    Invalid(usize),
}

/// Length of an RTU request frame from its first bytes, if known yet.
fn rtu_request_len(buf: &[u8]) -> Option<Option<usize>> {
    let &function = buf.get(1)?;
    Some(match function {
        1..=6 => Some(8),
        15 | 16 => {
            let &count = buf.get(6)?;
            Some(9 + usize::from(count))
        }
        7 | 11 | 12 | 17 => Some(4),
        _ => None,
    })
}

/// Whether `buf` starts with a whole request of a known function and a good CRC.
fn known_frame_at(buf: &[u8]) -> bool {
    match rtu_request_len(buf) {
        Some(Some(len)) if len <= buf.len() => {
            crc16(&buf[..len - 2]).to_le_bytes() == buf[len - 2..len]
        }
        _ => false,
    }
}

/// Parses one RTU request at the start of `buf`.
pub fn parse_rtu(buf: &[u8]) -> Parsed {
    if buf.len() < 4 {
        return Parsed::Incomplete;
    }
    let Some(len) = rtu_request_len(buf) else {
        return Parsed::Incomplete;
    };
    let check = |len: usize| {
        let body = &buf[..len - 2];
        crc16(body).to_le_bytes() == buf[len - 2..len]
    };
    match len {
        Some(len) if buf.len() < len => Parsed::Incomplete,
        Some(len) if check(len) => Parsed::Frame {
            unit: buf[0],
            transaction: 0,
            pdu: buf[1..len - 2].to_vec(),
            len,
        },
        Some(_) => Parsed::Invalid(1),
        // An unknown function: the frame ends where a CRC matches.
        None => match (4..=buf.len().min(MAX_RTU_FRAME)).find(|&l| check(l)) {
            Some(len) => Parsed::Frame {
                unit: buf[0],
                transaction: 0,
                pdu: buf[1..len - 2].to_vec(),
                len,
            },
            None if buf.len() >= MAX_RTU_FRAME => Parsed::Invalid(1),
            // Noise before a frame: skip to the frame.
            None => match (1..buf.len()).find(|&i| known_frame_at(&buf[i..])) {
                Some(i) => Parsed::Invalid(i),
                None => Parsed::Incomplete,
            },
        },
    }
}

/// Parses one Modbus TCP frame at the start of `buf`.
pub fn parse_tcp(buf: &[u8]) -> Parsed {
    if buf.len() < 7 {
        return Parsed::Incomplete;
    }
    let transaction = u16::from_be_bytes([buf[0], buf[1]]);
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    if protocol != 0 || !(2..=254).contains(&len) {
        return Parsed::Invalid(buf.len());
    }
    if buf.len() < 6 + len {
        return Parsed::Incomplete;
    }
    Parsed::Frame {
        unit: buf[6],
        transaction,
        pdu: buf[7..6 + len].to_vec(),
        len: 6 + len,
    }
}

/// A request PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Read {
        kind: RegisterKind,
        address: u16,
        count: u16,
    },
    Write {
        address: u16,
        values: Vec<u16>,
        single: bool,
    },
}

impl Request {
    /// Decodes a PDU; `Err` is the exception code to answer with.
    pub fn parse(pdu: &[u8]) -> Result<Request, u8> {
        let word = |i: usize| -> Result<u16, u8> {
            match pdu.get(i..i + 2) {
                Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
                None => Err(ILLEGAL_VALUE),
            }
        };
        let function = *pdu.first().ok_or(ILLEGAL_FUNCTION)?;
        match function {
            3 | 4 => {
                let (address, count) = (word(1)?, word(3)?);
                if !(1..=125).contains(&count) || pdu.len() != 5 {
                    return Err(ILLEGAL_VALUE);
                }
                let kind = if function == 3 {
                    RegisterKind::Holding
                } else {
                    RegisterKind::Input
                };
                Ok(Request::Read {
                    kind,
                    address,
                    count,
                })
            }
            6 => {
                if pdu.len() != 5 {
                    return Err(ILLEGAL_VALUE);
                }
                Ok(Request::Write {
                    address: word(1)?,
                    values: vec![word(3)?],
                    single: true,
                })
            }
            16 => {
                let (address, count) = (word(1)?, word(3)?);
                let bytes = usize::from(*pdu.get(5).ok_or(ILLEGAL_VALUE)?);
                if !(1..=123).contains(&count)
                    || bytes != 2 * usize::from(count)
                    || pdu.len() != 6 + bytes
                {
                    return Err(ILLEGAL_VALUE);
                }
                let values = (0..usize::from(count))
                    .map(|i| word(6 + 2 * i))
                    .collect::<Result<Vec<u16>, u8>>()?;
                Ok(Request::Write {
                    address,
                    values,
                    single: false,
                })
            }
            _ => Err(ILLEGAL_FUNCTION),
        }
    }
}

fn exception(function: u8, code: u8) -> Vec<u8> {
    vec![function | 0x80, code]
}

#[derive(Debug, Clone)]
enum Source {
    Signal(String),
    Setpoint(String),
    Constant(f64),
}

#[derive(Debug, Clone)]
struct ValueReg {
    kind: RegisterKind,
    address: u16,
    encoding: Encoding,
    source: Source,
}

impl ValueReg {
    fn span(&self) -> std::ops::Range<u32> {
        let a = u32::from(self.address);
        a..a + u32::from(self.encoding.data_type.registers())
    }
}

/// A register: its kind (0 holding, 1 input) and address.
type Key = (u8, u16);

fn key(kind: RegisterKind, address: u16) -> Key {
    (u8::from(kind == RegisterKind::Input), address)
}

/// A unit's registers, derived from its profile.
#[derive(Debug, Default)]
struct RegisterMap {
    values: Vec<ValueReg>,
    blocks: Vec<(RegisterKind, u16, u16)>,
    fixed: HashMap<Key, u16>,
    /// Registers the profile's steps read or write.
    known: HashSet<Key>,
    /// A write here runs a model command: the action's name, and the word
    /// the action writes when it is a constant (other words do not run it).
    commands: HashMap<Key, Vec<(String, Option<u16>)>>,
}

struct Settings<'a>(&'a IndexMap<String, f64>);

impl Scope for Settings<'_> {
    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

fn address(t: &Template, settings: &IndexMap<String, f64>) -> Option<u16> {
    let v = t.number(&Settings(settings)).ok()?;
    (v.fract() == 0.0 && (0.0..=65535.0).contains(&v)).then_some(v as u16)
}

fn number(t: Option<&Template>, settings: &IndexMap<String, f64>, default: f64) -> f64 {
    t.and_then(|t| t.number(&Settings(settings)).ok())
        .unwrap_or(default)
}

fn put_words(map: &mut HashMap<Key, u16>, kind: RegisterKind, address: u16, words: &[u16]) {
    for (i, w) in words.iter().enumerate() {
        if let Some(a) = address.checked_add(i as u16) {
            map.insert(key(kind, a), *w);
        }
    }
}

impl RegisterMap {
    fn derive(profile: &Profile, settings: &IndexMap<String, f64>) -> RegisterMap {
        let mut map = RegisterMap::default();
        let default_order = match profile.doc.link.get_ref() {
            LinkDef::Modbus(m) => m.word_order,
            LinkDef::Serial(_) => WordOrder::Big,
        };
        let defs = profile
            .doc
            .signals
            .iter()
            .map(|(n, s)| (Source::Signal(n.clone()), s.get_ref().register_def()))
            .chain(
                profile
                    .doc
                    .setpoints
                    .iter()
                    .map(|(n, s)| (Source::Setpoint(n.clone()), s.get_ref().register_def())),
            );
        for (source, def) in defs {
            let Some(a) = def.address.and_then(|t| address(t, settings)) else {
                continue;
            };
            let encoding = Encoding {
                data_type: def.data_type,
                word_order: def.word_order.unwrap_or(default_order),
                scale: number(def.scale, settings, 1.0),
                offset: number(def.offset, settings, 0.0),
            };
            // A setpoint at a signal's address is the same register, written.
            if let Source::Setpoint(_) = source {
                map.values
                    .retain(|v| !(v.kind == def.register && v.address == a));
            }
            map.values.push(ValueReg {
                kind: def.register,
                address: a,
                encoding,
                source,
            });
        }
        for sig in profile.doc.signals.values() {
            let sig = sig.get_ref();
            if let Some(b) = &sig.block
                && let Some(start) = address(&b.start, settings)
            {
                map.blocks.push((sig.register, start, b.count));
            }
            if let Some(st) = &sig.status
                && let Some(a) = address(&st.address, settings)
            {
                map.values.push(ValueReg {
                    kind: sig.register,
                    address: a,
                    encoding: Encoding {
                        data_type: st.data_type,
                        word_order: sig.word_order.unwrap_or(default_order),
                        scale: 1.0,
                        offset: 0.0,
                    },
                    source: Source::Constant(st.ok),
                });
            }
        }
        if let Some(sim) = &profile.doc.simulation {
            for r in &sim.get_ref().registers {
                let e = Encoding {
                    data_type: r.data_type,
                    word_order: r.word_order,
                    scale: 1.0,
                    offset: 0.0,
                };
                match e.encode(r.value) {
                    Ok(words) => {
                        put_words(&mut map.fixed, RegisterKind::Holding, r.address, &words);
                        put_words(&mut map.fixed, RegisterKind::Input, r.address, &words);
                    }
                    Err(err) => tracing::warn!(
                        "{}: fixed register {} cannot hold {}: {err}",
                        profile.id,
                        r.address,
                        r.value
                    ),
                }
            }
        }
        // A setpoint written by steps: the step whose value uses `value` is the
        // setpoint's register. Its template is linear in `value` (raw = a v + b),
        // so it is inverted from two evaluations.
        for (name, sp) in &profile.doc.setpoints {
            for step in &sp.get_ref().steps {
                let step = step.get_ref();
                let (Some(w), Some(v)) = (&step.write, &step.value) else {
                    continue;
                };
                if !v.names().contains("value") {
                    continue;
                }
                let Some(a) = address(w, settings) else {
                    continue;
                };
                let at = |x: f64| {
                    let mut scope = settings.clone();
                    scope.insert("value".into(), x);
                    v.number(&Settings(&scope)).ok()
                };
                let (Some(b), Some(b1)) = (at(0.0), at(1.0)) else {
                    continue;
                };
                let slope = b1 - b;
                if slope == 0.0 || !slope.is_finite() {
                    continue;
                }
                map.values.push(ValueReg {
                    kind: step.register,
                    address: a,
                    encoding: Encoding {
                        data_type: step.data_type.unwrap_or(DataType::U16),
                        word_order: step.word_order.unwrap_or(default_order),
                        scale: 1.0 / slope,
                        offset: -b / slope,
                    },
                    source: Source::Setpoint(name.clone()),
                });
            }
        }
        let doc = &profile.doc;
        let mut sequences: Vec<(Option<&str>, &StepDef)> = Vec::new();
        for (name, action) in &doc.actions {
            for s in &action.get_ref().steps {
                sequences.push((Some(name.as_str()), s.get_ref()));
            }
        }
        for s in &doc.safe_state {
            sequences.push((Some("safe_state"), s.get_ref()));
        }
        for s in doc.connect.iter().chain(doc.identify.iter()) {
            sequences.push((None, s.get_ref()));
        }
        for sp in doc.setpoints.values() {
            for s in &sp.get_ref().steps {
                sequences.push((None, s.get_ref()));
            }
        }
        for (action, step) in sequences {
            let n = step.data_type.unwrap_or(DataType::U16).registers();
            for (t, writes) in [(step.write.as_ref(), true), (step.read.as_ref(), false)] {
                let Some(a) = t.and_then(|t| address(t, settings)) else {
                    continue;
                };
                for i in 0..n {
                    if let Some(a) = a.checked_add(i) {
                        map.known.insert(key(step.register, a));
                    }
                }
                let is_setpoint = map.values.iter().any(|v| {
                    matches!(v.source, Source::Setpoint(_))
                        && v.kind == step.register
                        && v.span().contains(&u32::from(a))
                });
                if writes
                    && !is_setpoint
                    && let Some(action) = action
                {
                    let data_type = step.data_type.unwrap_or(DataType::U16);
                    let word = step
                        .value
                        .as_ref()
                        .and_then(|v| v.number(&Settings(settings)).ok())
                        .and_then(|v| {
                            Encoding {
                                data_type,
                                word_order: step.word_order.unwrap_or(default_order),
                                scale: 1.0,
                                offset: 0.0,
                            }
                            .encode(v)
                            .ok()
                        })
                        .and_then(|w| w.first().copied());
                    let entry = map.commands.entry(key(step.register, a)).or_default();
                    if !entry.iter().any(|(n, _)| n == action) {
                        entry.push((action.to_string(), word));
                    }
                }
            }
        }
        map
    }

    /// The block a read of `[start, end)` overlaps without covering, if any.
    fn cuts_block(&self, kind: RegisterKind, start: u32, end: u32) -> bool {
        self.blocks.iter().any(|&(k, s, c)| {
            let (s, e) = (u32::from(s), u32::from(s) + u32::from(c));
            k == kind && start < e && s < end && !(start <= s && e <= end)
        })
    }

    fn in_block(&self, kind: RegisterKind, a: u32) -> bool {
        self.blocks
            .iter()
            .any(|&(k, s, c)| k == kind && (u32::from(s)..u32::from(s) + u32::from(c)).contains(&a))
    }
}

/// One simulated Modbus instrument.
pub struct ModbusUnit {
    profile: Arc<Profile>,
    physics: Arc<dyn Physics>,
    faults: FaultHandle,
    map: RegisterMap,
    stored: Mutex<HashMap<Key, u16>>,
    reply_delay: Duration,
}

impl ModbusUnit {
    pub fn new(
        profile: Arc<Profile>,
        physics: Arc<dyn Physics>,
        settings_overrides: IndexMap<String, f64>,
    ) -> Self {
        let mut settings = profile.doc.settings.clone();
        settings.extend(settings_overrides);
        let map = RegisterMap::derive(&profile, &settings);
        let reply_delay = profile
            .doc
            .simulation
            .as_ref()
            .map_or(Duration::ZERO, |s| s.get_ref().reply_delay.std());
        ModbusUnit {
            profile,
            physics,
            faults: FaultHandle::new(),
            map,
            stored: Mutex::new(HashMap::new()),
            reply_delay,
        }
    }

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

    /// The unit id the profile names (`link.unit`).
    pub fn default_unit(&self) -> u8 {
        match self.profile.doc.link.get_ref() {
            LinkDef::Modbus(m) => m.unit,
            LinkDef::Serial(_) => 1,
        }
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u16>> {
        self.stored.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn value_words(&self, v: &ValueReg) -> Result<Vec<u16>, u8> {
        let device_value = match &v.source {
            Source::Constant(c) => *c,
            Source::Signal(name) => {
                let canonical = self.physics.read(name).await.map_err(|e| {
                    tracing::debug!("simulated {}: {name}: {e}", self.profile.id);
                    DEVICE_FAILURE
                })?;
                self.profile.to_device(name, canonical)
            }
            Source::Setpoint(name) => self
                .profile
                .to_device(name, self.physics.target(name).unwrap_or(0.0)),
        };
        v.encoding.encode(device_value).map_err(|_| DEVICE_FAILURE)
    }

    /// Registers `address..address+count`; `Err` is an exception code.
    pub async fn read(&self, kind: RegisterKind, address: u16, count: u16) -> Result<Vec<u16>, u8> {
        let (start, end) = (u32::from(address), u32::from(address) + u32::from(count));
        if end > 0x1_0000 {
            return Err(ILLEGAL_ADDRESS);
        }
        if self.map.cuts_block(kind, start, end) {
            return Err(ILLEGAL_ADDRESS);
        }
        let stored = self.stored().clone();
        let mut words = Vec::with_capacity(usize::from(count));
        for a in start..end {
            let key = key(kind, a as u16);
            let defined = self.map.in_block(kind, a)
                || self.map.fixed.contains_key(&key)
                || self.map.known.contains(&key)
                || stored.contains_key(&key)
                || self
                    .map
                    .values
                    .iter()
                    .any(|v| v.kind == kind && v.span().contains(&a));
            if !defined {
                return Err(ILLEGAL_ADDRESS);
            }
            words.push(
                stored
                    .get(&key)
                    .or_else(|| self.map.fixed.get(&key))
                    .copied()
                    .unwrap_or(0),
            );
        }
        for v in &self.map.values {
            let span = v.span();
            if v.kind != kind || span.end <= start || span.start >= end {
                continue;
            }
            let encoded = self.value_words(v).await?;
            for (i, w) in encoded.iter().enumerate() {
                let a = span.start + i as u32;
                if (start..end).contains(&a) {
                    words[(a - start) as usize] = *w;
                }
            }
        }
        Ok(words)
    }

    /// Writes holding registers; `Err` is an exception code.
    pub async fn write(&self, address: u16, values: &[u16]) -> Result<(), u8> {
        let kind = RegisterKind::Holding;
        let (start, end) = (u32::from(address), u32::from(address) + values.len() as u32);
        if end > 0x1_0000 {
            return Err(ILLEGAL_ADDRESS);
        }
        let setpoints: Vec<&ValueReg> = self
            .map
            .values
            .iter()
            .filter(|v| {
                v.kind == kind
                    && matches!(v.source, Source::Setpoint(_))
                    && v.span().start < end
                    && start < v.span().end
            })
            .collect();
        for a in start..end {
            let key = key(kind, a as u16);
            let writable = self.map.known.contains(&key)
                || self.map.fixed.contains_key(&key)
                || setpoints.iter().any(|v| v.span().contains(&a));
            if !writable {
                return Err(ILLEGAL_ADDRESS);
            }
        }
        for v in &setpoints {
            let span = v.span();
            if span.start < start || span.end > end {
                // Half of a 32-bit value.
                return Err(ILLEGAL_VALUE);
            }
            let Source::Setpoint(name) = &v.source else {
                continue;
            };
            let words = &values[(span.start - start) as usize..(span.end - start) as usize];
            let device_value = v.encoding.decode(words).map_err(|_| ILLEGAL_VALUE)?;
            let canonical = self.profile.to_canonical(name, device_value);
            self.physics.set(name, canonical).await.map_err(|e| {
                tracing::debug!("simulated {}: set {name}: {e}", self.profile.id);
                ILLEGAL_VALUE
            })?;
        }
        {
            let mut stored = self.stored();
            for (i, w) in values.iter().enumerate() {
                let a = (start + i as u32) as u16;
                let on_setpoint = setpoints.iter().any(|v| v.span().contains(&u32::from(a)));
                if !on_setpoint {
                    stored.insert(key(kind, a), *w);
                }
            }
        }
        let mut run: Vec<&String> = Vec::new();
        for (i, a) in (start..end).enumerate() {
            for (c, word) in self
                .map
                .commands
                .get(&key(kind, a as u16))
                .into_iter()
                .flatten()
            {
                if word.is_none_or(|w| w == values[i]) && !run.contains(&c) {
                    run.push(c);
                }
            }
        }
        for c in run {
            if let Err(e) = self.physics.command(c, &[]).await {
                tracing::debug!("simulated {}: {c}: {e}", self.profile.id);
            }
        }
        Ok(())
    }

    /// The answer PDU to a request PDU (no faults, no delay).
    pub async fn answer_pdu(&self, pdu: &[u8]) -> Vec<u8> {
        let function = pdu.first().copied().unwrap_or(0);
        let request = match Request::parse(pdu) {
            Ok(r) => r,
            Err(code) => return exception(function, code),
        };
        match request {
            Request::Read {
                kind,
                address,
                count,
            } => match self.read(kind, address, count).await {
                Ok(words) => {
                    let mut out = vec![function, (words.len() * 2) as u8];
                    for w in words {
                        out.extend_from_slice(&w.to_be_bytes());
                    }
                    out
                }
                Err(code) => exception(function, code),
            },
            Request::Write {
                address,
                values,
                single,
            } => match self.write(address, &values).await {
                Ok(()) if single => pdu.to_vec(),
                Ok(()) => {
                    let mut out = vec![function];
                    out.extend_from_slice(&address.to_be_bytes());
                    out.extend_from_slice(&(values.len() as u16).to_be_bytes());
                    out
                }
                Err(code) => exception(function, code),
            },
        }
    }
}

/// What goes back on the wire for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Silent,
    Pdu(Vec<u8>),
    /// Bytes that are not a frame.
    Garbage(Vec<u8>),
    /// This PDU, in a broken frame (bad CRC, wrong MBAP length).
    Corrupt(Vec<u8>),
}

/// The timing of a real RS-485 line at a baud rate, for serving RTU as slowly
/// as the line would carry it (see [`ModbusBus::pace_rtu`]). A PTY or a pipe
/// carries bytes as fast as they are written, whatever the baud rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinePacing {
    /// Bits per second (at least 1).
    pub baud: u32,
    /// Bits per character on the wire: start + data + parity + stop bits
    /// (11 for 8E1 or 8N2, 10 for 8N1).
    pub bits_per_char: u32,
}

impl LinePacing {
    pub fn new(baud: u32, bits_per_char: u32) -> Self {
        LinePacing {
            baud: baud.max(1),
            bits_per_char: bits_per_char.max(1),
        }
    }

    /// Time one character takes on the wire.
    pub fn char_time(&self) -> Duration {
        self.frame_time(1)
    }

    /// Time `chars` characters take on the wire, back to back.
    pub fn frame_time(&self, chars: usize) -> Duration {
        let bits = chars as u128 * u128::from(self.bits_per_char);
        let nanos = bits * 1_000_000_000 / u128::from(self.baud.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The silence that ends a frame, t3.5: 3.5 character times, and a fixed
    /// 1.75 ms above 19200 baud (Modbus over serial line v1.02, 2.5.1.1).
    pub fn t35(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            self.frame_time(7) / 2
        }
    }

    /// Wire time of one request/reply exchange: both frames, each followed
    /// by t3.5 of silence.
    pub fn exchange_time(&self, request: usize, reply: usize) -> Duration {
        self.frame_time(request + reply) + 2 * self.t35()
    }
}

/// Writes `bytes` no faster than the line carries them: byte `i` not before
/// `start` + (i + 1) character times. Bytes already due are written together
/// (tokio's timers tick in milliseconds), so lateness does not add up.
/// Returns when the last byte would have left the wire.
async fn write_paced<S>(
    stream: &mut S,
    bytes: &[u8],
    pacing: LinePacing,
    start: Instant,
) -> io::Result<Instant>
where
    S: AsyncWrite + Unpin,
{
    let mut sent = 0;
    while sent < bytes.len() {
        let elapsed = Instant::now().saturating_duration_since(start);
        let char_ns = pacing.char_time().as_nanos().max(1);
        let due = usize::try_from(elapsed.as_nanos() / char_ns)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        if due > sent {
            stream.write_all(&bytes[sent..due]).await?;
            stream.flush().await?;
            sent = due;
        } else {
            tokio::time::sleep_until(start + pacing.frame_time(sent + 1)).await;
        }
    }
    Ok(start + pacing.frame_time(bytes.len()))
}

/// The units on one RS-485 line (or behind one Modbus TCP server).
pub struct ModbusBus {
    units: IndexMap<u8, Arc<ModbusUnit>>,
    faults: FaultHandle,
    shutdown: CancellationToken,
    requests: AtomicU64,
    /// RTU served at a line's speed; `None` (the default): as fast as written.
    pacing: Option<LinePacing>,
}

impl Default for ModbusBus {
    fn default() -> Self {
        ModbusBus::new()
    }
}

impl ModbusBus {
    pub fn new() -> Self {
        ModbusBus {
            units: IndexMap::new(),
            faults: FaultHandle::new(),
            shutdown: CancellationToken::new(),
            requests: AtomicU64::new(0),
            pacing: None,
        }
    }

    /// Serves RTU at the speed of a real line (off by default; Modbus TCP is
    /// never paced). A request counts as on the wire from its first byte's
    /// arrival, or from when the line is quiet again if that is later; the
    /// bus answers t3.5 after the request's last byte would have arrived
    /// (plus the unit's reply delay), writes the reply one character time
    /// per byte, and the line is quiet again t3.5 after the reply. One
    /// exchange of an `n`-byte request and an `m`-byte reply thus takes
    /// [`LinePacing::exchange_time`]`(n, m)` at least.
    pub fn pace_rtu(&mut self, pacing: Option<LinePacing>) {
        self.pacing = pacing;
    }

    pub fn rtu_pacing(&self) -> Option<LinePacing> {
        self.pacing
    }

    /// Puts a unit on the bus at `unit_id` (replacing one already there).
    pub fn add(&mut self, unit_id: u8, unit: ModbusUnit) -> Arc<ModbusUnit> {
        let unit = Arc::new(unit);
        self.units.insert(unit_id, unit.clone());
        unit
    }

    pub fn unit(&self, unit_id: u8) -> Option<&Arc<ModbusUnit>> {
        self.units.get(&unit_id)
    }

    /// Faults of the whole line: a disconnect unplugs the adapter (or the TCP
    /// server); other faults apply to the next requests, whatever their unit.
    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }

    /// Ends every connection this bus serves.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Answers a request PDU for `unit_id`, after the unit's reply delay and
    /// any injected fault. `tcp`: an unknown unit gets exception 0B (gateway
    /// target failed to respond) and unit 0 or 255 reaches a lone unit; on
    /// RTU an unknown unit is silent and unit 0 is a broadcast.
    pub async fn answer(&self, unit_id: u8, pdu: &[u8], tcp: bool) -> Answer {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if !tcp && unit_id == 0 {
            if matches!(pdu.first(), Some(6 | 16)) {
                for u in self.units.values() {
                    let _ = u.answer_pdu(pdu).await;
                }
            }
            return Answer::Silent;
        }
        let unit = match self.units.get(&unit_id) {
            Some(u) => u,
            None if tcp && (unit_id == 0 || unit_id == 255) && self.units.len() == 1 => {
                match self.units.get_index(0) {
                    Some((_, u)) => u,
                    None => return Answer::Silent,
                }
            }
            None if tcp => {
                let function = pdu.first().copied().unwrap_or(0);
                return Answer::Pdu(exception(function, GATEWAY_NO_RESPONSE));
            }
            None => return Answer::Silent,
        };
        if unit.faults.is_offline() {
            return Answer::Silent;
        }
        let function = pdu.first().copied().unwrap_or(0);
        let fault = self.faults.take().or_else(|| unit.faults.take());
        let mut delay = unit.reply_delay;
        let answer = match fault {
            None => Answer::Pdu(unit.answer_pdu(pdu).await),
            Some(Fault::Slow(extra)) => {
                delay += extra;
                Answer::Pdu(unit.answer_pdu(pdu).await)
            }
            Some(Fault::NoReply | Fault::Disconnect(_)) => return Answer::Silent,
            Some(Fault::Garbage) => Answer::Garbage(garbage(n)),
            Some(Fault::Corrupt) => Answer::Corrupt(unit.answer_pdu(pdu).await),
            Some(Fault::Exception(code)) => Answer::Pdu(exception(function, code)),
            Some(Fault::Busy) => Answer::Pdu(exception(function, BUSY)),
        };
        reply_after(delay).await;
        answer
    }

    /// A new in-process Modbus TCP connection (for `sim://`), usable with
    /// `tokio_modbus::client::tcp::attach`. Refused while the bus is unplugged.
    pub fn connect(self: &Arc<Self>) -> io::Result<DuplexStream> {
        self.connect_framed(false)
    }

    /// A new in-process connection speaking RTU framing.
    pub fn connect_rtu(self: &Arc<Self>) -> io::Result<DuplexStream> {
        self.connect_framed(true)
    }

    fn connect_framed(self: &Arc<Self>, rtu: bool) -> io::Result<DuplexStream> {
        if self.faults.is_offline() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the simulated bus is unplugged",
            ));
        }
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let me = self.clone();
        let cancel = self.shutdown.child_token();
        let disconnects = self.faults.disconnects();
        tokio::spawn(async move {
            let _ = if rtu {
                me.serve_rtu_until(ours, cancel, disconnects).await
            } else {
                me.serve_tcp_until(ours, cancel, disconnects).await
            };
        });
        Ok(theirs)
    }

    /// Serves RTU frames from `stream` until it closes, `cancel` fires or the
    /// bus is unplugged. Bytes that are not a frame are skipped one at a time
    /// until a frame's CRC matches; an incomplete frame is dropped after
    /// [`RTU_SILENCE`] of silence. Replies are written at once, or at the
    /// line's speed after [`ModbusBus::pace_rtu`].
    pub async fn serve_rtu<S>(&self, stream: S, cancel: CancellationToken) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.serve_rtu_until(stream, cancel, self.faults.disconnects())
            .await
    }

    /// [`ModbusBus::serve_rtu`], ending at the next change of `disconnects`.
    pub(crate) async fn serve_rtu_until<S>(
        &self,
        mut stream: S,
        cancel: CancellationToken,
        mut disconnects: watch::Receiver<u64>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf: Vec<u8> = Vec::new();
        let mut scratch = [0u8; 512];
        // Pacing: when the bytes now in `buf` started to arrive, and when the
        // line is quiet again after the last reply.
        let mut first_byte: Option<Instant> = None;
        let mut line_free = Instant::now();
        loop {
            if buf.is_empty() {
                first_byte = None;
            }
            let read = async {
                if buf.is_empty() {
                    Some(stream.read(&mut scratch).await)
                } else {
                    tokio::time::timeout(RTU_SILENCE, stream.read(&mut scratch))
                        .await
                        .ok()
                }
            };
            let n = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = disconnects.changed() => return Ok(()),
                r = read => r,
            };
            match n {
                None => {
                    buf.clear();
                    continue;
                }
                Some(r) => {
                    let n = r?;
                    if n == 0 {
                        return Ok(());
                    }
                    first_byte.get_or_insert_with(Instant::now);
                    buf.extend_from_slice(&scratch[..n]);
                }
            }
            loop {
                match parse_rtu(&buf) {
                    Parsed::Incomplete => break,
                    Parsed::Invalid(skip) => {
                        buf.drain(..skip.min(buf.len()));
                    }
                    Parsed::Frame { unit, pdu, len, .. } => {
                        buf.drain(..len);
                        // Paced: the unit hears the end of the request t3.5
                        // after its last byte would have arrived.
                        let heard = self.pacing.map(|p| {
                            let start = first_byte.unwrap_or_else(Instant::now).max(line_free);
                            (p, start + p.frame_time(len) + p.t35())
                        });
                        let (answer, took) = tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = disconnects.changed() => return Ok(()),
                            a = async {
                                if let Some((_, at)) = heard {
                                    tokio::time::sleep_until(at).await;
                                }
                                let asked = Instant::now();
                                let answer = self.answer(unit, &pdu, false).await;
                                (answer, asked.elapsed())
                            } => a,
                        };
                        let bytes = match answer {
                            Answer::Silent => {
                                if let Some((_, at)) = heard {
                                    line_free = at;
                                }
                                continue;
                            }
                            Answer::Pdu(p) => rtu_frame(unit, &p),
                            Answer::Garbage(g) => g,
                            Answer::Corrupt(p) => {
                                let mut f = rtu_frame(unit, &p);
                                if let Some(last) = f.last_mut() {
                                    *last ^= 0x5A;
                                }
                                f
                            }
                        };
                        match heard {
                            Some((pacing, at)) => {
                                // From when the reply is due on the line, not
                                // from when the timer fired: lateness of
                                // tokio's millisecond timers does not add up.
                                let start = at + took;
                                let end = tokio::select! {
                                    _ = cancel.cancelled() => return Ok(()),
                                    _ = disconnects.changed() => return Ok(()),
                                    r = write_paced(&mut stream, &bytes, pacing, start) => r?,
                                };
                                line_free = end + pacing.t35();
                            }
                            None => {
                                stream.write_all(&bytes).await?;
                                stream.flush().await?;
                            }
                        }
                    }
                }
            }
            if buf.len() > 4 * MAX_RTU_FRAME {
                buf.clear();
            }
        }
    }

    /// Serves Modbus TCP frames from `stream` until it closes, `cancel`
    /// fires, the bus is unplugged or a frame header is invalid.
    pub async fn serve_tcp<S>(&self, stream: S, cancel: CancellationToken) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.serve_tcp_until(stream, cancel, self.faults.disconnects())
            .await
    }

    /// [`ModbusBus::serve_tcp`], ending at the next change of `disconnects`.
    pub(crate) async fn serve_tcp_until<S>(
        &self,
        mut stream: S,
        cancel: CancellationToken,
        mut disconnects: watch::Receiver<u64>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf: Vec<u8> = Vec::new();
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
            buf.extend_from_slice(&scratch[..n]);
            loop {
                match parse_tcp(&buf) {
                    Parsed::Incomplete => break,
                    Parsed::Invalid(_) => return Ok(()),
                    Parsed::Frame {
                        unit,
                        transaction,
                        pdu,
                        len,
                    } => {
                        buf.drain(..len);
                        let answer = tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = disconnects.changed() => return Ok(()),
                            a = self.answer(unit, &pdu, true) => a,
                        };
                        let bytes = match answer {
                            Answer::Silent => continue,
                            Answer::Pdu(p) => tcp_frame(transaction, unit, &p),
                            Answer::Garbage(g) => g,
                            Answer::Corrupt(p) => {
                                let mut f = tcp_frame(transaction, unit, &p);
                                // A length one byte longer than what follows.
                                if let Some(l) = f.get_mut(5) {
                                    *l = l.wrapping_add(1);
                                }
                                f
                            }
                        };
                        stream.write_all(&bytes).await?;
                        stream.flush().await?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::DeviceKind;
    use crate::clock::Clock;
    use crate::sim::{SimOptions, SimTiming};
    use crate::source::SourceFile;
    use crate::wiresim::Times;
    use crate::wiresim::physics::DevicePhysics;
    use proptest::prelude::*;

    #[test]
    fn crc_vectors() {
        // Read holding registers 0..1 of unit 1: 01 03 00 00 00 01 84 0A.
        assert_eq!(
            rtu_frame(1, &[3, 0, 0, 0, 1]),
            [1, 3, 0, 0, 0, 1, 0x84, 0x0A]
        );
        // 11 03 00 6B 00 03 76 87 (Modbus over serial line guide, 6.1).
        assert_eq!(crc16(&[0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]), 0x8776);
        assert_eq!(crc16(b"123456789"), 0x4B37);
        assert_eq!(crc16(&[]), 0xFFFF);
    }

    #[test]
    fn rtu_frames_parse_resync_and_wait() {
        let f = rtu_frame(2, &[3, 0x08, 0x29, 0, 10]);
        assert_eq!(
            parse_rtu(&f),
            Parsed::Frame {
                unit: 2,
                transaction: 0,
                pdu: vec![3, 0x08, 0x29, 0, 10],
                len: 8
            }
        );
        assert_eq!(parse_rtu(&f[..5]), Parsed::Incomplete);
        let mut bad = f.clone();
        bad[7] ^= 1;
        assert_eq!(parse_rtu(&bad), Parsed::Invalid(1));
        let w = rtu_frame(1, &[16, 0, 2, 0, 2, 4, 0, 1, 0, 2]);
        assert_eq!(w.len(), 13);
        assert!(matches!(parse_rtu(&w), Parsed::Frame { len: 13, .. }));
        assert_eq!(parse_rtu(&w[..8]), Parsed::Incomplete);
        // An unknown function ends where the CRC matches.
        let odd = rtu_frame(1, &[0x2B, 0x0E, 1, 0]);
        assert!(matches!(parse_rtu(&odd), Parsed::Frame { len: 7, .. }));
    }

    #[test]
    fn tcp_frames_parse() {
        let f = tcp_frame(7, 1, &[3, 0, 1, 0, 1]);
        assert_eq!(f, [0, 7, 0, 0, 0, 6, 1, 3, 0, 1, 0, 1]);
        assert!(matches!(
            parse_tcp(&f),
            Parsed::Frame {
                transaction: 7,
                unit: 1,
                len: 12,
                ..
            }
        ));
        assert_eq!(parse_tcp(&f[..9]), Parsed::Incomplete);
        assert!(matches!(
            parse_tcp(&[0, 1, 0, 9, 0, 6, 1, 3]),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse_tcp(&[0, 1, 0, 0, 0xFF, 0xFF, 1, 3]),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn request_pdus() {
        assert_eq!(
            Request::parse(&[4, 0, 1, 0, 2]),
            Ok(Request::Read {
                kind: RegisterKind::Input,
                address: 1,
                count: 2
            })
        );
        assert_eq!(Request::parse(&[3, 0, 1, 0, 0]), Err(ILLEGAL_VALUE));
        assert_eq!(Request::parse(&[3, 0, 1, 0, 126]), Err(ILLEGAL_VALUE));
        assert_eq!(Request::parse(&[3, 0, 1]), Err(ILLEGAL_VALUE));
        assert_eq!(
            Request::parse(&[16, 0, 1, 0, 2, 3, 0, 0, 0]),
            Err(ILLEGAL_VALUE)
        );
        assert_eq!(Request::parse(&[43, 14]), Err(ILLEGAL_FUNCTION));
        assert_eq!(Request::parse(&[]), Err(ILLEGAL_FUNCTION));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_rtu(&bytes);
            let _ = parse_tcp(&bytes);
            let _ = Request::parse(&bytes);
            if let Parsed::Frame { len, .. } = parse_rtu(&bytes) {
                prop_assert!(len <= bytes.len());
            }
            if let Parsed::Frame { len, .. } = parse_tcp(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }
    }

    proptest! {
        #[test]
        fn random_pdus_get_an_answer_or_an_exception(
            pdu in proptest::collection::vec(any::<u8>(), 0..260),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let answer = rt.block_on(async {
                let tc = unit(CONTROLLER, DeviceKind::TemperatureModule, Clock::new(1.0));
                tc.answer_pdu(&pdu).await
            });
            prop_assert!(!answer.is_empty());
            prop_assert!(answer.len() <= 253);
        }
    }

    const SENSOR: &str = r#"
format = "biofoundry.profile/1"
[profile]
name = "pH"
vendor = "V"
model = "M"
kind = "sensor"
source = "test"
[link]
type = "modbus"
word_order = "little"
[signals.ph]
address = 2091
type = "f32"
block = { start = 2089, count = 10 }
status = { address = 2093, type = "u32", ok = 0 }
[simulation]
registers = [{ address = 2089, type = "u32", word_order = "little", value = 4096 }]
"#;

    const CONTROLLER: &str = r#"
format = "biofoundry.profile/1"
[profile]
name = "TC"
vendor = "V"
model = "M"
kind = "temperature_module"
source = "test"
[link]
type = "modbus"
[settings]
channel = 1
[signals.temperature]
unit = "C"
address = "{channel}"
type = "i16"
scale = 0.1
[setpoints.temperature]
unit = "C"
limits = "4..95 C"
address = 2
type = "i16"
scale = 0.1
[actions.deactivate]
steps = [{ write = 273, value = 1 }]
"#;

    fn unit(text: &str, kind: DeviceKind, clock: Clock) -> ModbusUnit {
        let (p, d) = crate::profile::parse(SourceFile::new("t.toml", text));
        assert!(d.is_empty(), "{d:?}");
        let physics = DevicePhysics::for_kind(
            kind,
            "dev",
            clock,
            SimOptions {
                seed: 1,
                timing: SimTiming::Realistic,
            },
        );
        ModbusUnit::new(Arc::new(p.unwrap()), Arc::new(physics), IndexMap::new())
    }

    #[tokio::test(start_paused = true)]
    async fn register_maps_come_from_profiles() {
        let clock = Clock::new(1.0);
        let ph = unit(SENSOR, DeviceKind::Sensor, clock);
        let words = ph.read(RegisterKind::Holding, 2089, 10).await.unwrap();
        assert_eq!(&words[..2], &[4096, 0]);
        let value = Encoding {
            data_type: DataType::F32,
            word_order: WordOrder::Little,
            scale: 1.0,
            offset: 0.0,
        }
        .decode(&words[2..4])
        .unwrap();
        assert!((value - 7.0).abs() < 0.05, "{value}");
        assert_eq!(&words[4..6], &[0, 0]);
        // Only the whole block may be read.
        assert_eq!(
            ph.read(RegisterKind::Holding, 2091, 2).await,
            Err(ILLEGAL_ADDRESS)
        );
        assert_eq!(
            ph.read(RegisterKind::Holding, 2089, 11).await,
            Err(ILLEGAL_ADDRESS)
        );
        assert_eq!(
            ph.read(RegisterKind::Holding, 0, 1).await,
            Err(ILLEGAL_ADDRESS)
        );
        assert_eq!(ph.write(2091, &[0, 0]).await, Err(ILLEGAL_ADDRESS));

        let tc = unit(CONTROLLER, DeviceKind::TemperatureModule, clock);
        let pv = tc.read(RegisterKind::Holding, 1, 1).await.unwrap()[0];
        assert!((215..=225).contains(&pv), "{pv}");
        assert_eq!(tc.read(RegisterKind::Holding, 1, 2).await.unwrap()[1], 0);
        tc.write(2, &[370]).await.unwrap();
        assert_eq!(tc.read(RegisterKind::Holding, 2, 1).await.unwrap(), [370]);
        assert_eq!(tc.write(2, &[990]).await, Err(ILLEGAL_VALUE));
        assert_eq!(
            tc.read(RegisterKind::Input, 1, 1).await,
            Err(ILLEGAL_ADDRESS)
        );
        tc.write(273, &[1]).await.unwrap();
        assert_eq!(tc.read(RegisterKind::Holding, 273, 1).await.unwrap(), [1]);
    }

    #[test]
    fn line_pacing_times() {
        let p = LinePacing::new(19_200, 11);
        assert_eq!(p.char_time(), Duration::from_nanos(572_916));
        // t3.5 is 3.5 characters up to 19200 baud and 1.75 ms above.
        assert_eq!(p.t35(), Duration::from_nanos(2_005_208));
        assert_eq!(
            LinePacing::new(115_200, 11).t35(),
            Duration::from_micros(1750)
        );
        // A 10-register read: 8-byte request, 25-byte reply, 22.9 ms with
        // the gaps (as in the Modbus timing table of the reference notes).
        let ms = p.exchange_time(8, 25).as_secs_f64() * 1e3;
        assert!((ms - 22.9).abs() < 0.05, "{ms}");
        assert_eq!(LinePacing::new(0, 0), LinePacing::new(1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn paced_rtu_takes_the_line_time() {
        let request = rtu_frame(4, &[3, 0x08, 0x29, 0, 10]);
        let mut bus = ModbusBus::new();
        bus.add(4, unit(SENSOR, DeviceKind::Sensor, Clock::new(1.0)));
        // Off by default: the reply comes at once.
        assert_eq!(bus.rtu_pacing(), None);
        let bus = Arc::new(bus);
        let mut s = bus.connect_rtu().unwrap();
        let t0 = Instant::now();
        exchange(&mut s, &request, 25).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);

        let mut bus = ModbusBus::new();
        bus.add(4, unit(SENSOR, DeviceKind::Sensor, Clock::new(1.0)));
        let line = LinePacing::new(19_200, 11);
        bus.pace_rtu(Some(line));
        let bus = Arc::new(bus);
        let mut s = bus.connect_rtu().unwrap();
        let slack = Duration::from_millis(2);
        let t0 = Instant::now();
        s.write_all(&request).await.unwrap();
        // The request's 8 bytes and t3.5 pass before the first reply byte,
        // and the reply comes a few bytes at a time.
        let mut reply = vec![0u8; 25];
        let n = s.read(&mut reply).await.unwrap();
        let first = line.frame_time(8) + line.t35() + line.char_time();
        assert!(n < 25, "{n} bytes at once");
        assert!(
            (first..first + slack).contains(&t0.elapsed()),
            "{:?}",
            t0.elapsed()
        );
        s.read_exact(&mut reply[n..]).await.unwrap();
        let end = line.frame_time(8 + 25) + line.t35();
        assert!(
            (end..end + slack).contains(&t0.elapsed()),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(reply[..3], [4, 3, 20]);
        assert_eq!(crc16(&reply[..23]).to_le_bytes(), reply[23..]);
        // A request sent at once waits for t3.5 of silence after the reply:
        // each exchange takes the whole wire time.
        let r = exchange(&mut s, &request, 25).await;
        assert_eq!(crc16(&r[..23]).to_le_bytes(), r[23..]);
        let end = line.exchange_time(8, 25) + line.frame_time(8 + 25) + line.t35();
        assert!(
            (end..end + slack).contains(&t0.elapsed()),
            "{:?}",
            t0.elapsed()
        );
    }

    async fn exchange(s: &mut DuplexStream, frame: &[u8], reply_len: usize) -> Vec<u8> {
        s.write_all(frame).await.unwrap();
        let mut out = vec![0u8; reply_len];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut out))
            .await
            .expect("a reply")
            .unwrap();
        out
    }

    async fn silent(s: &mut DuplexStream) -> bool {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_bus_answers_its_units_only_with_faults() {
        let clock = Clock::new(1.0);
        let mut bus = ModbusBus::new();
        bus.add(3, unit(CONTROLLER, DeviceKind::TemperatureModule, clock));
        let ph = bus.add(4, unit(SENSOR, DeviceKind::Sensor, clock));
        let bus = Arc::new(bus);
        let mut s = bus.connect_rtu().unwrap();
        // Garbage before a frame is skipped.
        let mut req = vec![0xFF, 0x00, 0x13];
        req.extend(rtu_frame(3, &[6, 0, 2, 1, 114]));
        let r = exchange(&mut s, &req, 8).await;
        assert_eq!(r, rtu_frame(3, &[6, 0, 2, 1, 114]));
        // Unit 9 is not on the bus.
        s.write_all(&rtu_frame(9, &[3, 0, 1, 0, 1])).await.unwrap();
        assert!(silent(&mut s).await);
        // Exception 02 for an unknown register.
        let r = exchange(&mut s, &rtu_frame(3, &[3, 0, 9, 0, 1]), 5).await;
        assert_eq!(r, rtu_frame(3, &[0x83, 2]));
        // Faults of one unit.
        ph.faults().inject(Fault::Busy, Times::Next(1));
        let r = exchange(&mut s, &rtu_frame(4, &[3, 0x08, 0x29, 0, 10]), 5).await;
        assert_eq!(r, rtu_frame(4, &[0x83, 6]));
        ph.faults().inject(Fault::Corrupt, Times::Next(1));
        let r = exchange(&mut s, &rtu_frame(4, &[3, 0x08, 0x29, 0, 10]), 25).await;
        assert_ne!(crc16(&r[..23]).to_le_bytes(), r[23..]);
        ph.faults().inject(Fault::NoReply, Times::Next(1));
        s.write_all(&rtu_frame(4, &[3, 0x08, 0x29, 0, 10]))
            .await
            .unwrap();
        assert!(silent(&mut s).await);
        let r = exchange(&mut s, &rtu_frame(4, &[3, 0x08, 0x29, 0, 10]), 25).await;
        assert_eq!(r[..3], [4, 3, 20]);
        assert_eq!(crc16(&r[..23]).to_le_bytes(), r[23..]);

        // Modbus TCP, and a bus-wide disconnect.
        let mut t = bus.connect().unwrap();
        let r = exchange(&mut t, &tcp_frame(9, 3, &[3, 0, 2, 0, 1]), 11).await;
        assert_eq!(r, tcp_frame(9, 3, &[3, 2, 1, 114]));
        let r = exchange(&mut t, &tcp_frame(10, 7, &[3, 0, 2, 0, 1]), 9).await;
        assert_eq!(r, tcp_frame(10, 7, &[0x83, 0x0B]));
        bus.faults()
            .inject(Fault::Disconnect(Duration::from_secs(3)), Times::Next(1));
        let mut b = [0u8; 4];
        assert_eq!(t.read(&mut b).await.unwrap(), 0);
        assert!(bus.connect().is_err());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(bus.connect().is_ok());
    }
}
