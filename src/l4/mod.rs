//! L4 streaming ingest: RTMP over TCP passthrough, RTMPS with TLS terminated
//! here, SRT over UDP sessions. RTMP and RTMPS sessions reach nodes whose
//! group has `node_tls` as RTMPS ([`crate::node_tls::NodeTlsSet::dial_rtmp`]);
//! on `tls` listeners the client's TLS server name can pick the group
//! (`host_groups`).
//!
//! Each listener kind picks a node per session (never per packet) with the one
//! placement function ([`crate::streaming::select::pick`], through
//! [`crate::failover`] for TCP), relays bytes without interpreting them, and
//! counts sessions and bytes in the metrics registry
//! ([`crate::metrics::L4Metrics`]). The RTMP front ([`rtmp`]) and the SRT
//! handshake reader ([`srt`]) learn the stream key before a node is chosen.

pub mod meter;
pub mod rtmp;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod srt;
pub mod tcp;
pub mod tls;
pub mod udp;
