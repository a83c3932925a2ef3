//! `biofoundry devices …`, `biofoundry sim` and the lab-file side of `check`.

use crate::{Format, plural, print_json};
use biofoundry::device::DeviceHandle;
use biofoundry::diagnostics::{Diagnostic, render_human};
use biofoundry::lab::{self, LabDevice, LabFile, SimBacking};
use biofoundry::profile;
use biofoundry::protocol::ParamOverride;
use biofoundry::source::SourceFile;
use biofoundry::units::{Quantity, parse_quantity};
use clap::{Args, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// List the lab's devices with their profile, transport and state.
    List {
        #[arg(long)]
        lab: PathBuf,
    },
    /// Connect to each device (or one), ask its identity and take one reading.
    Probe {
        #[arg(long)]
        lab: PathBuf,
        device: Option<String>,
    },
    /// Read signals of a device once, or every `--every` with `--watch`.
    Read {
        #[arg(long)]
        lab: PathBuf,
        device: String,
        /// Signals to read (default: all of the device's signals).
        signals: Vec<String>,
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = "1 s")]
        every: String,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Write a setpoint, e.g. `devices set --lab lab.toml tm1 temperature "37 C"`.
    /// Values outside the instrument's limits are refused before anything is sent.
    Set {
        #[arg(long)]
        lab: PathBuf,
        device: String,
        setpoint: String,
        value: String,
    },
    /// Check profile files (devices/*.toml) and report every mistake.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the shipped profiles.
    Profiles,
}

#[derive(Args)]
pub struct SimArgs {
    /// Serve every simulated device of this lab file.
    #[arg(long, required_unless_present = "profile", conflicts_with = "profile")]
    lab: Option<PathBuf>,
    /// Or serve one profile (a name in devices/ or a path) as device `dev`.
    #[arg(long)]
    profile: Option<String>,
    /// With --profile: where the pseudo-terminal's symlink goes (serial and
    /// Modbus RTU); without it, a path under the temporary folder is printed.
    #[arg(long, requires = "profile")]
    at: Option<PathBuf>,
    /// With --profile: serve a Modbus profile on this loopback TCP port instead.
    #[arg(long, requires = "profile")]
    port: Option<u16>,
    /// Inject a fault at start: DEVICE=FAULT (no_reply, slow:2s, garbage,
    /// busy, exception:4, disconnect:10s); more while running on standard input.
    #[arg(long = "fault", value_name = "DEVICE=FAULT")]
    faults: Vec<ParamOverride>,
    /// Seed of the simulated physics (default: the lab's [simulation] seed, or 1).
    #[arg(long)]
    seed: Option<u64>,
    /// Run the simulated physics this many times faster (default: the lab's
    /// [simulation] speed, or 1). `run` must use the same speed.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
}

fn stderr_color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Loads a lab file, printing its diagnostics; `Err(code)` when it has errors.
pub fn load_lab(path: &Path) -> Result<Result<LabFile, ExitCode>, String> {
    match lab::load(path) {
        Ok(l) => Ok(Ok(l)),
        Err((file, diagnostics)) => {
            let color = stderr_color();
            for d in &diagnostics {
                eprintln!("{}\n", render_human(&file, d, color));
            }
            let n = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!("{}: {n} error{}", path.display(), plural(n));
            Ok(Err(ExitCode::from(1)))
        }
    }
}

pub use biofoundry::lab::check_with_lab;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// How long a command-line probe waits for one device.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn cmd_devices(command: DevicesCommand) -> Result<ExitCode, String> {
    match command {
        DevicesCommand::Check { files } => check_profiles(&files),
        DevicesCommand::Profiles => list_profiles(),
        DevicesCommand::List { lab } => {
            let lab = match load_lab(&lab)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            list(&lab, false)
        }
        DevicesCommand::Probe { lab, device } => {
            let lab = match load_lab(&lab)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            if let Some(d) = &device
                && !lab.devices.contains_key(d)
            {
                return Err(unknown_device(&lab, d));
            }
            probe(&lab, device.as_deref())
        }
        DevicesCommand::Read {
            lab,
            device,
            signals,
            watch,
            every,
            format,
        } => {
            let lab = match load_lab(&lab)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let every = parse_quantity(&every, biofoundry::units::Dimension::Time)
                .map_err(|e| format!("--every {every}: {e}"))?
                .value
                .max(0.05);
            read(&lab, &device, &signals, watch, every, format)
        }
        DevicesCommand::Set {
            lab,
            device,
            setpoint,
            value,
        } => {
            let lab = match load_lab(&lab)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            set(&lab, &device, &setpoint, &value)
        }
    }
}

fn unknown_device(lab: &LabFile, id: &str) -> String {
    let ids: Vec<&str> = lab.devices.keys().map(String::as_str).collect();
    match biofoundry::diagnostics::did_you_mean(id, ids.iter().copied()) {
        Some(h) => format!("the lab has no device `{id}`; {h}"),
        None => format!("the lab has no device `{id}` (devices: {})", ids.join(", ")),
    }
}

fn check_profiles(files: &[PathBuf]) -> Result<ExitCode, String> {
    let mut failed = false;
    let color = crate::color();
    let mut out = std::io::stdout().lock();
    for path in files {
        let text = profile::read_bounded(path).map_err(|e| e.to_string())?;
        let (_, diagnostics) = profile::parse(SourceFile::new(path, text.clone()));
        let file = SourceFile::new(path, text);
        for d in &diagnostics {
            let _ = writeln!(out, "{}\n", render_human(&file, d, color));
        }
        let errors = diagnostics.iter().filter(|d| d.is_error()).count();
        failed |= errors > 0;
        let _ = writeln!(
            out,
            "{}: {}",
            path.display(),
            if errors == 0 {
                "ok".to_string()
            } else {
                format!("{errors} error{}", plural(errors))
            }
        );
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn list_profiles() -> Result<ExitCode, String> {
    let mut seen = std::collections::BTreeMap::new();
    for dir in lab::shipped_profiles() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml")
                && let Ok(profile) = profile::load(&p)
            {
                seen.entry(profile.id.clone()).or_insert(profile);
            }
        }
    }
    if seen.is_empty() {
        return Err("no profiles found (looked in ./devices and next to the binary)".into());
    }
    let mut out = std::io::stdout().lock();
    for (id, p) in seen {
        let link = if p.is_modbus() { "Modbus" } else { "serial" };
        let _ = writeln!(
            out,
            "{id:<34} {:<20} {:<7} {} {}",
            p.kind.name(),
            link,
            p.doc.profile.vendor,
            p.doc.profile.model
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(device: &LabDevice) -> Vec<(String, String, String)> {
    match device {
        LabDevice::Instrument(i) => {
            vec![(String::new(), i.profile.id.clone(), i.transport.to_string())]
        }
        LabDevice::Bioreactor { parts } => parts
            .iter()
            .map(|(role, i)| {
                (
                    format!(".{role}"),
                    i.profile.id.clone(),
                    i.transport.to_string(),
                )
            })
            .collect(),
    }
}

async fn connect_with_timeout(handle: &DeviceHandle) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, handle.device().connect()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

fn list(lab: &LabFile, _json: bool) -> Result<ExitCode, String> {
    let rt = runtime()?;
    rt.block_on(async {
        let live = lab::connect_lab(lab, &SimBacking::default())?;
        let mut out = std::io::stdout().lock();
        let mut all_ready = true;
        for (id, device) in &lab.devices {
            let state = match live.lab.get(id) {
                Some(h) => match connect_with_timeout(h).await {
                    Ok(()) => "ready".to_string(),
                    Err(e) => {
                        all_ready = false;
                        format!("fault: {e}")
                    }
                },
                None => "not built".into(),
            };
            let kind = lab.kind(id).map_or("?", |k| k.name());
            let _ = writeln!(out, "{id:<14} {kind:<19} {state}");
            for (part, profile, transport) in describe(device) {
                let _ = writeln!(out, "  {part:<18} {profile:<30} {transport}");
            }
        }
        Ok(if all_ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

fn probe(lab: &LabFile, only: Option<&str>) -> Result<ExitCode, String> {
    let rt = runtime()?;
    rt.block_on(async {
        let live = lab::connect_lab(lab, &SimBacking::default())?;
        let mut failed = false;
        let mut out = std::io::stdout().lock();
        for (id, driver) in &live.instruments {
            let device_id = id.split('.').next().unwrap_or(id);
            if only.is_some_and(|o| o != device_id && o != id) {
                continue;
            }
            let handle = driver.clone().handle();
            if let Err(e) = connect_with_timeout(&handle).await {
                failed = true;
                let _ = writeln!(out, "{id:<20} fault: {e}");
                continue;
            }
            let identity = match tokio::time::timeout(PROBE_TIMEOUT, driver.identify()).await {
                Ok(Ok(i)) => i.replace('\n', " | "),
                Ok(Err(e)) => format!("(identity unknown: {e})"),
                Err(_) => "(identity: no answer)".into(),
            };
            let reading = match driver.profile().doc.signals.keys().next() {
                Some(signal) => {
                    match tokio::time::timeout(PROBE_TIMEOUT, handle.device().read(signal)).await {
                        Ok(Ok(q)) => format!("{signal} = {q}"),
                        Ok(Err(e)) => {
                            failed = true;
                            format!("{signal}: {e}")
                        }
                        Err(_) => {
                            failed = true;
                            format!("{signal}: no answer")
                        }
                    }
                }
                None => "no signals".into(),
            };
            let _ = writeln!(out, "{id:<20} ready  {identity}  {reading}");
        }
        Ok(if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn read(
    lab: &LabFile,
    id: &str,
    signals: &[String],
    watch: bool,
    every_s: f64,
    format: Format,
) -> Result<ExitCode, String> {
    if !lab.devices.contains_key(id) {
        return Err(unknown_device(lab, id));
    }
    let kind = lab.kind(id).ok_or("unknown kind")?;
    let names: Vec<String> = if signals.is_empty() {
        match &lab.devices[id] {
            LabDevice::Instrument(i) => i.profile.doc.signals.keys().cloned().collect(),
            LabDevice::Bioreactor { parts } => parts
                .keys()
                .filter(|r| kind.spec().signal(r).is_some())
                .cloned()
                .collect(),
        }
    } else {
        signals.to_vec()
    };
    let rt = runtime()?;
    rt.block_on(async {
        let live = lab::connect_lab(lab, &SimBacking::default())?;
        let handle = live.lab.get(id).ok_or("device not built")?.clone();
        connect_with_timeout(&handle).await?;
        let mut failed = false;
        loop {
            let mut values = serde_json::Map::new();
            let mut line = Vec::new();
            for name in &names {
                match tokio::time::timeout(PROBE_TIMEOUT, handle.device().read(name)).await {
                    Ok(Ok(q)) => {
                        values.insert(name.clone(), serde_json::json!(q.value));
                        line.push(format!("{name} = {q}"));
                    }
                    Ok(Err(e)) => {
                        failed = true;
                        line.push(format!("{name}: {e}"));
                    }
                    Err(_) => {
                        failed = true;
                        line.push(format!("{name}: no answer"));
                    }
                }
            }
            match format {
                Format::Json => print_json(&serde_json::json!({ "device": id, "values": values }))?,
                Format::Human => println!("{id}: {}", line.join(", ")),
            }
            if !watch {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(every_s)) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        Ok(if failed && !watch {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn set(lab: &LabFile, id: &str, setpoint: &str, value: &str) -> Result<ExitCode, String> {
    if !lab.devices.contains_key(id) {
        return Err(unknown_device(lab, id));
    }
    let kind = lab.kind(id).ok_or("unknown kind")?;
    let spec = kind.spec().setpoint(setpoint).ok_or_else(|| {
        let names: Vec<&str> = kind.spec().setpoints.iter().map(|s| s.name).collect();
        format!(
            "{} has no setpoint `{setpoint}` (setpoints: {})",
            kind.with_article(),
            names.join(", ")
        )
    })?;
    let q: Quantity = parse_quantity(value, spec.dimension)
        .map_err(|e| format!("`{value}`: {e}; {}", e.hint()))?;
    let rt = runtime()?;
    rt.block_on(async {
        let live = lab::connect_lab(lab, &SimBacking::default())?;
        let handle = live.lab.get(id).ok_or("device not built")?.clone();
        // The driver refuses a value outside the profile's limits before connecting.
        if let Some(l) = handle.device().limits(setpoint)
            && !l.contains(q.value)
        {
            eprintln!(
                "error: {id} refused: {setpoint} {q} is outside the instrument's limits {l}; nothing was sent"
            );
            return Ok(ExitCode::from(1));
        }
        connect_with_timeout(&handle).await?;
        match tokio::time::timeout(PROBE_TIMEOUT, handle.device().set(setpoint, q)).await {
            Ok(Ok(())) => {
                println!("{id}: {setpoint} set to {q}");
                Ok(ExitCode::SUCCESS)
            }
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(1))
            }
            Err(_) => {
                eprintln!("error: {id} did not answer within {} s", PROBE_TIMEOUT.as_secs());
                Ok(ExitCode::from(1))
            }
        }
    })
}

/// A one-device lab for `sim --profile`.
fn profile_lab(args: &SimArgs, profile_name: &str) -> Result<LabFile, String> {
    let path = profile::find(profile_name, &lab::shipped_profiles()).map_err(|e| e.to_string())?;
    let loaded = profile::load(&path).map_err(|e| match e {
        profile::ProfileError::Invalid { diagnostics, .. } => format!(
            "{profile_name} does not load: {}",
            diagnostics
                .first()
                .map(|d| d.message.clone())
                .unwrap_or_default()
        ),
        e => e.to_string(),
    })?;
    let at = || -> Result<String, String> {
        let at = match &args.at {
            Some(a) => a.clone(),
            None => std::env::temp_dir()
                .join(format!("biofoundry-sim-{}", std::process::id()))
                .join(&loaded.id),
        };
        at.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{} is not a usable path", at.display()))
    };
    let transport = match (loaded.is_modbus(), args.port) {
        (true, Some(port)) => format!("modbus-tcp://127.0.0.1:{port}"),
        (true, None) => format!("modbus-rtu://{}", at()?),
        (false, None) => format!("serial://{}", at()?),
        (false, Some(_)) => return Err("--port serves Modbus profiles; this one is serial".into()),
    };
    let text = format!(
        "format = \"biofoundry.lab/1\"\n[controller]\nsite = \"sim\"\ncell = \"sim\"\nid = \"sim\"\n\
         [[device]]\nid = \"dev\"\nprofile = {:?}\ntransport = {:?}\n",
        path.display().to_string(),
        transport
    );
    let (lab, diagnostics) = lab::parse(SourceFile::new("sim-profile.toml", text));
    match lab {
        Some(l) if !diagnostics.iter().any(Diagnostic::is_error) => Ok(l),
        _ => Err(diagnostics
            .first()
            .map(|d| d.message.clone())
            .unwrap_or_else(|| "cannot build a lab for the profile".into())),
    }
}

pub fn cmd_sim(args: SimArgs) -> Result<ExitCode, String> {
    let lab = match (&args.lab, &args.profile) {
        (Some(path), _) => match load_lab(path)? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        },
        (None, Some(name)) => profile_lab(&args, name)?,
        (None, None) => return Err("give --lab LAB or --profile NAME".into()),
    };
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err(format!(
            "--speed must be a positive number, not {}",
            args.speed
        ));
    }
    // `--speed`/`--seed` win over the lab file's [simulation].
    let (speed, seed) = match &lab.doc.simulation {
        Some(s) => (
            if args.speed == 1.0 {
                s.get_ref().speed
            } else {
                args.speed
            },
            args.seed.unwrap_or(s.get_ref().seed),
        ),
        None => (args.speed, args.seed.unwrap_or(1)),
    };
    let rt = runtime()?;
    rt.block_on(async {
        let backing = SimBacking {
            clock: biofoundry::clock::Clock::new(speed),
            options: biofoundry::sim::SimOptions {
                seed,
                timing: biofoundry::sim::SimTiming::Realistic,
            },
        };
        let workcell = lab::serve_lab(&lab, &backing).await?;
        for f in &args.faults {
            let (fault, times) = lab::parse_fault(&f.value)?;
            workcell.inject(&f.name, fault, times)?;
        }
        for e in &workcell.endpoints {
            println!("{e}");
        }
        println!(
            "Simulating {} instrument(s). Commands: `fault <id> <fault>`, `clear <id>`, `quit`.",
            workcell.faults.len()
        );
        let mut lines =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
        let mut stdin_open = true;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                line = lines.next_line(), if stdin_open => {
                    let line = match line {
                        Ok(Some(l)) => l,
                        // Standard input closed (a service, a pipe): keep serving.
                        _ => { stdin_open = false; continue; }
                    };
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let result = match words.as_slice() {
                        [] => Ok(()),
                        ["quit" | "exit"] => break,
                        ["fault", target, fault] => lab::parse_fault(fault)
                            .and_then(|(f, t)| workcell.inject(target, f, t)),
                        ["clear", target] => workcell.clear(target),
                        _ => Err("commands: fault <id> <fault>, clear <id>, quit".into()),
                    };
                    match result {
                        Ok(()) if !words.is_empty() => println!("ok"),
                        Ok(()) => {}
                        Err(e) => println!("error: {e}"),
                    }
                }
            }
        }
        workcell.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
