//! What makes amslb streaming-aware beyond the router: stream affinity
//! (bounded-load consistent hashing), regions, routing WebSocket signalling by
//! its first command, and the node assignment API.

pub mod assign;
pub mod frame;
pub mod hash;
pub mod select;
pub mod sniff;
