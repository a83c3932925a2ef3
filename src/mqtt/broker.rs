//! The embedded MQTT broker (rumqttd 0.20), for a workcell without a broker
//! of its own and for `biofoundry broker`.
//!
//! The configuration is built in code (no file): one MQTT 3.1.1 (v4) listener
//! on the given address, payloads up to 2 MiB (a command may carry a 1 MiB
//! protocol text), and limits sized for one workcell. Sessions live in memory
//! only: a broker restart loses queued messages (use mosquitto with
//! persistence where that matters, see docs/mqtt.md).
//!
//! rumqttd has no shutdown: a broker started here lives until the process
//! exits. It logs through `tracing` (and `metrics`, with no recorder
//! installed, so nowhere); it never writes to stdout. Its `info` lines are
//! noisy, so a subscriber that shows them should filter `rumqttd=warn`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// How long [`start_embedded`] waits for the broker to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest PUBLISH payload the broker accepts: what the controller may
/// send ([`crate::mqtt::link::MAX_PACKET`]), so its own broker refuses nothing.
pub const MAX_PAYLOAD_SIZE: usize = crate::mqtt::link::MAX_PACKET;

/// Why the embedded broker could not be started (or stopped running).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Something else listens on the port (another broker, a second controller).
    #[error("cannot start the MQTT broker: {addr} is already in use")]
    PortInUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The address cannot be listened on for another reason (not a local
    /// address, permission denied for a port below 1024, ...).
    #[error("cannot start the MQTT broker on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The configuration was refused (by this module or by rumqttd).
    #[error("invalid MQTT broker configuration: {0}")]
    Config(String),
    /// The threads could not be spawned.
    #[error("cannot start the MQTT broker threads: {0}")]
    Thread(#[source] io::Error),
    /// The broker did not answer an MQTT CONNECT in time.
    #[error(
        "the MQTT broker on {addr} did not accept connections within {timeout:?} (last error: {last_error})"
    )]
    NotStarted {
        addr: SocketAddr,
        timeout: Duration,
        last_error: String,
    },
    /// The broker's listener stopped (it should run until the process exits).
    #[error("the MQTT broker on {addr} stopped: {reason}")]
    Stopped { addr: SocketAddr, reason: String },
}

/// Starts rumqttd on `addr` in background threads and returns once it accepts
/// TCP connections and answers an MQTT CONNECT (bounded wait, 5 s) or an
/// error. It lives until the process exits (rumqttd has no shutdown).
pub fn start_embedded(addr: SocketAddr) -> Result<(), BrokerError> {
    spawn_broker(addr).map(|_| ())
}

/// Runs the broker for the `biofoundry broker` command: blocks forever, or
/// returns an error (could not start, or the listener stopped).
pub fn run_embedded(addr: SocketAddr) -> Result<(), BrokerError> {
    let running = spawn_broker(addr)?;
    // Only returns if rumqttd's server threads all end (they should not).
    let _ = running.thread.join();
    Err(BrokerError::Stopped {
        addr,
        reason: running
            .outcome
            .lock()
            .ok()
            .and_then(|o| o.clone())
            .unwrap_or_else(|| "the broker thread ended".to_string()),
    })
}

/// The rumqttd configuration for a listener on `addr`.
pub fn config(addr: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "v4-biofoundry".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PAYLOAD_SIZE,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 1000,
            // Per filter, held in memory: up to 8 x 8 MiB before the oldest
            // segment is dropped (a slow subscriber then skips ahead).
            max_segment_size: 8 << 20,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

struct Running {
    thread: JoinHandle<()>,
    /// Set when `Broker::start` returns (its listener is gone).
    outcome: Arc<Mutex<Option<String>>>,
}

fn spawn_broker(addr: SocketAddr) -> Result<Running, BrokerError> {
    if addr.port() == 0 {
        return Err(BrokerError::Config(
            "port 0 is not supported: give the port to listen on".to_string(),
        ));
    }
    check_port_free(addr)?;

    let outcome: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let slot = outcome.clone();
    let config = config(addr);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".to_string())
        .spawn(move || {
            // `Broker::new` spawns the router thread; `start` spawns the
            // listener threads and joins them (forever, normally).
            let mut broker = Broker::new(config);
            let message = match broker.start() {
                Ok(()) => "its listener ended (see the log for the cause)".to_string(),
                Err(e) => e.to_string(),
            };
            if let Ok(mut o) = slot.lock() {
                *o = Some(message);
            }
        })
        .map_err(BrokerError::Thread)?;

    wait_until_ready(addr, &outcome)?;
    Ok(Running { thread, outcome })
}

/// Binds (and drops) a listener so that "port in use" is a clear error here,
/// rather than an error logged by a rumqttd thread.
fn check_port_free(addr: SocketAddr) -> Result<(), BrokerError> {
    match TcpListener::bind(addr) {
        Ok(listener) => {
            drop(listener);
            Ok(())
        }
        Err(source) if source.kind() == io::ErrorKind::AddrInUse => {
            Err(BrokerError::PortInUse { addr, source })
        }
        Err(source) => Err(BrokerError::Bind { addr, source }),
    }
}

fn wait_until_ready(addr: SocketAddr, outcome: &Mutex<Option<String>>) -> Result<(), BrokerError> {
    let target = connect_address(addr);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(reason) = outcome.lock().ok().and_then(|o| o.clone()) {
            return Err(BrokerError::Stopped { addr, reason });
        }
        let error = match probe(target) {
            Ok(()) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(BrokerError::NotStarted {
                addr,
                timeout: START_TIMEOUT,
                last_error: error,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where to connect to reach a listener on `addr` (an unspecified address
/// listens on loopback too).
fn connect_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// A complete MQTT exchange (CONNECT, CONNACK, DISCONNECT), so that readiness
/// means "the router answers" and rumqttd logs no error for a bare TCP probe.
fn probe(target: SocketAddr) -> io::Result<()> {
    const CLIENT_ID: &[u8] = b"biofoundry-broker-probe";
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;

    let mut connect = vec![0x10, (10 + 2 + CLIENT_ID.len()) as u8];
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T']); // protocol name
    connect.push(0x04); // protocol level: 3.1.1
    connect.push(0x02); // flags: clean session
    connect.extend_from_slice(&[0x00, 0x0a]); // keep alive: 10 s
    connect.extend_from_slice(&(CLIENT_ID.len() as u16).to_be_bytes());
    connect.extend_from_slice(CLIENT_ID);
    stream.write_all(&connect)?;

    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[1] != 0x02 || connack[3] != 0x00 {
        return Err(io::Error::other(format!(
            "unexpected reply to CONNECT: {connack:02x?}"
        )));
    }
    stream.write_all(&[0xe0, 0x00])?; // DISCONNECT
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn port_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = start_embedded(addr).unwrap_err();
        assert!(matches!(err, BrokerError::PortInUse { .. }), "{err:?}");
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    #[test]
    fn port_zero_is_refused() {
        let err = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, BrokerError::Config(_)), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_subscribe_round_trip() {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        tokio::task::spawn_blocking(move || start_embedded(addr))
            .await
            .unwrap()
            .unwrap();

        let mut options = MqttOptions::new("broker-unit-test", "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .subscribe("bf/test/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        // A payload above rumqttd's 20 KiB default, to prove the limit is ours.
        let payload = vec![b'x'; 1 << 20];

        let received = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        client
                            .publish("bf/test/hello", QoS::AtLeastOnce, false, payload.clone())
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => return p,
                    Ok(_) => {}
                    Err(e) => panic!("MQTT client error: {e}"),
                }
            }
        })
        .await
        .expect("no round trip within 10 s");
        assert_eq!(received.topic, "bf/test/hello");
        assert_eq!(received.payload.len(), payload.len());

        // A second start on the same port is refused cleanly.
        let err = start_embedded(addr).unwrap_err();
        assert!(matches!(err, BrokerError::PortInUse { .. }), "{err:?}");
    }
}
