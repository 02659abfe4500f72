//! Noticing certificate files changed in `certs_dir` and reloading them.
//!
//! Polling, not inotify: it works the same on network file systems shared by
//! several instances (where ACME renewals land), costs one `readdir` + `stat`
//! per file per interval, and needs no extra dependency.

use super::resolver::Certificates;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// What is compared between two looks at the directory.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// Certificate-related files of `dir` with their mtime and size, sorted.
/// Taken before the first load and handed to [`watch`], so a change made
/// while the watcher task is still being scheduled is not missed.
pub fn fingerprint(dir: &Path) -> Fingerprint {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Fingerprint = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let path = e.path();
            let visible = !e.file_name().to_string_lossy().starts_with('.');
            let relevant = matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("pem" | "crt" | "key")
            );
            visible && relevant
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.modified().ok(), meta.len()))
        })
        .collect();
    files.sort();
    files
}

/// Reloads `certs` whenever its directory differs from `last`, checking
/// every `every`, until `shutdown`. A reload that fails (say, a file caught
/// half-copied) is logged and the loaded certificates keep serving; the next
/// change retries.
pub async fn watch(
    certs: Arc<Certificates>,
    mut last: Fingerprint,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = fingerprint(&certs.dir());
        if now == last {
            continue;
        }
        last = now;
        if let Err(e) = certs.reload() {
            tracing::warn!(error = %e, "certificate reload failed; the loaded certificates keep serving");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_cert_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("README.md"), "x").unwrap();
        std::fs::create_dir(dir.join(".acme")).unwrap();
        std::fs::write(dir.join(".acme/account.json"), "x").unwrap();
        let empty = fingerprint(dir);
        assert!(empty.is_empty());
        std::fs::write(dir.join("a.pem"), "x").unwrap();
        let one = fingerprint(dir);
        assert_eq!(one.len(), 1);
        std::fs::write(dir.join("a.pem"), "xy").unwrap();
        assert_ne!(fingerprint(dir), one, "a size change is a change");
    }
}
