//! Replacing a small file so that a crash leaves either the old or the new bytes, never a
//! mix: write a temporary file beside it, sync it, rename it over the target, sync the
//! directory (without that last sync the rename itself may not survive a crash).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Makes `bytes` the contents of `path`, durably and atomically (see the module docs). The
/// temporary file is `path` with `.tmp` appended; its directory must exist.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = PathBuf::from(path.as_os_str().to_owned());
    tmp.as_mut_os_string().push(".tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_contents_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.toml");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("record.toml.tmp").exists());
    }
}
