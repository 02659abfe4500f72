//! What makes amslb streaming-aware beyond the router: stream affinity
//! (bounded-load consistent hashing), regions, routing WebSocket signalling by
//! its first command, and the node assignment API.

pub mod hash;
pub mod select;
