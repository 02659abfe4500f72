//! A real SecantusDB server (MongoDB wire-compatible, from PyPI) on a free
//! loopback port, and AMS-style registry writes made with the official driver.

use mongodb::bson::{Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const INSTALL: &str = "SecantusDB is missing: pip install secantusdb==0.7.0b3";

/// A SecantusDB server owned by a test; killed (and its data removed) on drop.
pub struct Secantus {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

/// A port the OS just handed out and released again.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Secantus {
    /// Starts a server with extra flags (`--standalone`, `--auth`) on a free port.
    pub fn start(flags: &[&str]) -> Self {
        Self::start_on(free_port(), flags)
    }

    /// Starts a server on `port`; data lives in a fresh directory so a restart keeps it.
    pub fn start_on(port: u16, flags: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            args: flags.iter().map(|f| f.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let probe = Command::new("python3")
            .args(["-c", "import secantus"])
            .stderr(Stdio::null())
            .status();
        assert!(matches!(probe, Ok(s) if s.success()), "{INSTALL}");
        let child = Command::new("python3")
            .args(["-m", "secantus", "--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(self.dir.path())
            // Without it a killed server may lose its last writes (users included).
            .args(["--log-level", "WARNING", "--sync-on-commit"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(INSTALL);
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "SecantusDB did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a server that requires SCRAM authentication, with `users`
    /// (name, password, role on `clusterdb`) created in `admin`. SecantusDB
    /// provisions users only without `--auth`, so it starts plain, creates
    /// them and restarts with `--auth` on the same data.
    pub async fn start_with_users(users: &[(&str, &str, &str)]) -> Self {
        let mut server = Self::start(&[]);
        let admin = client(&server.uri(None)).await.database("admin");
        for (user, password, role) in users {
            admin
                .run_command(doc! {
                    "createUser": *user, "pwd": *password,
                    "roles": [{ "role": *role, "db": "clusterdb" }],
                })
                .await
                .unwrap();
        }
        server.restart(&["--auth"]);
        server
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for this server, with optional `user:password@`
    /// (checked against the `admin` database).
    pub fn uri(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!(
                "mongodb://{user}:{password}@127.0.0.1:{}/?directConnection=true&authSource=admin",
                self.port
            ),
            None => format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port),
        }
    }

    /// Kills the server at once (SIGKILL: an outage, not a clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data, and `flags`.
    pub fn restart(&mut self, flags: &[&str]) {
        self.kill();
        self.args = flags.iter().map(|f| f.to_string()).collect();
        self.launch();
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        // Before the data directory goes.
        self.kill();
    }
}

/// A driver client for `uri` with short timeouts, as a test writer.
pub async fn client(uri: &str) -> Client {
    let mut opts = ClientOptions::parse(uri).await.unwrap();
    opts.server_selection_timeout = Some(Duration::from_secs(2));
    Client::with_options(opts).unwrap()
}

/// AMS's node registry collection.
pub fn registry(client: &Client) -> Collection<Document> {
    client.database("clusterdb").collection("clusternode")
}

/// Our wall clock in epoch milliseconds, as AMS's `System.currentTimeMillis()`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A registry document exactly as AMS (Morphia) writes it.
pub fn ams_doc(id: &str, ip: &str, last_update_ms: i64, cpu: &str, memory: &str) -> Document {
    doc! {
        "_id": id,
        "className": "io.antmedia.cluster.ClusterNode",
        "ip": ip,
        "lastUpdateTime": last_update_ms,
        "memory": memory,
        "cpu": cpu,
    }
}

/// Writes a node's heartbeat the way AMS does: Morphia `save()`, i.e. a
/// replace with upsert of the whole document.
pub async fn heartbeat(
    coll: &Collection<Document>,
    id: &str,
    ip: &str,
    cpu: &str,
) -> mongodb::error::Result<()> {
    coll.replace_one(doc! { "_id": id }, ams_doc(id, ip, now_ms(), cpu, "30"))
        .upsert(true)
        .await
        .map(drop)
}

/// Waits until `check` holds, polling every 20 ms; returns how long it took.
pub async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// A `[cluster]` table following the registry at `uri`, with `extra` keys and
/// tables, and CIDR roles sending `origin_cidr` to "origin" and `edge_cidr` to "edge".
pub fn cluster_toml(uri: &str, origin_cidr: &str, edge_cidr: &str, extra: &str) -> String {
    format!(
        r#"
[cluster]
source = "mongodb"
uri = "{uri}"
{extra}

[[cluster.role]]
cidr = "{origin_cidr}"
group = "origin"

[[cluster.role]]
cidr = "{edge_cidr}"
group = "edge"
"#
    )
}
