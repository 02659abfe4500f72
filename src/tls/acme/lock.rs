//! A lease file in `certs_dir/.acme/` so that instances sharing the directory
//! do not all order the same certificate at once.
//!
//! The lock is a file created with `O_EXCL`; it is held while it exists and is
//! younger than the lease. An instance that dies while ordering leaves it
//! behind; once older than the lease, the next instance removes it and takes
//! over. Two instances taking over the same stale lock in the same instant may
//! both proceed: that costs one extra order, never a wrong certificate.

use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A held order lock; dropping it releases the lock if it is still ours.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    token: String,
}

impl Lease {
    /// Takes the lock at `path` unless another holder's lease is still running.
    pub fn try_acquire(path: &Path, lease: Duration) -> std::io::Result<Option<Lease>> {
        let token = format!(
            "pid {} token {:016x}\n",
            std::process::id(),
            rand::random::<u64>()
        );
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut file) => {
                    file.write_all(token.as_bytes())?;
                    return Ok(Some(Lease {
                        path: path.to_path_buf(),
                        token,
                    }));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let modified = std::fs::metadata(path).and_then(|m| m.modified());
                    let age = modified
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok());
                    if age.is_some_and(|age| age <= lease) {
                        return Ok(None);
                    }
                    tracing::warn!(lock = %path.display(), "taking over a stale ACME order lock");
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Only remove the file if it is still ours (not taken over as stale).
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_until_release() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("order.lock");
        let lease = Duration::from_secs(60);
        let first = Lease::try_acquire(&path, lease)
            .unwrap()
            .expect("free lock");
        assert!(Lease::try_acquire(&path, lease).unwrap().is_none());
        drop(first);
        assert!(!path.exists());
        assert!(Lease::try_acquire(&path, lease).unwrap().is_some());
    }

    #[test]
    fn stale_lock_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("order.lock");
        std::fs::write(&path, "pid 1 token dead\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let lease = Lease::try_acquire(&path, Duration::from_millis(10)).unwrap();
        assert!(lease.is_some(), "stale lock not taken over");
    }
}
