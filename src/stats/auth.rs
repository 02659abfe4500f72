//! Who may use the stats listener: an address allow list, then HTTP basic auth
//! with a constant-time credential check.

use crate::config::ops::{Secret, StatsConfig};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::PathBuf;
use subtle::ConstantTimeEq;

/// Why the stats access rules could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The password file could not be read.
    #[error("stats.password_file {path}: {source}")]
    PasswordFile {
        /// The file named in the config.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The password file holds nothing but whitespace.
    #[error("stats.password_file {0}: file is empty")]
    EmptyPasswordFile(PathBuf),
}

/// The outcome of checking one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// The client address is not in `allow`: 403.
    Forbidden,
    /// Missing or wrong credentials: 401 with a challenge.
    Unauthorized,
}

/// The access rules of the stats listener, built from `[stats]`.
#[derive(Clone)]
pub struct Access {
    allow: Vec<IpNet>,
    credentials: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("allow", &self.allow)
            .field("auth", &self.credentials.is_some())
            .finish()
    }
}

impl Access {
    /// Builds the rules, reading `password_file` if one is set. Called both by
    /// start-up/reload and by `amslb check`, so a missing file fails either way.
    pub fn from_config(config: &StatsConfig) -> Result<Self, AccessError> {
        let password = match (&config.password, &config.password_file) {
            (Some(Secret(p)), _) => Some(p.clone()),
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| AccessError::PasswordFile {
                        path: path.clone(),
                        source,
                    })?;
                // Editors and `echo` add a newline; a password never ends in one.
                let text = text.trim_end_matches(['\r', '\n']).to_string();
                if text.is_empty() {
                    return Err(AccessError::EmptyPasswordFile(path.clone()));
                }
                Some(text)
            }
            (None, None) => None,
        };
        let credentials = match (&config.user, password) {
            (Some(user), Some(password)) => {
                Some((user.clone().into_bytes(), password.into_bytes()))
            }
            _ => None,
        };
        Ok(Self {
            allow: config.allow.clone(),
            credentials,
        })
    }

    /// Whether credentials are required at all.
    pub fn requires_auth(&self) -> bool {
        self.credentials.is_some()
    }

    /// Checks the client address, then the `Authorization` header.
    pub fn check(&self, peer: IpAddr, authorization: Option<&HeaderValue>) -> Verdict {
        if !self.address_allowed(peer) {
            return Verdict::Forbidden;
        }
        match &self.credentials {
            None => Verdict::Allowed,
            Some((user, password)) => {
                let given = authorization.and_then(|h| decode_basic(h.as_bytes()));
                let ok = given.is_some_and(|(u, p)| {
                    // `&` rather than `&&`: compare both parts whatever the first says.
                    bool::from(u.ct_eq(user) & p.ct_eq(password))
                });
                if ok {
                    Verdict::Allowed
                } else {
                    Verdict::Unauthorized
                }
            }
        }
    }

    /// Whether `peer` is in the allow list (an empty list allows every address).
    pub fn address_allowed(&self, peer: IpAddr) -> bool {
        // A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&peer))
    }
}

/// The user name of a basic `Authorization` header, for audit records.
pub fn user_of(authorization: Option<&HeaderValue>) -> Option<String> {
    let (user, _) = decode_basic(authorization?.as_bytes())?;
    String::from_utf8(user).ok()
}

/// Splits `Basic base64(user:password)` into its parts.
fn decode_basic(header: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim_ascii()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> StatsConfig {
        toml::from_str(text).unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let token = STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn right_credentials_pass_wrong_or_missing_do_not() {
        let access =
            Access::from_config(&config("user = \"admin\"\npassword = \"s3:cret\"")).unwrap();
        assert_eq!(
            access.check(LOOPBACK, Some(&basic("admin", "s3:cret"))),
            Verdict::Allowed
        );
        assert_eq!(
            access.check(LOOPBACK, Some(&basic("admin", "s3:creT"))),
            Verdict::Unauthorized
        );
        assert_eq!(
            access.check(LOOPBACK, Some(&basic("root", "s3:cret"))),
            Verdict::Unauthorized
        );
        assert_eq!(access.check(LOOPBACK, None), Verdict::Unauthorized);
        let garbage = HeaderValue::from_static("Basic !!!");
        assert_eq!(
            access.check(LOOPBACK, Some(&garbage)),
            Verdict::Unauthorized
        );
        let bearer = HeaderValue::from_static("Bearer abc");
        assert_eq!(access.check(LOOPBACK, Some(&bearer)), Verdict::Unauthorized);
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let access = Access::from_config(&config("user = \"a\"\npassword = \"b\"")).unwrap();
        let header = HeaderValue::from_str(&format!("bAsIc {}", STANDARD.encode("a:b"))).unwrap();
        assert_eq!(access.check(LOOPBACK, Some(&header)), Verdict::Allowed);
    }

    #[test]
    fn allow_list_is_checked_before_credentials() {
        let access = Access::from_config(&config(
            "user = \"a\"\npassword = \"b\"\nallow = [\"10.0.0.0/8\", \"::1/128\"]",
        ))
        .unwrap();
        assert_eq!(
            access.check(LOOPBACK, Some(&basic("a", "b"))),
            Verdict::Forbidden
        );
        assert_eq!(
            access.check("10.1.2.3".parse().unwrap(), Some(&basic("a", "b"))),
            Verdict::Allowed
        );
        assert_eq!(
            access.check("::ffff:10.1.2.3".parse().unwrap(), None),
            Verdict::Unauthorized
        );
        assert_eq!(
            access.check("::1".parse().unwrap(), None),
            Verdict::Unauthorized
        );
    }

    #[test]
    fn no_user_means_open_to_allowed_addresses() {
        let access = Access::from_config(&config("allow = [\"127.0.0.0/8\"]")).unwrap();
        assert!(!access.requires_auth());
        assert_eq!(access.check(LOOPBACK, None), Verdict::Allowed);
        assert_eq!(
            access.check("192.0.2.1".parse().unwrap(), None),
            Verdict::Forbidden
        );
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("amslb-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "user = \"a\"\npassword_file = {:?}",
            file.display().to_string()
        );
        let access = Access::from_config(&config(&text)).unwrap();
        assert_eq!(
            access.check(LOOPBACK, Some(&basic("a", "from-file"))),
            Verdict::Allowed
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            Access::from_config(&config(&text)),
            Err(AccessError::EmptyPasswordFile(_))
        ));
        std::fs::remove_file(&file).unwrap();
        let err = Access::from_config(&config(&text)).unwrap_err();
        assert!(err.to_string().contains("stats.password_file"), "{err}");
        let _ = std::fs::remove_dir(&dir);
    }
}
