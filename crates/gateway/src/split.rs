//! A route's weighted split across upstreams (a canary, or a strangler migration one route at a
//! time): each request goes to one of them, in proportion to the weights.

use crate::config::SplitBy;
use crate::upstream::Pool;
use metrics::Counter;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug)]
pub struct Split {
    /// (pool, weight, requests sent to it); weights of 0 are left out.
    targets: Vec<(Arc<Pool>, u64, Counter)>,
    total: u64,
    by: SplitBy,
}

impl Split {
    pub fn new(route: &str, targets: Vec<(Arc<Pool>, u32)>, by: SplitBy) -> Split {
        let targets: Vec<(Arc<Pool>, u64, Counter)> = targets
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(pool, w)| {
                let counter =
                    metrics::counter!(crate::instruments::SPLIT, "http_route" => route.to_string(), "upstream" => pool.name.clone());
                (pool, u64::from(w), counter)
            })
            .collect();
        let total = targets.iter().map(|t| t.1).sum();
        Split { targets, total, by }
    }

    /// The upstream of this request: by chance, or by who sends it (`client` is the API key's
    /// name, if any; else the client address decides).
    pub fn pick(&self, client: Option<&str>, peer: IpAddr) -> &Arc<Pool> {
        let ticket = match self.by {
            SplitBy::Random => rand::random_range(0..self.total.max(1)),
            SplitBy::Client => {
                // SipHash with fixed keys: the same caller lands in the same place in every
                // process and after every restart.
                let mut h = std::hash::DefaultHasher::new();
                match client {
                    Some(name) => name.hash(&mut h),
                    None => peer.hash(&mut h),
                }
                h.finish() % self.total.max(1)
            }
        };
        let mut left = ticket;
        for (pool, weight, counter) in &self.targets {
            if left < *weight {
                counter.increment(1);
                return pool;
            }
            left -= weight;
        }
        &self.targets[0].0
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.targets.iter().map(|t| &t.0)
    }

    /// The target with the most weight: the route's main upstream for what is per route.
    pub fn heaviest(&self) -> Option<&Arc<Pool>> {
        self.targets.iter().max_by_key(|t| t.1).map(|t| &t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    fn split(by: SplitBy) -> Split {
        let pool = |name: &str| Arc::new(Pool::new(name, &UpstreamConfig::Url("http://127.0.0.1:1".into()).pool()));
        Split::new("/t", vec![(pool("legacy"), 90), (pool("new"), 10), (pool("off"), 0)], by)
    }

    #[test]
    fn requests_follow_the_weights() {
        let s = split(SplitBy::Random);
        let peer: IpAddr = [127, 0, 0, 1].into();
        let to_new = (0..20_000).filter(|_| s.pick(None, peer).name == "new").count();
        assert!((1_600..2_400).contains(&to_new), "about 10%: {to_new}");
        assert!((0..1000).all(|_| s.pick(None, peer).name != "off"), "weight 0 gets nothing");
        assert_eq!(s.heaviest().unwrap().name, "legacy");
    }

    #[test]
    fn by_client_a_caller_always_lands_on_the_same_upstream() {
        let s = split(SplitBy::Client);
        let peer: IpAddr = [10, 0, 0, 1].into();
        for i in 0..50 {
            let name = format!("key-{i}");
            let first = s.pick(Some(&name), peer).name.clone();
            assert!((0..20).all(|_| s.pick(Some(&name), peer).name == first));
        }
        let to_new = (0..5_000).filter(|i| s.pick(Some(&format!("key-{i}")), peer).name == "new").count();
        assert!((350..650).contains(&to_new), "callers spread by the weights: {to_new}");
        let anonymous = s.pick(None, peer).name.clone();
        assert!((0..20).all(|_| s.pick(None, peer).name == anonymous), "by address without a key");
    }
}
