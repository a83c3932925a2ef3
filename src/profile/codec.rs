//! Numbers in Modbus registers: data types, word order, scale and offset.
//!
//! `value = raw × scale + offset` when reading, the inverse when writing. A
//! 32-bit value spans two registers; `big` word order sends the high word first
//! (ABCD), `little` the low word first (CDAB, as Hamilton Arc sensors do).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl DataType {
    /// Registers the type occupies.
    pub fn registers(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            _ => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::F32 => "f32",
        }
    }

    fn range(self) -> (f64, f64) {
        match self {
            DataType::U16 => (0.0, f64::from(u16::MAX)),
            DataType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
            DataType::U32 => (0.0, f64::from(u32::MAX)),
            DataType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
            DataType::F32 => (f64::from(f32::MIN), f64::from(f32::MAX)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (ABCD).
    #[default]
    Big,
    /// Low word first (CDAB).
    Little,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    #[default]
    Holding,
    Input,
}

/// How one value sits in registers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    pub data_type: DataType,
    pub word_order: WordOrder,
    pub scale: f64,
    pub offset: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("expected {expected} registers, got {got}")]
    Length { expected: usize, got: usize },
    #[error("{value} does not fit in a {data_type} register value")]
    OutOfRange { value: f64, data_type: &'static str },
    #[error("the registers hold no number (NaN or infinite)")]
    NotANumber,
}

impl Encoding {
    pub fn decode(&self, words: &[u16]) -> Result<f64, CodecError> {
        let n = usize::from(self.data_type.registers());
        if words.len() < n {
            return Err(CodecError::Length {
                expected: n,
                got: words.len(),
            });
        }
        let u32_value = || match self.word_order {
            WordOrder::Big => (u32::from(words[0]) << 16) | u32::from(words[1]),
            WordOrder::Little => (u32::from(words[1]) << 16) | u32::from(words[0]),
        };
        let raw = match self.data_type {
            DataType::U16 => f64::from(words[0]),
            DataType::I16 => f64::from(words[0] as i16),
            DataType::U32 => f64::from(u32_value()),
            DataType::I32 => f64::from(u32_value() as i32),
            DataType::F32 => f64::from(f32::from_bits(u32_value())),
        };
        let v = raw * self.scale + self.offset;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(CodecError::NotANumber)
        }
    }

    pub fn encode(&self, value: f64) -> Result<Vec<u16>, CodecError> {
        if !value.is_finite() || self.scale == 0.0 {
            return Err(CodecError::NotANumber);
        }
        let raw = (value - self.offset) / self.scale;
        let raw = if self.data_type == DataType::F32 {
            raw
        } else {
            raw.round()
        };
        let (min, max) = self.data_type.range();
        if !(min..=max).contains(&raw) {
            return Err(CodecError::OutOfRange {
                value,
                data_type: self.data_type.name(),
            });
        }
        let bits: u32 = match self.data_type {
            DataType::U16 => return Ok(vec![raw as u16]),
            DataType::I16 => return Ok(vec![(raw as i16) as u16]),
            DataType::U32 => raw as u32,
            DataType::I32 => (raw as i32) as u32,
            DataType::F32 => (raw as f32).to_bits(),
        };
        let (high, low) = ((bits >> 16) as u16, bits as u16);
        Ok(match self.word_order {
            WordOrder::Big => vec![high, low],
            WordOrder::Little => vec![low, high],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(data_type: DataType, word_order: WordOrder, scale: f64) -> Encoding {
        Encoding {
            data_type,
            word_order,
            scale,
            offset: 0.0,
        }
    }

    #[test]
    fn word_orders() {
        let big = enc(DataType::F32, WordOrder::Big, 1.0);
        let little = enc(DataType::F32, WordOrder::Little, 1.0);
        // 7.0 = 0x40E00000
        assert_eq!(big.encode(7.0).unwrap(), vec![0x40E0, 0x0000]);
        assert_eq!(little.encode(7.0).unwrap(), vec![0x0000, 0x40E0]);
        assert_eq!(little.decode(&[0x0000, 0x40E0]).unwrap(), 7.0);
    }

    #[test]
    fn scaled_integers() {
        // Eurotherm: 37.5 C with one decimal is 375.
        let e = enc(DataType::I16, WordOrder::Big, 0.1);
        assert_eq!(e.encode(37.5).unwrap(), vec![375]);
        assert!((e.decode(&[375]).unwrap() - 37.5).abs() < 1e-9);
        assert_eq!(e.decode(&[0xFFFF]).unwrap(), -0.1);
        assert!(
            enc(DataType::U16, WordOrder::Big, 1.0)
                .encode(-1.0)
                .is_err()
        );
        assert!(
            enc(DataType::U16, WordOrder::Big, 1.0)
                .encode(70_000.0)
                .is_err()
        );
        assert!(
            enc(DataType::F32, WordOrder::Big, 1.0)
                .decode(&[1])
                .is_err()
        );
        assert!(
            enc(DataType::F32, WordOrder::Big, 1.0)
                .decode(&[0x7FC0, 0])
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn round_trip(v in -30000i32..30000, little in any::<bool>(), t in 0usize..5) {
            let data_type = [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F32][t];
            let word_order = if little { WordOrder::Little } else { WordOrder::Big };
            let e = enc(data_type, word_order, 0.5);
            let value = f64::from(v) * 0.5;
            match e.encode(value) {
                Ok(words) => {
                    prop_assert_eq!(words.len(), usize::from(data_type.registers()));
                    prop_assert!((e.decode(&words).unwrap() - value).abs() < 1e-6);
                }
                Err(_) => prop_assert!(v < 0 && matches!(data_type, DataType::U16 | DataType::U32)),
            }
        }

        #[test]
        fn decode_never_panics(words in proptest::collection::vec(any::<u16>(), 0..4), t in 0usize..5) {
            let data_type = [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F32][t];
            let _ = enc(data_type, WordOrder::Little, 1.0).decode(&words);
        }
    }
}
