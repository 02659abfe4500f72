//! Loopback addresses for one bench run: a random 127.X.Y.0/24 of our own, so
//! that nodes can use the real AMS port 5080 on distinct addresses without
//! clashing with other runs or tests, and so that each balancer run gets fresh
//! 4-tuples (no TIME_WAIT left over from the previous one).

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

/// The AMS HTTP port every node listens on.
pub const NODE_PORT: u16 = 5080;
/// The port balancers listen on (their address changes on every start).
const FRONT_PORT: u16 = 8080;

/// Hands out addresses inside one random 127.X.Y.0/24.
pub struct Addrs {
    base: [u8; 3],
    next_front: Cell<u8>,
}

impl Addrs {
    /// Picks a /24 whose first node address is free on port 5080.
    pub fn pick() -> Self {
        loop {
            let (x, y): (u8, u8) = (rand::random(), rand::random());
            // Stay away from 127.0.x.x, where tests and daemons usually live.
            if x < 16 {
                continue;
            }
            let addrs = Self {
                base: [127, x, y],
                next_front: Cell::new(10),
            };
            if TcpListener::bind(SocketAddr::new(addrs.host(1), NODE_PORT)).is_ok() {
                return addrs;
            }
        }
    }

    /// The address with last byte `n` in our /24.
    pub fn host(&self, n: u8) -> IpAddr {
        let [a, b, c] = self.base;
        IpAddr::V4(Ipv4Addr::new(a, b, c, n))
    }

    /// A fresh front address for the next balancer start.
    pub fn front(&self) -> SocketAddr {
        let n = self.next_front.get().checked_add(1).unwrap_or(10);
        self.next_front.set(n);
        SocketAddr::new(self.host(n), FRONT_PORT)
    }
}
