//! MQTT for MES (docs/mqtt.md): the topic tree, the durable outbox, the link
//! to the broker, commands from MES and the embedded broker.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod command;
pub mod link;
pub mod outbox;
pub mod publisher;
pub mod sink;
pub mod topics;

use crate::lab::LabFile;
use link::{BrokerSettings, Incoming, Link};
use publisher::Publisher;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The outbox keeps at most this many messages unless the lab file says otherwise.
pub const DEFAULT_OUTBOX_LIMIT: u64 = 1_000_000;

/// A lab's MQTT side, running: the publisher every sink writes to, the link,
/// and the commands from MES.
pub struct Mqtt {
    pub publisher: Publisher,
    pub link: Link,
    pub commands: mpsc::Receiver<Incoming>,
    /// The shared key commands must be signed with, when the lab sets one.
    pub command_key: Option<Vec<u8>>,
    pub settings: BrokerSettings,
    /// Where the embedded broker listens, when this controller started one.
    pub embedded: Option<std::net::SocketAddr>,
}

/// A password file holds one line; a cap keeps a wrong path (a log, a device
/// file) from being read into memory whole.
const MAX_PASSWORD_FILE_BYTES: u64 = 64 * 1024;

/// The password in a `password_file`: its text without the final line break.
/// Errors name the file, never its content.
fn read_password(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("cannot read {shown}: not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_PASSWORD_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if text.len() as u64 > MAX_PASSWORD_FILE_BYTES {
        return Err(format!(
            "password file {shown} is too large (more than {MAX_PASSWORD_FILE_BYTES} bytes); \
             it should hold just the password"
        ));
    }
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// How a lab file's `[mqtt]` table is read. Without the table, an embedded
/// broker on 127.0.0.1:1883 (when `allow_embedded`), else no MQTT.
pub fn broker_settings(
    lab: &LabFile,
    allow_embedded: bool,
) -> Result<Option<(BrokerSettings, bool)>, String> {
    let controller = &lab.doc.controller;
    let Some(m) = lab.doc.mqtt.as_ref().map(|m| m.get_ref()) else {
        if !allow_embedded {
            return Ok(None);
        }
        return Ok(Some((
            BrokerSettings {
                host: "127.0.0.1".into(),
                port: 1883,
                client_id: controller.id.get_ref().clone(),
                credentials: None,
                tls: None,
                keep_alive: Duration::from_secs(5),
            },
            true,
        )));
    };
    let credentials = match (&m.username, &m.password_file) {
        (Some(user), Some(file)) => Some((user.clone(), read_password(&lab.base.join(file))?)),
        (Some(user), None) => Some((user.clone(), String::new())),
        (None, Some(_)) => return Err("[mqtt] password_file needs a username".into()),
        (None, None) => None,
    };
    let tls = if m.tls {
        let ca = m.ca_file.as_ref().map(|f| lab.base.join(f));
        Some(Arc::new(link::tls_config(ca.as_deref())?))
    } else {
        None
    };
    Ok(Some((
        BrokerSettings {
            host: m.host.clone(),
            port: m.port,
            client_id: m
                .client_id
                .clone()
                .unwrap_or_else(|| controller.id.get_ref().clone()),
            credentials,
            tls,
            keep_alive: m.keep_alive.map_or(Duration::from_secs(5), |d| {
                Duration::from_secs_f64(d.0.max(1.0))
            }),
        },
        m.embedded,
    )))
}

/// Opens the lab's outbox, starts the embedded broker if the lab asks for one
/// (or has no `[mqtt]` and `allow_embedded`), and starts the link.
/// Returns None when the lab has no MQTT.
pub fn start(lab: &LabFile, allow_embedded: bool) -> Result<Option<Mqtt>, String> {
    let Some((settings, embedded)) = broker_settings(lab, allow_embedded)? else {
        return Ok(None);
    };
    let controller = &lab.doc.controller;
    let embedded_at = if embedded {
        let addr: std::net::SocketAddr = format!("{}:{}", settings.host, settings.port)
            .parse()
            .map_err(|_| {
                format!(
                    "[mqtt] embedded needs an IP address as host, not `{}`",
                    settings.host
                )
            })?;
        start_embedded(addr)?;
        Some(addr)
    } else {
        None
    };
    let command_key = match lab
        .doc
        .mqtt
        .as_ref()
        .and_then(|m| m.get_ref().command_key_file.clone())
    {
        Some(file) => Some(command::load_command_key(&lab.base.join(file))?),
        None => None,
    };
    let limit = lab
        .doc
        .mqtt
        .as_ref()
        .and_then(|m| m.get_ref().outbox_limit)
        .unwrap_or(DEFAULT_OUTBOX_LIMIT);
    let topics = topics::Topics::new(
        topics::PREFIX,
        controller.site.get_ref(),
        controller.cell.get_ref(),
        controller.id.get_ref(),
    );
    let (publisher, reader, wake) =
        Publisher::open(&link::outbox_path(&lab.data_dir()), limit, topics.clone())
            .map_err(|e| e.to_string())?;
    let (commands_tx, commands) = mpsc::channel(1024);
    let link = Link::start(&settings, topics, reader, wake, commands_tx);
    Ok(Some(Mqtt {
        publisher,
        link,
        commands,
        command_key,
        settings,
        embedded: embedded_at,
    }))
}

#[cfg(feature = "embedded-broker")]
fn start_embedded(addr: std::net::SocketAddr) -> Result<(), String> {
    broker::start_embedded(addr).map_err(|e| format!("embedded broker on {addr}: {e}"))
}

#[cfg(not(feature = "embedded-broker"))]
fn start_embedded(addr: std::net::SocketAddr) -> Result<(), String> {
    Err(format!(
        "the lab asks for an embedded broker on {addr}, but this build has no `embedded-broker` feature"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_is_read_bounded_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2-secret\r\n").unwrap();
        assert_eq!(read_password(&path).unwrap(), "hunter2-secret");
        std::fs::write(&path, "hunter2-secret".repeat(10_000)).unwrap();
        let e = read_password(&path).unwrap_err();
        assert!(e.contains("too large") && !e.contains("hunter2"), "{e}");
        std::fs::write(&path, b"hunter2-\xff").unwrap();
        let e = read_password(&path).unwrap_err();
        assert!(e.contains("pw") && !e.contains("hunter2"), "{e}");
        let e = read_password(dir.path()).unwrap_err();
        assert!(e.ends_with("not a regular file"), "{e}");
        assert!(read_password(&dir.path().join("missing")).is_err());
    }
}
