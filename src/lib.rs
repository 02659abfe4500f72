//! amslb: a load balancer for Ant Media Server clusters.
//!
//! Data flows one way: listener → connection → classify ([`route`]) → pick a
//! node ([`balance`] over a [`cluster`] snapshot) → forward ([`http`]).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod route;
pub mod stats;
