//! The TOML configuration: schema, defaults, loading and validation.
//!
//! Every table refuses unknown keys (`deny_unknown_fields`) so that a typo is an
//! error at start instead of a silently ignored setting. Loading is split in two:
//! [`load`] parses and checks a file, [`Config::validate`] checks cross-references
//! (groups named by listeners and nodes, duplicate binds) and is what both
//! `amslb check` and a reload run.

pub mod diff;
pub mod duration;
pub mod health;
pub mod l4;
mod load;
pub mod mongo;
pub mod ops;
pub mod rules;
pub mod state;
pub mod sticky;
pub mod streaming;
pub mod tls;

pub use load::{ConfigError, Loaded, load, parse_str};

use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide limits and lifecycle settings.
    #[serde(default)]
    pub global: Global,
    /// Timeouts shared by all listeners.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Listening sockets and how their traffic is handled.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Node groups (origin, edge, ...) and how each balances.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Where cluster membership comes from.
    pub cluster: ClusterConfig,
    /// Stats listener (metrics, status page, admin API); absent: none.
    #[serde(default)]
    pub stats: Option<ops::StatsConfig>,
    /// Access log; absent: none.
    #[serde(default)]
    pub access_log: Option<ops::AccessLogConfig>,
    /// Certificates for `https` and `tls` listeners, and ACME.
    #[serde(default)]
    pub tls: tls::TlsConfig,
    /// Cookie affinity.
    #[serde(default)]
    pub sticky: sticky::StickyConfig,
    /// Node health checks.
    #[serde(default)]
    pub health: health::HealthConfig,
    /// State shared with the other amslb instances (drains), in MongoDB; absent: none.
    #[serde(default)]
    pub state: Option<state::StateConfig>,
    /// Access rules, redirects, header edits and group choices, in order (see [`rules`]).
    #[serde(default, rename = "rule")]
    pub rules: Vec<rules::RuleConfig>,
    /// Per-client-address limits (see [`rules::LimitConfig`]).
    #[serde(default, rename = "limit")]
    pub limits: Vec<rules::LimitConfig>,
}

/// `[global]`: process-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Global {
    /// Cap on client connections open at once, over all listeners.
    pub max_connections: usize,
    /// How long a new connection over the cap may wait for a slot before it is refused.
    #[serde(with = "duration")]
    pub queue_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// How many other nodes to try when connecting to the chosen node fails
    /// (HAProxy `retries` + `option redispatch`).
    pub retries: u32,
    /// Largest request head (request line + headers) accepted, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Threads that accept and serve connections, each with its own event
    /// loop; 0 means one per CPU.
    pub workers: usize,
    /// This instance's home region: new sessions prefer nodes of this region.
    pub region: Option<String>,
    /// Regions to fall back to, nearest first, when the home region has no usable node.
    pub region_preference: Vec<String>,
    /// Request header through which a CDN or GeoDNS names the client's region.
    pub region_header: Option<String>,
    /// File holding the running process's pid, replaced atomically by the
    /// new process of a seamless upgrade once it has taken the listeners
    /// (`kill -USR2 $(cat pid_file)`).
    pub pid_file: Option<std::path::PathBuf>,
    /// After a seamless upgrade, how long the old process keeps serving its
    /// open tunnels and in-flight requests before closing them (HAProxy's name).
    #[serde(with = "duration")]
    pub hard_stop_after: Duration,
}

impl Default for Global {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            queue_timeout: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(30),
            retries: 3,
            max_header_bytes: 16 * 1024,
            workers: 0,
            region: None,
            region_preference: Vec::new(),
            region_header: None,
            pid_file: None,
            hard_stop_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[timeouts]`, named like HAProxy's `timeout connect|client|server|tunnel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connecting to a node.
    #[serde(with = "duration")]
    pub connect: Duration,
    /// Reading a request head from a client, and a client's idle keep-alive time.
    #[serde(with = "duration")]
    pub client: Duration,
    /// Waiting for a node's response head.
    #[serde(with = "duration")]
    pub server: Duration,
    /// Idle time after which a tunnel (WebSocket, TCP relay) is closed.
    #[serde(with = "duration")]
    pub tunnel: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            client: Duration::from_secs(30),
            server: Duration::from_secs(30),
            tunnel: Duration::from_secs(2 * 3600),
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Plain HTTP/1.1, proxied with the streaming-aware router.
    Http,
    /// HTTP over TLS terminated here.
    Https,
    /// Plain TCP passthrough (RTMP).
    Tcp,
    /// TLS terminated here, then TCP passthrough (RTMPS).
    #[serde(alias = "tls-tcp")]
    Tls,
    /// UDP sessions (SRT).
    Udp,
}

/// `[[listener]]`: one or more bind addresses sharing one behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Addresses to bind, IPv4 or IPv6 (`"[::1]:80"`).
    pub bind: Vec<SocketAddr>,
    /// What the listener speaks.
    pub protocol: Protocol,
    /// Group that receives traffic the router does not send elsewhere.
    #[serde(default = "default_group_name")]
    pub default_group: String,
    /// Answer every plain-HTTP request with a redirect to https (HAProxy's `redirect scheme https`).
    #[serde(default)]
    pub redirect_https: bool,
    /// Expect a PROXY protocol v1/v2 header first on every connection.
    #[serde(default)]
    pub accept_proxy: bool,
    /// Listen backlog.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Add an RFC 7239 `Forwarded` header (off by default, as most AMS setups read X-Forwarded-For).
    #[serde(default)]
    pub forwarded: bool,
    /// Add a `Via` header naming this balancer.
    #[serde(default)]
    pub via: bool,
    /// Settings of `tcp`, `tls` and `udp` listeners (RTMP, RTMPS, SRT); see [`l4::L4Options`].
    #[serde(flatten)]
    pub l4: l4::L4Options,
    /// Route `/{app}/websocket` by the first signalling command (publish → origin,
    /// play → edge) instead of by `?target=`.
    #[serde(default)]
    pub sniff_websocket: bool,
    /// How long a sniffed WebSocket may take to send its deciding command
    /// before it goes to the default group.
    #[serde(default = "streaming::default_sniff_timeout", with = "duration")]
    pub sniff_timeout: Duration,
    /// Serve `GET /amslb/v1/assign` (which node would take this stream).
    #[serde(default)]
    pub assign_api: bool,
    /// Host name (exact or `*.` wildcard, lower case) → group: a request whose
    /// Host matches goes to that group, whatever the path router says.
    #[serde(default)]
    pub host_groups: std::collections::BTreeMap<String, String>,
    /// Peers whose `X-Forwarded-For` is believed: the client is the rightmost
    /// address of the chain that is not one of these.
    #[serde(default)]
    pub trusted_proxies: Vec<rules::Cidr>,
}

fn default_group_name() -> String {
    "origin".to_string()
}

fn default_backlog() -> u32 {
    1024
}

/// How a group picks a node for a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMode {
    /// Each node in turn.
    #[default]
    RoundRobin,
    /// The node with the fewest open sessions from this balancer.
    LeastConn,
    /// Consistent hashing with bounded loads on the stream (`app/stream`), so a
    /// stream's viewers share few nodes; requests without a stream use least-conn.
    StreamHash,
}

/// `[[group]]`: a named set of nodes (AMS origin or edge group).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name; the router sends publish traffic to `origin` and play traffic to `edge`.
    pub name: String,
    /// Balancing algorithm.
    #[serde(default)]
    pub balance: BalanceMode,
    /// Group to use when this one has no usable node.
    #[serde(default)]
    pub backup: Option<String>,
    /// Stream-hash load bound: no node takes a new keyed session above this
    /// factor times the group's mean load (Mirrokni et al.'s `c`).
    #[serde(default = "streaming::default_load_factor")]
    pub load_factor: f64,
    /// TLS to this group's nodes, instead of `[cluster.node_tls]`.
    #[serde(default)]
    pub node_tls: Option<rules::NodeTlsConfig>,
}

/// Where the node list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterSource {
    /// Only the `[[cluster.node]]` entries.
    #[default]
    Static,
    /// AMS's own node registry in MongoDB, followed live (see [`mongo`]).
    Mongodb,
}

/// `[cluster]`: membership source and node defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Membership source.
    #[serde(default)]
    pub source: ClusterSource,
    /// HTTP port every node listens on (AMS: 5080).
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// RTMP port every node listens on (AMS: 1935).
    #[serde(default = "default_rtmp_port")]
    pub rtmp_port: u16,
    /// SRT (UDP) port every node listens on (AMS: 4200).
    #[serde(default = "l4::default_srt_port")]
    pub srt_port: u16,
    /// Nodes listed by hand. With `source = "mongodb"` they seed the membership
    /// until MongoDB answers, and set id, group and ports of the node with that address.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// MongoDB connection string (`source = "mongodb"`); never logged.
    #[serde(default)]
    pub uri: Option<mongo::MongoUri>,
    /// Database of AMS's node registry.
    #[serde(default = "mongo::default_database")]
    pub database: String,
    /// Collection of AMS's node registry.
    #[serde(default = "mongo::default_collection")]
    pub collection: String,
    /// A node whose heartbeat (`lastUpdateTime`) is older than this takes no new sessions.
    #[serde(default = "mongo::default_stale_after", with = "duration")]
    pub stale_after: Duration,
    /// How often to re-read the registry when change streams are unavailable.
    #[serde(default = "mongo::default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
    /// Group of MongoDB nodes that match no role; without it they are ignored.
    #[serde(default)]
    pub default_group: Option<String>,
    /// Address block → group rules for MongoDB nodes, first match wins.
    #[serde(default, rename = "role")]
    pub roles: Vec<mongo::RoleConfig>,
    /// Reported cpu or memory percentage from which a node gets new sessions
    /// only when no other node of its group has room.
    #[serde(default = "mongo::default_load_threshold")]
    pub load_threshold: f32,
    /// TLS to every node (HTTPS and RTMPS), unless its group has its own `node_tls`.
    #[serde(default)]
    pub node_tls: Option<rules::NodeTlsConfig>,
}

fn default_http_port() -> u16 {
    5080
}

fn default_rtmp_port() -> u16 {
    1935
}

/// `[[cluster.node]]`: one node listed by hand.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable node id (AMS uses the node's `_id` in `clusternode`).
    pub id: String,
    /// The node's address.
    pub address: IpAddr,
    /// Group the node belongs to.
    pub group: String,
    /// Overrides `[cluster] http_port` for this node.
    #[serde(default)]
    pub http_port: Option<u16>,
    /// Overrides `[cluster] rtmp_port` for this node.
    #[serde(default)]
    pub rtmp_port: Option<u16>,
    /// Overrides `[cluster] srt_port` for this node.
    #[serde(default)]
    pub srt_port: Option<u16>,
    /// Region the node is in (see `[global] region`).
    #[serde(default)]
    pub region: Option<String>,
    /// This node's value in the sticky cookie (HAProxy `server ... cookie ams1`);
    /// derived from the id when unset.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Start the node draining: no new sessions, existing ones continue.
    #[serde(default)]
    pub drain: bool,
}

impl Config {
    /// Looks a group up by name.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }
}
