//! A serial line (RS-232, RS-485, USB CDC) carrying a line-based ASCII protocol.
//!
//! One [`SerialLink`] owns a port; devices sharing an RS-485 line share the link
//! behind a mutex, which serialises their exchanges. An exchange writes one
//! command and reads reply lines until the caller's rule says the reply is
//! complete. Anything unread from before is discarded first, and a link that
//! timed out, read garbage or had its exchange given up by the caller (the
//! future dropped) is closed and reopened before the next exchange: a late
//! reply is never read as the answer to the next command. A port (or
//! pseudo-terminal) keeps what arrives while it is closed, so it is reopened
//! only once the device's reply time has passed again, and its input is
//! cleared then.
//!
//! Nothing here waits on a timer it does not need (tokio's timers tick in
//! whole milliseconds, which would cap a link at about a thousand exchanges
//! a second) or blocks the runtime's thread: commands are not flushed with
//! tcdrain(3); the time they take on the wire is added to the reply time
//! instead.

use super::{SerialSettings, TransportError};
use crate::profile::{FlowControl, Parity, SerialLinkDef};
use futures::FutureExt;
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

    /// How long `bytes` take on the line once handed to the port (none on a
    /// pipe): start bit, data bits, parity bit and stop bits a character.
    pub fn wire_time(&self, bytes: usize) -> Duration {
        match self {
            Opener::Port { settings, .. } => {
                let bits = 1
                    + u32::from(settings.data_bits)
                    + u32::from(settings.parity != Parity::None)
                    + u32::from(settings.stop_bits);
                Duration::from_secs_f64(
                    bytes as f64 * f64::from(bits) / f64::from(settings.baud.max(1)),
                )
            }
            Opener::Pipe(_) => Duration::ZERO,
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
    /// When the last command has left the wire (the port's OS buffer may
    /// still hold it after the write returns).
    sent_until: Option<Instant>,
    /// After a timeout or garbage on a port: a late reply may still come
    /// until then, so the port is not reopened before.
    quiet_at: Option<Instant>,
    /// An exchange is under way; still set at the next one when the caller
    /// gave it up (dropped its future) before it ended.
    in_flight: bool,
}

impl SerialLink {
    pub fn new(opener: Opener) -> Self {
        SerialLink {
            opener,
            stream: None,
            buffer: Vec::new(),
            last_end: None,
            sent_until: None,
            quiet_at: None,
            in_flight: false,
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
        if std::mem::replace(&mut self.in_flight, true) {
            // The last exchange was given up before it ended: its reply may
            // still come, so the link is rebuilt as after a timeout.
            self.close();
            self.sent_until = None;
            if matches!(self.opener, Opener::Port { .. }) {
                self.quiet_at = Some(Instant::now() + config.reply_timeout);
            }
        }
        let result = self
            .exchange_inner(config, command, expect_reply, complete)
            .await;
        self.in_flight = false;
        // The gap to the next command counts from when this one has left the
        // wire, for a command without a reply too.
        let now = Instant::now();
        self.last_end = Some(self.sent_until.take().map_or(now, |t| t.max(now)));
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
        // Without a gap there is nothing to wait for: the port sends its
        // bytes in order, after the last command's.
        if let Some(end) = self.last_end
            && !config.min_gap.is_zero()
        {
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
        self.drain()?;
        let stream = self.stream.as_mut().ok_or_else(|| down("closed"))?;
        let mut bytes = Vec::with_capacity(command.len() + config.send_terminator.len());
        bytes.extend_from_slice(command.as_bytes());
        bytes.extend_from_slice(config.send_terminator.as_bytes());
        // No `flush`: on a port it is tcdrain(3), which blocks the runtime's
        // thread until the bytes are on the wire (with flow control held
        // off, for ever). The time they take there is added instead.
        // One timer for the exchange, set for the write, then for the reply.
        let timed_out = || LinkError::Timeout(config.reply_timeout.as_secs_f64());
        let timer = tokio::time::sleep(config.reply_timeout);
        tokio::pin!(timer);
        tokio::select! {
            biased;
            r = stream.write_all(&bytes) => r.map_err(|e| down(&format!("write: {e}")))?,
            () = &mut timer => return Err(timed_out()),
        }
        let on_wire = self.opener.wire_time(bytes.len());
        self.sent_until = Some(Instant::now() + on_wire);
        if !expect_reply && !config.echo {
            return Ok(Vec::new());
        }
        // The reply time counts from when the command has left the wire.
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + on_wire + config.reply_timeout);
        let mut lines = Vec::new();
        let mut echo_pending = config.echo;
        loop {
            let line = tokio::select! {
                biased;
                r = self.read_line(config) => r?,
                () = &mut timer => return Err(timed_out()),
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

    /// Discards what the device sent before this command (late or unsolicited
    /// lines): whatever has arrived by now. It reads without waiting and sets
    /// no timer: tokio's timers tick in whole milliseconds, so even a zero
    /// timeout would hold every command up to the next tick.
    fn drain(&mut self) -> Result<(), LinkError> {
        self.buffer.clear();
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        let mut scratch = [0u8; 1024];
        let mut discarded = 0;
        loop {
            let read = match stream {
                LinkStream::Pipe(pipe) => match pipe.read(&mut scratch).now_or_never() {
                    Some(r) => r,
                    None => return Ok(()),
                },
                // When tokio believes the port readable, a read through it:
                // finding nothing, it learns that the port is not, and the
                // reply's first read waits without a futile read of its own.
                LinkStream::Port(port) if port.readable().now_or_never().is_some() => {
                    match port.read(&mut scratch).now_or_never() {
                        Some(r) => r,
                        None => return Ok(()),
                    }
                }
                // Otherwise from the OS buffer directly: tokio's readiness
                // lags behind bytes its reactor has not seen yet.
                LinkStream::Port(port) => match port.try_read(&mut scratch) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    r => r,
                },
            };
            match read {
                Ok(0) => return Err(down("the device closed the link")),
                Ok(n) => {
                    discarded += n;
                    if discarded > MAX_DRAIN {
                        return Err(LinkError::Malformed(
                            "the device sends without being asked".into(),
                        ));
                    }
                }
                Err(e) => return Err(down(&format!("read: {e}"))),
            }
        }
    }

    async fn read_line(&mut self, config: &LineConfig) -> Result<String, LinkError> {
        let terminator = config.reply_terminator.as_bytes();
        loop {
            if !terminator.is_empty()
                && let Some(i) = find(&self.buffer, terminator)
            {
                let text = String::from_utf8_lossy(&self.buffer[..i]).into_owned();
                self.buffer.drain(..i + terminator.len());
                return Ok(text);
            }
            if self.buffer.len() > MAX_LINE {
                return Err(LinkError::Malformed(format!(
                    "{} bytes without a line end",
                    self.buffer.len()
                )));
            }
            let stream = self.stream.as_mut().ok_or_else(|| down("closed"))?;
            // Straight into the buffer's spare room (no copy, no zeroing).
            self.buffer.reserve(512);
            match stream.read_buf(&mut self.buffer).await {
                Ok(0) => return Err(down("the device closed the link")),
                Ok(_) => {}
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
    async fn an_exchange_given_up_never_lends_its_reply() {
        // Each connection on its own: `SLOW` is answered late, `Q` at once.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
        let opener = Opener::Pipe(Arc::new(move || {
            let (a, b) = tokio::io::duplex(1024);
            tx.send(b).map_err(|_| io::Error::other("device gone"))?;
            Ok(a)
        }));
        tokio::spawn(async move {
            while let Some(stream) = rx.recv().await {
                tokio::spawn(async move {
                    let (read, mut write) = tokio::io::split(stream);
                    let mut lines = tokio::io::BufReader::new(read).split(b'\r');
                    while let Ok(Some(line)) = lines.next_segment().await {
                        let reply = match line.as_slice() {
                            b"SLOW" => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                "LATE\r\n"
                            }
                            b"Q" => "V\r\n",
                            _ => continue,
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut link = SerialLink::new(opener);
        let first = |_: &str| true;
        let config = config();
        // The caller gives up long before the reply (its own timeout).
        let slow = link.exchange(&config, "SLOW", true, &first);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), slow)
                .await
                .is_err()
        );
        // At once: the late reply comes after this command has been sent.
        let r = link.exchange(&config, "Q", true, &first).await;
        assert_eq!(r, Ok(vec!["V".to_string()]));
    }

    /// Plays the device on `device`: unsolicited lines first, then, once the
    /// link has sent `Q`, the answer. The link must read only the answer.
    async fn unread_input_is_discarded(
        mut link: SerialLink,
        mut device: impl AsyncRead + AsyncWrite + Unpin,
    ) {
        link.open().unwrap();
        device.write_all(b"NOISE\r\nok\r\n").await.unwrap();
        // Let the bytes reach the link's side (and tokio's reactor, or not).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let answer = async {
            let mut command = Vec::new();
            while !command.ends_with(b"\r") {
                let mut b = [0u8; 16];
                let n = device.read(&mut b).await.unwrap();
                command.extend_from_slice(&b[..n]);
            }
            assert_eq!(command, b"Q\r");
            device.write_all(b"V:1\r\n").await.unwrap();
            device
        };
        let first_v = |l: &str| l.starts_with('V');
        let config = config();
        let exchange = link.exchange(&config, "Q", true, &first_v);
        let (r, _device) = tokio::join!(exchange, answer);
        assert_eq!(r.unwrap(), vec!["V:1"]);
    }

    #[tokio::test]
    async fn unread_input_on_a_pipe_is_discarded_before_a_command() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let theirs = std::sync::Mutex::new(Some(theirs));
        let opener = Opener::Pipe(Arc::new(move || {
            theirs
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| io::Error::other("once"))
        }));
        unread_input_is_discarded(SerialLink::new(opener), ours).await;
    }

    #[tokio::test]
    async fn unread_input_on_a_port_is_discarded_before_a_command() {
        let (master, slave) = SerialStream::pair().unwrap();
        let link = SerialLink::new(Opener::Port {
            path: slave.name().unwrap(),
            settings: SerialSettings {
                baud: 9600,
                data_bits: 8,
                parity: Parity::None,
                stop_bits: 1,
                flow_control: FlowControl::None,
            },
        });
        unread_input_is_discarded(link, master).await;
        drop(slave);
    }

    #[test]
    fn commands_take_their_wire_time() {
        let port = |baud, parity, stop_bits| Opener::Port {
            path: "/dev/null".into(),
            settings: SerialSettings {
                baud,
                data_bits: 8,
                parity,
                stop_bits,
                flow_control: FlowControl::None,
            },
        };
        // 8N1: 10 bits a character; 8E1 and 8N2: 11.
        let t = port(115_200, Parity::None, 1).wire_time(9);
        assert!((t.as_secs_f64() - 90.0 / 115_200.0).abs() < 1e-9, "{t:?}");
        let t = port(9600, Parity::Even, 1).wire_time(8);
        assert!((t.as_secs_f64() - 88.0 / 9600.0).abs() < 1e-9, "{t:?}");
        assert_eq!(
            port(19_200, Parity::None, 2).wire_time(8),
            port(19_200, Parity::Even, 1).wire_time(8)
        );
        let pipe = Opener::Pipe(Arc::new(|| Err(io::Error::other("none"))));
        assert_eq!(pipe.wire_time(100), Duration::ZERO);
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
