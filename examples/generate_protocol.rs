//! Writes a generated protocol to stdout, for measuring `biofoundry check` as a
//! whole process (time and peak memory; see benches/check_memory.sh).
//!
//! cargo run --release --example generate_protocol -- steps 10000 > big.toml
//! cargo run --release --example generate_protocol -- packed 10000 > packed.toml

#[path = "../benches/protocol_gen.rs"]
mod protocol_gen;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let text = match args.first().map(String::as_str) {
        Some("packed") => protocol_gen::packed_transfers(n),
        _ => protocol_gen::mixed_steps(n),
    };
    print!("{text}");
}
