//! ACME storage shared through the `[state]` MongoDB: two real amslb
//! binaries with separate `certs_dir`, one SecantusDB, one Pebble.
//!
//! Pebble reaches "the deployment" through a TCP relay standing in for the
//! NLB in front of the instances; it sends every validation connection to
//! the instance that did NOT place the order, so the answer must come from
//! shared storage. Asserted: exactly one order, validation through the other
//! instance (http-01 and tls-alpn-01), both instances serve the issued
//! certificate, keys are encrypted in MongoDB, a restart of both orders
//! nothing; and with MongoDB killed both keep serving (also after a restart,
//! from their certs_dir cache), the outage logged once and exported.

mod support;
mod tls_support;

use mongodb::bson::{Document, doc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::secantus::{self, Secantus};
use support::{Amslb, SimNode, sim_node, unique_loopback};
use tls_support::{Pebble, get, get_eventually, lb_config, mode, tempdir};
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "live.amslb.test";
/// The log line of the instance that places an order.
const ORDERING: &str = "ordering certificate";

/// One amslb instance of the deployment.
struct Instance {
    name: &'static str,
    amslb: Amslb,
    https: SocketAddr,
    http: SocketAddr,
    stats: SocketAddr,
}

/// Where an instance listens and keeps its files (kept across restarts).
#[derive(Clone)]
struct Place {
    name: &'static str,
    https: SocketAddr,
    http: SocketAddr,
    stats: SocketAddr,
    certs_dir: PathBuf,
}

impl Place {
    fn new(name: &'static str, certs_dir: &Path) -> Self {
        let ip = unique_loopback();
        Self {
            name,
            https: SocketAddr::new(ip, 8443),
            http: SocketAddr::new(ip, 8080),
            stats: SocketAddr::new(ip, 6080),
            certs_dir: certs_dir.to_path_buf(),
        }
    }
}

/// The shared parts: Pebble, SecantusDB, the storage key, the relay.
struct Deployment {
    pebble: Pebble,
    db: Secantus,
    key_file: PathBuf,
    node: SimNode,
    relay: Relay,
    challenge: &'static str,
    _tmp: tempfile::TempDir,
}

impl Deployment {
    async fn new(challenge: &'static str) -> Self {
        amslb::tls::install_crypto_provider();
        let relay = Relay::start().await;
        let pebble = Pebble::start(relay.http.port(), relay.https.port(), None).await;
        let db = Secantus::start(&[]);
        let tmp = tempdir("acme-shared");
        let key_file = tmp.path().join("storage.key");
        std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
        Self {
            pebble,
            db,
            key_file,
            node: sim_node("origin-1").await,
            relay,
            challenge,
            _tmp: tmp,
        }
    }

    fn config(&self, place: &Place) -> String {
        let tls = format!(
            r#"
[tls]
certs_dir = "{dir}"

[tls.acme]
directory = "{directory}"
contact = ["mailto:ops@example.com"]
domains = ["{DOMAIN}"]
challenge = "{challenge}"
ca_file = "{ca}"
retry_min = "500ms"
retry_max = "2s"
storage_key_file = "{key}"

[state]
uri = "{uri}"
instance = "{name}"

[stats]
bind = "{stats}"
allow = ["127.0.0.0/8"]
"#,
            dir = place.certs_dir.display(),
            directory = self.pebble.directory,
            challenge = self.challenge,
            ca = self.pebble.ca_file.display(),
            key = self.key_file.display(),
            uri = self.db.uri(None),
            name = place.name,
            stats = place.stats,
        );
        lb_config(place.https, Some(place.http), self.node.addr, &tls)
    }

    /// Starts both instances at once (as a deployment rolls out) and tells
    /// the relay about them.
    fn start(&self, places: &[Place; 2]) -> [Instance; 2] {
        let [a, b] = std::thread::scope(|s| {
            let started = places.each_ref().map(|place| {
                let config = self.config(place);
                s.spawn(move || {
                    let amslb = Amslb::start(&config, &[place.https, place.http, place.stats]);
                    Instance {
                        name: place.name,
                        amslb,
                        https: place.https,
                        http: place.http,
                        stats: place.stats,
                    }
                })
            });
            started.map(|t| t.join().unwrap())
        });
        self.relay.set_backends(&[&a, &b]);
        [a, b]
    }

    /// The certificate's document in `amslb.acme_certs`.
    async fn stored(&self) -> Document {
        secantus::client(&self.db.uri(None))
            .await
            .database("amslb")
            .collection::<Document>("acme_certs")
            .find_one(doc! { "_id": DOMAIN })
            .await
            .unwrap()
            .expect("certificate document")
    }
}

impl Instance {
    /// Waits up to 20 s until the log contains `line`.
    async fn wait_log(&self, line: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.amslb.log().contains(line) {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not log {line:?}:\n{}",
                self.name,
                self.amslb.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn orders(&self) -> usize {
        self.amslb.log().matches(ORDERING).count()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = support::get(self.stats, "/metrics").await.text();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// A TCP relay standing in for the NLB in front of the instances: Pebble's
/// validation connections arrive here (its DNS says 127.0.0.1) and go to the
/// instance whose log shows no order, i.e. the one that did not order.
struct Relay {
    http: SocketAddr,
    https: SocketAddr,
    backends: Arc<Mutex<Vec<Backend>>>,
    /// Names of the instances each relayed connection went to.
    reached: Arc<Mutex<Vec<&'static str>>>,
}

#[derive(Clone)]
struct Backend {
    name: &'static str,
    log: PathBuf,
    http: SocketAddr,
    https: SocketAddr,
}

impl Relay {
    async fn start() -> Self {
        // Port 0: a port picked first and bound later can be taken by another
        // test in between (CI failed once with AddrInUse here).
        let http = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let https = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let relay = Self {
            http: http.local_addr().unwrap(),
            https: https.local_addr().unwrap(),
            backends: Arc::default(),
            reached: Arc::default(),
        };
        for (listener, tls) in [(http, false), (https, true)] {
            let (backends, reached) = (relay.backends.clone(), relay.reached.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let list = backends.lock().unwrap().clone();
                    let ordered = |b: &Backend| {
                        std::fs::read_to_string(&b.log).is_ok_and(|l| l.contains(ORDERING))
                    };
                    let Some(target) = list.iter().find(|b| !ordered(b)).cloned() else {
                        continue;
                    };
                    reached.lock().unwrap().push(target.name);
                    let addr = if tls { target.https } else { target.http };
                    tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(addr).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
        }
        relay
    }

    fn set_backends(&self, instances: &[&Instance]) {
        *self.backends.lock().unwrap() = instances
            .iter()
            .map(|i| Backend {
                name: i.name,
                log: i.amslb.dir.path().join("stderr.log"),
                http: i.http,
                https: i.https,
            })
            .collect();
    }

    fn reached(&self) -> Vec<&'static str> {
        self.reached.lock().unwrap().clone()
    }
}

/// Waits until both instances serve a certificate Pebble issued; its leaf.
async fn both_serve(deployment: &Deployment, instances: &[Instance; 2]) -> Vec<u8> {
    let roots = [deployment.pebble.root_der()];
    let mut leaves = Vec::new();
    for instance in instances {
        let seen = get_eventually(instance.https, DOMAIN, &roots, Duration::from_secs(60)).await;
        assert_eq!(seen.status, 200, "{}", instance.name);
        assert_eq!(seen.headers["x-node-id"], "origin-1");
        leaves.push(seen.leaf.as_ref().to_vec());
    }
    assert_eq!(
        leaves[0], leaves[1],
        "both instances serve the one certificate"
    );
    leaves.remove(0)
}

/// One order, validated through the instance that did not order, served by
/// both; restart of both orders nothing.
async fn one_order_serves_both(challenge: &'static str) {
    let deployment = Deployment::new(challenge).await;
    let (dir_a, dir_b) = (tempdir("acme-a"), tempdir("acme-b"));
    let places = [Place::new("A", dir_a.path()), Place::new("B", dir_b.path())];
    let started = std::time::Instant::now();
    let instances = deployment.start(&places);
    let leaf = both_serve(&deployment, &instances).await;
    let took = started.elapsed();

    let orders: Vec<usize> = instances.iter().map(Instance::orders).collect();
    assert_eq!(
        orders.iter().sum::<usize>(),
        1,
        "exactly one order across the deployment: {orders:?}\nA:\n{}\nB:\n{}",
        instances[0].amslb.log(),
        instances[1].amslb.log()
    );
    let mut issued = 0.0;
    for instance in &instances {
        issued += instance
            .metric("amslb_acme_orders_total{result=\"issued\"}")
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(
        issued, 1.0,
        "amslb_acme_orders_total issued, summed over both"
    );
    let (orderer, other) = if orders[0] == 1 {
        (&instances[0], &instances[1])
    } else {
        (&instances[1], &instances[0])
    };
    let reached = deployment.relay.reached();
    assert!(
        !reached.is_empty() && reached.iter().all(|r| *r == other.name),
        "Pebble's validation reached only {} (the instance that did not order): {reached:?}",
        other.name
    );
    eprintln!(
        "{challenge}: {} ordered, Pebble's {} validation connection(s) reached {}, both served the certificate {took:?} after start",
        orderer.name,
        reached.len(),
        other.name
    );
    assert!(
        other
            .amslb
            .log()
            .contains("serving an ACME challenge answer from shared storage"),
        "{}",
        other.amslb.log()
    );
    assert!(
        orderer
            .amslb
            .log()
            .contains("certificate obtained and stored for every instance")
    );
    assert!(
        other
            .amslb
            .log()
            .contains("certificate from shared storage installed"),
        "{}",
        other.amslb.log()
    );

    // Each certs_dir caches the certificate (0600); no account file there.
    for place in &places {
        let cached = place.certs_dir.join(format!("{DOMAIN}.pem"));
        assert_eq!(mode(&cached), 0o600, "{}", cached.display());
        assert!(!place.certs_dir.join(".acme/account.json").exists());
    }
    // In MongoDB the private key is encrypted; the lock is free again.
    let stored = deployment.stored().await;
    assert!(
        stored
            .get_str("chain")
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let key = stored.get_binary_generic("key").unwrap();
    assert!(!String::from_utf8_lossy(key).contains("PRIVATE KEY"));
    assert_eq!(stored.get_i64("lock_until_ms").unwrap(), 0);
    assert_eq!(stored.get_array("challenges").unwrap().len(), 0);
    let fence = stored.get_i64("fence").unwrap();

    // Restart both: the certificate is reused, nothing is ordered, the lock
    // is not even taken (each cache is fresh).
    drop(instances);
    let instances = deployment.start(&places);
    let again = both_serve(&deployment, &instances).await;
    assert_eq!(again, leaf, "restart serves the same certificate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for instance in &instances {
        assert_eq!(instance.orders(), 0, "{}", instance.amslb.log());
    }
    let stored = deployment.stored().await;
    assert_eq!(stored.get_i64("fence").unwrap(), fence, "no new lock taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_one_order_validated_through_the_other_instance() {
    one_order_serves_both("tls-alpn-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_one_order_validated_through_the_other_instance() {
    one_order_serves_both("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_keeps_serving_the_cached_certificate() {
    let mut deployment = Deployment::new("tls-alpn-01").await;
    let (dir_a, dir_b) = (tempdir("acme-a"), tempdir("acme-b"));
    let places = [Place::new("A", dir_a.path()), Place::new("B", dir_b.path())];
    let instances = deployment.start(&places);
    let leaf = both_serve(&deployment, &instances).await;

    deployment.db.kill();
    let roots = [deployment.pebble.root_der()];
    for instance in &instances {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while instance.metric("amslb_shared_state_up").await != Some(0.0) {
            assert!(
                std::time::Instant::now() < deadline,
                "outage not exported by {}",
                instance.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seen = get(instance.https, DOMAIN, &roots, &[], "/").await.unwrap();
        assert_eq!(seen.leaf.as_ref(), leaf, "{} keeps serving", instance.name);
        assert_eq!(seen.status, 200);
    }
    // Restart both while MongoDB is down: they serve from their cache.
    drop(instances);
    let instances = deployment.start(&places);
    for instance in &instances {
        let seen = get(instance.https, DOMAIN, &roots, &[], "/").await.unwrap();
        assert_eq!(
            seen.leaf.as_ref(),
            leaf,
            "{} serves its cache",
            instance.name
        );
    }
    let outage = "ACME storage unavailable: the certificates cached in certs_dir keep serving";
    for instance in &instances {
        instance.wait_log(outage).await;
    }
    // A few more failed reads (every second or so) are not logged again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for instance in &instances {
        let log = instance.amslb.log();
        assert_eq!(log.matches(outage).count(), 1, "logged once:\n{log}");
        assert_eq!(instance.orders(), 0, "nothing ordered while down:\n{log}");
        assert_eq!(instance.metric("amslb_shared_state_up").await, Some(0.0));
    }
    // MongoDB back: storage resumes, still no order.
    deployment.db.restart(&[]);
    for instance in &instances {
        instance.wait_log("ACME storage resumes").await;
        assert_eq!(instance.orders(), 0);
    }
}

/// The order lock in MongoDB: a second holder waits while the lease runs;
/// once it has run out the lock is taken over with a higher fence, and the
/// stale holder's writes (challenges, certificate) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lock_holder_is_fenced_off() {
    use amslb::tls::acme::storage::{Challenge, Storage, StorageError, Target};
    let deployment = Deployment::new("tls-alpn-01").await;
    let tmp = tempdir("acme-fence");
    let place = Place::new("A", tmp.path());
    let loaded =
        amslb::config::parse_str(&deployment.config(&place), Path::new("lb.toml")).unwrap();
    let key = amslb::config::tls::read_storage_key(&deployment.key_file).unwrap();
    let metrics =
        Arc::new(amslb::metrics::Metrics::new(Arc::new(amslb::cluster::Cluster::new())).unwrap());
    let storage = || {
        Storage::new(
            Target::of(&loaded.config).unwrap(),
            amslb::tls::acme::seal::StorageKey::new(&key),
            metrics.clone(),
        )
    };
    let (first, second) = (storage(), storage());
    let lease = Duration::from_millis(1500);
    let old = first
        .acquire(DOMAIN, lease)
        .await
        .unwrap()
        .expect("free lock");
    assert!(
        second.acquire(DOMAIN, lease).await.unwrap().is_none(),
        "a live lease keeps the lock"
    );
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let new = second
        .acquire(DOMAIN, lease)
        .await
        .unwrap()
        .expect("stale lock taken over");
    assert!(new.fence() > old.fence());
    let answer = [Challenge::Http01 {
        token: "t".into(),
        key_authorization: "t.k".into(),
    }];
    let refused = first.publish(&old, &answer).await.unwrap_err();
    assert!(matches!(refused, StorageError::Refused(_)), "{refused}");
    let refused = first
        .store_certificate(&old, "chain", "key")
        .await
        .unwrap_err();
    assert!(matches!(refused, StorageError::Refused(_)), "{refused}");
    second.publish(&new, &answer).await.unwrap();
    // The stale holder's release leaves the new holder's lock alone.
    first.release(&old).await;
    let doc = deployment.stored().await;
    assert_eq!(doc.get_i64("fence").unwrap(), new.fence());
    assert!(doc.get_i64("lock_until_ms").unwrap() > 0, "still held");
    assert_eq!(doc.get_array("challenges").unwrap().len(), 1);
}
