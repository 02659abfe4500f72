//! `[state]`: state shared by every amslb instance of a deployment, kept in
//! MongoDB (the cluster's own, by default) in a database of amslb's own, so
//! amslb needs write access only there and stays read-only on `clusterdb`.

use super::ClusterConfig;
use super::mongo::MongoUri;
use serde::Deserialize;

/// `[state]`: where the shared drain state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// MongoDB connection string; default: `[cluster] uri`. Never logged.
    #[serde(default)]
    pub uri: Option<MongoUri>,
    /// Database amslb writes its shared state to.
    #[serde(default = "default_database")]
    pub database: String,
    /// This instance's name among its peers, recorded with every change it
    /// makes; default: the host name.
    #[serde(default)]
    pub instance: Option<String>,
}

fn default_database() -> String {
    "amslb".into()
}

impl StateConfig {
    /// The URI to use: `[state] uri`, else the cluster's.
    pub fn uri<'a>(&'a self, cluster: &'a ClusterConfig) -> Option<&'a MongoUri> {
        self.uri.as_ref().or(cluster.uri.as_ref())
    }

    /// This instance's name.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "amslb".into())
        })
    }
}

/// Checks `[state]`: it needs a URI of its own or the cluster's.
pub fn validate(state: &StateConfig, cluster: &ClusterConfig) -> Result<(), (String, String)> {
    if state.uri(cluster).is_none() {
        return Err((
            "state.uri".into(),
            "no MongoDB to keep shared state in: set state.uri or [cluster] uri".into(),
        ));
    }
    if state.database.is_empty() {
        return Err(("state.database".into(), "must not be empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::parse_str;
    use std::path::Path;

    const BASE: &str = "[[listener]]\nname = \"h\"\nbind = [\"127.0.0.1:0\"]\nprotocol = \"http\"\n\n[[group]]\nname = \"origin\"\n";

    #[test]
    fn state_defaults_to_the_cluster_uri_and_its_own_database() {
        let text = format!(
            "{BASE}\n[state]\n\n[cluster]\nsource = \"mongodb\"\nuri = \"mongodb://10.0.0.5:27017\"\ndefault_group = \"origin\"\n"
        );
        let config = parse_str(&text, Path::new("lb.toml")).unwrap().config;
        let state = config.state.as_ref().unwrap();
        assert_eq!(state.database, "amslb");
        assert_eq!(
            state.uri(&config.cluster).unwrap().expose(),
            "mongodb://10.0.0.5:27017"
        );
    }

    #[test]
    fn state_without_any_uri_is_refused() {
        let text = format!("{BASE}\n[state]\ndatabase = \"lb\"\n\n[cluster]\n");
        let err = parse_str(&text, Path::new("lb.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("state.uri"), "{err}");
    }
}
