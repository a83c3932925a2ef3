//! The durable outbox: every message for the broker is written here first
//! (SQLite in WAL mode), numbered with the controller's `seq`, sent in order by
//! the link and deleted only after the broker's PUBACK. It also keeps the last
//! payload of every retained topic (re-published on each reconnect) and the
//! `cmd_id`s already seen (so a command is never run twice, even across restarts).
//!
//! WAL with `synchronous = NORMAL`: a commit is durable against a controller
//! crash or SIGKILL (the WAL is in the OS's cache), not against power loss
//! between checkpoints; a commit costs microseconds instead of an fsync.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What a message is, which decides what may be dropped at the outbox's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Device telemetry: the oldest is dropped first when the outbox is full.
    Telemetry = 0,
    /// Run events, run states, alarms, command results: never dropped.
    Event = 1,
    /// Controller and device state topics (no `seq`); never dropped.
    State = 2,
}

/// A message to append. `body` is a JSON object for messages that carry `seq`
/// (the outbox adds it); `raw` bodies (plain strings, empty clears) carry none.
pub enum Body {
    Json(serde_json::Map<String, serde_json::Value>),
    Raw(Vec<u8>),
}

pub struct NewMessage {
    pub topic: String,
    pub retain: bool,
    pub class: Class,
    pub body: Body,
}

/// A stored message, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: i64,
    pub seq: Option<u64>,
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Stored {
    /// The payload as sent after an outage or a restart: a JSON object gains
    /// `"replayed": true`, so consumers can tell history from live values.
    pub fn replayed_payload(&self) -> Vec<u8> {
        if self.seq.is_some() {
            mark_replayed(&self.payload)
        } else {
            self.payload.clone()
        }
    }
}

/// Adds `"replayed": true` to a JSON object that carries a `seq` (a copy of a
/// message sent before); other payloads are returned as they are.
pub fn mark_replayed(p: &[u8]) -> Vec<u8> {
    let numbered = p.windows(6).any(|w| w == b"\"seq\":");
    if numbered && p.len() > 2 && p.first() == Some(&b'{') && p.last() == Some(&b'}') {
        let mut out = Vec::with_capacity(p.len() + 17);
        out.extend_from_slice(&p[..p.len() - 1]);
        out.extend_from_slice(b",\"replayed\":true}");
        out
    } else {
        p.to_vec()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("outbox {path}: cannot create its folder: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an append did at the bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// The `seq` of the last message appended (if any carried one).
    pub last_seq: Option<u64>,
    /// Telemetry messages dropped to stay within the bound.
    pub dropped: u64,
}

/// Counters shared by the writer and the link (the link deletes).
#[derive(Debug, Default)]
pub struct OutboxCounts {
    /// Messages in the outbox (unsent or unacknowledged). Signed: the writer
    /// counts a message before its commit, so an acknowledgement can never be
    /// subtracted before the message was added.
    unsent: AtomicI64,
    /// Telemetry messages dropped at the bound since the controller started.
    pub dropped: AtomicU64,
}

/// The writer's side: appends messages, records retained state and commands.
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    limit: u64,
    next_seq: u64,
    counts: Arc<OutboxCounts>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    class INTEGER NOT NULL
);
-- No index on class: the bound's delete walks from the oldest row, where
-- telemetry is most of what it finds, and an index costs every append.
DROP INDEX IF EXISTS outbox_class;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    outbox_id INTEGER
);
CREATE TABLE IF NOT EXISTS commands (
    cmd_id TEXT PRIMARY KEY,
    verb TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
";

/// Command ids are remembered this long (QoS 1 redelivery and MES retries
/// happen within minutes; a month is generous).
const COMMAND_MEMORY_MS: u64 = super::command::COMMAND_MEMORY.as_millis() as u64;

pub use crate::store::now_ms;

impl OutboxError {
    fn opening(path: &Path, failure: crate::store::OpenFailure) -> OutboxError {
        let path = path.to_path_buf();
        match failure {
            crate::store::OpenFailure::Folder(source) => OutboxError::Folder { path, source },
            crate::store::OpenFailure::Sqlite(source) => OutboxError::Sqlite { path, source },
        }
    }
}

impl OutboxCounts {
    /// Messages in the outbox (unsent or unacknowledged).
    pub fn unsent(&self) -> u64 {
        self.unsent.load(Ordering::Relaxed).max(0) as u64
    }
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`, keeping at most `limit` messages.
    pub fn open(path: &Path, limit: u64) -> Result<Outbox, OutboxError> {
        let err = |source| OutboxError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = crate::store::open(path).map_err(|f| OutboxError::opening(path, f))?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let next_seq: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(err)?
            .map_or(1, |v| v.max(1) as u64);
        // `meta` is brought up to date when messages are deleted; the
        // newest unsent message may be ahead of it.
        let in_outbox: Option<i64> = conn
            .query_row(
                "SELECT seq FROM outbox WHERE seq IS NOT NULL ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let next_seq = next_seq.max(in_outbox.map_or(0, |s| s.max(0) as u64 + 1));
        let unsent: i64 = conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        let cutoff = now_ms().saturating_sub(COMMAND_MEMORY_MS) as i64;
        conn.execute("DELETE FROM commands WHERE received_ms < ?1", [cutoff])
            .map_err(err)?;
        let counts = Arc::new(OutboxCounts::default());
        counts.unsent.store(unsent.max(0), Ordering::Relaxed);
        Ok(Outbox {
            conn,
            path: path.to_path_buf(),
            limit: limit.max(1),
            next_seq,
            counts,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn counts(&self) -> Arc<OutboxCounts> {
        self.counts.clone()
    }

    /// The `seq` the next message will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn err(&self, source: rusqlite::Error) -> OutboxError {
        OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends messages in one transaction, numbering those with JSON bodies.
    /// Returns after the commit: the messages survive a crash from here on.
    pub fn append(&mut self, messages: Vec<NewMessage>) -> Result<Appended, OutboxError> {
        let count = messages.len() as u64;
        if count == 0 {
            return Ok(Appended::default());
        }
        let mut next_seq = self.next_seq;
        let mut last_seq = None;
        let mut dropped = 0;
        let unsent = self.counts.unsent();
        let tx = self.conn.transaction().map_err(|e| OutboxError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        // Counted before the commit makes the rows visible to the link.
        self.counts
            .unsent
            .fetch_add(count as i64, Ordering::Relaxed);
        let result = (|| -> Result<(), rusqlite::Error> {
            if unsent + count > self.limit {
                // The bound: the oldest telemetry goes first; events never.
                let excess = (unsent + count - self.limit) as i64;
                dropped = tx.execute(
                    "DELETE FROM outbox WHERE id IN \
                     (SELECT id FROM outbox WHERE class = 0 ORDER BY id LIMIT ?1)",
                    [excess],
                )? as u64;
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO outbox (seq, topic, payload, retain, class) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut retained = tx.prepare_cached(
                "INSERT INTO retained (topic, payload, outbox_id) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, outbox_id = excluded.outbox_id",
            )?;
            for m in messages {
                let (seq, payload) = match m.body {
                    Body::Json(mut map) => {
                        let seq = next_seq;
                        next_seq += 1;
                        map.insert("seq".into(), seq.into());
                        let payload = serde_json::to_vec(&serde_json::Value::Object(map))
                            .unwrap_or_else(|_| b"{}".to_vec());
                        (Some(seq), payload)
                    }
                    Body::Raw(bytes) => (None, bytes),
                };
                insert.execute(params![
                    seq.map(|s| s as i64),
                    m.topic,
                    payload,
                    m.retain,
                    m.class as i64
                ])?;
                if m.retain {
                    retained.execute(params![m.topic, payload, tx.last_insert_rowid()])?;
                }
                if seq.is_some() {
                    last_seq = seq;
                }
            }
            drop(insert);
            drop(retained);
            Ok(())
        })();
        match result.and_then(|_| tx.commit()) {
            Ok(()) => {
                self.next_seq = next_seq;
                self.counts
                    .unsent
                    .fetch_sub(dropped as i64, Ordering::Relaxed);
                self.counts.dropped.fetch_add(dropped, Ordering::Relaxed);
                Ok(Appended { last_seq, dropped })
            }
            Err(e) => {
                self.counts
                    .unsent
                    .fetch_sub(count as i64, Ordering::Relaxed);
                Err(self.err(e))
            }
        }
    }

    /// Sets a retained topic's payload without sending it now (it goes out on
    /// the next connect and every reconnect): `$description`, initial states.
    pub fn set_retained(&mut self, topic: &str, payload: &[u8]) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT INTO retained (topic, payload, outbox_id) VALUES (?1, ?2, NULL) \
                 ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, outbox_id = NULL",
                params![topic, payload],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets retained topics under a prefix (devices no longer in the lab file).
    pub fn forget_retained(&mut self, keep: impl Fn(&str) -> bool) -> Result<(), OutboxError> {
        let topics: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT topic FROM retained")
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| self.err(e))?;
            rows.filter_map(Result::ok).filter(|t| !keep(t)).collect()
        };
        for t in topics {
            self.conn
                .execute("DELETE FROM retained WHERE topic = ?1", [&t])
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Retained run states beyond the newest `keep` runs (oldest first).
    pub fn old_run_states(&self, keep: usize) -> Result<Vec<String>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT topic FROM retained WHERE topic LIKE '%/run/%/$state' AND length(payload) > 0 \
                 ORDER BY COALESCE(outbox_id, 0) DESC LIMIT -1 OFFSET ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([keep as i64], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut topics: Vec<String> = rows.filter_map(Result::ok).collect();
        topics.reverse();
        Ok(topics)
    }

    /// The retained topics and their payloads.
    pub fn retained(&self) -> Result<Vec<(String, Vec<u8>)>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare("SELECT topic, payload FROM retained ORDER BY topic")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        Ok(rows.filter_map(Result::ok).collect())
    }

    /// Records a command id; false when it was seen before (a duplicate).
    pub fn record_command(&mut self, cmd_id: &str, verb: &str) -> Result<bool, OutboxError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO commands (cmd_id, verb, received_ms) VALUES (?1, ?2, ?3)",
                params![cmd_id, verb, now_ms() as i64],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }
}

/// The link's side: reads what to send, deletes what the broker acknowledged.
pub struct OutboxReader {
    conn: Connection,
    path: PathBuf,
    counts: Arc<OutboxCounts>,
}

impl OutboxReader {
    pub fn open(outbox: &Outbox) -> Result<OutboxReader, OutboxError> {
        let conn =
            crate::store::open(&outbox.path).map_err(|f| OutboxError::opening(&outbox.path, f))?;
        Ok(OutboxReader {
            conn,
            path: outbox.path.clone(),
            counts: outbox.counts(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> OutboxError {
        OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Up to `limit` messages with `id > after`, in order.
    pub fn next(&self, after: i64, limit: usize) -> Result<Vec<Stored>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, seq, topic, payload, retain FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(Stored {
                    id: r.get(0)?,
                    seq: r.get::<_, Option<i64>>(1)?.map(|s| s as u64),
                    topic: r.get(2)?,
                    payload: r.get(3)?,
                    retain: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The highest id ever given (messages at or below it were written before now).
    pub fn high_water(&self) -> Result<i64, OutboxError> {
        self.conn
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Deletes acknowledged messages, in one transaction.
    pub fn acknowledge(&mut self, ids: &[i64]) -> Result<(), OutboxError> {
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(|e| OutboxError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        let mut deleted = 0u64;
        let result = (|| -> Result<(), rusqlite::Error> {
            // The next seq is kept in `meta` before numbered messages leave the
            // outbox (appends do not write it: one statement less per message).
            tx.execute(
                "INSERT INTO meta (key, value) \
                 SELECT 'next_seq', seq + 1 FROM outbox WHERE seq IS NOT NULL ORDER BY id DESC LIMIT 1 \
                 ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                [],
            )?;
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in ids {
                deleted += stmt.execute([id])? as u64;
            }
            Ok(())
        })();
        result.and_then(|_| tx.commit()).map_err(|e| self.err(e))?;
        self.counts
            .unsent
            .fetch_sub(deleted as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Retained topics to re-publish on a reconnect: all but those whose latest
    /// message is still in the outbox (the outbox sends those, in order).
    pub fn retained_to_republish(&self) -> Result<Vec<(String, Vec<u8>)>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT topic, payload FROM retained WHERE outbox_id IS NULL \
                 OR outbox_id NOT IN (SELECT id FROM outbox) ORDER BY topic",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Drops retained entries whose payload is empty (cleared alarms, an idle
    /// `run/current`) once they have been published after a connect.
    pub fn forget_cleared(&mut self) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "DELETE FROM retained WHERE length(payload) = 0 \
                 AND (topic LIKE '%/alarm/%' OR topic LIKE '%/run/%/$state') \
                 AND (outbox_id IS NULL OR outbox_id NOT IN (SELECT id FROM outbox))",
                [],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_body(v: serde_json::Value) -> Body {
        match v {
            serde_json::Value::Object(m) => Body::Json(m),
            _ => unreachable!(),
        }
    }

    fn telemetry(i: u32) -> NewMessage {
        NewMessage {
            topic: "r/device/d/telemetry".into(),
            retain: false,
            class: Class::Telemetry,
            body: json_body(json!({ "i": i })),
        }
    }

    fn event(i: u32) -> NewMessage {
        NewMessage {
            topic: "r/run/x/event".into(),
            retain: false,
            class: Class::Event,
            body: json_body(json!({ "i": i })),
        }
    }

    #[test]
    fn seq_survives_reopening_and_order_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        {
            let mut o = Outbox::open(&path, 100).unwrap();
            let a = o.append(vec![telemetry(1), event(2)]).unwrap();
            assert_eq!(a.last_seq, Some(2));
        }
        let mut o = Outbox::open(&path, 100).unwrap();
        assert_eq!(o.next_seq(), 3);
        assert_eq!(o.counts().unsent(), 2);
        o.append(vec![event(3)]).unwrap();
        let r = OutboxReader::open(&o).unwrap();
        let all = r.next(0, 10).unwrap();
        let seqs: Vec<_> = all.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![Some(1), Some(2), Some(3)]);
        let v: serde_json::Value = serde_json::from_slice(&all[2].payload).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["i"], 3);
    }

    #[test]
    fn acknowledged_messages_are_deleted_and_seq_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let mut o = Outbox::open(&path, 100).unwrap();
        o.append((0..5).map(event).collect()).unwrap();
        let mut r = OutboxReader::open(&o).unwrap();
        let ids: Vec<i64> = r.next(0, 3).unwrap().iter().map(|m| m.id).collect();
        r.acknowledge(&ids).unwrap();
        assert_eq!(o.counts().unsent(), 2);
        let rest = r.next(0, 10).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].seq, Some(4));
        drop((o, r));
        let o = Outbox::open(&path, 100).unwrap();
        assert_eq!(o.next_seq(), 6);
        assert_eq!(o.counts().unsent(), 2);
    }

    #[test]
    fn at_the_bound_the_oldest_telemetry_goes_and_events_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(&dir.path().join("o.sqlite"), 4).unwrap();
        o.append(vec![event(0), telemetry(1), telemetry(2), event(3)])
            .unwrap();
        let a = o.append(vec![telemetry(4)]).unwrap();
        assert_eq!(a.dropped, 1);
        let r = OutboxReader::open(&o).unwrap();
        let left: Vec<_> = r.next(0, 10).unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(left, vec![Some(1), Some(3), Some(4), Some(5)]);
        // Only events left to drop: the bound gives way, events are kept.
        let mut o2 = Outbox::open(&dir.path().join("p.sqlite"), 2).unwrap();
        o2.append(vec![event(0), event(1), event(2)]).unwrap();
        assert_eq!(o2.counts().unsent(), 3);
        assert_eq!(o.counts().dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn replayed_payload_marks_json_objects_only() {
        let m = Stored {
            id: 1,
            seq: Some(1),
            topic: "t".into(),
            payload: br#"{"seq":1}"#.to_vec(),
            retain: false,
        };
        let v: serde_json::Value = serde_json::from_slice(&m.replayed_payload()).unwrap();
        assert_eq!(v["replayed"], true);
        let raw = Stored {
            seq: None,
            payload: b"ready".to_vec(),
            ..m
        };
        assert_eq!(raw.replayed_payload(), b"ready");
    }

    #[test]
    fn retained_topics_wait_for_their_pending_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(&dir.path().join("o.sqlite"), 100).unwrap();
        o.set_retained("r/$description", b"{}").unwrap();
        o.append(vec![NewMessage {
            topic: "r/run/1/$state".into(),
            retain: true,
            class: Class::Event,
            body: json_body(json!({"state": "running"})),
        }])
        .unwrap();
        let mut r = OutboxReader::open(&o).unwrap();
        let topics: Vec<_> = r
            .retained_to_republish()
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(topics, vec!["r/$description"]);
        let ids: Vec<i64> = r.next(0, 10).unwrap().iter().map(|m| m.id).collect();
        r.acknowledge(&ids).unwrap();
        assert_eq!(r.retained_to_republish().unwrap().len(), 2);
        assert!(r.high_water().unwrap() >= 1);
    }

    #[test]
    fn a_command_id_is_recorded_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let mut o = Outbox::open(&path, 10).unwrap();
        assert!(o.record_command("c1", "pause").unwrap());
        assert!(!o.record_command("c1", "pause").unwrap());
        drop(o);
        let mut o = Outbox::open(&path, 10).unwrap();
        assert!(!o.record_command("c1", "resume").unwrap());
        assert!(o.record_command("c2", "resume").unwrap());
    }
}
