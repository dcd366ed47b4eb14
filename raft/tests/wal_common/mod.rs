//! Helpers shared by the WAL integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

use calm_raft::wal::{Wal, WalBackend, WalBatch, WalError, WalOptions};

/// Small segments and batches, so that tests cross segment boundaries quickly.
pub fn small_options(backend: WalBackend) -> WalOptions {
    WalOptions {
        segment_bytes_max: 64 * 1024,
        batch_bytes_max: 16 * 1024,
        batch_records_max: 64,
        group_bytes_max: 32 * 1024,
        queue_records_max: 4096,
        queue_bytes_max: 1 << 20,
        backend,
        preallocate: true,
    }
}

/// Every batch the WAL in `dir` holds, read through a fresh `open`.
pub fn reopen_and_read_all(dir: &Path, options: WalOptions) -> Result<Vec<WalBatch>, WalError> {
    let wal = Wal::open(dir, options)?;
    let batches = read_all(&wal);
    Ok(batches)
}

pub fn read_all(wal: &Wal) -> Vec<WalBatch> {
    let batches: Vec<WalBatch> = wal
        .read_from(wal.oldest_lsn())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for pair in batches.windows(2) {
        assert_eq!(
            pair[0].position.lsn + 1,
            pair[1].position.lsn,
            "LSNs are dense"
        );
    }
    batches
}

/// Segment files of the WAL in `dir`, sorted.
pub fn segment_paths(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    paths.sort();
    paths
}

/// splitmix64: a tiny deterministic generator, so every random choice follows from a
/// printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low < high);
        low + self.next_u64() % (high - low)
    }
}

/// A seed from `env_var` if set, else from the clock; printed so a failure can be replayed.
pub fn seed(env_var: &str) -> u64 {
    let seed = std::env::var(env_var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed: {seed} (replay with {env_var}={seed})");
    seed
}

/// The name the io_uring backend must report for a WAL in `dir`: "io_uring+direct" where the
/// filesystem accepts O_DIRECT (ext4, XFS), else "io_uring" (tmpfs), said on stderr.
pub fn expected_uring_name(dir: &Path) -> &'static str {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("test-direct-probe");
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    if direct {
        "io_uring+direct"
    } else {
        eprintln!(
            "{} refuses O_DIRECT: the io_uring backend runs write + fdatasync here, not direct writes",
            dir.display()
        );
        "io_uring"
    }
}
