//! The real HAProxy (Debian `haproxy`), started with a config text on loopback
//! so tests can compare amslb's behaviour with it byte for byte.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `haproxy -db`; killed when dropped.
pub struct Haproxy {
    child: Child,
    /// Directory holding the config and the captured output.
    pub dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with `config` and waits until `ready` accepts connections.
    /// Panics with an install hint when the binary is missing: a comparison
    /// test must not pass silently without its reference.
    pub fn start(config: &str, ready: SocketAddr) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = match Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("cannot run haproxy ({e}); install it: apt-get install haproxy"),
        };
        let mut haproxy = Haproxy { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&ready, Duration::from_millis(100)).is_err() {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!("haproxy exited with {status}:\n{}", haproxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {ready}:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    /// What HAProxy wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
