//! `biofoundry report`: a real run on the simulated workcell (a liquid handler
//! pipetting onto a cooled plate while a monitor watches the temperature),
//! then its report: the sections, one plot per signal, nothing loaded from
//! elsewhere — and headless Chromium draws it: the readings' line and the
//! limit band must be on the screenshot.
//!
//! Chromium: `/usr/bin/chromium` (or `chromium` in PATH). Without it the
//! rendering part is skipped, except on CI (`CI` set), where it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn biofoundry(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("biofoundry runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const PROTOCOL: &str = r#"
format = "biofoundry.protocol/1"

[protocol]
name = "Report test: dilution on a cooled plate"
version = "1.2.0"

[params]
volume = "50 uL"

[devices]
lh = "liquid_handler"
tm = { kind = "temperature_module", at = "lh:4" }

[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"

[labware.stock]
type = "nest_12_reservoir_15ml"
at = "lh:2"
contents = { A1 = "10 mL diluent" }

[labware.plate]
type = "biorad_96_wellplate_200ul_pcr"
at = "tm:1"
contents = { "A1:H1" = "150 uL standard" }

[[step]]
id = "chill"
do = "tm.set_temperature"
temperature = "8 C"
wait = true
timeout = "30 min"

[[step]]
id = "diluent"
do = "lh.transfer"
from = "stock:A1"
to = "plate:A2:H4"
volume = "${volume}"

[[step]]
id = "dilute"
do = "lh.transfer"
from = "plate:A1:H3"
to = "plate:A2:H4"
volume = "${volume}"
tips = "always"

[[step]]
id = "hold_cold"
do = "wait"
duration = "10 min"

[[monitor]]
id = "cooling"
device = "tm"
read = ["temperature"]
every = "10 s"
limits = { temperature = "4..12 C" }
on_violation = "alarm"
"#;

fn chromium() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
            .find(|p| p.is_file())
    })
}

/// Call before rendering: without Chromium the test skips that part (with a
/// note), except on CI (`CI` set), where a missing Chromium is a setup error.
fn require_chromium(test: &str) -> Option<PathBuf> {
    if let Some(p) = chromium() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test} needs chromium, which is not installed: .ci/run must install it \
             (apt-get install -y chromium)"
        );
    }
    eprintln!("skipping the rendering part of {test}: chromium is not installed");
    None
}

/// Runs Chromium headless for a screenshot, killed after 60 s.
fn screenshot(chromium: &Path, html: &Path, png: &Path, profile: &Path) {
    let mut child = Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--window-size=1200,3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            assert!(
                png.is_file(),
                "chromium ({status}) wrote no screenshot: {err}"
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish its screenshot within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hex(colour: &str) -> [u8; 3] {
    let c = colour.trim_start_matches('#');
    let byte = |i: usize| u8::from_str_radix(&c[i..i + 2], 16).expect("hex colour");
    [byte(0), byte(2), byte(4)]
}

/// How many pixels of the screenshot are within `tolerance` (per channel) of `rgb`.
fn pixels_like(png: &Path, rgb: [u8; 3], tolerance: u8) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf[..info.buffer_size()]
        .chunks_exact(channels)
        .filter(|p| (0..3).all(|i| p[i].abs_diff(rgb[i]) <= tolerance))
        .count()
}

#[test]
fn a_run_report_has_its_sections_and_renders() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lab = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sim-lab.toml"
    ))
    .expect("lab")
    .replace(
        "data_dir = \"../target/biofoundry-data\"",
        "data_dir = \"data\"",
    );
    std::fs::write(dir.path().join("lab.toml"), lab).expect("lab");
    std::fs::write(dir.path().join("protocol.toml"), PROTOCOL).expect("protocol");
    let run = biofoundry(
        &[
            "run",
            "protocol.toml",
            "--lab",
            "lab.toml",
            "--speed",
            "200",
            "--param",
            "volume=40 uL",
        ],
        dir.path(),
    );
    assert!(run.status.success(), "{}", text(&run));
    let list = biofoundry(&["runs", "list", "--lab", "lab.toml", "--json"], dir.path());
    let runs: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let run_id = runs[0]["run_id"].as_str().expect("run id").to_string();

    let report = biofoundry(
        &["report", &run_id, "--lab", "lab.toml", "-o", "report.html"],
        dir.path(),
    );
    assert!(report.status.success(), "{}", text(&report));
    let path = dir.path().join("report.html");
    let html = std::fs::read_to_string(&path).expect("report");

    for needle in [
        "<!DOCTYPE html>",
        "id=\"run\"",
        "id=\"signals\"",
        "id=\"steps\"",
        "id=\"deck\"",
        "id=\"alarms\"",
        "id=\"events\"",
        run_id.as_str(),
        "Report test: dilution on a cooled plate",
        "1.2.0",
        "operator (CLI)",
        "40 uL",
        "tm1",
        "lh1",
        "hash chain",
        "intact",
        "completed",
        "diluent",
        "hold_cold",
    ] {
        assert!(html.contains(needle), "the report lacks {needle:?}");
    }
    // One plot per device and signal: the monitor reads one signal of one device.
    let signals = &html
        [html.find("id=\"signals\"").expect("signals")..html.find("id=\"steps\"").expect("steps")];
    assert_eq!(signals.matches("<svg").count(), 1, "one signal plot");
    assert_eq!(signals.matches("class=\"plot\"").count(), 1);
    assert_eq!(html.matches("class=\"band\"").count(), 1, "the limit band");
    assert!(html.contains("class=\"gantt\""), "the Gantt chart");
    // The deck: plate maps when the runtime journals the decks, else a note.
    let has_deck = biofoundry(
        &["runs", "export", &run_id, "--lab", "lab.toml"],
        dir.path(),
    );
    if String::from_utf8_lossy(&has_deck.stdout).contains("\"type\": \"deck\"") {
        assert_eq!(html.matches("class=\"labware\"").count(), 3, "plate maps");
        assert!(html.contains("tips used"), "the tip rack");
        assert!(
            html.contains("wells hold liquid"),
            "the plate and the reservoir"
        );
    } else {
        assert!(html.contains("no deck entry"));
    }
    // Nothing is loaded from elsewhere.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "a resource from elsewhere"
    );
    assert!(!html.contains("<script"), "a script");
    assert!(html.len() < 2 << 20, "{} bytes", html.len());

    let unknown = biofoundry(
        &["report", "no-such-run", "--lab", "lab.toml", "-o", "x.html"],
        dir.path(),
    );
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(text(&unknown).contains("no run `no-such-run`"));
    let no_journal = biofoundry(
        &[
            "report",
            &run_id,
            "--journal",
            "missing.sqlite",
            "-o",
            "x.html",
        ],
        dir.path(),
    );
    assert_eq!(no_journal.status.code(), Some(2), "{}", text(&no_journal));
    let from_file = biofoundry(
        &[
            "report",
            &run_id,
            "--journal",
            "data/journal.sqlite",
            "-o",
            "copy.html",
        ],
        dir.path(),
    );
    assert!(from_file.status.success(), "{}", text(&from_file));

    let Some(chromium) = require_chromium("a_run_report_has_its_sections_and_renders") else {
        return;
    };
    let png = dir.path().join("report.png");
    screenshot(&chromium, &path, &png, &dir.path().join("chromium-profile"));
    // The readings' line (2 px wide, anti-aliased at its edges) and the band
    // (opaque, drawn exactly) must both be on the page in quantity.
    let line = pixels_like(&png, hex(biofoundry::report::LINE_COLOUR), 40);
    let band = pixels_like(&png, hex(biofoundry::report::BAND_COLOUR), 3);
    eprintln!("screenshot: {line} pixels of the readings' line, {band} of the limit band");
    assert!(line > 800, "only {line} pixels of the readings' line");
    assert!(band > 20_000, "only {band} pixels of the limit band");
    if let Some(keep) = std::env::var_os("BIOFOUNDRY_KEEP_REPORT") {
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&path, keep.join("report.html"));
        let _ = std::fs::copy(&png, keep.join("report.png"));
    }
}
