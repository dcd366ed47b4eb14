//! One process per data directory: an exclusive flock(2) on `<data dir>/calm.lock`.
//!
//! A node's data directory holds several stores (the RocksDB state, the WAL, checkpoints,
//! Raft snapshots, the cluster record), each of which used to be guarded, if at all, by its
//! own lock, taken one after the other. A second process started on a directory in use got
//! past the first of them: RocksDB's `LOCK` held by the live node looked like a damaged
//! store, so the newcomer moved the live node's `state/` aside and restored a checkpoint in
//! its place before the WAL's lock stopped it, and the live node died at its next
//! checkpoint. So the whole directory is locked once, before anything in it is opened or
//! written, and the lock is held for as long as the node runs.
//!
//! flock locks belong to the open file description: the kernel drops the lock when the
//! process exits, however it exits (`kill -9` included), so a stale lock file never blocks a
//! restart. The file also records the holder's PID, read only to say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "calm.lock";

#[derive(Debug, Error)]
pub enum DirLockError {
    #[error(
        "the data directory {dir} is in use by another calm process{}; stop that process first, or use another data directory (--data-dir)",
        holder.map(|pid| format!(" (PID {pid})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock the data directory {dir} ({path}): {source}")]
    Io {
        dir: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Holds a data directory's exclusive lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    dir: PathBuf,
    _file: File,
}

impl DataDirLock {
    /// Take `dir`'s lock (the directory must exist) without waiting: a directory in use is
    /// an error naming the holder's PID.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DirLockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| DirLockError::Io {
            dir: dir.to_path_buf(),
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; no pointers are passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DirLockError::InUse {
                    dir: dir.to_path_buf(),
                    holder: holder_pid(&mut file),
                });
            }
            return Err(io(error));
        }
        // Ours now: record who holds it. Not synced: it only names the holder while it runs.
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// The directory this lock holds.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The PID a holder wrote into the lock file, if it reads as one.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether a running process holds `dir`'s lock now (and its PID, if recorded). Writes
/// nothing and keeps no lock: for read-only tools that warn before reading a live node's
/// files.
pub fn holder(dir: &Path) -> Option<Option<u32>> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    // SAFETY: flock on a descriptor we own; no pointers are passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        // Free: the shared lock goes with the file when it is closed here.
        return None;
    }
    Some(holder_pid(&mut file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_in_use_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(first.dir(), dir.path());
        let e = DataDirLock::acquire(dir.path()).unwrap_err();
        match &e {
            DirLockError::InUse { holder, .. } => {
                assert_eq!(*holder, Some(std::process::id()))
            }
            other => panic!("{other:?}"),
        }
        let message = e.to_string();
        assert!(
            message.contains("in use by another calm process")
                && message.contains(&format!("PID {}", std::process::id()))
                && message.contains("--data-dir"),
            "{message}"
        );
        assert_eq!(holder(dir.path()), Some(Some(std::process::id())));
        drop(first);
        // Released with its holder; the stale PID in the file does not matter.
        assert_eq!(holder(dir.path()), None);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        drop(again);
    }
}
