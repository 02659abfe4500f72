//! L4 streaming ingest: RTMP over TCP passthrough, RTMPS with TLS terminated
//! here, SRT over UDP sessions.
//!
//! Each listener kind picks a node of its group per session (never per packet),
//! relays bytes without interpreting them, and counts what it moved in an
//! [`L4Stats`]. The optional RTMP inspector reads, without changing them, the
//! first bytes a client sends to learn app and stream key.

pub mod meter;
pub mod rtmp;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod srt;
pub mod tcp;
pub mod tls;
pub mod udp;
