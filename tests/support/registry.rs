//! The simulated node's MongoDB mode: it registers itself in AMS's node
//! registry (`clusterdb.clusternode`) and refreshes `lastUpdateTime` the way
//! AMS does (every 5 s by default), and can stop refreshing on command, like a
//! node that hangs or dies without deregistering.

use super::secantus::{client, heartbeat, registry};
use super::sim::SimNode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// AMS's refresh period (`ClusterNode.NODE_UPDATE_PERIOD`).
pub const AMS_REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    refreshing: AtomicBool,
    cpu: Mutex<String>,
}

/// A node's registry entry kept fresh in the background; dropping it stops the refreshes.
#[derive(Debug)]
pub struct Registration {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl SimNode {
    /// Registers this node (its id and address) in the registry at `uri` and
    /// refreshes it every `every` (use [`AMS_REFRESH`] to behave like AMS).
    /// Returns once the first write succeeded.
    pub async fn register(&self, uri: &str, every: Duration) -> Registration {
        self.register_as(uri, every, &self.addr.ip().to_string())
            .await
    }

    /// Like [`SimNode::register`], with `ip` written as the node's address (a
    /// host name, as AMS writes `AMS_HOST_ADDRESS`).
    pub async fn register_as(&self, uri: &str, every: Duration, ip: &str) -> Registration {
        let coll = registry(&client(uri).await);
        let (id, ip) = (self.id().to_string(), ip.to_string());
        heartbeat(&coll, &id, &ip, "5").await.unwrap();
        let state = Arc::new(State {
            refreshing: AtomicBool::new(true),
            cpu: Mutex::new("5".into()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if shared.refreshing.load(Ordering::Relaxed) {
                    let cpu = shared.cpu.lock().unwrap().clone();
                    // Like AMS: a failed write (MongoDB down) is retried next period.
                    let _ = heartbeat(&coll, &id, &ip, &cpu).await;
                }
            }
        });
        Registration { state, task }
    }
}

impl Registration {
    /// Stops refreshing `lastUpdateTime`; the document stays, as with a dead AMS.
    pub fn stop_refreshing(&self) {
        self.state.refreshing.store(false, Ordering::Relaxed);
    }

    /// Resumes refreshing.
    pub fn resume_refreshing(&self) {
        self.state.refreshing.store(true, Ordering::Relaxed);
    }

    /// The cpu figure written from the next refresh on (AMS writes a percentage as text).
    pub fn set_cpu(&self, cpu: &str) {
        *self.state.cpu.lock().unwrap() = cpu.to_string();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}
