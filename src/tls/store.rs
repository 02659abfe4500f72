//! An immutable snapshot of the certificates in `certs_dir`, indexed for SNI.
//!
//! A reload builds a new snapshot and swaps it in ([`super::Certificates`]); a
//! handshake reads one snapshot, so it never sees a half-loaded directory.

use super::certs::{CertEntry, CertError, parent_domain};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Certificates indexed by exact and wildcard name, plus the default.
#[derive(Debug, Default)]
pub struct CertStore {
    entries: Vec<CertEntry>,
    exact: HashMap<String, usize>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, usize>,
    default: Option<usize>,
}

impl CertStore {
    /// Reads every certificate in `dir`: `*.pem` as combined files, `*.crt` with
    /// their `*.key`. Hidden entries (the `.acme/` state) and other files are
    /// skipped. The first bad file fails the whole load, naming that file.
    pub fn load_dir(dir: &Path, default_cert: Option<&str>) -> Result<Self, CertError> {
        let read_dir = std::fs::read_dir(dir)
            .map_err(|e| CertError::new(dir, format!("cannot list certificate directory: {e}")))?;
        let mut paths = Vec::new();
        for item in read_dir {
            let item = item.map_err(|e| CertError::new(dir, format!("cannot list: {e}")))?;
            paths.push(item.path());
        }
        paths.sort();
        let mut entries = Vec::new();
        for path in paths {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if hidden || !path.is_file() {
                continue;
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("pem") => entries.push(CertEntry::load_combined(&path)?),
                Some("crt") => entries.push(CertEntry::load_pair(&path)?),
                _ => {}
            }
        }
        Self::from_entries(entries, default_cert).map_err(|reason| CertError::new(dir, reason))
    }

    /// Indexes `entries`. When two certificates claim one name, the one valid
    /// longest wins: after a renewal written under a new file name, the fresh
    /// certificate is served without deleting the old file first.
    pub fn from_entries(
        entries: Vec<CertEntry>,
        default_cert: Option<&str>,
    ) -> Result<Self, String> {
        let mut exact: HashMap<String, usize> = HashMap::new();
        let mut wildcard: HashMap<String, usize> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            for name in &entry.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(base) => (&mut wildcard, base.to_string()),
                    None => (&mut exact, name.clone()),
                };
                let slot = map.entry(key).or_insert(i);
                if entries[*slot].not_after < entry.not_after {
                    *slot = i;
                }
            }
        }
        let default = match default_cert {
            Some(name) => Some(
                entries
                    .iter()
                    .position(|e| e.name == name)
                    .ok_or_else(|| {
                        format!(
                            "default_cert {name:?} not found (expected {name}.pem or {name}.crt + {name}.key)"
                        )
                    })?,
            ),
            // HAProxy serves the first certificate it loaded to clients without SNI; so do we.
            None if entries.is_empty() => None,
            None => Some(0),
        };
        Ok(Self {
            entries,
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for a ClientHello's SNI: exact name, then wildcard, then default.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let by_name = sni.and_then(|host| {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            self.exact
                .get(&host)
                .or_else(|| parent_domain(&host).and_then(|p| self.wildcard.get(p)))
                .copied()
        });
        by_name.or(self.default).map(|i| &self.entries[i].key)
    }

    /// The certificate loaded from file `name` (without extension).
    pub fn entry(&self, name: &str) -> Option<&CertEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// All loaded certificates, in file-name order.
    pub fn entries(&self) -> &[CertEntry] {
        &self.entries
    }

    /// Whether no certificate is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::tests::self_signed;

    fn write_combined(dir: &Path, name: &str, names: &[&str]) {
        let (cert, key) = self_signed(names);
        std::fs::write(dir.join(format!("{name}.pem")), format!("{cert}{key}")).unwrap();
    }

    fn served(store: &CertStore, sni: Option<&str>) -> Option<String> {
        let key = store.lookup(sni)?;
        store
            .entries()
            .iter()
            .find(|e| Arc::ptr_eq(&e.key, key))
            .map(|e| e.name.clone())
    }

    #[test]
    fn sni_exact_then_wildcard_then_default() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_combined(dir, "a-wild", &["*.example.com"]);
        write_combined(dir, "b-live", &["live.example.com"]);
        let (cert, key) = self_signed(&["other.test"]);
        std::fs::write(dir.join("c-other.crt"), cert).unwrap();
        std::fs::write(dir.join("c-other.key"), key).unwrap();
        std::fs::write(dir.join("README.txt"), "ignored").unwrap();
        std::fs::create_dir(dir.join(".acme")).unwrap();

        let store = CertStore::load_dir(dir, Some("c-other")).unwrap();
        assert_eq!(store.entries().len(), 3);
        assert_eq!(served(&store, Some("live.example.com")).unwrap(), "b-live");
        assert_eq!(served(&store, Some("Live.Example.Com.")).unwrap(), "b-live");
        assert_eq!(served(&store, Some("cdn.example.com")).unwrap(), "a-wild");
        assert_eq!(served(&store, Some("other.test")).unwrap(), "c-other");
        assert_eq!(served(&store, Some("x.y.example.com")).unwrap(), "c-other");
        assert_eq!(served(&store, None).unwrap(), "c-other");

        let store = CertStore::load_dir(dir, None).unwrap();
        assert_eq!(served(&store, None).unwrap(), "a-wild");
    }

    #[test]
    fn unknown_default_and_bad_file_are_refused() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_combined(dir, "a", &["a.test"]);
        let err = CertStore::load_dir(dir, Some("nope")).unwrap_err();
        assert_eq!(err.path, dir);
        assert!(err.reason.contains("\"nope\""), "{err}");

        std::fs::write(dir.join("b.pem"), "garbage").unwrap();
        let err = CertStore::load_dir(dir, None).unwrap_err();
        assert_eq!(err.path, dir.join("b.pem"));
    }

    #[test]
    fn empty_dir_serves_nothing() {
        let store = CertStore::load_dir(tempfile::tempdir().unwrap().path(), None).unwrap();
        assert!(store.is_empty());
        assert!(store.lookup(Some("a.test")).is_none());
    }
}
