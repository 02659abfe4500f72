//! The real HAProxy (Debian `haproxy`), started with a config text on loopback
//! so tests can compare amslb's behaviour with it byte for byte.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

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
        let log = haproxy.dir.path().join("haproxy.log");
        super::wait_listening("haproxy", &mut haproxy.child, &[ready], &log);
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
