//! Scenario 7's node registry: a SecantusDB server (MongoDB wire-compatible,
//! from PyPI) on a free loopback port, written to the way AMS writes
//! `clusterdb.clusternode`, and the amslb configuration that follows it.

use crate::net::NODE_PORT;
use crate::procs::{Daemon, StartError, find_program};
use mongodb::bson::{Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How to get SecantusDB (the version the tests use).
pub const INSTALL: &str = "pip install secantusdb==0.7.0b3";
/// Python start-up plus WiredTiger: slower than the other daemons.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A SecantusDB server with ephemeral storage, stopped when dropped.
pub struct Secantus {
    _daemon: Daemon,
    /// Connection string for the driver and for amslb.
    pub uri: String,
}

impl Secantus {
    /// Starts a server, a one-node replica set (change streams) or, with
    /// `standalone`, a plain server (no change streams: readers poll).
    /// A missing SecantusDB is `Refused` with the install hint.
    pub fn start(dir: &Path, standalone: bool) -> Result<Self, StartError> {
        let missing = || StartError::Refused(format!("SecantusDB is missing: {INSTALL}"));
        let python = find_program("python3").ok_or_else(missing)?;
        let probe = Command::new(&python)
            .args(["-c", "import secantus"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(s) if s.success()) {
            return Err(missing());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| StartError::Failed(format!("free port: {e}")))?
            .port();
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "secantus", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--storage-path", ":memory:", "--log-level", "WARNING"])
            .arg("--sync-on-commit");
        if standalone {
            cmd.arg("--standalone");
        }
        let name = if standalone {
            "secantus-standalone"
        } else {
            "secantus"
        };
        let mut daemon = Daemon::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))?;
        daemon
            .wait_listening_within(&[SocketAddr::from(([127, 0, 0, 1], port))], START_LIMIT)
            .map_err(|e| StartError::Failed(e.to_string()))?;
        Ok(Self {
            _daemon: daemon,
            uri: format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        })
    }
}

/// AMS's node registry, written with the official driver.
pub struct Registry {
    coll: Collection<Document>,
}

impl Registry {
    /// A client for `uri` with short timeouts.
    pub async fn connect(uri: &str) -> Result<Self, String> {
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| format!("MongoDB URI: {e}"))?;
        opts.server_selection_timeout = Some(Duration::from_secs(2));
        let client = Client::with_options(opts).map_err(|e| format!("MongoDB client: {e}"))?;
        Ok(Self {
            coll: client.database("clusterdb").collection("clusternode"),
        })
    }

    /// Registers (or refreshes) node `id` at `ip` as AMS does: Morphia `save()`,
    /// a replace with upsert of the whole document, heartbeat = now, 10 % cpu.
    pub async fn register(&self, id: &str, ip: IpAddr) -> Result<(), String> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let document = doc! {
            "_id": id,
            "className": "io.antmedia.cluster.ClusterNode",
            "ip": ip.to_string(),
            "lastUpdateTime": now_ms,
            "memory": "30",
            "cpu": "10",
        };
        self.coll
            .replace_one(doc! { "_id": id }, document)
            .upsert(true)
            .await
            .map(drop)
            .map_err(|e| format!("registering {id}: {e}"))
    }

    /// Removes node `id` (AMS deletes a node's document when it leaves).
    pub async fn remove(&self, id: &str) -> Result<(), String> {
        self.coll
            .delete_one(doc! { "_id": id })
            .await
            .map(drop)
            .map_err(|e| format!("removing {id}: {e}"))
    }
}

/// amslb on `listen`, round-robin over the nodes registered at `uri` whose
/// address is in `cidr`. `stale_after` is far above the scenario's length so
/// node 1 (registered once) never goes stale during it.
pub fn amslb_config(listen: SocketAddr, uri: &str, cidr: &str) -> String {
    format!(
        "[[listener]]\nname = \"bench\"\nbind = [\"{listen}\"]\nprotocol = \"http\"\n\
         default_group = \"origin\"\n\n\
         [[group]]\nname = \"origin\"\nbalance = \"round-robin\"\n\n\
         [cluster]\nsource = \"mongodb\"\nuri = \"{uri}\"\nstale_after = \"10m\"\n\
         http_port = {NODE_PORT}\nrtmp_port = {NODE_PORT}\n\n\
         [[cluster.role]]\ncidr = \"{cidr}\"\ngroup = \"origin\"\n"
    )
}
