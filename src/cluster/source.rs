//! Membership sources behind one trait: where the node list comes from.
//!
//! A source writes the [`Cluster`] snapshot and nothing else; the server
//! starts the one `[cluster] source` names through [`start`], and a reload
//! that changes `[cluster]` stops it and starts the new one. Nodes that both
//! sources list with the same id and endpoint keep their `Arc<Node>` (see
//! [`Cluster::update`]), so their health, drain flag and session counts
//! survive the switch. A new source is one more `impl MembershipSource` and
//! one arm in [`start`].

use super::{Cluster, mongodb, static_source};
use crate::config::{ClusterConfig, ClusterSource};
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// How a source is doing, for metrics and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceState {
    /// Whether the source's last contact with its backend succeeded.
    pub connected: bool,
    /// When it last delivered a membership, if ever.
    pub last_success: Option<SystemTime>,
}

/// A running membership source.
pub trait MembershipSource: Send + Sync + std::fmt::Debug {
    /// Its name in metrics and logs (the `[cluster] source` value).
    fn name(&self) -> &'static str;
    /// Its current state.
    fn state(&self) -> SourceState;
    /// Stops it; once the future resolves it writes the cluster no more, so
    /// the next source cannot be overwritten by a late update of this one.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Starts the source `cfg` names, writing into `cluster` until `stop` is
/// cancelled or [`MembershipSource::stop`] is called. Returns at once: a
/// remote source answers later, and the membership already in `cluster`
/// serves meanwhile.
pub fn start(
    cfg: &ClusterConfig,
    cluster: Arc<Cluster>,
    stop: &CancellationToken,
) -> Result<Box<dyn MembershipSource>, mongodb::SpawnError> {
    Ok(match cfg.source {
        ClusterSource::Static => {
            cluster.update(static_source::specs(cfg));
            Box::new(StaticSource {
                loaded: SystemTime::now(),
            })
        }
        ClusterSource::Mongodb => {
            let stop = stop.child_token();
            let source = mongodb::spawn(cfg, cluster, stop.clone())?;
            Box::new(MongoRunning { source, stop })
        }
    })
}

/// The `[[cluster.node]]` list: loaded once when started, nothing runs after.
#[derive(Debug)]
struct StaticSource {
    loaded: SystemTime,
}

impl MembershipSource for StaticSource {
    fn name(&self) -> &'static str {
        "static"
    }

    fn state(&self) -> SourceState {
        SourceState {
            connected: true,
            last_success: Some(self.loaded),
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The MongoDB follower task and the token that ends it.
#[derive(Debug)]
struct MongoRunning {
    source: mongodb::MongoSource,
    stop: CancellationToken,
}

impl MembershipSource for MongoRunning {
    fn name(&self) -> &'static str {
        "mongodb"
    }

    fn state(&self) -> SourceState {
        let status = &self.source.status;
        SourceState {
            connected: status.is_connected(),
            last_success: status.last_success(),
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.stop.cancel();
        let task = self.source.task;
        // Aborting lands on the task's next await; cluster updates are
        // synchronous, so none is left half done.
        task.abort();
        Box::pin(async move {
            let _ = task.await;
        })
    }
}
