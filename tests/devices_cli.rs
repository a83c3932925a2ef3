//! `biofoundry devices …`, `sim`, `check --lab` and `run --lab` as a device
//! integrator and a technician use them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn biofoundry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bf-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_shipped_profile_checks_clean_and_is_listed() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("devices"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    files.sort();
    assert!(files.len() >= 11, "{files:?}");
    let mut args = vec!["devices", "check"];
    args.extend(files.iter().map(String::as_str));
    let out = biofoundry(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = biofoundry(&["devices", "profiles"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for name in [
        "liconic-stx",
        "hamilton-arc-ph",
        "gcode-liquid-handler",
        "agrowtek-pump",
    ] {
        assert!(text(&out).contains(name), "{}", text(&out));
    }
}

#[test]
fn a_profile_mistake_is_reported_at_its_line_and_column() {
    let dir = scratch("badprofile");
    let good =
        std::fs::read_to_string(root().join("devices/opentrons-temperature-module.toml")).unwrap();
    let bad = good.replacen("M104 S{value", "M104 S{valeu", 1);
    assert_ne!(good, bad);
    let path = dir.join("tm.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = biofoundry(&["devices", "check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("error[unknown-name]"), "{t}");
    let line = bad.lines().position(|l| l.contains("{valeu")).unwrap() + 1;
    assert!(t.contains(&format!("tm.toml:{line}:")), "{t}");
    assert!(t.contains("did you mean `value`"), "{t}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_lab_file_mistake_is_reported_like_a_protocol_error() {
    let dir = scratch("badlab");
    let path = dir.join("lab.toml");
    std::fs::write(
        &path,
        r#"format = "biofoundry.lab/1"
[controller]
site = "s"
cell = "c"
id = "x"
[[device]]
id = "tm1"
profile = "opentrons-temperature-modul"
transport = "sim://"
[[device]]
id = "ph1"
profile = "hamilton-arc-ph"
transport = "serial:///dev/ttyUSB0"
"#,
    )
    .unwrap();
    let out = biofoundry(&["devices", "list", "--lab", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("error[unknown-profile]"), "{t}");
    assert!(t.contains("lab.toml:8:11"), "{t}");
    assert!(
        t.contains("did you mean `opentrons-temperature-module`"),
        "{t}"
    );
    assert!(t.contains("error[transport-mismatch]"), "{t}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn list_probe_read_and_set_on_the_in_process_simulated_lab() {
    let lab = "examples/sim-lab.toml";
    let out = biofoundry(&["devices", "list", "--lab", lab]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("inc1"), "{}", text(&out));
    let out = biofoundry(&["devices", "probe", "--lab", lab, "tm1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("temperature = "), "{}", text(&out));
    let out = biofoundry(&["devices", "read", "--lab", lab, "br1", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ph = v["values"]["ph"].as_f64().unwrap();
    assert!((6.0..8.0).contains(&ph), "{v}");
    let out = biofoundry(&["devices", "set", "--lab", lab, "tm1", "temperature", "37 C"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = biofoundry(&[
        "devices",
        "set",
        "--lab",
        lab,
        "tm1",
        "temperature",
        "120 C",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("outside the instrument's limits 4..95 C"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("nothing was sent"), "{}", text(&out));
}

#[test]
fn check_with_a_lab_reports_what_its_instruments_cannot_do() {
    let out = biofoundry(&[
        "check",
        "--lab",
        "examples/sim-lab.toml",
        "protocols/media_conditioning.toml",
        "protocols/fed_batch.toml",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("protocols/media_conditioning.toml: ok"), "{t}");
    assert!(t.contains("error[not-on-device]"), "{t}");
    assert!(t.contains("provides the setpoint `ph`"), "{t}");
}

#[test]
fn run_with_the_in_process_simulated_lab_completes() {
    let out = biofoundry(&[
        "run",
        "protocols/media_conditioning.toml",
        "--lab",
        "examples/sim-lab.toml",
        "--speed",
        "300",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("Run completed"), "{}", text(&out));
}

struct SimProcess {
    child: Child,
}

/// The process's standard output, line by line, on a channel (so waits on it
/// can be bounded).
fn stdout_lines(sim: &mut SimProcess) -> std::sync::mpsc::Receiver<String> {
    let stdout = sim.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// examples/sim-workcell.toml in `dir` (links, a free TCP port, a clock speed),
/// served by a `biofoundry sim` process; its stdout lines come on the channel.
fn start_sim(dir: &Path, speed: u32) -> (SimProcess, String, std::sync::mpsc::Receiver<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lab_text = std::fs::read_to_string(root().join("examples/sim-workcell.toml"))
        .unwrap()
        .replace("/tmp/biofoundry-sim", &dir.display().to_string())
        .replace("15020", &port.to_string())
        .replace("speed = 60", &format!("speed = {speed}"))
        .replace(
            "data_dir = \"../target/biofoundry-data\"",
            "data_dir = \"data\"",
        );
    let lab = dir.join("lab.toml");
    std::fs::write(&lab, lab_text).unwrap();
    let lab = lab.to_str().unwrap().to_string();
    let mut sim = SimProcess {
        child: Command::new(env!("CARGO_BIN_EXE_biofoundry"))
            .args(["sim", "--lab", &lab])
            .current_dir(root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    // Wait (bounded) for the simulators to be up.
    let rx = stdout_lines(&mut sim);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("sim did not start");
        if line.starts_with("Simulating") {
            break;
        }
    }
    (sim, lab, rx)
}

#[test]
fn a_fed_batch_runs_against_sim_in_another_process_with_readings_over_the_wire() {
    let dir = scratch("fedbatch");
    let (sim, lab, _lines) = start_sim(&dir, 1000);
    // About 8 lab hours at 1000 times: well under a minute.
    let out = biofoundry(&["run", "protocols/fed_batch_instruments.toml", "--lab", &lab]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("Run completed"), "{t}");
    assert!(t.contains("step od_reached (wait_until) completed"), "{t}");
    assert!(t.contains("step feeding (wait) completed"), "{t}");
    drop(sim);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sim_serves_a_lab_on_pseudo_terminals_and_takes_faults_while_running() {
    let dir = scratch("sim");
    let (mut sim, lab, rx) = start_sim(&dir, 1);
    assert!(dir.join("rs485-1").exists());
    let out = biofoundry(&["devices", "probe", "--lab", &lab]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("br1.ph"), "{}", text(&out));

    // A fault typed into the running simulator: the Liconic stops answering.
    let stdin = sim.child.stdin.as_mut().unwrap();
    writeln!(stdin, "fault inc1 no_reply").unwrap();
    stdin.flush().unwrap();
    let ok = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ok, "ok");
    let out = biofoundry(&["devices", "read", "--lab", &lab, "inc1", "temperature"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("did not answer"), "{}", text(&out));
    writeln!(stdin, "clear inc1").unwrap();
    stdin.flush().unwrap();
    let ok = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ok, "ok");
    let out = biofoundry(&["devices", "read", "--lab", &lab, "inc1", "temperature"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(sim);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sim_serves_one_profile_at_a_requested_path() {
    let dir = scratch("oneprofile");
    let link = dir.join("tm");
    let mut sim = SimProcess {
        child: Command::new(env!("CARGO_BIN_EXE_biofoundry"))
            .args(["sim", "--profile", "opentrons-temperature-module", "--at"])
            .arg(&link)
            .current_dir(root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    let rx = stdout_lines(&mut sim);
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("sim did not start");
    assert!(first.contains(&link.display().to_string()), "{first}");
    let lab = dir.join("lab.toml");
    std::fs::write(
        &lab,
        format!(
            "format = \"biofoundry.lab/1\"\n[controller]\nsite = \"s\"\ncell = \"c\"\nid = \"x\"\n\
             [[device]]\nid = \"tm1\"\nprofile = \"opentrons-temperature-module\"\ntransport = \"serial://{}\"\n",
            link.display()
        ),
    )
    .unwrap();
    let out = biofoundry(&["devices", "read", "--lab", lab.to_str().unwrap(), "tm1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("temperature = "), "{}", text(&out));
    drop(sim);
    let _ = std::fs::remove_dir_all(dir);
}
