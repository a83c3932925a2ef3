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
        create_folder(dir).map_err(OpenFailure::Folder)?;
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

/// Creates a data folder (and its parents) that other users cannot enter: the
/// journal holds protocols, operators and MES commands. On Unix the folders
/// made here are `rwxr-x---` (less if the umask says so); a folder that
/// already exists is left as it is.
fn create_folder(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o750);
    builder.create(dir)
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

    #[cfg(unix)]
    #[test]
    fn a_new_data_folder_is_closed_to_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("lab").join("data");
        open(&data.join("journal.sqlite")).unwrap();
        for folder in [&data, &dir.path().join("lab")] {
            let mode = std::fs::metadata(folder).unwrap().permissions().mode();
            assert_eq!(mode & 0o007, 0, "{}: {mode:o}", folder.display());
            assert_eq!(mode & 0o700, 0o700, "{mode:o}");
        }
        // An existing folder keeps its permissions.
        let open_dir = dir.path().join("shared");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        open(&open_dir.join("outbox.sqlite")).unwrap();
        let mode = std::fs::metadata(&open_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
