//! Where a set learns its instances from, behind one trait: pixmesh's registry (its watch
//! stream of one service), a static list, or DNS (a Kubernetes headless Service: one A record
//! per ready pod); and the task that keeps a set in line with its source.

use crate::set::{EndpointSet, Transport};
use pixmesh_chassis::grpc::Dialer;
use pixmesh_proto::v1::WatchRequest;
use pixmesh_proto::v1::registry_client::RegistryClient;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tonic::transport::Channel;

/// An instance as discovery reports it: its address and how many calls it takes at once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub address: String,
    /// Calls with their bytes inline.
    pub capacity: usize,
    /// An image worker's calls with presigned URLs (0: as `capacity`).
    pub transfers: usize,
}

pub type Next<'a> = Pin<Box<dyn Future<Output = Result<Vec<Member>, String>> + Send + 'a>>;

/// A source of worker sets. `next` waits for the next full set (the first call answers with
/// the current one); an error means the source is unreachable for now.
pub trait Discovery: Send {
    fn name(&self) -> &'static str;
    fn next(&mut self) -> Next<'_>;
}

/// The registry's watch stream of one service's instances, reopened on the next call after it
/// breaks.
pub struct RegistryWatch {
    client: RegistryClient<Channel>,
    service: String,
    stream: Option<tonic::Streaming<pixmesh_proto::v1::WatchResponse>>,
}

impl RegistryWatch {
    /// The instances of `service` registered at the registry at `address`, dialed by `dialer`.
    pub fn new(address: &str, service: &str, dialer: &Dialer) -> Result<RegistryWatch, tonic::transport::Error> {
        let client = RegistryClient::new(pixmesh_registry::client::watch_channel(address, dialer)?);
        Ok(RegistryWatch { client, service: service.to_string(), stream: None })
    }
}

impl Discovery for RegistryWatch {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn next(&mut self) -> Next<'_> {
        Box::pin(async move {
            if self.stream.is_none() {
                let stream = self.client.watch(WatchRequest { service: self.service.clone() }).await.map_err(|e| e.to_string())?;
                self.stream = Some(stream.into_inner());
            }
            let stream = self.stream.as_mut().ok_or("no stream")?;
            match stream.message().await {
                Ok(Some(update)) => {
                    tracing::debug!(revision = update.revision, service = %self.service, instances = update.instances.len(), "instances from the registry");
                    Ok(update
                        .instances
                        .into_iter()
                        .map(|i| Member { address: i.address, capacity: i.capacity as usize, transfers: i.transfers as usize })
                        .collect())
                }
                Ok(None) => {
                    self.stream = None;
                    Err("the registry ended the watch".into())
                }
                Err(e) => {
                    self.stream = None;
                    Err(e.to_string())
                }
            }
        })
    }
}

/// A fixed list: answered once, then never changes.
pub struct Static {
    members: Option<Vec<Member>>,
}

impl Static {
    pub fn new(addresses: &[String], capacity: usize, transfers: usize) -> Static {
        Static { members: Some(addresses.iter().map(|a| Member { address: a.clone(), capacity, transfers }).collect()) }
    }
}

impl Discovery for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn next(&mut self) -> Next<'_> {
        let members = self.members.take();
        Box::pin(async move {
            match members {
                Some(m) => Ok(m),
                None => std::future::pending().await,
            }
        })
    }
}

/// `host:port` resolved every `interval`; a new set is reported when the addresses change.
pub struct Dns {
    target: String,
    capacity: usize,
    transfers: usize,
    interval: Duration,
    last: Option<Vec<Member>>,
}

impl Dns {
    pub fn new(target: &str, capacity: usize, transfers: usize, interval: Duration) -> Dns {
        Dns { target: target.to_string(), capacity, transfers, interval, last: None }
    }
}

impl Discovery for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn next(&mut self) -> Next<'_> {
        Box::pin(async move {
            loop {
                if self.last.is_some() {
                    tokio::time::sleep(self.interval).await;
                }
                let resolved =
                    tokio::net::lookup_host(self.target.as_str()).await.map_err(|e| format!("cannot resolve {}: {e}", self.target))?;
                let mut members: Vec<Member> =
                    resolved.map(|a| Member { address: a.to_string(), capacity: self.capacity, transfers: self.transfers }).collect();
                members.sort();
                members.dedup();
                if self.last.as_ref() != Some(&members) {
                    self.last = Some(members.clone());
                    return Ok(members);
                }
            }
        })
    }
}

/// Keeps `set` in line with `discovery` until `shutdown`, each instance with the calls `slots`
/// gives it. While the source is unreachable the last known set is kept (an outage of the
/// registry or of DNS must not stop calls) and it is asked again after `retry`.
pub fn spawn_with<T: Transport>(
    mut discovery: Box<dyn Discovery>,
    set: EndpointSet<T>,
    slots: impl Fn(&Member) -> usize + Send + 'static,
    retry: Duration,
    shutdown: pixmesh_chassis::Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let outcome = tokio::select! {
                outcome = discovery.next() => outcome,
                _ = shutdown.wait() => return,
            };
            match outcome {
                Ok(members) => {
                    let instances: Vec<(String, usize)> = members.iter().map(|m| (m.address.clone(), slots(m))).collect();
                    set.update(&instances);
                }
                Err(e) => {
                    tracing::warn!(source = discovery.name(), error = %e, "discovery failed; keeping the last known instances");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            }
        }
    })
}

/// [`spawn_with`], each instance taking its `capacity`.
pub fn spawn<T: Transport>(
    discovery: Box<dyn Discovery>,
    set: EndpointSet<T>,
    retry: Duration,
    shutdown: pixmesh_chassis::Shutdown,
) -> tokio::task::JoinHandle<()> {
    spawn_with(discovery, set, |m| m.capacity, retry, shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_answers_once_and_dns_resolves() {
        let mut s = Static::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], 3, 12);
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert!(tokio::time::timeout(Duration::from_millis(50), s.next()).await.is_err(), "no second answer");

        let mut d = Dns::new("localhost:50051", 2, 8, Duration::from_millis(20));
        let first = d.next().await.unwrap();
        assert!(first.iter().any(|m| m.address.ends_with(":50051") && m.capacity == 2), "{first:?}");
        assert!(tokio::time::timeout(Duration::from_millis(100), d.next()).await.is_err(), "unchanged records are not reported again");
        let mut bad = Dns::new("no-such-host.invalid:1", 2, 8, Duration::from_millis(20));
        assert!(bad.next().await.is_err());
    }
}
