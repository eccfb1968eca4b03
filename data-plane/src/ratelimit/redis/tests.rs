//! Against a real Redis: `SLUICE_TEST_REDIS_URL`, or redis://127.0.0.1:6379. Each test has its
//! own key prefix and scopes, so tests run in parallel and leave nothing that outlives its TTL.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ::redis::AsyncCommands;

use super::*;
use crate::ratelimit::Subject;

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A connection to the test Redis, for looking at keys; fails the test if Redis does not answer.
async fn test_redis() -> MultiplexedConnection {
    let url = redis_url();
    let connected = tokio::time::timeout(Duration::from_secs(3), async {
        let client = Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok::<_, RedisError>(connection)
    })
    .await;
    match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => panic!(
            "Redis at {url} did not answer ({error}); start it with `bash scripts/services.sh`"
        ),
        Err(_) => panic!(
            "Redis at {url} did not answer within 3 s; start it with `bash scripts/services.sh`"
        ),
    }
}

/// A limiter on the test Redis with keys under `prefix`.
fn limiter(prefix: &str) -> RedisLimiter {
    RedisLimiter::new(&redis_url(), prefix.to_owned(), Duration::from_secs(2)).unwrap()
}

fn unique_prefix() -> String {
    format!("sluice-test:{}:", uuid::Uuid::new_v4())
}

fn budget_key(subject: Subject) -> BudgetKey {
    BudgetKey {
        scope: uuid::Uuid::new_v4().into_bytes(),
        subject,
    }
}

fn per_second(limit: u64, burst: u64) -> Rate {
    Rate::new(limit, Duration::from_secs(1), burst).unwrap()
}

/// `value` is in `(expected - slack, expected]`: Redis's clock runs on between two checks, so
/// times measured from the second one are a little shorter.
fn assert_near(value: Duration, expected: Duration, what: &str) {
    let slack = Duration::from_millis(100);
    assert!(
        value <= expected && value + slack > expected,
        "{what}: {value:?}, expected up to {slack:?} less than {expected:?}"
    );
}

#[tokio::test]
async fn gcra_in_redis_passes_the_burst_then_the_steady_rate() {
    let mut redis = test_redis().await;
    let prefix = unique_prefix();
    let limiter = limiter(&prefix);
    let key = budget_key(Subject::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    // 4 per second (one per 250 ms), 2 more at once: 3 pass at once.
    let rates = [per_second(4, 2)];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];
    let interval = Duration::from_millis(250);

    for (count, expected_remaining) in [(1, 2), (2, 1), (3, 0)] {
        let decision = limiter.check(&budgets, &[]).await.unwrap();
        assert!(decision.allowed, "request {count}: {decision:?}");
        assert_eq!(decision.limit, 3);
        assert_eq!(decision.remaining, expected_remaining, "request {count}");
        assert_eq!(decision.retry_after, None);
        assert_near(decision.reset, interval * count, "reset");
    }
    let refused = limiter.check(&budgets, &[]).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert_near(refused.reset, interval * 3, "reset when refused");
    let retry_after = refused.retry_after.unwrap();
    assert_near(retry_after, interval, "retry after");

    tokio::time::sleep(retry_after).await;
    let decision = limiter.check(&budgets, &[]).await.unwrap();
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(decision.remaining, 0);
    assert!(!limiter.check(&budgets, &[]).await.unwrap().allowed);

    // The key is named after the budget and the rate, and expires when the budget is whole.
    let name = format!("{prefix}rl:{}:ip-10.0.0.1:4per1s", hex::encode(key.scope));
    let ttl_ms: i64 = redis.pttl(&name).await.unwrap();
    assert!((500..=750).contains(&ttl_ms), "PTTL of {name}: {ttl_ms}");
}

/// Two limiters are two nodes: hammered together for 2 s, a budget of 50 per second with no
/// burst lets through what one node alone would (one at once, then one per 20 ms), not twice
/// that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_prefix_share_the_budget() {
    test_redis().await;
    let prefix = unique_prefix();
    let key = budget_key(Subject::Whole);
    let rates = [per_second(50, 0)];
    let hammer_for = Duration::from_secs(2);
    let started = Instant::now();
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            let node = limiter(&prefix);
            let key = key.clone();
            tokio::spawn(async move {
                let budgets = [Budget {
                    key: &key,
                    rates: &rates,
                }];
                let (mut checks, mut passed) = (0, 0);
                while started.elapsed() < hammer_for {
                    checks += 1;
                    if node.check(&budgets, &[]).await.unwrap().allowed {
                        passed += 1;
                    }
                }
                (checks, passed)
            })
        })
        .collect();
    let mut per_node = Vec::new();
    for node in nodes {
        per_node.push(node.await.unwrap());
    }
    // Every check reached Redis within `span`, so at most one at once and one per 20 ms of it
    // passed. Fewer pass when the machine stalls both nodes (with no burst, a missed 20 ms slot
    // is lost): 95 allows 100 ms of stalls in 2 s.
    let span = started.elapsed();
    let passed: u128 = per_node.iter().map(|&(_, passed)| passed).sum();
    let most = 1 + span.as_micros() / 20_000;
    eprintln!("checks and passes per node: {per_node:?} in {span:?}");
    assert!(
        (95..=most).contains(&passed),
        "{passed} passed, expected 95..={most}"
    );
    assert!(per_node.iter().all(|&(checks, _)| checks > 200));
}

#[tokio::test]
async fn a_refused_request_costs_no_budget_or_quota() {
    let mut redis = test_redis().await;
    let prefix = unique_prefix();
    let limiter = limiter(&prefix);
    let tight_key = budget_key(Subject::Consumer([1; 16]));
    let loose_key = budget_key(Subject::Consumer([1; 16]));
    let tight = [per_second(1, 0)];
    let loose = [per_second(10, 5)];
    // The loose budget and the quota come first, so the script meets them before the refusal.
    let budgets = [
        Budget {
            key: &loose_key,
            rates: &loose,
        },
        Budget {
            key: &tight_key,
            rates: &tight,
        },
    ];
    let quotas = [Quota {
        key: &loose_key,
        per_month: 10,
    }];

    let first = limiter.check(&budgets, &quotas).await.unwrap();
    assert!(first.allowed);
    assert_eq!((first.limit, first.remaining), (1, 0));
    for _ in 0..3 {
        let refused = limiter.check(&budgets, &quotas).await.unwrap();
        assert!(!refused.allowed);
        assert_near(
            refused.retry_after.unwrap(),
            Duration::from_secs(1),
            "retry",
        );
    }
    let loose_only = [Budget {
        key: &loose_key,
        rates: &loose,
    }];
    // Counted once before this: 5 - 1 left after it (3 if a refusal had counted).
    let decision = limiter.check(&loose_only, &[]).await.unwrap();
    assert_eq!((decision.allowed, decision.remaining), (true, 4));
    let decision = limiter.check(&[], &quotas).await.unwrap();
    assert_eq!((decision.allowed, decision.remaining), (true, 8));

    delete_quota_keys(&mut redis, &prefix).await;
}

#[tokio::test]
async fn a_monthly_quota_allows_its_count_then_refuses_until_the_month_ends() {
    let mut redis = test_redis().await;
    let prefix = unique_prefix();
    let limiter = limiter(&prefix);
    let key = budget_key(Subject::Consumer([2; 16]));
    let quotas = [Quota {
        key: &key,
        per_month: 3,
    }];
    for expected_remaining in [2, 1, 0] {
        let decision = limiter.check(&[], &quotas).await.unwrap();
        assert!(decision.allowed);
        assert_eq!(
            (decision.limit, decision.remaining),
            (3, expected_remaining)
        );
        assert!(decision.reset <= Duration::from_secs(31 * 86_400));
    }
    let refused = limiter.check(&[], &quotas).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert_eq!(refused.retry_after, Some(refused.reset));

    // One key, named after the month, holding the count and expiring as the month ends.
    let keys = delete_quota_keys(&mut redis, &prefix).await;
    let [(name, count, ttl_ms)] = keys.as_slice() else {
        panic!("expected one quota key, found {keys:?}");
    };
    let stem = format!("{prefix}quota:{}:{}:", hex::encode(key.scope), key.subject);
    let month = name.strip_prefix(&stem).unwrap_or_else(|| panic!("{name}"));
    assert!(
        month.len() == 7 && month.as_bytes()[4] == b'-',
        "month {month}"
    );
    assert_eq!(*count, 3);
    let ttl = Duration::from_millis(u64::try_from(*ttl_ms).unwrap());
    assert!(
        ttl.abs_diff(refused.reset) < Duration::from_secs(2),
        "PTTL {ttl:?}, reset {:?}",
        refused.reset
    );
}

/// Deletes the quota keys under `prefix` (they would live to the end of the month) and returns
/// each one's name, count and PTTL.
async fn delete_quota_keys(
    redis: &mut MultiplexedConnection,
    prefix: &str,
) -> Vec<(String, i64, i64)> {
    let names: Vec<String> = redis.keys(format!("{prefix}quota:*")).await.unwrap();
    let mut keys = Vec::new();
    for name in names {
        let count: i64 = redis.get(&name).await.unwrap();
        let ttl_ms: i64 = redis.pttl(&name).await.unwrap();
        let _: i64 = redis.del(&name).await.unwrap();
        keys.push((name, count, ttl_ms));
    }
    keys
}

#[tokio::test]
async fn the_script_finds_calendar_months() {
    let mut redis = test_redis().await;
    let script = Script::new(&format!(
        "{CALENDAR_LUA}\nlocal month, next_starts = month_of(tonumber(ARGV[1]))\n\
         return {{month, next_starts}}"
    ));
    for (seconds, month, next_starts) in [
        (0_i64, "1970-01", 2_678_400),
        (951_825_600, "2000-02", 951_868_800),
        (946_684_799, "1999-12", 946_684_800),
        (1_709_251_199, "2024-02", 1_709_251_200),
        (1_798_761_599, "2026-12", 1_798_761_600),
        (4_107_542_400, "2100-03", 4_110_220_800),
    ] {
        let (found, found_next): (String, i64) =
            script.arg(seconds).invoke_async(&mut redis).await.unwrap();
        assert_eq!(
            (found.as_str(), found_next),
            (month, next_starts),
            "{seconds}"
        );
    }
}

/// A Redis that accepts connections and never answers: the listener counts connections and the
/// bytes sent to it.
async fn silent_redis() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let (connections, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted_connections, counted_bytes) = (Arc::clone(&connections), Arc::clone(&bytes));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted_connections.fetch_add(1, Ordering::SeqCst);
            let counted_bytes = Arc::clone(&counted_bytes);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buffer = [0; 1024];
                while let Ok(read @ 1..) = socket.read(&mut buffer).await {
                    counted_bytes.fetch_add(read, Ordering::SeqCst);
                }
            });
        }
    });
    (url, connections, bytes)
}

#[tokio::test]
async fn a_silent_redis_costs_one_timeout_then_the_breaker_answers_at_once() {
    let (url, connections, bytes) = silent_redis().await;
    let timeout = Duration::from_millis(200);
    let limiter = RedisLimiter::new(&url, unique_prefix(), timeout).unwrap();
    let key = budget_key(Subject::Whole);
    let rates = [per_second(10, 0)];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];

    let started = Instant::now();
    let error = limiter.check(&budgets, &[]).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(error, RedisUnavailable::Timeout { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("200 ms"), "{error}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_millis(100),
        "{elapsed:?}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // Within the cooldown: refused at once, without the network.
    let bytes_sent = bytes.load(Ordering::SeqCst);
    let started = Instant::now();
    let error = limiter.check(&budgets, &[]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(20));
    let RedisUnavailable::BreakerOpen { retry_in, cause } = &error else {
        panic!("{error:?}");
    };
    assert!(*retry_in <= breaker::COOLDOWN, "{retry_in:?}");
    assert!(cause.contains("did not answer within 200 ms"), "{cause}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(bytes.load(Ordering::SeqCst), bytes_sent);

    // After the cooldown one probe goes out, on a new connection, and fails the same way.
    tokio::time::sleep(*retry_in).await;
    let started = Instant::now();
    let error = limiter.check(&budgets, &[]).await.unwrap_err();
    assert!(
        matches!(error, RedisUnavailable::Timeout { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() >= timeout);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert!(matches!(
        limiter.check(&budgets, &[]).await,
        Err(RedisUnavailable::BreakerOpen { .. })
    ));
}

#[tokio::test]
async fn a_refused_connection_fails_fast() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let limiter = RedisLimiter::new(
        &format!("redis://127.0.0.1:{port}"),
        unique_prefix(),
        Duration::from_secs(2),
    )
    .unwrap();
    let key = budget_key(Subject::Whole);
    let rates = [per_second(10, 0)];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];
    let started = Instant::now();
    let error = limiter.check(&budgets, &[]).await.unwrap_err();
    assert!(
        matches!(error, RedisUnavailable::ConnectionRefused { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(200));
    // Nothing to check needs no Redis.
    assert_eq!(
        limiter.check(&[], &[]).await.unwrap(),
        Decision::unlimited()
    );
}

#[test]
fn a_bad_url_or_timeout_is_named() {
    let error = RedisLimiter::new("http://x", String::new(), Duration::from_secs(1)).unwrap_err();
    assert!(error.starts_with("invalid Redis URL"), "{error}");
    let error = RedisLimiter::new("redis://x", String::new(), Duration::ZERO).unwrap_err();
    assert!(error.contains("timeout"), "{error}");
}

#[test]
fn a_check_can_run_on_any_worker() {
    fn assert_send<T: Send>(_: &T) {}
    let limiter = RedisLimiter::new("redis://x", String::new(), Duration::from_secs(1)).unwrap();
    assert_send(&limiter.check(&[], &[]));
}
