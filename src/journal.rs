//! The run journal: every run's header (protocol text and sha256, parameters,
//! bindings, lab file, controller version, operator) and every event of the
//! run, in an SQLite file in the lab's data folder. Each entry carries the
//! sha256 of the previous entry's hash and its own JSON text, so changing,
//! removing or reordering an entry breaks the chain (`biofoundry runs verify`).
//!
//! The journal is the bus's durable sink: entries are chained as events happen
//! and committed together at the bus's flush points (before a device is sent
//! an operation, before the runtime waits), always before the console or MQTT
//! report them.

use crate::runtime::events::{Event, EventKind, EventSink};
use crate::runtime::machine::RunState;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The chain's first `prev` (the header entry's).
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("journal {path}: cannot create its folder: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no run `{0}` in the journal")]
    UnknownRun(String),
    #[error("run {0} is live in another controller process")]
    Live(String),
    #[error("run {run_id}: the journal does not verify at entry {seq} ({reason})")]
    Broken {
        run_id: String,
        seq: u64,
        reason: String,
    },
}

/// What the journal recorded of a run, to take it up again.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub run_id: String,
    pub protocol: String,
    /// The protocol text as it was checked and run.
    pub text: String,
    pub params: Vec<crate::protocol::ParamOverride>,
    /// role → device id.
    pub binds: Vec<(String, String)>,
    pub operator: Option<String>,
    /// Every entry after the header: (seq, event).
    pub events: Vec<(u64, Value)>,
    /// Where the protocol file was when the run started.
    pub file: Option<PathBuf>,
}

impl Recorded {
    /// Where the resumed run's protocol is taken to be: where its file was
    /// (so the labware definitions next to it are found), else an empty
    /// folder of the data folder (never the controller's working directory).
    pub fn source_path(&self, data_dir: &Path) -> PathBuf {
        self.file
            .clone()
            .filter(|f| f.parent().is_some_and(Path::is_dir))
            .unwrap_or_else(|| {
                data_dir
                    .join("resumed")
                    .join(format!("{}.toml", self.run_id))
            })
    }
}

/// What is known about a run when it starts.
#[derive(Debug, Clone, Serialize)]
pub struct RunHeader {
    pub run_id: String,
    pub protocol: String,
    pub version: Option<String>,
    pub sha256: String,
    /// The protocol file's text, as run.
    pub text: String,
    pub params: Value,
    /// role → device id.
    pub bindings: Value,
    /// The lab file's text, when the run had one.
    pub lab: Option<String>,
    pub controller_version: String,
    pub operator: Option<String>,
    /// Who started it: `operator (CLI)` or `mes (<cmd_id>)`.
    pub source: String,
    pub started_ms: u64,
    /// Where the protocol file was, so that a resumed run finds the labware
    /// definitions next to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// One row of `runs list`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub protocol: String,
    pub state: String,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub entries: u64,
}

/// One journal entry: its JSON text is what the hash covers.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub kind: String,
    pub body: String,
    pub prev: String,
    pub hash: String,
}

impl Entry {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// The outcome of `runs verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    Intact {
        entries: u64,
    },
    /// The first entry (by seq) that does not match the chain, and why.
    Broken {
        seq: u64,
        reason: String,
    },
}

fn chain_hash(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    protocol TEXT NOT NULL,
    state TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER
);
CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
";

/// Where a lab's journal lives.
pub fn journal_path(data_dir: &Path) -> PathBuf {
    data_dir.join("journal.sqlite")
}

fn open_connection(path: &Path) -> Result<Connection, JournalError> {
    let conn = crate::store::open(path).map_err(|failure| match failure {
        crate::store::OpenFailure::Folder(source) => JournalError::Folder {
            path: path.to_path_buf(),
            source,
        },
        crate::store::OpenFailure::Sqlite(source) => JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        },
    })?;
    conn.execute_batch(SCHEMA)
        .map_err(|source| JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(conn)
}

/// Reading the journal: runs, entries, verification.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

impl Journal {
    /// Opens the journal, first moving into it the tail logs left by runs
    /// whose process died.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let conn = open_connection(path)?;
        import_tails(&conn, path).map_err(|source| JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Journal {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Starts a run's journal: its header is entry 0 of its chain.
    pub fn begin(&self, header: &RunHeader) -> Result<JournalSink, JournalError> {
        let body = serde_json::to_string(&serde_json::json!({ "type": "run", "header": header }))
            .unwrap_or_default();
        let hash = chain_hash(GENESIS, &body);
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO runs (run_id, protocol, state, started_ms) VALUES (?1, ?2, 'idle', ?3)",
            params![header.run_id, header.protocol, header.started_ms as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO entries (run_id, seq, kind, body, prev, hash) VALUES (?1, 0, 'run', ?2, ?3, ?4)",
            params![header.run_id, body, GENESIS, hash],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        JournalSink::new(
            open_connection(&self.path)?,
            &self.path,
            &header.run_id,
            hash,
        )
    }

    /// Goes on with a run's chain (resuming it): the returned sink chains
    /// after the last entry.
    pub fn resume(&self, run_id: &str) -> Result<JournalSink, JournalError> {
        let last: Option<String> = self
            .conn
            .query_row(
                "SELECT hash FROM entries WHERE run_id = ?1 ORDER BY seq DESC LIMIT 1",
                params![run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let prev = last.ok_or_else(|| JournalError::UnknownRun(run_id.to_string()))?;
        JournalSink::new(open_connection(&self.path)?, &self.path, run_id, prev)
    }

    /// The header a run started with (entry 0).
    pub fn header(&self, run_id: &str) -> Result<Value, JournalError> {
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM entries WHERE run_id = ?1 AND seq = 0",
                params![run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let body = body.ok_or_else(|| JournalError::UnknownRun(run_id.to_string()))?;
        Ok(serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("header").cloned())
            .unwrap_or(Value::Null))
    }

    /// A run as recorded, for resuming it; a journal that does not verify is
    /// not a record to act on.
    pub fn recorded(&self, run_id: &str) -> Result<Recorded, JournalError> {
        if let Verified::Broken { seq, reason } = self.verify(run_id)? {
            return Err(JournalError::Broken {
                run_id: run_id.to_string(),
                seq,
                reason,
            });
        }
        let header = self.header(run_id)?;
        let pairs = |v: &Value| -> Vec<(String, String)> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |name: &str| header[name].as_str().map(str::to_string);
        Ok(Recorded {
            run_id: run_id.to_string(),
            protocol: text("protocol").unwrap_or_default(),
            text: text("text").unwrap_or_default(),
            params: pairs(&header["params"])
                .into_iter()
                .map(|(name, value)| crate::protocol::ParamOverride { name, value })
                .collect(),
            binds: pairs(&header["bindings"]),
            operator: text("operator"),
            file: text("file").map(PathBuf::from),
            events: self
                .entries(run_id)?
                .into_iter()
                .filter(|e| e.seq > 0)
                .map(|e| (e.seq, e.json()))
                .collect(),
        })
    }

    /// Runs that did not reach a final state (candidates for resuming), newest first.
    pub fn unfinished(&self) -> Result<Vec<RunSummary>, JournalError> {
        Ok(self
            .runs()?
            .into_iter()
            .filter(|r| !RunState::from_name(&r.state).is_some_and(RunState::is_final))
            .collect())
    }

    /// Every run, newest first.
    pub fn runs(&self) -> Result<Vec<RunSummary>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.run_id, r.protocol, r.state, r.started_ms, r.ended_ms, \
                 (SELECT COUNT(*) FROM entries e WHERE e.run_id = r.run_id) \
                 FROM runs r ORDER BY r.started_ms DESC, r.run_id DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RunSummary {
                    run_id: r.get(0)?,
                    protocol: r.get(1)?,
                    state: r.get(2)?,
                    started_ms: r.get::<_, i64>(3)?.max(0) as u64,
                    ended_ms: r.get::<_, Option<i64>>(4)?.map(|v| v.max(0) as u64),
                    entries: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// A run's entries in order (entry 0 is the header).
    pub fn entries(&self, run_id: &str) -> Result<Vec<Entry>, JournalError> {
        let known: Option<String> = self
            .conn
            .query_row("SELECT run_id FROM runs WHERE run_id = ?1", [run_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        if known.is_none() {
            return Err(JournalError::UnknownRun(run_id.to_string()));
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, kind, body, prev, hash FROM entries WHERE run_id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok(Entry {
                    seq: r.get::<_, i64>(0)?.max(0) as u64,
                    kind: r.get(1)?,
                    body: r.get(2)?,
                    prev: r.get(3)?,
                    hash: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Recomputes the chain: every entry's hash from the previous hash and its
    /// text, seq without gaps from 0, and the columns agreeing with the text.
    pub fn verify(&self, run_id: &str) -> Result<Verified, JournalError> {
        let entries = self.entries(run_id)?;
        let mut prev = GENESIS.to_string();
        for (i, e) in entries.iter().enumerate() {
            let broken = |reason: &str| Verified::Broken {
                seq: e.seq,
                reason: reason.to_string(),
            };
            if e.seq != i as u64 {
                return Ok(Verified::Broken {
                    seq: i as u64,
                    reason: format!("entry {i} is missing (next is {})", e.seq),
                });
            }
            if e.prev != prev {
                return Ok(broken("it does not follow the entry before it"));
            }
            if chain_hash(&prev, &e.body) != e.hash {
                return Ok(broken("its content was changed after it was written"));
            }
            let v = e.json();
            let seq_in_body = if i == 0 { Some(0) } else { v["seq"].as_u64() };
            if seq_in_body != Some(e.seq) || v["type"].as_str() != Some(e.kind.as_str()) {
                return Ok(broken("its columns disagree with its content"));
            }
            prev = e.hash.clone();
        }
        Ok(Verified::Intact {
            entries: entries.len() as u64,
        })
    }
}

/// The durable sink of a run's bus. Each event is chained at once; at the
/// bus's flush points (write-ahead points) the new entries are appended to the
/// run's tail log with one `write`, which a killed process cannot lose; the
/// entries go into SQLite in larger transactions (every 2 048 entries or
/// 200 ms, at a final state, at the end), after which the tail is emptied.
/// `Journal::open` moves the tail of a run whose process died into SQLite.
pub struct JournalSink {
    conn: Connection,
    path: PathBuf,
    run_id: String,
    prev: String,
    /// Chained, not yet in SQLite.
    buffered: Vec<Buffered>,
    /// How many of `buffered` are in the tail log already.
    tailed: usize,
    tail: Option<Tail>,
    last_commit: std::time::Instant,
    /// A final run state is pending: commit it to SQLite at once.
    final_pending: bool,
}

/// A run's tail log, locked while its run is live.
struct Tail {
    file: std::fs::File,
    path: PathBuf,
}

struct Buffered {
    seq: u64,
    kind: &'static str,
    body: String,
    prev: String,
    hash: String,
    /// A run state change also updates the `runs` row.
    state: Option<(&'static str, Option<i64>)>,
}

/// Entries in SQLite at most this many behind.
const COMMIT_ENTRIES: usize = 2048;
/// ... and at most this old.
const COMMIT_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// The folder of the tail logs of a journal file.
fn tail_dir(journal: &Path) -> PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push(".tail");
    PathBuf::from(name)
}

fn tail_file(journal: &Path, run_id: &str) -> PathBuf {
    let safe: String = run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    tail_dir(journal).join(format!("{safe}.log"))
}

impl JournalSink {
    /// Takes the run's tail log; refused when another process has it (the
    /// run is live there: two controllers must never drive one run).
    fn new(
        conn: Connection,
        path: &Path,
        run_id: &str,
        prev: String,
    ) -> Result<JournalSink, JournalError> {
        Ok(JournalSink {
            conn,
            path: path.to_path_buf(),
            run_id: run_id.to_string(),
            prev,
            buffered: Vec::new(),
            tailed: 0,
            tail: claim_tail(path, run_id)?,
            last_commit: std::time::Instant::now(),
            final_pending: false,
        })
    }

    fn commit(&mut self) -> Result<(), rusqlite::Error> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO entries (run_id, seq, kind, body, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for b in &self.buffered {
                insert.execute(params![
                    self.run_id,
                    b.seq as i64,
                    b.kind,
                    b.body,
                    b.prev,
                    b.hash
                ])?;
                if let Some((state, ended)) = b.state {
                    tx.execute(
                        "UPDATE runs SET state = ?2, ended_ms = COALESCE(?3, ended_ms) WHERE run_id = ?1",
                        params![self.run_id, state, ended],
                    )?;
                }
            }
        }
        tx.commit()?;
        self.buffered.clear();
        self.tailed = 0;
        self.final_pending = false;
        self.last_commit = std::time::Instant::now();
        if let Some(tail) = &self.tail {
            // In SQLite now: the tail starts again (appends go to its new end).
            let _ = tail.file.set_len(0);
        }
        Ok(())
    }

    /// Appends the entries not yet in the tail log with one write.
    fn append_tail(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if self.tail.is_none() {
            return Err(std::io::Error::other("no tail log"));
        }
        let mut text = String::new();
        for b in &self.buffered[self.tailed..] {
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\n",
                self.run_id, b.seq, b.kind, b.prev, b.hash, b.body
            ));
        }
        if let Some(tail) = &mut self.tail {
            tail.file.write_all(text.as_bytes())?;
        }
        self.tailed = self.buffered.len();
        Ok(())
    }

    fn commit_or_log(&mut self) {
        if let Err(e) = self.commit() {
            // The run goes on (a stopped run is worse than a gap); the gap
            // shows in `runs verify`, and the log says why.
            tracing::error!(target: "journal", "{}: run {}: {e}", self.path.display(), self.run_id);
            self.buffered.clear();
            self.tailed = 0;
        }
    }
}

impl EventSink for JournalSink {
    fn publish(&mut self, event: &Event) {
        let body = serde_json::to_string(event).unwrap_or_default();
        let hash = chain_hash(&self.prev, &body);
        let state = match &event.kind {
            EventKind::RunState { state, .. } => {
                self.final_pending |= state.is_final();
                Some((
                    state.name(),
                    state.is_final().then_some(event.unix_ms as i64),
                ))
            }
            _ => None,
        };
        self.buffered.push(Buffered {
            seq: event.seq,
            kind: event.kind.name(),
            body,
            prev: std::mem::replace(&mut self.prev, hash.clone()),
            hash,
            state,
        });
    }

    fn durable(&self) -> bool {
        true
    }

    fn flush(&mut self) {
        if self.tailed == self.buffered.len() {
            return;
        }
        let due = self.final_pending
            || self.buffered.len() >= COMMIT_ENTRIES
            || self.last_commit.elapsed() >= COMMIT_AFTER;
        if due {
            self.commit_or_log();
        } else if let Err(e) = self.append_tail() {
            tracing::warn!(target: "journal", "{}: run {}: tail log: {e}; committing to SQLite instead", self.path.display(), self.run_id);
            self.commit_or_log();
        }
    }
}

impl Drop for JournalSink {
    fn drop(&mut self) {
        if !self.buffered.is_empty() && self.tailed < self.buffered.len() {
            // Not in the tail yet: there is nowhere else for them.
            let _ = self.append_tail();
        }
        let committed = self.buffered.is_empty() || self.commit().is_ok();
        match self.tail.take() {
            Some(tail) if committed => {
                let _ = std::fs::remove_file(&tail.path);
            }
            // Left for the next `Journal::open` to move into SQLite.
            Some(_) => {
                tracing::error!(target: "journal", "{}: run {}: the last entries stay in the tail log", self.path.display(), self.run_id)
            }
            None => {}
        }
    }
}

/// Opens and locks a run's tail log, held while the run is live here. A tail
/// that cannot be opened leaves the run on SQLite commits alone (logged).
fn claim_tail(journal: &Path, run_id: &str) -> Result<Option<Tail>, JournalError> {
    let path = tail_file(journal, run_id);
    let open = || -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(tail_dir(journal))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    };
    let file = match open() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(target: "journal", "{}: {e}; committing every write-ahead point to SQLite", path.display());
            return Ok(None);
        }
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(Tail { file, path })),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Live(run_id.to_string())),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(target: "journal", "{}: {e}; committing every write-ahead point to SQLite", path.display());
            Ok(None)
        }
    }
}

/// Moves into SQLite the tail logs whose runs' processes died (their lock is
/// free): entries after the last one SQLite has, as long as they continue its
/// chain; a torn last line is left out.
fn import_tails(conn: &Connection, journal: &Path) -> Result<(), rusqlite::Error> {
    let Ok(dir) = std::fs::read_dir(tail_dir(journal)) else {
        return Ok(());
    };
    for item in dir.flatten() {
        let path = item.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // its run is live
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tx = conn.unchecked_transaction()?;
        let mut last: Option<(String, i64, String)> = None;
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                break; // torn
            };
            let f: Vec<&str> = line.splitn(6, '\t').collect();
            let [run_id, seq, kind, prev, hash, body] = f[..] else {
                break;
            };
            let Ok(seq) = seq.parse::<i64>() else {
                break;
            };
            if last.as_ref().is_none_or(|(r, _, _)| r != run_id) {
                let top: Option<(i64, String)> = tx
                    .query_row(
                        "SELECT seq, hash FROM entries WHERE run_id = ?1 ORDER BY seq DESC LIMIT 1",
                        params![run_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((s, h)) = top else {
                    break; // no header: not a run of this journal
                };
                last = Some((run_id.to_string(), s, h));
            }
            let Some((_, top_seq, top_hash)) = &mut last else {
                break;
            };
            if seq <= *top_seq {
                continue; // in SQLite already
            }
            if seq != *top_seq + 1 || prev != top_hash.as_str() || chain_hash(prev, body) != hash {
                break;
            }
            tx.execute(
                "INSERT INTO entries (run_id, seq, kind, body, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![run_id, seq, kind, body, prev, hash],
            )?;
            if kind == "run_state" {
                let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                if let Some(state) = v["state"].as_str() {
                    let ended = RunState::from_name(state)
                        .is_some_and(RunState::is_final)
                        .then(|| v["unix_ms"].as_i64())
                        .flatten();
                    tx.execute(
                        "UPDATE runs SET state = ?2, ended_ms = COALESCE(?3, ended_ms) WHERE run_id = ?1",
                        params![run_id, state, ended],
                    )?;
                }
            }
            *top_seq = seq;
            *top_hash = hash.to_string();
        }
        tx.commit()?;
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// The samples of a run as a tidy table: one row per value.
pub fn samples_csv(entries: &[Entry]) -> String {
    let mut out = String::from("run_seq,t_s,time,device,source,signal,value,unit\n");
    for e in entries.iter().filter(|e| e.kind == "sample") {
        let v = e.json();
        let time = v["unix_ms"]
            .as_u64()
            .map(crate::mqtt::publisher::timestamp)
            .unwrap_or_default();
        let Some(values) = v["values"].as_array() else {
            continue;
        };
        for pair in values {
            let name = pair[0].as_str().unwrap_or("");
            let q = &pair[1];
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                e.seq,
                v["t_s"].as_f64().unwrap_or(f64::NAN),
                time,
                csv_field(v["device"].as_str().unwrap_or("")),
                csv_field(v["source"].as_str().unwrap_or("")),
                csv_field(name),
                q["value"].as_f64().map_or(String::new(), |x| x.to_string()),
                csv_field(&quantity_unit(q)),
            ));
        }
    }
    out
}

fn quantity_unit(q: &Value) -> String {
    q["unit"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            let dim: crate::units::Dimension =
                serde_json::from_value(q["dimension"].clone()).ok()?;
            Some(dim.canonical_unit().to_string())
        })
        .unwrap_or_default()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Opens the lab's journal and starts the run's chain; the returned sink goes
/// first on the run's bus.
pub fn begin_run(
    lab: &crate::lab::LabFile,
    info: &crate::mqtt::publisher::RunInfo,
    text: &str,
    setup: &crate::runtime::executor::RunSetup,
    source: &str,
    file: &Path,
) -> Result<JournalSink, JournalError> {
    let bindings: serde_json::Map<String, Value> = setup
        .bindings
        .iter()
        .map(|(role, h)| (role.clone(), Value::String(h.device().id().to_string())))
        .collect();
    let header = RunHeader {
        run_id: info.run_id.clone(),
        protocol: info.protocol.clone(),
        version: info.version.clone(),
        sha256: info.sha256.clone(),
        text: text.to_string(),
        params: info.params.clone(),
        bindings: Value::Object(bindings),
        lab: Some(lab.file.text.clone()),
        controller_version: env!("CARGO_PKG_VERSION").to_string(),
        operator: info.operator.clone(),
        source: source.to_string(),
        started_ms: crate::store::now_ms(),
        file: Some(file.display().to_string()),
    };
    Journal::open(&journal_path(&lab.data_dir()))?.begin(&header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::events::StepPhase;
    use crate::runtime::machine::RunState;

    fn header(run_id: &str) -> RunHeader {
        RunHeader {
            run_id: run_id.into(),
            protocol: "p".into(),
            version: None,
            sha256: "x".into(),
            text: "format = 1".into(),
            params: Value::Null,
            bindings: Value::Null,
            lab: None,
            controller_version: "0".into(),
            operator: None,
            source: "test".into(),
            started_ms: 1,
            file: None,
        }
    }

    fn event(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            t_s: seq as f64,
            unix_ms: 1000 + seq,
            kind,
        }
    }

    fn journal_with_a_run() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        let j = Journal::open(&path).unwrap();
        let mut sink = j.begin(&header("r1")).unwrap();
        sink.publish(&event(
            1,
            EventKind::RunState {
                state: RunState::Running,
                reason: None,
            },
        ));
        sink.publish(&event(
            2,
            EventKind::Step {
                step_id: "s1".into(),
                action: "wait".into(),
                phase: StepPhase::Started,
                repetition: None,
                detail: None,
            },
        ));
        sink.publish(&event(
            3,
            EventKind::RunState {
                state: RunState::Completed,
                reason: None,
            },
        ));
        (dir, path)
    }

    #[test]
    fn a_run_is_listed_and_its_chain_verifies() {
        let (_dir, path) = journal_with_a_run();
        let j = Journal::open(&path).unwrap();
        let runs = j.runs().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].state, "completed");
        assert_eq!(runs[0].entries, 4);
        assert_eq!(j.verify("r1").unwrap(), Verified::Intact { entries: 4 });
        assert!(matches!(j.verify("nope"), Err(JournalError::UnknownRun(_))));
    }

    #[test]
    fn a_changed_removed_or_relabelled_entry_breaks_the_chain() {
        let (_dir, path) = journal_with_a_run();
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE entries SET body = replace(body, 's1', 's9') WHERE seq = 2",
            [],
        )
        .unwrap();
        let j = Journal::open(&path).unwrap();
        assert!(matches!(
            j.verify("r1").unwrap(),
            Verified::Broken { seq: 2, .. }
        ));

        let (_dir, path) = journal_with_a_run();
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM entries WHERE seq = 1", [])
            .unwrap();
        let j = Journal::open(&path).unwrap();
        assert!(matches!(
            j.verify("r1").unwrap(),
            Verified::Broken { seq: 1, .. }
        ));

        let (_dir, path) = journal_with_a_run();
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE entries SET kind = 'alarm' WHERE seq = 2", [])
            .unwrap();
        let j = Journal::open(&path).unwrap();
        let v = j.verify("r1").unwrap();
        assert!(matches!(v, Verified::Broken { seq: 2, .. }), "{v:?}");
    }

    #[test]
    fn a_dead_runs_tail_log_is_moved_into_sqlite_up_to_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        let j = Journal::open(&path).unwrap();
        let mut sink = j.begin(&header("r4")).unwrap();
        for seq in 1..=3 {
            sink.publish(&event(
                seq,
                EventKind::Log {
                    step_id: "s".into(),
                    message: format!("line {seq}"),
                },
            ));
        }
        // The lines a dead process left: what its sink had chained.
        let mut text: String = sink
            .buffered
            .iter()
            .map(|b| {
                format!(
                    "r4\t{}\t{}\t{}\t{}\t{}\n",
                    b.seq, b.kind, b.prev, b.hash, b.body
                )
            })
            .collect();
        text.push_str("r4\t4\tlog\tabc"); // torn by the kill
        sink.buffered.clear();
        drop(sink);
        drop(j);
        std::fs::create_dir_all(tail_dir(&path)).unwrap();
        std::fs::write(tail_file(&path, "r4"), text).unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.verify("r4").unwrap(), Verified::Intact { entries: 4 });
        assert!(!tail_file(&path, "r4").exists());
        assert_eq!(j.entries("r4").unwrap()[3].json()["message"], "line 3");
    }

    #[test]
    fn a_live_runs_tail_log_is_left_alone_and_committed_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        let j = Journal::open(&path).unwrap();
        let mut sink = j.begin(&header("r5")).unwrap();
        sink.publish(&event(
            1,
            EventKind::Log {
                step_id: "s".into(),
                message: "x".into(),
            },
        ));
        sink.flush();
        // Written ahead to the tail, not yet in SQLite; a reader leaves it.
        assert!(tail_file(&path, "r5").exists());
        let reader = Journal::open(&path).unwrap();
        assert_eq!(reader.entries("r5").unwrap().len(), 1);
        assert!(tail_file(&path, "r5").exists());
        // A second controller cannot take the run up while it is live.
        assert!(matches!(reader.resume("r5"), Err(JournalError::Live(_))));
        drop(sink);
        assert_eq!(reader.entries("r5").unwrap().len(), 2);
        assert!(!tail_file(&path, "r5").exists());
    }

    #[test]
    fn a_resumed_protocol_is_read_where_it_was_or_in_the_data_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut recorded = Recorded {
            run_id: "r9".into(),
            protocol: "p".into(),
            text: String::new(),
            params: Vec::new(),
            binds: Vec::new(),
            operator: None,
            events: Vec::new(),
            file: Some(dir.path().join("p.toml")),
        };
        let data = Path::new("/data");
        assert_eq!(recorded.source_path(data), dir.path().join("p.toml"));
        recorded.file = Some(PathBuf::from("/no/such/folder/p.toml"));
        assert_eq!(
            recorded.source_path(data),
            data.join("resumed").join("r9.toml")
        );
        recorded.file = None;
        assert_eq!(
            recorded.source_path(data),
            data.join("resumed").join("r9.toml")
        );
    }

    #[test]
    fn samples_become_one_row_per_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        let j = Journal::open(&path).unwrap();
        let mut sink = j.begin(&header("r2")).unwrap();
        sink.publish(&event(
            1,
            EventKind::Sample {
                device: "br1".into(),
                source: "watch, ph".into(),
                values: vec![
                    (
                        "temperature".into(),
                        crate::units::Quantity::new(37.5, crate::units::Dimension::Temperature),
                    ),
                    (
                        "dissolved_oxygen".into(),
                        crate::units::Quantity::new(40.0, crate::units::Dimension::Percent),
                    ),
                ],
            },
        ));
        drop(sink);
        let csv = samples_csv(&j.entries("r2").unwrap());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3, "{csv}");
        assert!(lines[1].starts_with("1,1,"), "{csv}");
        assert!(
            lines[1].contains(",br1,\"watch, ph\",temperature,37.5,C"),
            "{csv}"
        );
    }
}
