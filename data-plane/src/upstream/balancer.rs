//! Choosing a target of an upstream: weighted round robin, power-of-two-choices least
//! request, or consistent hashing on a header or cookie.
//!
//! Every algorithm is lock-free on the request path: round robin walks a precomputed weighted
//! schedule with one atomic counter, least request reads two in-flight counters, consistent
//! hashing binary-searches a ring built at config time.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderMap, HeaderName, header};
use rand::Rng;
use sluice_proto::pb;

/// Virtual nodes per 100 units of weight on the consistent-hash ring.
const RING_POINTS_PER_100: usize = 160;
/// Longest round-robin schedule; larger weight sets are scaled down to it.
const MAX_SCHEDULE: usize = 4096;

/// How one upstream picks a target.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin {
        /// Target indices, each appearing in proportion to its weight, interleaved.
        schedule: Vec<usize>,
        next: AtomicUsize,
    },
    LeastRequest {
        weights: Vec<u32>,
    },
    ConsistentHash {
        /// `(point, target)`, sorted by point.
        ring: Vec<(u64, usize)>,
        on: HashOn,
        /// Requests without the header or cookie fall back to round robin.
        fallback: Box<Balancer>,
    },
}

#[derive(Debug, Clone)]
pub enum HashOn {
    Header(HeaderName),
    Cookie(String),
}

impl Balancer {
    /// A balancer over targets with these weights (0 already replaced by the default).
    pub fn new(config: Option<&pb::LoadBalancing>, weights: &[u32]) -> Result<Self, String> {
        use pb::load_balancing::{Algorithm, HashOn as PbHashOn};
        let algorithm = config
            .map(|c| Algorithm::try_from(c.algorithm).unwrap_or(Algorithm::Unspecified))
            .unwrap_or(Algorithm::Unspecified);
        Ok(match algorithm {
            Algorithm::Unspecified | Algorithm::RoundRobin => round_robin(weights),
            Algorithm::LeastRequest => Balancer::LeastRequest {
                weights: weights.to_vec(),
            },
            Algorithm::ConsistentHash => {
                let on = match config.and_then(|c| c.hash_on.as_ref()) {
                    Some(PbHashOn::Header(name)) => HashOn::Header(
                        HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
                    ),
                    Some(PbHashOn::Cookie(name)) => HashOn::Cookie(name.clone()),
                    None => return Err("consistent hashing needs a header or cookie".into()),
                };
                Balancer::ConsistentHash {
                    ring: ring(weights),
                    on,
                    fallback: Box::new(round_robin(weights)),
                }
            }
        })
    }

    /// The index of the target for a request, among targets for which `usable` is true
    /// (healthy, not ejected). `in_flight(i)` is target i's outstanding request count.
    pub fn pick(
        &self,
        headers: &HeaderMap,
        usable: &dyn Fn(usize) -> bool,
        in_flight: &dyn Fn(usize) -> usize,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin { schedule, next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|step| schedule[(start + step) % schedule.len()])
                    .find(|&i| usable(i))
            }
            Balancer::LeastRequest { weights } => {
                let candidates: Vec<usize> = (0..weights.len()).filter(|&i| usable(i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let mut rng = rand::thread_rng();
                        let a = candidates[rng.gen_range(0..n)];
                        let mut b = candidates[rng.gen_range(0..n - 1)];
                        if b == a {
                            b = candidates[n - 1];
                        }
                        // Fewer outstanding requests per unit of weight wins.
                        let load = |i: usize| in_flight(i) as u64 * 100 / u64::from(weights[i]);
                        Some(if load(b) < load(a) { b } else { a })
                    }
                }
            }
            Balancer::ConsistentHash { ring, on, fallback } => {
                let Some(key) = hash_key(on, headers) else {
                    return fallback.pick(headers, usable, in_flight);
                };
                let point = hash64(key);
                let start = ring.partition_point(|(p, _)| *p < point);
                // Walk clockwise past unusable targets, so only their keys move.
                (0..ring.len())
                    .map(|step| ring[(start + step) % ring.len()].1)
                    .find(|&i| usable(i))
            }
        }
    }
}

fn round_robin(weights: &[u32]) -> Balancer {
    Balancer::RoundRobin {
        schedule: schedule(weights),
        next: AtomicUsize::new(rand::thread_rng().gen_range(0..weights.len().max(1))),
    }
}

/// Smooth weighted round robin (as nginx does it), unrolled into a fixed schedule: heavy
/// targets are spread out rather than picked in bursts.
fn schedule(weights: &[u32]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut units: Vec<u64> = weights.iter().map(|w| u64::from(w / divisor)).collect();
    let total: u64 = units.iter().sum();
    if total > MAX_SCHEDULE as u64 {
        for unit in &mut units {
            *unit = (*unit * MAX_SCHEDULE as u64 / total).max(1);
        }
    }
    let total: i64 = units.iter().map(|&u| u as i64).sum();
    let mut current = vec![0i64; units.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &u) in current.iter_mut().zip(&units) {
            *c += u as i64;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
            .unwrap_or((0, &0));
        current[best] -= total;
        schedule.push(best);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn ring(weights: &[u32]) -> Vec<(u64, usize)> {
    let mut ring = Vec::new();
    for (target, &weight) in weights.iter().enumerate() {
        let points = (RING_POINTS_PER_100 * weight as usize / 100).max(1);
        for point in 0..points {
            ring.push((hash64((target, point)), target));
        }
    }
    ring.sort_unstable();
    ring
}

fn hash_key<'a>(on: &HashOn, headers: &'a HeaderMap) -> Option<&'a [u8]> {
    match on {
        HashOn::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        HashOn::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
    }
}

/// A hash with fixed keys (`DefaultHasher::new` is unseeded), the same in every node of one
/// build, so nodes agree on the ring.
fn hash64(value: impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn counts(balancer: &Balancer, n: usize, targets: usize) -> Vec<usize> {
        let mut counts = vec![0; targets];
        for _ in 0..n {
            counts[balancer.pick(&HeaderMap::new(), &|_| true, &|_| 0).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_and_spreads_picks() {
        let balancer = Balancer::new(None, &[100, 300]).unwrap();
        assert_eq!(counts(&balancer, 400, 2), [100, 300]);
        let Balancer::RoundRobin { schedule, .. } = &balancer else {
            panic!("round robin is the default");
        };
        assert_eq!(schedule.len(), 4);
        assert!(schedule.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn unusable_targets_are_skipped() {
        let balancer = Balancer::new(None, &[100, 100, 100]).unwrap();
        for _ in 0..10 {
            let pick = balancer.pick(&HeaderMap::new(), &|i| i == 2, &|_| 0);
            assert_eq!(pick, Some(2));
        }
        assert_eq!(balancer.pick(&HeaderMap::new(), &|_| false, &|_| 0), None);
    }

    #[test]
    fn least_request_prefers_the_idle_target() {
        let config = pb::LoadBalancing {
            algorithm: pb::load_balancing::Algorithm::LeastRequest as i32,
            hash_on: None,
        };
        let balancer = Balancer::new(Some(&config), &[100, 100]).unwrap();
        for _ in 0..50 {
            let pick = balancer.pick(&HeaderMap::new(), &|_| true, &|i| {
                if i == 0 { 9 } else { 0 }
            });
            assert_eq!(pick, Some(1));
        }
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_few_keys() {
        let config = pb::LoadBalancing {
            algorithm: pb::load_balancing::Algorithm::ConsistentHash as i32,
            hash_on: Some(pb::load_balancing::HashOn::Header("x-user".into())),
        };
        let balancer = Balancer::new(Some(&config), &[100, 100, 100, 100]).unwrap();
        let pick = |user: usize, usable: &dyn Fn(usize) -> bool| {
            let mut headers = HeaderMap::new();
            headers.insert("x-user", HeaderValue::from(user));
            balancer.pick(&headers, usable, &|_| 0).unwrap()
        };
        let before: Vec<usize> = (0..1000).map(|u| pick(u, &|_| true)).collect();
        let again: Vec<usize> = (0..1000).map(|u| pick(u, &|_| true)).collect();
        assert_eq!(before, again, "the same key goes to the same target");
        let spread = (0..4).map(|t| before.iter().filter(|&&p| p == t).count());
        assert!(
            spread.clone().all(|c| c > 150),
            "{:?}",
            spread.collect::<Vec<_>>()
        );
        // Target 3 goes away: only its keys move.
        let after: Vec<usize> = (0..1000).map(|u| pick(u, &|i| i != 3)).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn consistent_hash_reads_cookies_and_falls_back_without_one() {
        let config = pb::LoadBalancing {
            algorithm: pb::load_balancing::Algorithm::ConsistentHash as i32,
            hash_on: Some(pb::load_balancing::HashOn::Cookie("session".into())),
        };
        let balancer = Balancer::new(Some(&config), &[100, 100]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; session=abc"));
        let first = balancer.pick(&headers, &|_| true, &|_| 0);
        for _ in 0..20 {
            assert_eq!(balancer.pick(&headers, &|_| true, &|_| 0), first);
        }
        assert_eq!(counts(&balancer, 100, 2), [50, 50]);
    }
}
