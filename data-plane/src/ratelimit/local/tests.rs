use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::ratelimit::Subject;

fn per_second(limit: u64, burst: u64) -> Rate {
    Rate::new(limit, Duration::from_secs(1), burst).unwrap()
}

fn ip_key(scope: u8, last_octet: u32) -> BudgetKey {
    BudgetKey {
        scope: [scope; 16],
        subject: Subject::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + last_octet))),
    }
}

fn allowed(remaining: u64, reset_ms: u64, limit: u64) -> Decision {
    Decision {
        allowed: true,
        limit,
        remaining,
        reset: Duration::from_millis(reset_ms),
        retry_after: None,
    }
}

fn refused(reset_ms: u64, retry_ms: u64, limit: u64) -> Decision {
    Decision {
        allowed: false,
        limit,
        remaining: 0,
        reset: Duration::from_millis(reset_ms),
        retry_after: Some(Duration::from_millis(retry_ms)),
    }
}

#[test]
fn burst_passes_at_once_then_steady_rate() {
    let limiter = LocalLimiter::new(1000);
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let key = ip_key(1, 1);
    // 10 per second (one per 100 ms), 2 more at once: 3 pass at once.
    let rates = [per_second(10, 2)];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];

    assert_eq!(limiter.check_at(&budgets, at(0)), allowed(2, 100, 3));
    assert_eq!(limiter.check_at(&budgets, at(0)), allowed(1, 200, 3));
    assert_eq!(limiter.check_at(&budgets, at(0)), allowed(0, 300, 3));
    assert_eq!(limiter.check_at(&budgets, at(0)), refused(300, 100, 3));
    assert_eq!(limiter.check_at(&budgets, at(99)), refused(201, 1, 3));
    // Then one per interval, and no more.
    assert_eq!(limiter.check_at(&budgets, at(100)), allowed(0, 300, 3));
    assert_eq!(limiter.check_at(&budgets, at(100)), refused(300, 100, 3));
    assert_eq!(limiter.check_at(&budgets, at(200)), allowed(0, 300, 3));
    // Idle until whole (the TAT was at 500 ms): the full burst again.
    assert_eq!(limiter.check_at(&budgets, at(500)), allowed(2, 100, 3));
    // A burst of 0 lets exactly one through at once.
    let strict = [per_second(2, 0)];
    let other = ip_key(1, 2);
    let budgets = [Budget {
        key: &other,
        rates: &strict,
    }];
    assert_eq!(limiter.check_at(&budgets, at(0)), allowed(0, 500, 1));
    assert_eq!(limiter.check_at(&budgets, at(0)), refused(500, 500, 1));
    assert_eq!(limiter.check_at(&budgets, at(500)), allowed(0, 500, 1));
}

#[test]
fn nothing_to_check_is_unlimited() {
    let limiter = LocalLimiter::new(10);
    let key = ip_key(1, 1);
    assert_eq!(limiter.check(&[]), Decision::unlimited());
    assert_eq!(
        limiter.check(&[Budget {
            key: &key,
            rates: &[]
        }]),
        Decision::unlimited()
    );
    assert!(limiter.is_empty());
}

#[test]
fn a_refused_request_costs_no_budget_anywhere() {
    let limiter = LocalLimiter::new(1000);
    let t0 = Instant::now();
    let tight = [per_second(1, 0)];
    let loose = [per_second(10, 5)];
    let both = [per_second(1, 0), per_second(10, 5)];

    // Two rates of one budget: the tight one refuses the second request.
    let key = ip_key(2, 1);
    let budget = |rates| Budget { key: &key, rates };
    assert_eq!(limiter.check_at(&[budget(&both)], t0), allowed(0, 1000, 1));
    assert_eq!(
        limiter.check_at(&[budget(&both)], t0),
        refused(1000, 1000, 1)
    );
    // The loose rate was counted once before this request, not twice (which would leave 3).
    assert_eq!(limiter.check_at(&[budget(&loose)], t0), allowed(4, 200, 6));

    // Two budgets, with the loose one listed first so that it is counted before the tight
    // one refuses, and the count is undone.
    let tight_key = ip_key(3, 1);
    let loose_key = ip_key(4, 1);
    let pair = [
        Budget {
            key: &loose_key,
            rates: &loose,
        },
        Budget {
            key: &tight_key,
            rates: &tight,
        },
    ];
    assert_eq!(limiter.check_at(&pair, t0), allowed(0, 1000, 1));
    for _ in 0..3 {
        assert_eq!(limiter.check_at(&pair, t0), refused(1000, 1000, 1));
    }
    assert_eq!(
        limiter.check_at(
            &[Budget {
                key: &loose_key,
                rates: &loose
            }],
            t0
        ),
        allowed(4, 200, 6)
    );
}

#[test]
fn a_refusal_reports_the_longest_wait() {
    let limiter = LocalLimiter::new(1000);
    let t0 = Instant::now();
    let key = ip_key(5, 1);
    let rates = [per_second(4, 0), per_second(1, 0)];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];
    assert!(limiter.check_at(&budgets, t0).allowed);
    // Both refuse; the request can pass only when the 1-per-second rate allows it.
    assert_eq!(limiter.check_at(&budgets, t0), refused(1000, 1000, 1));
}

#[test]
fn subjects_and_scopes_are_independent() {
    let limiter = LocalLimiter::new(1000);
    let t0 = Instant::now();
    let rates = [per_second(1, 0)];
    let keys = [
        ip_key(6, 1),
        ip_key(6, 2),
        ip_key(7, 1),
        BudgetKey {
            scope: [6; 16],
            subject: Subject::Consumer([1; 16]),
        },
        BudgetKey {
            scope: [6; 16],
            subject: Subject::Whole,
        },
    ];
    for key in &keys {
        let budgets = [Budget { key, rates: &rates }];
        assert!(limiter.check_at(&budgets, t0).allowed, "{key:?}");
        assert!(!limiter.check_at(&budgets, t0).allowed, "{key:?}");
    }
    assert_eq!(limiter.len(), keys.len());
}

#[test]
fn memory_is_bounded_by_max_keys() {
    let limiter = LocalLimiter::new(10);
    let t0 = Instant::now();
    let rates = [per_second(1, 0)];
    for octet in 0..1000 {
        let key = ip_key(8, octet);
        let budgets = [Budget {
            key: &key,
            rates: &rates,
        }];
        // A new subject has its whole budget whatever the table holds.
        assert_eq!(limiter.check_at(&budgets, t0), allowed(0, 1000, 1));
        assert!(limiter.len() <= 10, "{} entries", limiter.len());
    }
    // A subject still held is still limited.
    let last = ip_key(8, 999);
    assert!(
        !limiter
            .check_at(
                &[Budget {
                    key: &last,
                    rates: &rates
                }],
                t0
            )
            .allowed
    );
}

#[test]
fn a_full_shard_drops_expired_entries_first() {
    let limiter = LocalLimiter::with_shards(8, 1);
    let t0 = Instant::now();
    let rates = [per_second(1, 0)];
    let check = |octet, at| {
        let key = ip_key(9, octet);
        limiter.check_at(
            &[Budget {
                key: &key,
                rates: &rates,
            }],
            at,
        )
    };
    for octet in 0..8 {
        assert!(check(octet, t0).allowed);
    }
    assert_eq!(limiter.len(), 8);
    // Two seconds on, every TAT is past: the ninth key sweeps them all.
    let later = t0 + Duration::from_secs(2);
    assert_eq!(check(8, later), allowed(0, 1000, 1));
    assert_eq!(limiter.len(), 1);
}

#[test]
fn a_shard_full_of_live_entries_evicts_the_soonest_whole() {
    let limiter = LocalLimiter::with_shards(8, 1);
    let t0 = Instant::now();
    // One per 100 ms, 9 more at once.
    let rates = [per_second(10, 9)];
    let check = |octet| {
        let key = ip_key(10, octet);
        limiter.check_at(
            &[Budget {
                key: &key,
                rates: &rates,
            }],
            t0,
        )
    };
    // Subject i sends i + 1 requests: its TAT is (i + 1) * 100 ms ahead.
    for octet in 0..8 {
        for _ in 0..=octet {
            assert!(check(octet).allowed);
        }
    }
    assert_eq!(limiter.len(), 8);
    // A ninth subject: subject 0 (whole again soonest) makes room.
    assert_eq!(check(8), allowed(9, 100, 10));
    assert_eq!(limiter.len(), 8);
    assert_eq!(check(1), allowed(7, 300, 10), "subject 1 was kept");
    assert_eq!(check(7), allowed(1, 900, 10), "subject 7 was kept");
    assert_eq!(check(0), allowed(9, 100, 10), "subject 0 was forgiven");
    assert_eq!(limiter.len(), 8);
}

#[test]
fn concurrent_checks_count_exactly_and_never_deadlock() {
    let limiter = Arc::new(LocalLimiter::new(1000));
    let t0 = Instant::now();
    let tight = [per_second(1, 99)];
    let loose = [per_second(1, 199)];
    // Keys in different shards, so checks lock two shards; half the threads list them in the
    // other order.
    let first = ip_key(11, 1);
    let second = (2..)
        .map(|octet| ip_key(11, octet))
        .find(|key| {
            let shard = |key: &BudgetKey| limiter.shard_of(limiter.budget_hash(key));
            shard(key) != shard(&first)
        })
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let limiter = Arc::clone(&limiter);
            let (first, second) = (first.clone(), second.clone());
            std::thread::spawn(move || {
                let a = Budget {
                    key: &first,
                    rates: &tight,
                };
                let b = Budget {
                    key: &second,
                    rates: &loose,
                };
                let budgets = if thread % 2 == 0 { [a, b] } else { [b, a] };
                (0..2000)
                    .filter(|_| limiter.check_at(&budgets, t0).allowed)
                    .count()
            })
        })
        .collect();
    let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(passed, 100);
    // The looser budget was counted for exactly the 100 that passed: this is its 101st.
    let budgets = [Budget {
        key: &second,
        rates: &loose,
    }];
    assert_eq!(limiter.check_at(&budgets, t0).remaining, 199 - 100);
}

/// Guards against a check doing work proportional to the table (a sweep per check, say): even
/// unoptimised, with 10 000 live entries, a check stays far below 20 µs. The figure printed is
/// for the report; the criterion benchmark measures the optimised build.
#[test]
fn a_check_costs_little_with_a_full_table() {
    let limiter = LocalLimiter::new(10_000);
    let rates = [per_second(1000, 10)];
    let keys: Vec<BudgetKey> = (0..10_000).map(|octet| ip_key(12, octet)).collect();
    for key in &keys {
        limiter.check(&[Budget { key, rates: &rates }]);
    }
    let rounds = 200_000;
    let started = Instant::now();
    for round in 0..rounds {
        let key = &keys[(round * 7919) % keys.len()];
        std::hint::black_box(limiter.check(&[Budget { key, rates: &rates }]));
    }
    let per_check = started.elapsed() / rounds as u32;
    eprintln!("LocalLimiter::check: {per_check:?} per check (this build's profile)");
    assert!(per_check < Duration::from_micros(20), "{per_check:?}");
    assert!(limiter.len() <= 10_000);
}

#[test]
fn a_refund_gives_back_one_request_and_keeps_the_others() {
    let limiter = LocalLimiter::new(1000);
    let key = ip_key(9, 1);
    // 3 a minute, all at once.
    let rates = [Rate::new(3, Duration::from_secs(60), 2).unwrap()];
    let budgets = [Budget {
        key: &key,
        rates: &rates,
    }];
    assert_eq!(limiter.check(&budgets).remaining, 2);
    assert_eq!(limiter.check(&budgets).remaining, 1);
    limiter.refund(&budgets);
    assert_eq!(
        limiter.check(&budgets).remaining,
        1,
        "the refunded request is back"
    );
    assert_eq!(limiter.check(&budgets).remaining, 0);
    assert!(!limiter.check(&budgets).allowed);
}
