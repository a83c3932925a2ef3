//! Crash recovery through the CLI: the real `biofoundry run` process is
//! killed with SIGKILL at 20 points of a run (inside multi-well transfers,
//! during a wait, between steps), then `biofoundry resume` takes the run up.
//! Every resumed run must complete (the operator answers `retry` when it
//! holds for an uncertain operation) with a journal that verifies, no step
//! started or completed twice, no operation done twice, the same final deck
//! as a run that was never interrupted, and the bioreactor sampled again.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PROTOCOL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/resume_workflow.toml"
);
const SPEED: &str = "1000";
const KILLS: u64 = 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_biofoundry"))
}

/// A lab file (the simulated lab of examples/) whose data folder is `data_dir`.
fn lab(dir: &Path, name: &str, data_dir: &str) -> PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sim-lab.toml"
    ))
    .expect("lab")
    .replace(
        "data_dir = \"../target/biofoundry-data\"",
        &format!("data_dir = \"{data_dir}\""),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).expect("lab");
    path
}

/// Every entry of the journal's only run, in order (none while it is created).
fn entries(db: &Path) -> Vec<Value> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare("SELECT body FROM entries ORDER BY run_id, seq") else {
        return Vec::new();
    };
    stmt.query_map([], |r| r.get::<_, String>(0))
        .map(|rows| {
            rows.filter_map(Result::ok)
                .filter_map(|b| serde_json::from_str(&b).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn entry_count(db: &Path) -> usize {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM entries", [], |r| r.get::<_, i64>(0))
                .ok()
        })
        .unwrap_or(0) as usize
}

fn run_id(db: &Path) -> String {
    entries(db)
        .first()
        .and_then(|h| h["header"]["run_id"].as_str().map(str::to_string))
        .expect("a run in the journal")
}

fn last_deck(entries: &[Value]) -> Value {
    entries
        .iter()
        .rev()
        .find(|e| e["type"] == "deck")
        .map(|e| e["labware"].clone())
        .expect("a deck entry")
}

fn final_state(entries: &[Value]) -> String {
    entries
        .iter()
        .rev()
        .find(|e| e["type"] == "run_state")
        .and_then(|e| e["state"].as_str())
        .unwrap_or("none")
        .to_string()
}

/// Same labware, same tips used, same volumes (to 1e-6 µL).
fn same_deck(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_array(), b.as_array()) else {
        return false;
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x["name"] == y["name"]
                && x["slot"] == y["slot"]
                && x["tips_used"] == y["tips_used"]
                && match (x["volumes_ul"].as_object(), y["volumes_ul"].as_object()) {
                    (Some(vx), Some(vy)) => {
                        vx.len() == vy.len()
                            && vx.iter().all(|(w, v)| {
                                vy.get(w).and_then(Value::as_f64).is_some_and(|u| {
                                    (u - v.as_f64().unwrap_or(f64::NAN)).abs() < 1e-6
                                })
                            })
                    }
                    _ => false,
                }
        })
}

/// Where a kill landed, from the last entry written before it.
#[derive(Debug, Default)]
struct Landing {
    inside_transfer: bool,
    during_wait: bool,
}

fn landing(entries: &[Value]) -> Landing {
    let mut started: Vec<String> = Vec::new();
    let mut transfer_ops_done = 0;
    for e in entries {
        match e["type"].as_str() {
            Some("step") => {
                let id = e["step_id"].as_str().unwrap_or("").to_string();
                match e["phase"].as_str() {
                    Some("started") => {
                        started.push(id);
                        transfer_ops_done = 0;
                    }
                    Some("completed") => started.retain(|s| *s != id),
                    _ => {}
                }
            }
            Some("operation") if e["phase"] == "done" => transfer_ops_done += 1,
            _ => {}
        }
    }
    let in_transfer = started
        .iter()
        .any(|s| matches!(s.as_str(), "buffer" | "dye" | "mix"));
    Landing {
        inside_transfer: in_transfer && transfer_ops_done > 0,
        during_wait: started.iter().any(|s| s == "settle"),
    }
}

/// `biofoundry resume`, answering `retry` whenever the run holds.
fn resume(dir: &Path, lab: &Path, run_id: &str) -> (Option<i32>, String) {
    let mut child = bin()
        .args(["resume", run_id, "--lab"])
        .arg(lab)
        .args(["--speed", SPEED])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("resume starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take();
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("resume did not finish in 90 s:\n{output}");
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if line.starts_with("Held.")
                    && let Some(s) = stdin.as_mut()
                {
                    let _ = s.write_all(b"retry\n");
                    let _ = s.flush();
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(_)) = child.try_wait() {
                    // Drain what is left.
                    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                        output.push_str(&line);
                        output.push('\n');
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(stdin);
    let status = child.wait().expect("resume ends");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    output.push_str(&err);
    (status.code(), output)
}

/// Per step: started and completed at most once; per operation: done at most once.
fn no_repeats(entries: &[Value]) -> Result<(), String> {
    use std::collections::HashMap;
    let mut phases: HashMap<(String, String), u32> = HashMap::new();
    let mut done: HashMap<(String, u64), u32> = HashMap::new();
    for e in entries {
        let id = e["step_id"].as_str().unwrap_or("").to_string();
        match e["type"].as_str() {
            Some("step") => {
                let phase = e["phase"].as_str().unwrap_or("").to_string();
                *phases.entry((id, phase)).or_default() += 1;
            }
            Some("operation") if e["phase"] == "done" => {
                *done
                    .entry((id, e["index"].as_u64().unwrap_or(0)))
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    if let Some(((id, phase), n)) = phases
        .iter()
        .find(|((_, p), n)| matches!(p.as_str(), "started" | "completed") && **n > 1)
    {
        return Err(format!("step {id} {phase} {n} times"));
    }
    if let Some(((id, k), n)) = done.iter().find(|(_, n)| **n > 1) {
        return Err(format!("step {id} operation {k} done {n} times"));
    }
    for step in ["cool", "buffer", "settle", "dye", "mix"] {
        if phases.get(&(step.to_string(), "completed".to_string())) != Some(&1) {
            return Err(format!("step {step} did not complete once"));
        }
    }
    Ok(())
}

#[test]
fn a_run_killed_at_twenty_points_is_resumed_without_repeating_anything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();

    // The reference: the same run, never interrupted.
    let reference_lab = lab(dir, "reference.toml", "reference");
    let run = bin()
        .args(["run", PROTOCOL, "--lab"])
        .arg(&reference_lab)
        .args(["--speed", SPEED])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let reference = entries(&dir.join("reference/journal.sqlite"));
    let total = reference.len();
    assert!(total > 200, "{total} entries");
    let reference_deck = last_deck(&reference);

    let mut inside_transfer = 0;
    let mut during_wait = 0;
    let mut held_and_answered = 0;
    let mut sampled_after = 0;
    let mut shown = false;
    for k in 1..=KILLS {
        let data = format!("data-{k}");
        let lab = lab(dir, &format!("lab-{k}.toml"), &data);
        let db = dir.join(&data).join("journal.sqlite");
        // Kill once the journal holds this many entries: spread over the run.
        let target = (total as u64 * k / (KILLS + 1)).max(2) as usize;
        let mut child = bin()
            .args(["run", PROTOCOL, "--lab"])
            .arg(&lab)
            .args(["--speed", SPEED])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        while entry_count(&db) < target {
            assert!(
                Instant::now() < deadline,
                "kill {k}: the run never reached {target} entries"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kill {k}: the run ended ({status}) before {target} entries");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("killed");
        // Any reader moves the dead run's tail log into SQLite.
        let list = bin()
            .args(["runs", "list", "--lab"])
            .arg(&lab)
            .current_dir(dir)
            .output()
            .expect("runs list");
        assert!(list.status.success());

        let before = entries(&db);
        let at = landing(&before);
        inside_transfer += usize::from(at.inside_transfer);
        during_wait += usize::from(at.during_wait);
        let id = run_id(&db);
        if final_state(&before) == "completed" {
            continue;
        }
        let (code, output) = resume(dir, &lab, &id);
        assert_eq!(
            code,
            Some(0),
            "kill {k} at {} entries:\n{output}",
            before.len()
        );
        if output.contains("Held.") {
            held_and_answered += 1;
        }

        let after = entries(&db);
        assert_eq!(final_state(&after), "completed", "kill {k}:\n{output}");
        let verify = bin()
            .args(["runs", "verify", &id, "--lab"])
            .arg(&lab)
            .current_dir(dir)
            .output()
            .expect("verify");
        assert!(
            verify.status.success(),
            "kill {k}: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
        if let Err(e) = no_repeats(&after) {
            panic!("kill {k} at {} entries: {e}\n{output}", before.len());
        }
        let deck = last_deck(&after);
        assert!(
            same_deck(&deck, &reference_deck),
            "kill {k}: final deck differs from the uninterrupted run:\n{deck}\n{reference_deck}"
        );
        if !shown {
            // The timeline says where the run was taken up.
            let show = bin()
                .args(["runs", "show", &id, "--lab"])
                .arg(&lab)
                .current_dir(dir)
                .output()
                .expect("show");
            let timeline = String::from_utf8_lossy(&show.stdout).to_string();
            assert!(timeline.contains("resumed after #"), "{timeline}");
            assert!(
                timeline.contains("operation buffer #1 sent: pick up tip"),
                "{timeline}"
            );
            shown = true;
        }
        let resumed_at = after
            .iter()
            .position(|e| e["type"] == "resumed")
            .expect("a resumed entry");
        if after[resumed_at..].iter().any(|e| e["type"] == "sample") {
            sampled_after += 1;
        }
    }
    assert!(
        inside_transfer >= 3,
        "{inside_transfer} kills inside a transfer"
    );
    assert!(during_wait >= 1, "{during_wait} kills during the wait");
    // Most kills leave minutes of lab time, so sampling must go on after them.
    assert!(sampled_after >= 10, "sampled after {sampled_after} resumes");
    eprintln!(
        "{KILLS} kills: {inside_transfer} inside a transfer, {during_wait} during the wait, {held_and_answered} held for an uncertain operation"
    );
}
