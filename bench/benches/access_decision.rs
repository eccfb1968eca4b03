//! One access-control decision of the data plane at scale (the access-control issue's
//! microbenchmark): [`RouteAccess::check`] on a node holding the large registry with a million
//! API keys ([`large::access_config`]): the key looked up by its SHA-256, its consumer and
//! subscription checked, and the request counted against the subscription's local rate limit
//! (which never refuses). Random existing keys, each on route 0 of its consumer's API.
//!
//! Measured, in one program:
//! - criterion's ns per operation: the whole decision, and its parts alone (finding and hashing
//!   the key, [`Holdings::api_key`], the consumer, the subscription, the local limit);
//! - p50, p99 and p99.9 over `SLUICE_BENCH_DECISIONS` (default 1M) decisions timed one by one,
//!   against the goal of p99 <= 1 us;
//! - the data plane's lookups (API keys by hash in `KeyTable`, ids in `HashedMap`) against
//!   `std`'s `HashMap` and the sorted `ChunkedMap`, a million random keys each.
//!
//! `cargo bench -p sluice-bench --bench access_decision` (in `make bench`); rows go to
//! `target/bench/access_decision.json`. `SLUICE_BENCH_CONSUMERS` (default 100k, 10 keys each)
//! sets the scale. Under `cargo test` (criterion's test mode) it runs once on 1000 consumers and
//! writes nothing.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::Criterion;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use sluice_bench::large::{self, APIS, KEYS_PER_CONSUMER};
use sluice_bench::{Row, percentile, report};
use sluice_data_plane::auth::jwks::JwksCache;
use sluice_data_plane::auth::key::KeyAuth;
use sluice_data_plane::auth::{AccessGuard, AccessPolicies, Admission, Caller, RouteAccess};
use sluice_data_plane::config::Holdings;
use sluice_data_plane::config::chunked::ChunkedMap;
use sluice_data_plane::config::hashed::HashedMap;
use sluice_data_plane::config::keys::{self, ApiKey, KeyTable};
use sluice_data_plane::ratelimit::{Budget, BudgetKey, LocalLimiter, Rate, Subject};
use sluice_proto::pb::{self, ResourceKind};
use sluice_proto::snapshot::PackedKey;

/// The allocator sluice-dp runs with: a decision allocates (decoded resources, the identity).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "access_decision";
const COMMAND: &str = "cargo bench -p sluice-bench --bench access_decision";
/// The goal for one decision, at p99.
const GOAL_P99_NS: f64 = 1000.0;
/// Requests come from one address: it only matters to IP-scoped limits and the failure
/// throttle, neither of which this route has.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// Requests prepared ahead (a power of two), cycled through: enough distinct keys that the
/// lookups miss the CPU caches as a node's would with many clients.
const SAMPLES: usize = 1 << 17;

/// One prepared request: a random existing key of a random consumer.
#[derive(Debug)]
struct Sample {
    headers: HeaderMap,
    /// Index in [`Fixture::routes`]: route 0 of the consumer's API.
    route: usize,
    key_sha256: [u8; 32],
    consumer_id: [u8; 16],
    api_id: [u8; 16],
    subscription_id: [u8; 16],
}

#[derive(Debug)]
struct Fixture {
    holdings: Holdings,
    policies: AccessPolicies,
    /// Route 0 of `api-{a}`, compiled, at index `a`.
    routes: Vec<RouteAccess>,
    guard: AccessGuard,
    samples: Vec<Sample>,
    /// The `key_auth` policy's key finder, for timing that step alone.
    key_auth: KeyAuth,
    /// The plans' rate ([`large::unreached_rate_limit`]), for timing the local limit alone.
    rate: Rate,
    consumers: usize,
    /// The runtime JWKS fetches would run on (the fixture has no JWT policy); kept alive with
    /// the policies compiled against it.
    _jwks: JwksCache,
    _runtime: tokio::runtime::Runtime,
}

fn uuid(kind: ResourceKind, name: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(&large::id(kind, name))
        .expect("derived ids are UUIDs")
        .into_bytes()
}

/// splitmix64: a fixed sequence, so every run asks for the same keys.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Fixture {
    fn build(consumers: usize) -> Self {
        let started = Instant::now();
        let snapshot = sluice_proto::snapshot::from_config(large::access_config(consumers));
        let holdings = Holdings::from_snapshot(&snapshot).expect("the fixture is a valid config");
        drop(snapshot);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let jwks = JwksCache::new(runtime.handle().clone());
        let policies = AccessPolicies::compile(&holdings, &jwks).expect("policies compile");
        let apis: std::collections::HashMap<String, pb::Api> = holdings
            .apis()
            .map(|api| (api.meta.clone().unwrap_or_default().name, api))
            .collect();
        let routes = (0..APIS)
            .map(|a| {
                let api = &apis[&format!("api-{a}")];
                let access = RouteAccess::compile(api, &api.routes[0], &policies)
                    .expect("the route's policies exist");
                assert!(!access.is_open(), "the route checks access");
                access
            })
            .collect();
        let mut random = 0x5eed;
        let samples = (0..SAMPLES)
            .map(|_| {
                let r = next_random(&mut random);
                let c = (r % consumers as u64) as usize;
                let k = ((r >> 40) % KEYS_PER_CONSUMER as u64) as usize;
                let key = large::api_key(c, k);
                let mut headers = HeaderMap::new();
                headers.insert("x-api-key", HeaderValue::from_str(&key).unwrap());
                let api = format!("api-{}", c % APIS);
                Sample {
                    headers,
                    route: c % APIS,
                    key_sha256: Sha256::digest(key.as_bytes()).into(),
                    consumer_id: uuid(ResourceKind::Consumer, &format!("c-{c}")),
                    api_id: uuid(ResourceKind::Api, &api),
                    subscription_id: uuid(ResourceKind::Subscription, &format!("c-{c}.{api}")),
                }
            })
            .collect();
        let fixture = Fixture {
            holdings,
            policies,
            routes,
            guard: AccessGuard::new(None, 1_000_000, 0),
            samples,
            key_auth: KeyAuth::compile(&pb::KeyAuthPolicy::default()).unwrap(),
            rate: Rate::from_pb(&large::unreached_rate_limit()).unwrap(),
            consumers,
            _jwks: jwks,
            _runtime: runtime,
        };
        eprintln!(
            "{NAME}: {} consumers, {} API keys, {APIS} routes checked; fixture built in {:.1} s",
            consumers,
            fixture.holdings.count(ResourceKind::Credential),
            started.elapsed().as_secs_f64()
        );
        fixture
    }

    /// Sample `i`, cycling through the prepared ones.
    fn sample(&self, i: usize) -> &Sample {
        &self.samples[i & (SAMPLES - 1)]
    }

    /// One decision. `check` is async for Redis; with only local limits it never awaits, so it
    /// is polled once, with a waker that does nothing, instead of through a runtime.
    fn decide(&self, sample: &Sample) -> Admission {
        let caller = Caller {
            ip: CLIENT,
            headers: &sample.headers,
            query: None,
            certificate: None,
        };
        let check = pin!(self.routes[sample.route].check(
            &caller,
            &self.holdings,
            &self.policies,
            &self.guard
        ));
        match check.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(admission)) => admission,
            Poll::Ready(Err(denial)) => {
                panic!(
                    "refused: {} {} ({})",
                    denial.status, denial.reason, denial.detail
                )
            }
            Poll::Pending => panic!("the check awaited, with only local limits"),
        }
    }
}

/// What criterion times: the decision, then each of its steps alone.
fn criterion_benches(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("access");
    let mut i = 0;
    group.bench_function("decision", |b| {
        b.iter(|| {
            i += 1;
            f.decide(f.sample(i))
        })
    });
    group.bench_function("key_auth_find", |b| {
        b.iter(|| {
            i += 1;
            f.key_auth.find(&f.sample(i).headers, None)
        })
    });
    group.bench_function("holdings_api_key", |b| {
        b.iter(|| {
            i += 1;
            f.holdings.api_key(black_box(&f.sample(i).key_sha256))
        })
    });
    group.bench_function("holdings_consumer", |b| {
        b.iter(|| {
            i += 1;
            f.holdings.consumer(black_box(&f.sample(i).consumer_id))
        })
    });
    group.bench_function("holdings_subscription", |b| {
        b.iter(|| {
            i += 1;
            let s = f.sample(i);
            f.holdings
                .subscription(black_box(&s.consumer_id), &s.api_id)
        })
    });
    let limiter = LocalLimiter::new(1_000_000);
    group.bench_function("local_limit", |b| {
        b.iter(|| {
            i += 1;
            let key = BudgetKey {
                scope: f.sample(i).subscription_id,
                subject: Subject::Whole,
            };
            limiter.check(&[Budget {
                key: &key,
                rates: std::slice::from_ref(&f.rate),
            }])
        })
    });
    group.finish();
}

/// The data plane's lookup structures against `std`'s `HashMap` and the sorted
/// [`ChunkedMap`] (what holdings kept everything in before), a million random keys each,
/// looked up with the same random existing keys: how much of a lookup is the structure's own.
#[derive(Debug)]
struct Maps {
    /// API keys by hash, as [`Holdings`] holds them.
    keys: KeyTable,
    keys_std: std::collections::HashMap<[u8; 32], ApiKey>,
    keys_chunked: ChunkedMap<[u8; 32], ApiKey>,
    /// 16-byte ids (consumers, subscriptions), as [`Holdings`] holds them.
    ids: HashedMap<[u8; 16], u64>,
    ids_std: std::collections::HashMap<[u8; 16], u64>,
    /// Existing keys, in a random order.
    probes: Vec<([u8; 32], [u8; 16])>,
}

impl Maps {
    fn build(len: usize) -> Self {
        let mut random = 0x3a95;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n.div_ceil(8))
                .flat_map(|_| next_random(&mut random).to_be_bytes())
                .take(n)
                .collect()
        };
        let mut keys: Vec<ApiKey> = (0..len as u128)
            .map(|i| {
                let sha: [u8; 32] = bytes(32).try_into().unwrap();
                ApiKey::new(
                    PackedKey {
                        id: i.to_be_bytes(),
                        consumer_id: (i / 10).to_be_bytes(),
                        key_sha256: sha,
                    },
                    None,
                    false,
                )
            })
            .collect();
        let ids: Vec<([u8; 16], u64)> = (0..len as u64)
            .map(|i| (bytes(16).try_into().unwrap(), i))
            .collect();
        let mut builder = keys::Builder::default();
        for key in &keys {
            builder.push(*key);
        }
        let table = builder.build();
        let keys_std = keys.iter().map(|k| (k.key_sha256, *k)).collect();
        keys.sort_unstable_by_key(|k| k.key_sha256);
        let keys_chunked = ChunkedMap::from_sorted(keys.iter().map(|k| (k.key_sha256, *k)));
        let mut pick = 0x77u64;
        let probes = (0..SAMPLES)
            .map(|_| {
                let r = next_random(&mut pick) as usize;
                (
                    keys[r % keys.len()].key_sha256,
                    ids[(r >> 20) % ids.len()].0,
                )
            })
            .collect();
        Maps {
            keys: table,
            keys_std,
            keys_chunked,
            ids: HashedMap::from_entries(ids.iter().copied()),
            ids_std: ids.into_iter().collect(),
            probes,
        }
    }
}

fn map_benches(c: &mut Criterion, maps: &Maps) {
    let mut group = c.benchmark_group("map");
    let mut i = 0;
    let mut probe = move || {
        i += 1;
        black_box(&maps.probes[i & (SAMPLES - 1)])
    };
    group.bench_function("key_table_get", |b| b.iter(|| maps.keys.get(&probe().0)));
    group.bench_function("key_std_hash_get", |b| {
        b.iter(|| maps.keys_std.get(&probe().0))
    });
    group.bench_function("key_chunked_get", |b| {
        b.iter(|| maps.keys_chunked.get(&probe().0))
    });
    group.bench_function("id_hashed_get", |b| b.iter(|| maps.ids.get(&probe().1)));
    group.bench_function("id_std_hash_get", |b| {
        b.iter(|| maps.ids_std.get(&probe().1))
    });
    group.finish();
}

/// Where criterion writes its results, found as criterion finds it: `$CRITERION_HOME`, else
/// `criterion` in cargo's target folder.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let cargo = std::env::var_os("CARGO")?;
            let out = std::process::Command::new(cargo)
                .args(["metadata", "--format-version", "1", "--no-deps"])
                .output()
                .ok()?;
            let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            metadata["target_directory"].as_str().map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("criterion")
}

/// Criterion's estimate for `{group}/{id}`, in ns: the slope of its linear sampling (what it
/// prints as `time:`), else the mean.
fn criterion_ns(id: &str) -> Option<f64> {
    let path = criterion_dir().join(format!("{id}/new/estimates.json"));
    let text = std::fs::read_to_string(&path).ok()?;
    let estimates: serde_json::Value = serde_json::from_str(&text).ok()?;
    let typical = if estimates["slope"].is_object() {
        &estimates["slope"]
    } else {
        &estimates["mean"]
    };
    typical["point_estimate"].as_f64()
}

/// Decisions timed one at a time, in ns, ascending; and the mean of the whole loop.
fn timed_decisions(f: &Fixture, n: usize) -> (Vec<f64>, f64) {
    let mut ns = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let sample = f.sample(i);
        // A node decides on a request it has just parsed, whose headers are in the CPU's
        // cache; the samples are not (there are a hundred thousand), so their headers are
        // read once before the clock starts. The lookups stay cold.
        black_box(sample.headers.get("x-api-key"));
        let start = Instant::now();
        black_box(f.decide(sample));
        ns.push(start.elapsed().as_nanos() as f64);
    }
    let mean = started.elapsed().as_nanos() as f64 / n as f64;
    ns.sort_unstable_by(f64::total_cmp);
    (ns, mean)
}

/// The median cost of reading the clock twice, which every timed decision includes.
fn clock_overhead_ns() -> f64 {
    let mut ns: Vec<f64> = (0..100_000)
        .map(|_| {
            let start = Instant::now();
            black_box(start.elapsed()).as_nanos() as f64
        })
        .collect();
    ns.sort_unstable_by(f64::total_cmp);
    percentile(&ns, 50.0)
}

/// The machine's own tail at the decision's length: `n` runs of work that touches no memory
/// beyond a few cache lines (SHA-256 rounds, as many as take `p50_ns` at the median), each
/// timed as a decision is. What this work's p99 is over its p50 is jitter the machine adds
/// (interrupts, the hypervisor), which no change to the decision can remove.
fn cache_resident_timings(p50_ns: f64, n: usize) -> Vec<f64> {
    let mut state = [7u8; 32];
    let mut rounds = |count: usize| {
        for _ in 0..count {
            state = Sha256::digest(black_box(state)).into();
        }
    };
    let one: Vec<f64> = {
        let mut ns: Vec<f64> = (0..10_000)
            .map(|_| {
                let start = Instant::now();
                rounds(64);
                start.elapsed().as_nanos() as f64 / 64.0
            })
            .collect();
        ns.sort_unstable_by(f64::total_cmp);
        ns
    };
    let count = (p50_ns / percentile(&one, 50.0)).round().max(1.0) as usize;
    let mut ns: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            rounds(count);
            start.elapsed().as_nanos() as f64
        })
        .collect();
    ns.sort_unstable_by(f64::total_cmp);
    ns
}

/// `n` the way row names say it: `1M`, `10k`.
fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

fn main() {
    // Criterion's own modes: `cargo bench` passes --bench; `cargo test` (and --list) does not,
    // and then every benchmark runs once, on a small fixture.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let benchmarking = has("--bench") && !has("--test") && !has("--list");
    let (consumers, decisions) = if benchmarking {
        (
            env_usize("SLUICE_BENCH_CONSUMERS", large::CONSUMERS),
            env_usize("SLUICE_BENCH_DECISIONS", 1_000_000),
        )
    } else {
        (1_000, 10_000)
    };
    let fixture = Fixture::build(consumers);
    let maps = Maps::build(consumers * KEYS_PER_CONSUMER);

    let mut criterion = Criterion::default().configure_from_args();
    criterion_benches(&mut criterion, &fixture);
    map_benches(&mut criterion, &maps);
    criterion.final_summary();
    if has("--list") {
        return;
    }

    // Warm the caches and the budgets as the criterion runs would have, then time one by one.
    let _ = timed_decisions(&fixture, SAMPLES.min(decisions));
    let (ns, mean) = timed_decisions(&fixture, decisions);
    let clock = clock_overhead_ns();
    let (p50, p99, p999) = (
        percentile(&ns, 50.0),
        percentile(&ns, 99.0),
        percentile(&ns, 99.9),
    );
    let max = ns.last().copied().unwrap_or(f64::NAN);
    println!(
        "\n{decisions} decisions timed one by one ({} API keys): p50 {p50:.0} ns, p99 {p99:.0} \
         ns, p99.9 {p999:.0} ns, max {max:.0} ns, mean {mean:.0} ns (each includes reading the \
         clock twice: {clock:.0} ns)",
        consumers * KEYS_PER_CONSUMER
    );
    let resident = cache_resident_timings(p50, decisions);
    let (resident_p50, resident_p99) = (percentile(&resident, 50.0), percentile(&resident, 99.0));
    println!(
        "the machine's own tail: work of no memory misses, timed the same way: p50 \
         {resident_p50:.0} ns, p99 {resident_p99:.0} ns, p99.9 {:.0} ns",
        percentile(&resident, 99.9)
    );
    if !benchmarking {
        println!("(test mode: no rows written)");
        return;
    }

    let keys = format!("{} keys", count(consumers * KEYS_PER_CONSUMER));
    let timed = format!("{COMMAND} ({decisions} decisions timed one by one)");
    let estimate = |id: &str| {
        criterion_ns(id).unwrap_or_else(|| {
            eprintln!(
                "{NAME}: no criterion estimate for {id} in {:?}",
                criterion_dir()
            );
            f64::NAN
        })
    };
    let criterion_row = |name: &str, id: &str| {
        Row::new(
            &format!("{name}, {keys} (criterion)"),
            "-",
            "ns",
            estimate(&format!("access/{id}")),
            None,
            COMMAND,
        )
    };
    let key_table = estimate("map/key_table_get");
    let rows = vec![
        criterion_row("access decision", "decision"),
        Row::new(
            &format!("access decision p50, {keys}"),
            "-",
            "ns",
            p50,
            None,
            &timed,
        ),
        Row::new(
            &format!("access decision p99 (goal <= 1 us), {keys}"),
            "goal",
            "ns",
            p99,
            Some(GOAL_P99_NS),
            &timed,
        ),
        Row::new(
            "cache-resident work of the decision's p50, p99 (the machine's tail)",
            "-",
            "ns",
            resident_p99,
            None,
            &timed,
        ),
        Row::new(
            &format!("access decision p99.9, {keys}"),
            "-",
            "ns",
            p999,
            None,
            &timed,
        ),
        criterion_row("step: find and hash the key", "key_auth_find"),
        criterion_row("step: Holdings::api_key", "holdings_api_key"),
        criterion_row("step: Holdings::consumer", "holdings_consumer"),
        criterion_row("step: Holdings::subscription", "holdings_subscription"),
        criterion_row("step: local limit, 1 budget", "local_limit"),
        Row::new(
            &format!("KeyTable::get, {keys} (criterion)"),
            "std HashMap::get, same keys",
            "ns",
            key_table,
            Some(estimate("map/key_std_hash_get")),
            COMMAND,
        ),
        Row::new(
            &format!("KeyTable::get, {keys} (criterion)"),
            "ChunkedMap::get (sorted chunks), same keys",
            "ns",
            key_table,
            Some(estimate("map/key_chunked_get")),
            COMMAND,
        ),
        Row::new(
            &format!(
                "HashedMap::get, {} 16-byte ids (criterion)",
                count(consumers * KEYS_PER_CONSUMER)
            ),
            "std HashMap::get, same ids",
            "ns",
            estimate("map/id_hashed_get"),
            Some(estimate("map/id_std_hash_get")),
            COMMAND,
        ),
    ];
    if let Err(e) = report(NAME, &rows) {
        eprintln!("{NAME}: cannot write the rows: {e}");
    }
    let verdict = if p99 <= GOAL_P99_NS { "met" } else { "NOT met" };
    println!(
        "goal (access control): one decision <= 1 us at p99: {p99:.0} ns  {verdict} \
         (fixture: {} consumers)",
        fixture.consumers
    );
}
