//! A serial line (RS-232, RS-485, USB CDC) carrying a line-based ASCII protocol.
//!
//! One [`SerialLink`] owns a port; devices sharing an RS-485 line share the link
//! behind a mutex, which serialises their exchanges. An exchange writes one
//! command and reads reply lines until the caller's rule says the reply is
//! complete. Anything unread from before is discarded first, and a link that
//! timed out or read garbage is closed and reopened before the next exchange:
//! a late reply is never read as the answer to the next command. A port (or
//! pseudo-terminal) keeps what arrives while it is closed, so it is reopened
//! only once the device's reply time has passed again, and its input is
//! cleared then.

use super::{SerialSettings, TransportError};
use crate::profile::{FlowControl, Parity, SerialLinkDef};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("no reply within {0} s")]
    Timeout(f64),
    #[error("link down: {0}")]
    Disconnected(String),
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// The byte stream under a link: a serial port, or a pipe to an in-process simulator.
pub enum LinkStream {
    Port(SerialStream),
    Pipe(DuplexStream),
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Port(s) => Pin::new(s).poll_read(cx, buf),
            LinkStream::Pipe(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Port(s) => Pin::new(s).poll_write(cx, buf),
            LinkStream::Pipe(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Port(s) => Pin::new(s).poll_flush(cx),
            LinkStream::Pipe(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Port(s) => Pin::new(s).poll_shutdown(cx),
            LinkStream::Pipe(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens the stream of a link, again after every rebuild.
pub type PipeOpener = Arc<dyn Fn() -> io::Result<DuplexStream> + Send + Sync>;

#[derive(Clone)]
pub enum Opener {
    Port {
        path: String,
        settings: SerialSettings,
    },
    /// An in-process simulator: each call starts a fresh connection to it.
    Pipe(PipeOpener),
}

impl Opener {
    /// Opens a serial port (or a pseudo-terminal) by path with its line settings.
    pub fn open_port(path: &str, s: &SerialSettings) -> io::Result<SerialStream> {
        let builder = tokio_serial::new(path, s.baud)
            .data_bits(match s.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match s.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .stop_bits(if s.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match s.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
                FlowControl::Software => tokio_serial::FlowControl::Software,
            });
        builder.open_native_async().map_err(io::Error::from)
    }

    fn open(&self) -> io::Result<LinkStream> {
        match self {
            Opener::Port { path, settings } => {
                let port = Opener::open_port(path, settings)?;
                // Bytes left in the OS buffer from before belong to nobody.
                let _ = port.clear(tokio_serial::ClearBuffer::Input);
                Ok(LinkStream::Port(port))
            }
            Opener::Pipe(open) => open().map(LinkStream::Pipe),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Opener::Port { path, settings } => format!("{path} ({settings})"),
            Opener::Pipe(_) => "in-process simulator".into(),
        }
    }
}

/// Framing and timing of a line protocol (from the profile's `[link]`).
#[derive(Debug, Clone)]
pub struct LineConfig {
    pub send_terminator: String,
    pub reply_terminator: String,
    pub echo: bool,
    pub min_gap: Duration,
    pub reply_timeout: Duration,
}

impl LineConfig {
    pub fn of(link: &SerialLinkDef) -> LineConfig {
        LineConfig {
            send_terminator: link.send_terminator.clone(),
            reply_terminator: link.reply_terminator.clone(),
            echo: link.echo,
            min_gap: link.min_gap.std(),
            reply_timeout: link.reply_timeout.std(),
        }
    }
}

/// A reply line longer than this is garbage, not a reply.
const MAX_LINE: usize = 4096;
/// A reply of more lines than this is garbage too.
const MAX_LINES: usize = 64;
/// Unread input discarded before a command, at most (a flooding device is a fault).
const MAX_DRAIN: usize = 64 * 1024;

pub struct SerialLink {
    opener: Opener,
    stream: Option<LinkStream>,
    buffer: Vec<u8>,
    last_end: Option<Instant>,
    /// After a timeout or garbage on a port: a late reply may still come
    /// until then, so the port is not reopened before.
    quiet_at: Option<Instant>,
}

impl SerialLink {
    pub fn new(opener: Opener) -> Self {
        SerialLink {
            opener,
            stream: None,
            buffer: Vec::new(),
            last_end: None,
            quiet_at: None,
        }
    }

    pub fn describe(&self) -> String {
        self.opener.describe()
    }

    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Opens the port if it is not open.
    pub fn open(&mut self) -> Result<(), LinkError> {
        if self.stream.is_none() {
            let stream = self.opener.open().map_err(|e| {
                LinkError::Disconnected(format!("cannot open {}: {e}", self.opener.describe()))
            })?;
            self.stream = Some(stream);
            self.buffer.clear();
        }
        Ok(())
    }

    /// Closes the port; the next exchange reopens it.
    pub fn close(&mut self) {
        self.stream = None;
        self.buffer.clear();
    }

    /// Holds the line in break (Liconic's wake-up), then releases it.
    pub async fn send_break(&mut self, hold: Duration) -> Result<(), LinkError> {
        self.open()?;
        if let Some(LinkStream::Port(port)) = &self.stream {
            // A pseudo-terminal may refuse a break; the simulator does not need one.
            if port.set_break().is_ok() {
                tokio::time::sleep(hold).await;
                port.clear_break()
                    .map_err(|e| LinkError::Disconnected(format!("clear break: {e}")))?;
            }
        }
        tokio::time::sleep(hold).await;
        Ok(())
    }

    /// Writes `command` and reads reply lines until `complete` returns true for
    /// a line (or, with `expect_reply` false, reads only the echo of an
    /// echoing device). Echoed commands are dropped. Any failure closes the link.
    pub async fn exchange(
        &mut self,
        config: &LineConfig,
        command: &str,
        expect_reply: bool,
        complete: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<String>, LinkError> {
        let result = self
            .exchange_inner(config, command, expect_reply, complete)
            .await;
        self.last_end = Some(Instant::now());
        if result.is_err() {
            self.close();
        }
        // A pipe is a new connection when reopened; a port is the same line.
        if matches!(result, Err(LinkError::Timeout(_) | LinkError::Malformed(_)))
            && matches!(self.opener, Opener::Port { .. })
        {
            self.quiet_at = Some(Instant::now() + config.reply_timeout);
        }
        result
    }

    async fn exchange_inner(
        &mut self,
        config: &LineConfig,
        command: &str,
        expect_reply: bool,
        complete: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<String>, LinkError> {
        if let Some(end) = self.last_end {
            let ready = end + config.min_gap;
            let now = Instant::now();
            if ready > now {
                tokio::time::sleep(ready - now).await;
            }
        }
        if let Some(quiet) = self.quiet_at.take() {
            let now = Instant::now();
            if quiet > now {
                tokio::time::sleep(quiet - now).await;
            }
        }
        self.open()?;
        self.drain().await?;
        let stream = self.stream.as_mut().ok_or_else(|| down("closed"))?;
        let mut bytes = command.as_bytes().to_vec();
        bytes.extend_from_slice(config.send_terminator.as_bytes());
        let write = async {
            stream.write_all(&bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(config.reply_timeout, write).await {
            Err(_) => return Err(LinkError::Timeout(config.reply_timeout.as_secs_f64())),
            Ok(Err(e)) => return Err(down(&format!("write: {e}"))),
            Ok(Ok(())) => {}
        }
        if !expect_reply && !config.echo {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + config.reply_timeout;
        let mut lines = Vec::new();
        let mut echo_pending = config.echo;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.read_line(config)).await {
                Err(_) => return Err(LinkError::Timeout(config.reply_timeout.as_secs_f64())),
                Ok(r) => r?,
            };
            if echo_pending && line.trim() == command.trim() {
                echo_pending = false;
                // A command without a reply is done once echoed; an echo left
                // unread would be taken for the next command's reply.
                if !expect_reply {
                    return Ok(Vec::new());
                }
                continue;
            }
            if !expect_reply {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(LinkError::Malformed(format!(
                    "`{}` instead of the echo of `{command}`",
                    line.escape_debug()
                )));
            }
            echo_pending = false;
            if line.trim().is_empty() {
                continue;
            }
            let done = complete(&line);
            lines.push(line);
            if done {
                return Ok(lines);
            }
            if lines.len() > MAX_LINES {
                return Err(LinkError::Malformed(format!(
                    "more than {MAX_LINES} lines without the end of a reply"
                )));
            }
        }
    }

    /// Discards what the device sent before this command (late or unsolicited lines).
    async fn drain(&mut self) -> Result<(), LinkError> {
        self.buffer.clear();
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        let mut scratch = [0u8; 1024];
        let mut discarded = 0;
        loop {
            // A zero timeout still polls once: whatever is already there is read.
            match tokio::time::timeout(Duration::ZERO, stream.read(&mut scratch)).await {
                Err(_) => return Ok(()),
                Ok(Ok(0)) => return Err(down("the device closed the link")),
                Ok(Ok(n)) => {
                    discarded += n;
                    if discarded > MAX_DRAIN {
                        return Err(LinkError::Malformed(
                            "the device sends without being asked".into(),
                        ));
                    }
                }
                Ok(Err(e)) => return Err(down(&format!("read: {e}"))),
            }
        }
    }

    async fn read_line(&mut self, config: &LineConfig) -> Result<String, LinkError> {
        let terminator = config.reply_terminator.as_bytes();
        loop {
            if !terminator.is_empty()
                && let Some(i) = find(&self.buffer, terminator)
            {
                let line: Vec<u8> = self.buffer.drain(..i + terminator.len()).collect();
                let text = String::from_utf8_lossy(&line[..i]).to_string();
                return Ok(text);
            }
            if self.buffer.len() > MAX_LINE {
                return Err(LinkError::Malformed(format!(
                    "{} bytes without a line end",
                    self.buffer.len()
                )));
            }
            let stream = self.stream.as_mut().ok_or_else(|| down("closed"))?;
            let mut scratch = [0u8; 512];
            match stream.read(&mut scratch).await {
                Ok(0) => return Err(down("the device closed the link")),
                Ok(n) => self.buffer.extend_from_slice(&scratch[..n]),
                Err(e) => return Err(down(&format!("read: {e}"))),
            }
        }
    }
}

fn down(what: &str) -> LinkError {
    LinkError::Disconnected(what.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl From<TransportError> for LinkError {
    fn from(e: TransportError) -> Self {
        LinkError::Disconnected(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    fn config() -> LineConfig {
        LineConfig {
            send_terminator: "\r".into(),
            reply_terminator: "\r\n".into(),
            echo: false,
            min_gap: Duration::ZERO,
            reply_timeout: Duration::from_millis(200),
        }
    }

    /// A device on the other end of a pipe: answers `Q` with `V:<n>`, `SLOW` late,
    /// and says nothing to `MUTE`.
    fn device() -> (Opener, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
        let opener = Opener::Pipe(Arc::new(move || {
            let (a, b) = tokio::io::duplex(1024);
            tx.send(b).map_err(|_| io::Error::other("device gone"))?;
            Ok(a)
        }));
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Some(stream) = rx.recv().await {
                let (read, mut write) = tokio::io::split(stream);
                let mut lines = tokio::io::BufReader::new(read).split(b'\r');
                while let Ok(Some(line)) = lines.next_segment().await {
                    n += 1;
                    let reply = match line.as_slice() {
                        b"Q" => format!("V:{n}\r\n"),
                        b"SLOW" => {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            format!("LATE:{n}\r\n")
                        }
                        b"TWO" => "A\r\nok\r\n".to_string(),
                        _ => continue,
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        });
        (opener, task)
    }

    #[tokio::test]
    async fn a_late_reply_is_never_taken_for_the_next_one() {
        let (opener, _device) = device();
        let mut link = SerialLink::new(opener);
        let first = |_: &str| true;
        let r = link.exchange(&config(), "Q", true, &first).await.unwrap();
        assert_eq!(r, vec!["V:1"]);
        let r = link.exchange(&config(), "SLOW", true, &first).await;
        assert_eq!(r, Err(LinkError::Timeout(0.2)));
        assert!(!link.is_open(), "a timed-out link is closed");
        // The late reply went to the old connection; the new one answers afresh.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = link.exchange(&config(), "Q", true, &first).await.unwrap();
        assert!(r[0].starts_with("V:"), "{r:?}");
        let r = link.exchange(&config(), "MUTE", true, &first).await;
        assert!(matches!(r, Err(LinkError::Timeout(_))));
        let until_ok = |l: &str| l == "ok";
        let r = link
            .exchange(&config(), "TWO", true, &until_ok)
            .await
            .unwrap();
        assert_eq!(r, vec!["A", "ok"]);
    }

    #[tokio::test]
    async fn a_missing_device_is_disconnected() {
        let mut link = SerialLink::new(Opener::Port {
            path: "/nonexistent/ttyUSB9".into(),
            settings: SerialSettings {
                baud: 9600,
                data_bits: 8,
                parity: Parity::None,
                stop_bits: 1,
                flow_control: FlowControl::None,
            },
        });
        let r = link.exchange(&config(), "Q", true, &|_| true).await;
        assert!(matches!(r, Err(LinkError::Disconnected(_))), "{r:?}");
    }
}
