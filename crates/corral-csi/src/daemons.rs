//! The controller's view of the cluster: the node daemons named by
//! `--daemons` (addresses, or `NAME:PORT` — a headless Service name that
//! resolves to every node daemon), asked afresh on every call, since the
//! plugin keeps no state of its own. A daemon that does not answer is
//! reported as unreachable, not dropped silently: callers decide what an
//! unknown answer means for them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use corral_client::{ClientError, EngineManager, ReplicaControl};
use corral_proto::v1 as pb;
use futures::future::join_all;
use tonic::transport::Channel;

use crate::placement::NodeRoom;

/// One node daemon, as it answered.
#[derive(Clone)]
pub struct NodeView {
    pub addr: String,
    pub info: pb::NodeInfo,
    pub replicas: Vec<pb::ReplicaInfo>,
    pub engines: Vec<pb::EngineStatus>,
    pub manager: EngineManager,
    pub control: ReplicaControl,
    /// The daemon's channel, for calls the client wrappers lack.
    pub channel: Channel,
}

impl NodeView {
    pub fn node_id(&self) -> &str {
        &self.info.node_id
    }

    pub fn room(&self) -> NodeRoom {
        NodeRoom {
            node_id: self.info.node_id.clone(),
            free_bytes: self.info.free_bytes,
            allocated_bytes: self.info.allocated_bytes,
            capacity_bytes: self.info.capacity_bytes,
        }
    }

    pub fn replica(&self, volume: &str) -> Option<&pb::ReplicaInfo> {
        self.replicas.iter().find(|r| r.volume == volume)
    }

    pub fn engine(&self, volume: &str) -> Option<&pb::EngineStatus> {
        self.engines
            .iter()
            .find(|e| e.spec.as_ref().is_some_and(|s| s.volume == volume))
    }

    /// The volume's engine here if it is an attachment (not a transient
    /// engine running for one snapshot call).
    pub fn attached(&self, volume: &str) -> Option<&pb::EngineStatus> {
        self.engine(volume).filter(|e| !e.transient)
    }
}

/// Every daemon, as seen now.
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// Daemons that did not answer, with why.
    pub unreachable: Vec<(String, ClientError)>,
}

impl ClusterView {
    pub fn node(&self, node_id: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.node_id() == node_id)
    }

    /// The nodes holding a replica of `volume`.
    pub fn holders(&self, volume: &str) -> Vec<&NodeView> {
        self.nodes
            .iter()
            .filter(|n| n.replica(volume).is_some())
            .collect()
    }

    /// The nodes where `volume` is attached: running its engine, not for
    /// one snapshot call only.
    pub fn attached_on(&self, volume: &str) -> Vec<&NodeView> {
        self.nodes
            .iter()
            .filter(|n| n.attached(volume).is_some())
            .collect()
    }

    /// The nodes running `volume`'s engine (attached or transient).
    pub fn engines_of(&self, volume: &str) -> Vec<&NodeView> {
        self.nodes
            .iter()
            .filter(|n| n.engine(volume).is_some())
            .collect()
    }

    /// Every volume with a replica somewhere, by id: its size and holders.
    pub fn volumes(&self) -> BTreeMap<String, (u64, BTreeSet<String>)> {
        let mut out: BTreeMap<String, (u64, BTreeSet<String>)> = BTreeMap::new();
        for n in &self.nodes {
            for r in &n.replicas {
                let e = out
                    .entry(r.volume.clone())
                    .or_insert((r.size, BTreeSet::new()));
                e.1.insert(n.node_id().to_string());
            }
        }
        out
    }

    /// The replica addresses a volume's engine should be given: the
    /// members of the newest membership recorded on any reachable replica
    /// (so a member on a dead node stays in, to be caught up when it
    /// returns), or, for a volume never opened, the replicas found.
    pub fn replica_addresses(&self, volume: &str) -> Vec<String> {
        let newest = self
            .nodes
            .iter()
            .filter_map(|n| n.replica(volume))
            .filter_map(|r| r.membership.as_ref())
            .filter(|m| !m.members.is_empty())
            .max_by_key(|m| (m.epoch, m.generation));
        let mut addrs: Vec<String> = match newest {
            Some(m) => m.members.iter().map(|m| m.address.clone()).collect(),
            None => self
                .holders(volume)
                .iter()
                .map(|n| n.info.replica_address.clone())
                .collect(),
        };
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The highest epoch any reachable replica of `volume` has seen.
    pub fn epoch(&self, volume: &str) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.replica(volume))
            .map(|r| r.epoch)
            .max()
            .unwrap_or(0)
    }
}

/// The node daemons the controller talks to.
#[derive(Clone, Debug)]
pub struct Daemons {
    names: Vec<String>,
    timeout: Duration,
}

impl Daemons {
    /// `names`: `host:port` each; a host name resolving to several
    /// addresses (a headless Service) stands for all of them.
    pub fn new(names: Vec<String>, timeout: Duration) -> Self {
        Daemons { names, timeout }
    }

    /// Timeout for slow calls (engine start and stop).
    pub fn engine_timeout(&self) -> Duration {
        self.timeout.max(Duration::from_secs(60))
    }

    async fn addresses(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        for name in &self.names {
            if name.parse::<std::net::SocketAddr>().is_ok() {
                out.insert(name.clone());
                continue;
            }
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        out.insert(a.to_string());
                    }
                }
                Err(e) => tracing::warn!(daemons = %name, error = %e, "cannot resolve"),
            }
        }
        out.into_iter().collect()
    }

    /// Ask every daemon who it is, what it hosts and what it runs.
    pub async fn view(&self) -> ClusterView {
        let addrs = self.addresses().await;
        let answers = join_all(addrs.into_iter().map(|addr| self.ask(addr))).await;
        let mut view = ClusterView {
            nodes: Vec::new(),
            unreachable: Vec::new(),
        };
        for a in answers {
            match a {
                Ok(n) => view.nodes.push(n),
                Err((addr, e)) => view.unreachable.push((addr, e)),
            }
        }
        view.nodes
            .sort_by(|a, b| a.info.node_id.cmp(&b.info.node_id));
        view
    }

    async fn ask(&self, addr: String) -> Result<NodeView, (String, ClientError)> {
        let fail = |e| (addr.clone(), e);
        let channel = corral_client::connect(&addr, self.timeout)
            .await
            .map_err(fail)?;
        let channel_for_calls = channel.clone();
        let manager = EngineManager::on(&addr, channel.clone(), self.engine_timeout());
        let quick = EngineManager::on(&addr, channel.clone(), self.timeout);
        let control = ReplicaControl::on(&addr, channel, self.timeout);
        let (info, replicas, engines) =
            tokio::join!(quick.node_info(), control.list(), quick.list_engines());
        Ok(NodeView {
            info: info.map_err(fail)?,
            replicas: replicas.map_err(fail)?,
            engines: engines.map_err(fail)?,
            addr: addr.clone(),
            manager,
            control,
            channel: channel_for_calls,
        })
    }
}
