//! TLS termination: certificates from `certs_dir`, chosen by SNI, obtained and
//! renewed by ACME, and the rustls handshake. What runs over the TLS stream
//! is not decided here: HTTPS is served by `http`, RTMPS relayed by `l4`.
//!
//! [`Certificates`] is the one shared object: it holds the current
//! [`store::CertStore`] snapshot behind an `ArcSwap` (swapped on reload or
//! renewal without touching open connections, which keep the key they
//! handshook with), the pending ACME challenge answers, and it is the rustls
//! certificate resolver of every TLS listener.

pub mod acme;
pub mod certs;
pub mod challenge;
pub mod files;
pub mod resolver;
pub mod serve;
pub mod server_config;
pub mod state;
pub mod store;
pub mod watch;

pub use certs::{CertEntry, CertError};
pub use challenge::{ChallengeStore, is_http01_path};
pub use resolver::Certificates;
pub use server_config::{https_server_config, tcp_server_config};
pub use state::{Staged, TlsState};

/// Installs aws-lc-rs as the process-wide rustls provider; without one,
/// `ServerConfig::builder()` panics because two providers are compiled in.
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
