//! Hosting simulators where a controller finds real instruments: on a
//! pseudo-terminal (serial protocols and Modbus RTU) or on a TCP port
//! (Modbus TCP).
//!
//! A PTY host keeps its own descriptor of the terminal's slave side open, so
//! a controller may close and reopen the port; with a symlink path, a stale
//! link there is replaced. A disconnect fault drops the PTY (the symlink and
//! the `/dev/pts/N` node disappear, as when a USB adapter is unplugged) and
//! creates a new one at the same symlink once the fault ends.

use super::FaultHandle;
use super::modbus::ModbusBus;
use super::serial::SerialSimulator;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

/// Pause before recreating a PTY that failed.
const RETRY: Duration = Duration::from_millis(200);

#[derive(Clone)]
enum Served {
    Serial(Arc<SerialSimulator>),
    ModbusRtu(Arc<ModbusBus>),
}

impl Served {
    fn faults(&self) -> FaultHandle {
        match self {
            Served::Serial(s) => s.faults(),
            Served::ModbusRtu(b) => b.faults(),
        }
    }

    async fn serve(
        &self,
        master: SerialStream,
        cancel: CancellationToken,
        disconnects: watch::Receiver<u64>,
    ) -> io::Result<()> {
        match self {
            Served::Serial(s) => s.serve_until(master, cancel, disconnects).await,
            Served::ModbusRtu(b) => b.serve_rtu_until(master, cancel, disconnects).await,
        }
    }
}

/// A simulator served on a pseudo-terminal.
pub struct PtyHost {
    path: watch::Receiver<Option<PathBuf>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Creates a PTY pair; the slave side's descriptor is kept (returned), so the
/// terminal stays while the controller closes and reopens the path.
fn new_pty() -> io::Result<(SerialStream, SerialStream, PathBuf)> {
    // `pair` takes no lock on the slave side (`set_exclusive(false)` would take
    // a shared flock and make the controller's exclusive open fail).
    let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
    // A process that hosts simulators and starts another program must not
    // hand it the PTYs: an "unplugged" instrument would stay plugged in for
    // the child, which still holds the nodes open.
    close_on_exec(&master)?;
    close_on_exec(&slave)?;
    let name = slave
        .name()
        .ok_or_else(|| io::Error::other("the pseudo-terminal has no name"))?;
    Ok((master, slave, PathBuf::from(name)))
}

fn close_on_exec(stream: &SerialStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: `fd` is open and owned by `stream`, which outlives the call;
    // F_SETFD only changes the descriptor's flags.
    let done = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if done == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points `link` at `target`, replacing a symlink already there (never a file).
fn place_link(link: &Path, target: &Path) -> io::Result<()> {
    // Already right (the host placed it before its task started): replacing it
    // would take it away for a moment, and a controller opening the path
    // then would find nothing there.
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", link.display()),
            ));
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, link)
}

/// Removes `link` if it still points at `target`.
fn remove_link(link: &Path, target: &Path) {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        let _ = std::fs::remove_file(link);
    }
}

impl PtyHost {
    /// Serves a serial simulator on a new PTY, behind `link` if given.
    pub async fn serial(sim: Arc<SerialSimulator>, link: Option<PathBuf>) -> io::Result<PtyHost> {
        PtyHost::start(Served::Serial(sim), link).await
    }

    /// Serves a Modbus RTU bus on a new PTY, behind `link` if given.
    pub async fn modbus_rtu(bus: Arc<ModbusBus>, link: Option<PathBuf>) -> io::Result<PtyHost> {
        PtyHost::start(Served::ModbusRtu(bus), link).await
    }

    async fn start(served: Served, link: Option<PathBuf>) -> io::Result<PtyHost> {
        let (master, slave, pts) = new_pty()?;
        if let Some(l) = &link {
            place_link(l, &pts)?;
        }
        let (tx, rx) = watch::channel(Some(link.clone().unwrap_or_else(|| pts.clone())));
        let cancel = CancellationToken::new();
        let disconnects = served.faults().disconnects();
        let task = tokio::spawn(host_pty(
            served,
            disconnects,
            link,
            (master, slave, pts),
            tx,
            cancel.clone(),
        ));
        Ok(PtyHost {
            path: rx,
            cancel,
            task,
        })
    }

    /// Where the controller opens the port: the symlink, or the PTY's own
    /// path (which changes after a disconnect when there is no symlink).
    /// `None` while unplugged.
    pub fn path(&self) -> Option<PathBuf> {
        self.path.borrow().clone()
    }

    /// Changes whenever the path appears or disappears.
    pub fn watch_path(&self) -> watch::Receiver<Option<PathBuf>> {
        self.path.clone()
    }

    /// Stops serving and removes the PTY and its symlink.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn host_pty(
    served: Served,
    mut disconnects: watch::Receiver<u64>,
    link: Option<PathBuf>,
    first: (SerialStream, SerialStream, PathBuf),
    path: watch::Sender<Option<PathBuf>>,
    cancel: CancellationToken,
) {
    let faults = served.faults();
    let mut pty = Some(first);
    loop {
        let (master, slave, pts) = match pty.take() {
            Some(p) => p,
            None => match new_pty() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("simulator: cannot create a pseudo-terminal: {e}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            },
        };
        if let Some(l) = &link
            && let Err(e) = place_link(l, &pts)
        {
            tracing::warn!("simulator: cannot link {}: {e}", l.display());
        }
        path.send_replace(Some(link.clone().unwrap_or_else(|| pts.clone())));
        let result = if faults.is_offline() {
            Ok(())
        } else {
            disconnects.mark_unchanged();
            served
                .serve(master, cancel.child_token(), disconnects.clone())
                .await
        };
        // Unplugged: the PTY goes away with its nodes.
        drop(slave);
        if let Some(l) = &link {
            remove_link(l, &pts);
        }
        path.send_replace(None);
        if cancel.is_cancelled() {
            return;
        }
        match faults.offline_until() {
            Some(until) => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            None => {
                if let Err(e) = result {
                    tracing::debug!("simulator: pseudo-terminal failed: {e}");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// A Modbus bus served over Modbus TCP.
pub struct TcpHost {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl TcpHost {
    /// Listens on 127.0.0.1:`port` (0: any free port; see [`TcpHost::port`]).
    pub async fn modbus(bus: Arc<ModbusBus>, port: u16) -> io::Result<TcpHost> {
        TcpHost::modbus_on(bus, SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    pub async fn modbus_on(bus: Arc<ModbusBus>, addr: SocketAddr) -> io::Result<TcpHost> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(host_tcp(bus, listener, cancel.clone()));
        Ok(TcpHost { addr, cancel, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and closes every connection.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn host_tcp(bus: Arc<ModbusBus>, listener: TcpListener, cancel: CancellationToken) {
    let faults = bus.faults();
    let bus_shutdown = bus.shutdown_token();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = bus_shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!("simulator: accept: {e}");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        if faults.is_offline() {
            // Unplugged: the connection is closed at once.
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let bus = bus.clone();
        let conn_cancel = cancel.child_token();
        tokio::spawn(async move {
            let _ = bus.serve_tcp(stream, conn_cancel).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_process_does_not_inherit_the_ptys() {
        let (_master, _slave, pts) = new_pty().unwrap();
        // `ls` lists its own descriptors: what it inherited.
        let out = std::process::Command::new("ls")
            .args(["-l", "/proc/self/fd"])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}");
        assert!(
            !listing.contains(&*pts.to_string_lossy()) && !listing.contains("ptmx"),
            "{listing}"
        );
    }
}
