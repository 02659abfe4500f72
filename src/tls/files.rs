//! Writing secrets to disk: private keys and ACME account credentials.

use super::certs::CertError;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file in the
/// same directory, fsynced, then renamed over `path`. A crash leaves either the
/// old file or the new one, never half a key, and the key is never readable by
/// others, not even for an instant.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    let fail = |e: std::io::Error| CertError::new(path, format!("cannot write: {e}"));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CertError::new(path, "not a file path"))?;
    let tmp = path.with_file_name(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

/// Creates `dir` and its parents with mode 0700 if missing (it will hold keys).
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CertError::new(dir, format!("cannot create directory: {e}")))
}

/// The permission bits of `path` (for checks and tests).
pub fn mode(path: &Path) -> std::io::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_file_is_0600_and_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("k.pem");
        write_private(&path, b"one").unwrap();
        assert_eq!(mode(&path).unwrap(), 0o600);
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path).unwrap(), 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn private_dir_is_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir).unwrap(), 0o700);
    }
}
