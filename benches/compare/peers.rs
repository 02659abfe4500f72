//! The balancers under comparison and their equivalent configurations:
//! round-robin over the same nodes, X-Forwarded-For added, keep-alive to the
//! nodes, the same number of threads, the same connection cap.

use crate::backend::{LIVENESS_PATH, nginx_http_common, nginx_preamble, start_nginx};
use crate::net::NODE_PORT;
use crate::procs::{Daemon, StartError, find_program, output};
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// nginx's dynamic stream module (Debian `libnginx-mod-stream`).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Which balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HAProxy (Debian 2.6).
    Haproxy,
    /// nginx as a reverse proxy.
    Nginx,
    /// The balancer under test.
    Amslb,
    /// Another amslb build (`AMSLB_BASELINE`), measured in the same run to
    /// give a before/after ratio free of the machine's drift between runs.
    Baseline,
}

impl Kind {
    /// Column heading.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Amslb => "amslb",
            Kind::Baseline => "amslb before",
        }
    }

    /// How the balancer was told to use `threads` cores, for the report.
    pub fn threading(self, threads: usize) -> String {
        match self {
            Kind::Haproxy => format!("`nbthread {threads}` (one process)"),
            Kind::Nginx => format!("`worker_processes {threads}` (+ master)"),
            Kind::Amslb | Kind::Baseline => format!(
                "{threads} worker threads, one event loop each (`[global] workers`, one per core)"
            ),
        }
    }
}

/// What the balancer's front end speaks.
pub enum Front<'a> {
    /// Plain HTTP/1.1.
    Http,
    /// HTTPS terminated by the balancer, with this certificate, HTTP/1.1 only.
    Https(&'a TlsFiles),
    /// HTTPS offering HTTP/2 (and HTTP/1.1) by ALPN, as browsers fetch HLS.
    Https2(&'a TlsFiles),
    /// Plain TCP relay (HAProxy `mode tcp`, nginx `stream`, amslb `protocol = "tcp"`).
    Tcp,
}

/// The name the bench's certificate is for.
pub const TLS_NAME: &str = "bench.test";

/// One ECDSA P-256 certificate in the layouts each balancer wants.
pub struct TlsFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Certificate followed by key (HAProxy `crt`).
    pub combined: PathBuf,
    /// Directory holding `cert`/`key` (amslb `[tls] certs_dir`).
    pub dir: PathBuf,
}

impl TlsFiles {
    /// Generates a self-signed certificate for `bench.test` under `dir/certs`.
    pub fn generate(dir: &Path) -> Result<Self, String> {
        let certified = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_string()])
            .map_err(|e| e.to_string())?;
        let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
        let certs = dir.join("certs");
        let files = Self {
            cert: certs.join("bench.test.crt"),
            key: certs.join("bench.test.key"),
            combined: dir.join("haproxy.pem"),
            dir: certs.clone(),
        };
        let write = |path: &Path, text: &str| fs::write(path, text).map_err(|e| e.to_string());
        fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
        write(&files.cert, &cert_pem)?;
        write(&files.key, &key_pem)?;
        write(&files.combined, &format!("{cert_pem}{key_pem}"))?;
        Ok(files)
    }
}

/// Everything a balancer start depends on.
pub struct Spec<'a> {
    /// Front end kind.
    pub front: &'a Front<'a>,
    /// Where the balancer listens.
    pub listen: SocketAddr,
    /// Node addresses (all on port 5080).
    pub nodes: &'a [IpAddr],
    /// Directory for configs, logs and temp files.
    pub dir: &'a Path,
    /// Connection cap (HAProxy `maxconn`, nginx `worker_connections`, amslb `max_connections`).
    pub max_conn: usize,
    /// Threads / worker processes.
    pub threads: usize,
}

/// A balancer program found on this machine.
pub struct Peer {
    /// Which one.
    pub kind: Kind,
    /// Its executable.
    pub program: PathBuf,
}

impl Peer {
    /// Finds the peers' programs; prints how to install the missing ones.
    /// `baseline`, when given, is an older amslb measured right after `amslb`.
    pub fn find_all(amslb: &Path, baseline: Option<PathBuf>) -> Vec<Peer> {
        let mut found = Vec::new();
        for (kind, program) in [(Kind::Haproxy, "haproxy"), (Kind::Nginx, "nginx")] {
            match find_program(program) {
                Some(program) => found.push(Peer { kind, program }),
                None => println!(
                    "skipping {}: `{program}` not found (apt-get install haproxy nginx wrk nghttp2-client)",
                    kind.name()
                ),
            }
        }
        found.push(Peer {
            kind: Kind::Amslb,
            program: amslb.to_path_buf(),
        });
        if let Some(program) = baseline {
            found.push(Peer {
                kind: Kind::Baseline,
                program,
            });
        }
        found
    }

    /// Writes the configuration for `spec`, starts the balancer and waits until it listens.
    pub fn start(&self, spec: &Spec) -> Result<Daemon, StartError> {
        let name = self.kind.name().to_lowercase();
        let mut daemon = match self.kind {
            Kind::Haproxy => {
                let conf = write(spec.dir, "haproxy.cfg", &haproxy_config(spec))?;
                Daemon::spawn(
                    &name,
                    Command::new(&self.program).arg("-db").arg("-f").arg(conf),
                    &spec.dir.join("haproxy.log"),
                )?
            }
            Kind::Nginx => {
                let conf = write(spec.dir, "proxy.conf", &nginx_config(spec)?)?;
                start_nginx("proxy", &self.program, spec.dir, &conf)?
            }
            Kind::Amslb | Kind::Baseline => {
                return self.start_amslb(spec.dir, spec.listen, &amslb_config(spec), "warn");
            }
        };
        daemon.wait_listening(&[spec.listen])?;
        Ok(daemon)
    }

    /// Starts amslb (this peer's program) with the configuration `text`,
    /// logging at `rust_log`, and waits until it listens on `listen`.
    pub fn start_amslb(
        &self,
        dir: &Path,
        listen: SocketAddr,
        text: &str,
        rust_log: &str,
    ) -> Result<Daemon, StartError> {
        let conf = write(dir, "amslb.toml", text)?;
        // `amslb check` is how amslb says it does not (yet) support a
        // feature the scenario needs: a refusal there is n/a, not an error.
        output(
            Command::new(&self.program)
                .arg("check")
                .arg("--config")
                .arg(&conf),
        )
        .map_err(|why| StartError::Refused(format!("amslb refused the config: {why}")))?;
        let mut daemon = Daemon::spawn(
            "amslb",
            Command::new(&self.program)
                .arg("--config")
                .arg(conf)
                .env("RUST_LOG", rust_log),
            &dir.join("amslb.log"),
        )?;
        daemon.wait_listening(&[listen])?;
        Ok(daemon)
    }
}

fn write(dir: &Path, file: &str, text: &str) -> Result<PathBuf, StartError> {
    let path = dir.join(file);
    fs::write(&path, text).map_err(|e| StartError::Failed(format!("{}: {e}", path.display())))?;
    Ok(path)
}

fn haproxy_config(spec: &Spec) -> String {
    let (mode, options, bind_extra) = match spec.front {
        Front::Http => ("http", "    option forwardfor\n", String::new()),
        Front::Https(tls) => (
            "http",
            "    option forwardfor\n",
            format!(" ssl crt {} alpn http/1.1", tls.combined.display()),
        ),
        Front::Https2(tls) => (
            "http",
            "    option forwardfor\n",
            format!(" ssl crt {} alpn h2,http/1.1", tls.combined.display()),
        ),
        // Zero-copy relay, the best nginx can do for a TCP relay.
        Front::Tcp => ("tcp", "    option splice-auto\n", String::new()),
    };
    let mut servers = String::new();
    for (i, ip) in spec.nodes.iter().enumerate() {
        let _ = writeln!(
            servers,
            "    server n{i} {ip}:{NODE_PORT} check inter 2s fall 3 rise 2"
        );
    }
    // Keep-alive to the servers and connection reuse are HAProxy 2.6's defaults
    // (`option http-keep-alive`, `http-reuse safe`); no `log` line: no logging.
    // Health probes as amslb's defaults: GET /rest/v2/liveness every 2 s, fall 3, rise 2.
    format!(
        "global\n    nbthread {threads}\n    maxconn {max}\n\n\
         defaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 30s\n\
         \x20   timeout server 30s\n    timeout tunnel 2h\n{options}\n\
         frontend fe\n    bind {listen}{bind_extra}\n    default_backend nodes\n\n\
         backend nodes\n    balance roundrobin\n\
         \x20   option httpchk GET {LIVENESS_PATH}\n{servers}",
        threads = spec.threads,
        max = spec.max_conn,
        listen = spec.listen,
    )
}

fn nginx_config(spec: &Spec) -> Result<String, StartError> {
    let servers: String = spec
        .nodes
        .iter()
        .map(|ip| format!("    server {ip}:{NODE_PORT};\n"))
        .collect();
    let mut conf = String::new();
    if matches!(spec.front, Front::Tcp) {
        if !Path::new(NGINX_STREAM_MODULE).exists() {
            return Err(StartError::Refused(
                "nginx has no stream module (apt-get install libnginx-mod-stream)".into(),
            ));
        }
        let _ = writeln!(conf, "load_module {NGINX_STREAM_MODULE};");
    }
    conf += &nginx_preamble("proxy", spec.threads);
    // Each proxied connection holds two nginx connections.
    let _ = writeln!(
        conf,
        "events {{ worker_connections {}; }}",
        spec.max_conn * 2
    );
    let (listen_extra, tls) = match spec.front {
        Front::Https(files) | Front::Https2(files) => (
            if matches!(spec.front, Front::Https2(_)) {
                " ssl http2"
            } else {
                " ssl"
            },
            // nginx 1.22 (Debian 12) offers TLS 1.0-1.2 unless told: the
            // same versions as amslb and HAProxy, or it would be measured
            // on TLS 1.2 resumptions, which skip the key exchange.
            format!(
                "ssl_protocols TLSv1.2 TLSv1.3;\nssl_certificate {};\nssl_certificate_key {};\n",
                files.cert.display(),
                files.key.display()
            ),
        ),
        _ => ("", String::new()),
    };
    match spec.front {
        Front::Tcp => {
            let _ = write!(
                conf,
                "stream {{\nupstream nodes {{\n{servers}}}\n\
                 server {{ listen {listen}; proxy_pass nodes; }}\n}}\n",
                listen = spec.listen
            );
        }
        Front::Http | Front::Https(_) | Front::Https2(_) => {
            // Upgrade/Connection mapping: WebSocket tunnels pass, and an empty
            // Connection header keeps upstream connections alive otherwise.
            // proxy_max_temp_file_size 0: stream large bodies instead of spooling to disk.
            let _ = write!(
                conf,
                "http {{\n{common}\
                 map $http_upgrade $connection_upgrade {{ default upgrade; \"\" \"\"; }}\n\
                 upstream nodes {{\n{servers}    keepalive 64;\n    keepalive_requests 10000000;\n}}\n\
                 server {{\n    listen {listen}{listen_extra};\n{tls}\
                 location / {{\n    proxy_pass http://nodes;\n    proxy_http_version 1.1;\n\
                 proxy_set_header Host $host;\n    proxy_set_header Upgrade $http_upgrade;\n\
                 proxy_set_header Connection $connection_upgrade;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                 proxy_read_timeout 2h;\n    proxy_max_temp_file_size 0;\n}}\n}}\n}}\n",
                common = nginx_http_common("proxy"),
                listen = spec.listen,
            );
        }
    }
    Ok(conf)
}

fn amslb_config(spec: &Spec) -> String {
    let (protocol, tls) = match spec.front {
        Front::Http => ("http", String::new()),
        // amslb's https listeners always offer h2 and http/1.1 by ALPN.
        Front::Https(files) | Front::Https2(files) => (
            "https",
            format!("\n[tls]\ncerts_dir = \"{}\"\n", files.dir.display()),
        ),
        Front::Tcp => ("tcp", String::new()),
    };
    let mut nodes = String::new();
    for (i, ip) in spec.nodes.iter().enumerate() {
        let _ = write!(
            nodes,
            "\n[[cluster.node]]\nid = \"n{i}\"\naddress = \"{ip}\"\ngroup = \"origin\"\n"
        );
    }
    // X-Forwarded-For and the per-node keep-alive pool are always on in amslb;
    // health probes are on by default (the nodes answer /rest/v2/liveness).
    // rtmp_port = the nodes' HTTP port: the TCP relay scenario relays HTTP.
    format!(
        "[global]\nmax_connections = {max}\n\n\
         [[listener]]\nname = \"bench\"\nbind = [\"{listen}\"]\nprotocol = \"{protocol}\"\n\
         default_group = \"origin\"\n\n\
         [[group]]\nname = \"origin\"\nbalance = \"round-robin\"\n{tls}\n\
         [cluster]\nsource = \"static\"\nhttp_port = {NODE_PORT}\nrtmp_port = {NODE_PORT}\n{nodes}",
        max = spec.max_conn,
        listen = spec.listen,
    )
}
