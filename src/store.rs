//! The SQLite files of a lab's data folder (MQTT outbox, run journal): opened
//! the same way, in WAL mode with `synchronous = NORMAL` (a commit survives a
//! killed process in microseconds; after a power cut the last commits may be
//! missing, the file is never corrupt), waiting up to 10 s for a busy writer.

use rusqlite::Connection;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a data file could not be opened.
#[derive(Debug)]
pub enum OpenFailure {
    /// Its folder could not be created.
    Folder(std::io::Error),
    Sqlite(rusqlite::Error),
}

/// Opens (or creates, with its folder) a data file.
pub fn open(path: &Path) -> Result<Connection, OpenFailure> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(OpenFailure::Folder)?;
    }
    let configure = || -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(conn)
    };
    configure().map_err(OpenFailure::Sqlite)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_cannot_be_made_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        // A folder inside a regular file cannot exist.
        let r = open(&file.join("sub").join("db.sqlite"));
        assert!(matches!(r, Err(OpenFailure::Folder(_))), "{r:?}");
        let ok = open(&dir.path().join("data").join("db.sqlite")).unwrap();
        let mode: String = ok
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
