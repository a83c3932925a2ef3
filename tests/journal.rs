//! The run journal through the CLI: a run on a lab is journaled; `runs list`,
//! `show`, `export` and `verify` read it; a modified entry fails `verify`.

use std::path::Path;
use std::process::{Command, Output};

fn biofoundry(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
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

#[test]
fn a_run_is_journaled_listed_exported_and_verified_and_tampering_shows() {
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
    let protocol = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/protocols/media_conditioning.toml"
    );
    let run = biofoundry(
        &[
            "run",
            protocol,
            "--lab",
            "lab.toml",
            "--speed",
            "200",
            "--operator",
            "ada",
        ],
        dir.path(),
    );
    assert!(run.status.success(), "{}", text(&run));

    let list = biofoundry(&["runs", "list", "--lab", "lab.toml", "--json"], dir.path());
    let runs: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(runs[0]["state"], "completed");
    let run_id = runs[0]["run_id"].as_str().expect("run id").to_string();

    let show = biofoundry(&["runs", "show", &run_id, "--lab", "lab.toml"], dir.path());
    let timeline = text(&show);
    assert!(timeline.contains("\"Medium conditioning\""), "{timeline}");
    assert!(
        timeline.contains("started by operator (CLI), operator ada"),
        "{timeline}"
    );
    assert!(
        timeline.contains("command start from operator"),
        "{timeline}"
    );
    assert!(
        timeline.contains("step conditions br.set completed"),
        "{timeline}"
    );
    assert!(timeline.contains("run completed"), "{timeline}");

    let export = biofoundry(
        &[
            "runs", "export", &run_id, "--lab", "lab.toml", "--format", "json",
        ],
        dir.path(),
    );
    let entries: serde_json::Value = serde_json::from_slice(&export.stdout).expect("json");
    let header = &entries[0]["header"];
    assert_eq!(header["protocol"], "Medium conditioning");
    assert!(
        header["text"]
            .as_str()
            .is_some_and(|t| t.contains("[protocol]"))
    );
    assert_eq!(header["bindings"]["br"], "br1");
    assert!(
        header["lab"]
            .as_str()
            .is_some_and(|t| t.contains("[[device]]"))
    );
    assert_eq!(header["sha256"].as_str().map(str::len), Some(64));

    let csv = biofoundry(
        &[
            "runs", "export", &run_id, "--lab", "lab.toml", "--format", "csv",
        ],
        dir.path(),
    );
    let csv = String::from_utf8_lossy(&csv.stdout).to_string();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("run_seq,t_s,time,device,source,signal,value,unit")
    );
    let rows: Vec<&str> = lines.collect();
    assert!(rows.len() >= 10, "{csv}");
    assert!(
        rows.iter()
            .any(|r| r.contains(",br1,") && r.contains(",ph,")),
        "{csv}"
    );

    let ok = biofoundry(
        &["runs", "verify", &run_id, "--lab", "lab.toml"],
        dir.path(),
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("hash chain intact"));

    // Someone edits a step's outcome in the database.
    let db = dir.path().join("data").join("journal.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("journal");
    let changed = conn
        .execute(
            "UPDATE entries SET body = replace(body, '\"completed\"', '\"skipped\"') \
             WHERE seq = (SELECT MIN(seq) FROM entries WHERE kind = 'step' AND body LIKE '%completed%')",
            [],
        )
        .expect("update");
    assert_eq!(changed, 1);
    drop(conn);
    let bad = biofoundry(
        &["runs", "verify", &run_id, "--lab", "lab.toml"],
        dir.path(),
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("was changed after it was written"),
        "{}",
        text(&bad)
    );

    let unknown = biofoundry(
        &["runs", "verify", "no-such-run", "--lab", "lab.toml"],
        dir.path(),
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown).contains("no run `no-such-run`"),
        "{}",
        text(&unknown)
    );
}
