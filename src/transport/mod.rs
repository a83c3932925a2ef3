//! Transports: how bytes reach an instrument. A lab file names each device's
//! transport as a URL:
//!
//! - `serial:///dev/ttyUSB0?baud=19200&parity=none&stop=2`
//! - `modbus-rtu:///dev/ttyUSB1?baud=19200&stop=2&unit=3`
//! - `modbus-tcp://10.0.0.5:502?unit=1`
//! - `sim://` — the profile's simulator, in process, over an in-memory pipe
//!
//! Serial settings in the URL override the profile's. Every request is bounded
//! by a timeout, and a link that timed out or read a malformed reply is rebuilt
//! before the next request, so a late reply is never taken for the next one.

pub mod modbus;
pub mod serial;

use crate::profile::{FlowControl, LinkDef, Parity, Profile};
use std::fmt;

/// A parsed transport URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Serial {
        path: String,
        settings: SerialSettings,
    },
    ModbusRtu {
        path: String,
        settings: SerialSettings,
        unit: Option<u8>,
    },
    ModbusTcp {
        host: String,
        port: u16,
        unit: Option<u8>,
    },
    /// The profile's simulator, in process.
    Sim { unit: Option<u8> },
}

/// Line settings of a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialSettings {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
}

impl SerialSettings {
    /// The profile's serial settings (serial or Modbus RTU link).
    pub fn of(profile: &Profile) -> SerialSettings {
        match profile.doc.link.get_ref() {
            LinkDef::Serial(s) => SerialSettings {
                baud: s.baud,
                data_bits: s.data_bits,
                parity: s.parity,
                stop_bits: s.stop_bits,
                flow_control: s.flow_control,
            },
            LinkDef::Modbus(m) => SerialSettings {
                baud: m.baud,
                data_bits: m.data_bits,
                parity: m.parity,
                stop_bits: m.stop_bits,
                flow_control: FlowControl::None,
            },
        }
    }
}

impl fmt::Display for SerialSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(
            f,
            "{} {}{}{}",
            self.baud, self.data_bits, parity, self.stop_bits
        )
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// Overridable serial keys and Modbus unit in the query string.
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.pairs.iter().position(|(k, _)| k == key)?;
        Some(self.pairs.remove(i).1)
    }

    fn number<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, TransportError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| TransportError(format!("`{key}={v}` is not a valid number"))),
        }
    }

    fn serial(&mut self, base: SerialSettings) -> Result<SerialSettings, TransportError> {
        let mut s = base;
        if let Some(b) = self.number("baud")? {
            s.baud = b;
        }
        if let Some(d) = self.number::<u8>("data")? {
            if !(5..=8).contains(&d) {
                return Err(TransportError(format!("data={d}: 5 to 8 data bits")));
            }
            s.data_bits = d;
        }
        if let Some(st) = self.number::<u8>("stop")? {
            if !(1..=2).contains(&st) {
                return Err(TransportError(format!("stop={st}: 1 or 2 stop bits")));
            }
            s.stop_bits = st;
        }
        if let Some(p) = self.take("parity") {
            s.parity = match p.as_str() {
                "none" | "n" | "N" => Parity::None,
                "even" | "e" | "E" => Parity::Even,
                "odd" | "o" | "O" => Parity::Odd,
                _ => return Err(TransportError(format!("parity={p}: none, even or odd"))),
            };
        }
        if let Some(fc) = self.take("flow") {
            s.flow_control = match fc.as_str() {
                "none" => FlowControl::None,
                "hardware" | "rtscts" => FlowControl::Hardware,
                "software" | "xonxoff" => FlowControl::Software,
                _ => {
                    return Err(TransportError(format!(
                        "flow={fc}: none, hardware or software"
                    )));
                }
            };
        }
        Ok(s)
    }

    fn unit(&mut self) -> Result<Option<u8>, TransportError> {
        match self.number::<u8>("unit")? {
            Some(0) => Err(TransportError(
                "unit=0 is the broadcast address, which never answers".into(),
            )),
            u => Ok(u),
        }
    }

    fn finish(self) -> Result<(), TransportError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((k, _)) => Err(TransportError(format!(
                "unknown option `{k}` (known: baud, data, parity, stop, flow, unit)"
            ))),
        }
    }
}

impl Transport {
    /// Parses a URL; serial settings start from `base` (the profile's).
    pub fn parse(text: &str, base: SerialSettings) -> Result<Transport, TransportError> {
        let url = url::Url::parse(text).map_err(|e| {
            TransportError(format!(
                "`{text}` is not a transport URL ({e}); try serial:///dev/ttyUSB0, \
                 modbus-rtu:///dev/ttyUSB1?unit=2, modbus-tcp://10.0.0.5:502?unit=1 or sim://"
            ))
        })?;
        let mut q = Query {
            pairs: url
                .query_pairs()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let path = || {
            let p = url.path();
            if p.is_empty() || p == "/" {
                Err(TransportError(format!(
                    "`{text}` names no device path, e.g. serial:///dev/ttyUSB0"
                )))
            } else {
                Ok(p.to_string())
            }
        };
        let t = match url.scheme() {
            "serial" => Transport::Serial {
                path: path()?,
                settings: q.serial(base)?,
            },
            "modbus-rtu" => Transport::ModbusRtu {
                path: path()?,
                settings: q.serial(base)?,
                unit: q.unit()?,
            },
            "modbus-tcp" => Transport::ModbusTcp {
                host: url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| TransportError(format!("`{text}` names no host")))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: url.port().unwrap_or(502),
                unit: q.unit()?,
            },
            "sim" => Transport::Sim { unit: q.unit()? },
            other => {
                return Err(TransportError(format!(
                    "unknown transport `{other}://` (serial, modbus-rtu, modbus-tcp or sim)"
                )));
            }
        };
        q.finish()?;
        Ok(t)
    }

    pub fn is_modbus(&self) -> bool {
        matches!(
            self,
            Transport::ModbusRtu { .. } | Transport::ModbusTcp { .. }
        )
    }

    /// Devices on the same line share one owner: this is the line's name.
    pub fn bus_key(&self) -> Option<String> {
        match self {
            Transport::Serial { path, .. } | Transport::ModbusRtu { path, .. } => {
                Some(path.clone())
            }
            Transport::ModbusTcp { host, port, .. } => Some(format!("{host}:{port}")),
            Transport::Sim { .. } => None,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Serial { path, settings } => write!(f, "serial {path} ({settings})"),
            Transport::ModbusRtu {
                path,
                settings,
                unit,
            } => write!(
                f,
                "Modbus RTU {path} ({settings}) unit {}",
                unit.map_or("default".into(), |u| u.to_string())
            ),
            Transport::ModbusTcp { host, port, unit } => write!(
                f,
                "Modbus TCP {host}:{port} unit {}",
                unit.map_or("default".into(), |u| u.to_string())
            ),
            Transport::Sim { .. } => f.write_str("in-process simulator"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base() -> SerialSettings {
        SerialSettings {
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            Transport::parse(
                "serial:///dev/ttyUSB0?baud=19200&parity=none&stop=2",
                base()
            )
            .unwrap(),
            Transport::Serial {
                path: "/dev/ttyUSB0".into(),
                settings: SerialSettings {
                    baud: 19200,
                    stop_bits: 2,
                    ..base()
                }
            }
        );
        assert_eq!(
            Transport::parse("modbus-tcp://10.0.0.5:502?unit=1", base()).unwrap(),
            Transport::ModbusTcp {
                host: "10.0.0.5".into(),
                port: 502,
                unit: Some(1)
            }
        );
        let rtu =
            Transport::parse("modbus-rtu:///dev/ttyUSB1?baud=19200&stop=2&unit=3", base()).unwrap();
        assert_eq!(rtu.bus_key().as_deref(), Some("/dev/ttyUSB1"));
        assert_eq!(
            Transport::parse("sim://", base()).unwrap(),
            Transport::Sim { unit: None }
        );
        for bad in [
            "serial://",
            "ftp://x",
            "serial:///dev/x?baud=fast",
            "serial:///dev/x?colour=red",
            "modbus-rtu:///dev/x?unit=0",
            "modbus-tcp://:502",
            "no scheme",
        ] {
            assert!(Transport::parse(bad, base()).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,60}") {
            let _ = Transport::parse(&text, base());
        }
    }
}
