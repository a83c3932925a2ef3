//! The `biofoundry` binary as a technician or an MES uses it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn biofoundry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn protocols() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("protocols"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_protocol_passes_check_without_warnings() {
    let files = protocols();
    assert!(files.len() >= 6, "{files:?}");
    let mut args = vec!["check", "--format", "json"];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = biofoundry(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let diagnostics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        diagnostics,
        serde_json::json!([]),
        "warnings in the examples"
    );
}

#[test]
fn errors_exit_1_with_rustc_style_location_and_hint() {
    let out = biofoundry(&[
        "check",
        "tests/bad/out-of-limits-incubator-temperature.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("error[out-of-limits]"), "{text}");
    assert!(
        text.contains("--> tests/bad/out-of-limits-incubator-temperature.toml:"),
        "{text}"
    );
    assert!(text.contains("^^^^"), "{text}");
    assert!(text.contains("= help:"), "{text}");
    assert!(text.contains("1 error"), "{text}");
}

#[test]
fn json_diagnostics_have_the_documented_fields() {
    let out = biofoundry(&[
        "check",
        "--format",
        "json",
        "tests/bad/unknown-key-step.toml",
        "protocols/fed_batch.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!all.is_empty());
    for d in &all {
        for key in [
            "file", "line", "column", "severity", "code", "message", "hint",
        ] {
            assert!(d.get(key).is_some(), "{key} missing in {d}");
        }
        assert!(d["line"].as_u64().unwrap() >= 1 && d["column"].as_u64().unwrap() >= 1);
        assert_eq!(d["file"], "tests/bad/unknown-key-step.toml");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        biofoundry(&["check", "no/such/file.toml"]).status.code(),
        Some(2)
    );
    assert_eq!(biofoundry(&["check"]).status.code(), Some(2));
    assert_eq!(
        biofoundry(&["check", "--frobnicate", "protocols/fed_batch.toml"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        biofoundry(&["check", "--param", "novalue", "protocols/fed_batch.toml"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_param_override_is_checked_like_a_file_value() {
    let out = biofoundry(&[
        "check",
        "--param",
        "volume=10 s",
        "protocols/plate_replication_384.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("`s` is not a unit of volume (from --param volume=10 s)"),
        "{}",
        stdout(&out)
    );
    let ok = biofoundry(&[
        "check",
        "--param",
        "volume=4 uL",
        "protocols/plate_replication_384.toml",
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
}

#[test]
fn plan_lists_operations_and_final_volumes() {
    let out = biofoundry(&[
        "plan",
        "--format",
        "json",
        "tests/data/custom_labware_protocol.toml",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ops: Vec<&str> = plan["steps"][0]["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "pick_up_tip",
            "aspirate",
            "dispense",
            "aspirate",
            "dispense",
            "drop_tip"
        ]
    );
    assert_eq!(plan["steps"][0]["device"], "lh");
    let wells = plan["wells"].as_array().unwrap();
    let volume = |w: &str| {
        wells
            .iter()
            .find(|x| x["well"] == w)
            .map(|x| x["volume_ul"].as_f64().unwrap())
    };
    assert_eq!(volume("A1"), Some(60.0));
    assert_eq!(volume("A2"), Some(20.0));
    assert_eq!(volume("B2"), Some(20.0));
    assert_eq!(wells[1]["liquids"], serde_json::json!(["dye"]));

    let human = biofoundry(&["plan", "tests/data/custom_labware_protocol.toml"]);
    let text = stdout(&human);
    assert!(text.contains("pick up tip tips:A1 (300 uL)"), "{text}");
    assert!(text.contains("custom:A1"), "{text}");
    assert_eq!(
        biofoundry(&["plan", "tests/bad/out-of-tips-always.toml"])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn schema_accepts_every_example_and_rejects_a_misspelt_key() {
    let out = biofoundry(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    for f in protocols() {
        let doc: toml::Value = toml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let doc = serde_json::to_value(doc).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
    }
    let bad: toml::Value = toml::from_str(
        &std::fs::read_to_string(root().join("tests/bad/unknown-key-step.toml")).unwrap(),
    )
    .unwrap();
    assert!(!validator.is_valid(&serde_json::to_value(bad).unwrap()));
}

#[test]
fn labware_and_kinds_are_listed() {
    let out = stdout(&biofoundry(&["labware"]));
    assert!(
        out.contains("corning_384_wellplate_112ul_flat") && out.contains("384 wells"),
        "{out}"
    );
    let kinds = stdout(&biofoundry(&["kinds", "incubator"]));
    assert!(
        kinds.contains("setpoint temperature") && kinds.contains("4..50 C"),
        "{kinds}"
    );
    assert_eq!(biofoundry(&["kinds", "toaster"]).status.code(), Some(2));
}

fn biofoundry_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn run_completes_a_short_protocol_and_answers_its_prompt() {
    // Without a terminal: plain lines; the piped Enter answers the prompt.
    let out = biofoundry_with_input(&["run", "--speed", "50", "protocols/dye_check.toml"], "\n");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("step fill (lh.transfer) completed"), "{text}");
    assert!(text.contains("step look answered: confirmed"), "{text}");
    assert!(text.contains("Run completed: finished in"), "{text}");
    assert!(text.contains("4 of 4 steps done, 0 alarms"), "{text}");
}

#[test]
fn run_refuses_a_protocol_with_errors_and_bad_bindings() {
    let out = biofoundry(&["run", "tests/bad/out-of-limits-incubator-temperature.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not run"));
    let out = biofoundry(&["run", "--bind", "lh=incubator", "protocols/dye_check.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "--bind lh=incubator: `incubator` is an incubator, but `lh` needs a liquid_handler"
        ),
        "{err}"
    );
}

#[test]
fn simulate_reports_every_example() {
    for f in protocols() {
        let name = f.display().to_string();
        let out = biofoundry(&["simulate", "--format", "json", &name]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sim["state"], "completed", "{name}");
        assert!(sim["duration_s"].as_f64().unwrap() > 0.0, "{name}");
        assert!(
            !sim["critical_path"].as_array().unwrap().is_empty(),
            "{name}"
        );
        for d in sim["devices"].as_array().unwrap() {
            let u = d["utilisation"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&u), "{name}: {d}");
        }
    }
    let human = stdout(&biofoundry(&["simulate", "protocols/dye_check.toml"]));
    assert!(human.contains("estimated duration  44 s"), "{human}");
    assert!(
        human.contains("Critical path: fill -> look -> step-4"),
        "{human}"
    );
}
