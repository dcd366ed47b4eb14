//! Checkpoints: verified, crash-safe copies of the state store.
//!
//! A checkpoint is a directory `ckpt-<id>` holding a RocksDB checkpoint of the state store (SST
//! files hard-linked, the rest copied) and `calm-manifest.json`: the WAL LSN, version vector
//! and per-group applied indexes the state corresponds to, every file with its length and
//! BLAKE3 hash, and a root hash over all of that. It is what bounds WAL replay, what a node
//! falls back to when its live store is damaged, and (issue 4) what Raft ships as a snapshot.
//!
//! Crash safety: everything is written under `tmp-<id>`, each file and the directory are
//! fsynced, then the directory is renamed into place and its parent fsynced. A crash leaves
//! either no checkpoint or a complete one; stray `tmp-*` directories are removed on open.
//!
//! Verification recomputes every hash. A checkpoint that fails is rejected (and reported with
//! the file that failed) in favour of an older one plus a longer WAL replay; that is why the
//! WAL is kept back to the *oldest* kept checkpoint, not the newest.

use crate::store::{AppliedMeta, StateStore, StoreError};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const MANIFEST_FILE: &str = "calm-manifest.json";
pub const MANIFEST_FORMAT: u32 = 1;
/// Default number of checkpoints kept; older ones are deleted after a new one is complete.
pub const CHECKPOINTS_KEPT_DEFAULT: usize = 2;
/// A checkpoint with more files than this is refused as corrupt rather than hashed forever.
const CHECKPOINT_FILES_MAX: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    /// BLAKE3, hex.
    pub blake3: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: u64,
    pub applied: AppliedMeta,
    /// Sorted by name.
    pub files: Vec<FileEntry>,
    /// BLAKE3 over the id, the applied position and every file entry; hex.
    pub root: String,
}

impl Manifest {
    fn compute_root(id: u64, applied: &AppliedMeta, files: &[FileEntry]) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"calm checkpoint v1\0");
        h.update(&id.to_le_bytes());
        h.update(&postcard::to_stdvec(applied).expect("encoding into a Vec cannot fail"));
        for f in files {
            h.update(f.name.as_bytes());
            h.update(b"\0");
            h.update(&f.bytes.to_le_bytes());
            h.update(f.blake3.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O failed on {path}: {source}; check the disk and free space")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create a RocksDB checkpoint in {path}: {source}; check free space")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A checkpoint that passed verification.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub path: PathBuf,
}

/// What `latest_valid` found.
#[derive(Debug, Default)]
pub struct Selection {
    pub chosen: Option<Verified>,
    /// Newer checkpoints that failed verification, newest first, with why.
    pub rejected: Vec<CheckpointError>,
}

/// The checkpoint directory of one node.
pub struct Checkpoints {
    dir: PathBuf,
    kept: usize,
}

impl Checkpoints {
    /// Open `dir` (created if missing), removing leftovers of checkpoints a crash interrupted.
    pub fn open(dir: impl AsRef<Path>, kept: usize) -> Result<Checkpoints, CheckpointError> {
        assert!(kept >= 1, "keep at least one checkpoint");
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if entry.file_name().to_string_lossy().starts_with("tmp-") {
                tracing::warn!(path = %entry.path().display(), "removing an unfinished checkpoint");
                fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
            }
        }
        Ok(Checkpoints { dir, kept })
    }

    /// Checkpoint ids present, newest first (not verified).
    pub fn ids(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("ckpt-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        Ok(ids)
    }

    pub fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(format!("ckpt-{id:020}"))
    }

    /// Flush the store and capture it with `applied` (the position its content corresponds
    /// to). Deletes checkpoints beyond the number kept once the new one is durable.
    pub fn create(
        &self,
        store: &StateStore,
        applied: &AppliedMeta,
    ) -> Result<Manifest, CheckpointError> {
        debug_assert_eq!(
            &store.meta()?,
            applied,
            "checkpoint position must match the store"
        );
        let id = self.ids()?.first().map_or(1, |newest| newest + 1);
        let tmp = self.dir.join(format!("tmp-{id:020}"));
        store.flush()?;
        rocksdb::checkpoint::Checkpoint::new(store.db())
            .and_then(|c| c.create_checkpoint(&tmp))
            .map_err(|source| CheckpointError::Rocks {
                path: tmp.clone(),
                source,
            })?;
        let mut files = Vec::new();
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let path = entry.path();
            let (bytes, hash) = hash_file(&path)?;
            // Hard-linked SSTs are already durable; copied files (MANIFEST, OPTIONS) are not.
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
            files.push(FileEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                bytes,
                blake3: hash,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id,
            root: Manifest::compute_root(id, applied, &files),
            applied: applied.clone(),
            files,
        };
        let manifest_path = tmp.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        fs::write(&manifest_path, json).map_err(io_err(&manifest_path))?;
        File::open(&manifest_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&manifest_path))?;
        sync_dir(&tmp)?;
        let done = self.path_of(id);
        fs::rename(&tmp, &done).map_err(io_err(&done))?;
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(manifest)
    }

    /// Delete all but the newest `kept` checkpoints.
    fn prune(&self) -> Result<(), CheckpointError> {
        for id in self.ids()?.into_iter().skip(self.kept) {
            let path = self.path_of(id);
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        sync_dir(&self.dir)
    }

    /// Read checkpoint `id`'s manifest and check its root hash, without hashing the files
    /// (cheap: for what a checkpoint claims to cover, not for restoring it).
    pub fn read_manifest(&self, id: u64) -> Result<Manifest, CheckpointError> {
        let path = self.path_of(id);
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.clone(),
            reason,
        };
        let manifest_path = path.join(MANIFEST_FILE);
        let text = fs::read(&manifest_path)
            .map_err(|e| corrupt(format!("{MANIFEST_FILE} cannot be read: {e}")))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("{MANIFEST_FILE} does not parse: {e}")))?;
        let root = Manifest::compute_root(manifest.id, &manifest.applied, &manifest.files);
        if manifest.id != id || root != manifest.root {
            return Err(corrupt(format!(
                "manifest names checkpoint {} with root hash {}, computed {root}",
                manifest.id, manifest.root
            )));
        }
        Ok(manifest)
    }

    /// Recompute every hash of checkpoint `id`.
    pub fn verify(&self, id: u64) -> Result<Verified, CheckpointError> {
        let path = self.path_of(id);
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.clone(),
            reason,
        };
        let manifest_path = path.join(MANIFEST_FILE);
        let text = fs::read(&manifest_path)
            .map_err(|e| corrupt(format!("{MANIFEST_FILE} cannot be read: {e}")))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("{MANIFEST_FILE} does not parse: {e}")))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(corrupt(format!(
                "manifest format {} is not {MANIFEST_FORMAT}",
                manifest.format
            )));
        }
        if manifest.id != id {
            return Err(corrupt(format!(
                "manifest names checkpoint {}",
                manifest.id
            )));
        }
        if manifest.files.len() > CHECKPOINT_FILES_MAX {
            return Err(corrupt(format!("{} files listed", manifest.files.len())));
        }
        let root = Manifest::compute_root(manifest.id, &manifest.applied, &manifest.files);
        if root != manifest.root {
            return Err(corrupt(format!(
                "root hash is {root}, the manifest says {}",
                manifest.root
            )));
        }
        let mut present = 0;
        for entry in fs::read_dir(&path).map_err(io_err(&path))? {
            let name = entry.map_err(io_err(&path))?.file_name();
            if name != MANIFEST_FILE {
                present += 1;
                if !manifest.files.iter().any(|f| *f.name == *name) {
                    return Err(corrupt(format!(
                        "file {} is not in the manifest",
                        name.to_string_lossy()
                    )));
                }
            }
        }
        if present != manifest.files.len() {
            return Err(corrupt(format!(
                "{} files listed, {present} present",
                manifest.files.len()
            )));
        }
        for f in &manifest.files {
            let file = path.join(&f.name);
            let (bytes, hash) = hash_file(&file)
                .map_err(|e| corrupt(format!("file {} cannot be read: {e}", f.name)))?;
            if bytes != f.bytes || hash != f.blake3 {
                return Err(corrupt(format!(
                    "file {} has {bytes} bytes and BLAKE3 {hash}, the manifest says {} bytes and {}",
                    f.name, f.bytes, f.blake3
                )));
            }
        }
        Ok(Verified { manifest, path })
    }

    /// The newest checkpoint that verifies; newer ones that do not are reported and skipped
    /// (never deleted: an operator may want them).
    pub fn latest_valid(&self) -> Result<Selection, CheckpointError> {
        let mut selection = Selection::default();
        for id in self.ids()? {
            match self.verify(id) {
                Ok(v) => {
                    selection.chosen = Some(v);
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "rejecting checkpoint; falling back to an older one");
                    selection.rejected.push(e);
                }
            }
        }
        Ok(selection)
    }

    /// WAL records below this LSN are covered by every kept checkpoint and may be deleted.
    pub fn oldest_kept_wal_lsn(&self) -> Result<Option<u64>, CheckpointError> {
        Ok(self.oldest_kept_applied()?.map(|a| a.wal_lsn))
    }

    /// What the oldest kept checkpoint holds: falling back to it must stay possible, so the
    /// WAL keeps everything after its position (facts and Raft entries alike).
    pub fn oldest_kept_applied(&self) -> Result<Option<AppliedMeta>, CheckpointError> {
        let mut oldest = None;
        // `ids` is newest first, so the last one verified is the oldest.
        for id in self.ids()? {
            oldest = Some(self.verify(id)?.manifest.applied);
        }
        Ok(oldest)
    }

    /// Make `target` (which must not exist) a state store holding checkpoint `v`'s state:
    /// verified files are copied under a temporary name, then renamed into place.
    pub fn restore(&self, v: &Verified, target: &Path) -> Result<(), CheckpointError> {
        let tmp = target.with_extension("restoring");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for f in &v.manifest.files {
            let to = tmp.join(&f.name);
            fs::copy(v.path.join(&f.name), &to).map_err(io_err(&to))?;
            let (bytes, hash) = hash_file(&to)?;
            if bytes != f.bytes || hash != f.blake3 {
                return Err(CheckpointError::Corrupt {
                    path: v.path.clone(),
                    reason: format!("file {} changed while it was being restored", f.name),
                });
            }
            File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&to))?;
        }
        sync_dir(&tmp)?;
        fs::rename(&tmp, target).map_err(io_err(target))?;
        if let Some(parent) = target.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

fn hash_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}
