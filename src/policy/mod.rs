//! Edge policy decisions, pure of I/O: which `[[rule]]` a request meets
//! ([`rules`]), which client a proxied request comes from ([`clients`]),
//! which group a Host names ([`hosts`]), and the per-client-address limit
//! tables ([`limits`]). The HTTP glue in `http::edge` and the accept loop
//! call in here.

pub mod clients;
pub mod hosts;
pub mod limits;
pub mod rules;
