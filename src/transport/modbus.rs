//! Modbus RTU and TCP through tokio-modbus, with one owner task per bus.
//!
//! Every device on an RS-485 line (or behind one TCP gateway) sends its requests
//! to the bus's owner task, which keeps one tokio-modbus context, switches the
//! unit id per request and runs one request at a time. The owner bounds every
//! request with a timeout, retries exception 06 (server busy), and drops the
//! context after a timeout or a transport/protocol error: RTU frames carry no
//! transaction id, so a late reply read by the next request would silently be
//! taken for its answer. Before an RTU port is reopened the owner waits out the
//! device's reply time and clears the input buffer.

use super::SerialSettings;
use super::serial::{Opener, PipeOpener};
use crate::profile::codec::RegisterKind;
use std::borrow::Cow;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_serial::SerialPort;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModbusError {
    #[error("no reply within {0} s")]
    Timeout(f64),
    #[error("link down: {0}")]
    Disconnected(String),
    /// The device answered with an exception.
    #[error("exception {code:02}: {text}")]
    Exception { code: u8, text: String },
    /// A reply that does not belong to the request (garbage, a late frame).
    #[error("bad reply: {0}")]
    Protocol(String),
}

/// Where a bus is.
#[derive(Clone)]
pub enum Endpoint {
    Rtu {
        path: String,
        settings: SerialSettings,
    },
    Tcp {
        host: String,
        port: u16,
    },
    /// An in-process simulator speaking Modbus TCP framing over a pipe.
    Pipe(PipeOpener),
}

impl Endpoint {
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Rtu { path, settings } => format!("{path} ({settings})"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Pipe(_) => "in-process simulator".into(),
        }
    }
}

/// Per-device request settings (from the profile's `[link]`).
#[derive(Debug, Clone, Copy)]
pub struct RequestPolicy {
    pub timeout: Duration,
    pub busy_retries: u32,
    pub busy_retry_wait: Duration,
    pub min_gap: Duration,
}

struct Job {
    unit: u8,
    request: Request<'static>,
    policy: RequestPolicy,
    reply: oneshot::Sender<Result<Response, ModbusError>>,
}

/// A handle on a bus's owner task; clones share the bus.
#[derive(Clone)]
pub struct ModbusBus {
    jobs: mpsc::Sender<Job>,
    describe: String,
}

impl ModbusBus {
    /// Starts the owner task of a bus (it ends when the last handle is dropped).
    pub fn spawn(endpoint: Endpoint) -> ModbusBus {
        let (jobs, rx) = mpsc::channel(64);
        let describe = endpoint.describe();
        tokio::spawn(owner(endpoint, rx));
        ModbusBus { jobs, describe }
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub async fn call(
        &self,
        unit: u8,
        request: Request<'static>,
        policy: RequestPolicy,
    ) -> Result<Response, ModbusError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                unit,
                request,
                policy,
                reply,
            })
            .await
            .map_err(|_| ModbusError::Disconnected("the bus is shut down".into()))?;
        // The owner answers every job within its bounded retries; this bound
        // only guards against a bus stuck behind many other devices' requests.
        let bound = policy.timeout * (policy.busy_retries + 2) + Duration::from_secs(30);
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ModbusError::Disconnected("the bus owner stopped".into())),
            Err(_) => Err(ModbusError::Timeout(bound.as_secs_f64())),
        }
    }

    pub async fn read(
        &self,
        unit: u8,
        kind: RegisterKind,
        address: u16,
        count: u16,
        policy: RequestPolicy,
    ) -> Result<Vec<u16>, ModbusError> {
        let request = match kind {
            RegisterKind::Holding => Request::ReadHoldingRegisters(address, count),
            RegisterKind::Input => Request::ReadInputRegisters(address, count),
        };
        match self.call(unit, request, policy).await? {
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)
                if words.len() == usize::from(count) =>
            {
                Ok(words)
            }
            other => Err(ModbusError::Protocol(format!(
                "asked for {count} registers at {address}, got {other:?}"
            ))),
        }
    }

    /// Writes registers: function 06 for one, 16 for several.
    pub async fn write(
        &self,
        unit: u8,
        address: u16,
        words: &[u16],
        policy: RequestPolicy,
    ) -> Result<(), ModbusError> {
        let request = match words {
            [one] => Request::WriteSingleRegister(address, *one),
            _ => Request::WriteMultipleRegisters(address, Cow::Owned(words.to_vec())),
        };
        self.call(unit, request, policy).await.map(|_| ())
    }
}

async fn connect(endpoint: &Endpoint, unit: u8, timeout: Duration) -> Result<Context, ModbusError> {
    let slave = Slave(unit);
    match endpoint {
        Endpoint::Rtu { path, settings } => {
            let port = Opener::open_port(path, settings)
                .map_err(|e| ModbusError::Disconnected(format!("cannot open {path}: {e}")))?;
            let _ = port.clear(tokio_serial::ClearBuffer::Input);
            Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
        }
        Endpoint::Tcp { host, port } => {
            let connect = async {
                let addr = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                tokio_modbus::client::tcp::connect_slave(addr, slave).await
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(ModbusError::Disconnected(format!(
                    "cannot connect to {host}:{port}: {e}"
                ))),
                Err(_) => Err(ModbusError::Timeout(timeout.as_secs_f64())),
            }
        }
        Endpoint::Pipe(open) => {
            let stream = open().map_err(|e| ModbusError::Disconnected(e.to_string()))?;
            Ok(tokio_modbus::client::tcp::attach_slave(stream, slave))
        }
    }
}

async fn owner(endpoint: Endpoint, mut jobs: mpsc::Receiver<Job>) {
    let mut context: Option<Context> = None;
    // After a failure on RTU, when the line is quiet again.
    let mut quiet_at: Option<tokio::time::Instant> = None;
    let mut last_end: Option<tokio::time::Instant> = None;
    while let Some(job) = jobs.recv().await {
        if job.reply.is_closed() {
            continue;
        }
        // No timer when the gap has passed already (the usual case, and every
        // time without a `min_gap`): tokio's timers tick in whole
        // milliseconds, so even a deadline just past could hold a request up
        // to the next tick.
        if let Some(end) = last_end
            && !job.policy.min_gap.is_zero()
        {
            let ready = end + job.policy.min_gap;
            if ready > tokio::time::Instant::now() {
                tokio::time::sleep_until(ready).await;
            }
        }
        let result = run_job(&endpoint, &mut context, &mut quiet_at, &job).await;
        last_end = Some(tokio::time::Instant::now());
        let _ = job.reply.send(result);
    }
}

async fn run_job(
    endpoint: &Endpoint,
    context: &mut Option<Context>,
    quiet_at: &mut Option<tokio::time::Instant>,
    job: &Job,
) -> Result<Response, ModbusError> {
    let mut busy = 0;
    loop {
        if context.is_none() {
            if let Some(t) = quiet_at.take()
                && matches!(endpoint, Endpoint::Rtu { .. })
            {
                tokio::time::sleep_until(t).await;
            }
            *context = Some(connect(endpoint, job.unit, job.policy.timeout).await?);
        }
        let Some(ctx) = context.as_mut() else {
            return Err(ModbusError::Disconnected("no context".into()));
        };
        ctx.set_slave(Slave(job.unit));
        let outcome = tokio::time::timeout(job.policy.timeout, ctx.call(job.request.clone())).await;
        let poisoned = |context: &mut Option<Context>, quiet_at: &mut Option<_>| {
            *context = None;
            *quiet_at = Some(tokio::time::Instant::now() + job.policy.timeout);
        };
        match outcome {
            Ok(Ok(Ok(response))) => return Ok(response),
            Ok(Ok(Err(ExceptionCode::ServerDeviceBusy))) if busy < job.policy.busy_retries => {
                busy += 1;
                tokio::time::sleep(job.policy.busy_retry_wait).await;
            }
            Ok(Ok(Err(code))) => {
                return Err(ModbusError::Exception {
                    code: u8::from(code),
                    text: exception_text(code),
                });
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                poisoned(context, quiet_at);
                return Err(ModbusError::Disconnected(e.to_string()));
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                poisoned(context, quiet_at);
                return Err(ModbusError::Protocol(e.to_string()));
            }
            Err(_) => {
                poisoned(context, quiet_at);
                return Err(ModbusError::Timeout(job.policy.timeout.as_secs_f64()));
            }
        }
    }
}

fn exception_text(code: ExceptionCode) -> String {
    match code {
        ExceptionCode::IllegalFunction => "illegal function".into(),
        ExceptionCode::IllegalDataAddress => "illegal data address".into(),
        ExceptionCode::IllegalDataValue => "illegal data value".into(),
        ExceptionCode::ServerDeviceFailure => "server device failure".into(),
        ExceptionCode::Acknowledge => "acknowledge (long operation)".into(),
        ExceptionCode::ServerDeviceBusy => "server device busy".into(),
        ExceptionCode::MemoryParityError => "memory parity error".into(),
        ExceptionCode::GatewayPathUnavailable => "gateway path unavailable".into(),
        ExceptionCode::GatewayTargetDevice => "gateway target failed to respond".into(),
        ExceptionCode::Custom(c) => format!("vendor code {c}"),
    }
}
