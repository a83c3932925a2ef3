//! Any bytes as Modbus RTU and TCP frames (the simulator's parsers), as a
//! request PDU, and as register contents decoded with every data type and
//! word order (the driver's decoding).
#![no_main]

use biofoundry::profile::codec::{DataType, Encoding, WordOrder};
use biofoundry::wiresim::modbus::{Request, parse_rtu, parse_tcp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_rtu(data);
    let _ = parse_tcp(data);
    let _ = Request::parse(data);
    let words: Vec<u16> = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    for data_type in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F32] {
        for word_order in [WordOrder::Big, WordOrder::Little] {
            let e = Encoding { data_type, word_order, scale: 0.1, offset: -3.0 };
            if let Ok(v) = e.decode(&words) {
                let _ = e.encode(v);
            }
        }
    }
});
