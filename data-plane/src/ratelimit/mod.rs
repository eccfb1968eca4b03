//! Rate limits: GCRA budgets counted in the node's memory or in Redis.
//!
//! A rate limit is `limit` requests per `period` with `burst` extra requests allowed at once
//! above the steady rate. It is enforced with GCRA (the generic cell rate algorithm): each
//! request moves the budget's *theoretical arrival time* (TAT) one emission interval
//! `T = period / limit` into the future, and a request is refused when the TAT is more than the
//! tolerance `T * burst` ahead of now. So at most `1 + burst` requests pass at once, then one per
//! `T`. GCRA keeps one timestamp per budget and rate, with no window edges to game.
//!
//! - [`LocalLimiter`] counts in the node's memory: exact per node, no I/O, on the hot path.
//! - [`RedisLimiter`] counts in Redis, shared by every node, one round trip per request; what a
//!   request does when Redis is unavailable (`fail_open`) is the caller's decision.
//!
//! Both count all-or-nothing: a request is counted against every budget and rate it was checked
//! against only when all of them allow it, so a refused request costs no budget anywhere.
//!
//! The caller compiles the configuration into [`Rate`]s (rejecting what cannot be enforced),
//! derives a [`BudgetKey`] per request, and turns the merged [`Decision`] into the `RateLimit-*`
//! and `Retry-After` headers.

mod gcra;
mod local;
mod redis;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use sluice_proto::pb;

pub use self::local::LocalLimiter;
pub use self::redis::{RedisLimiter, RedisUnavailable};

/// The largest tolerance (`burst * period / limit`) a rate may have, in microseconds: 50 years
/// of 365 days (the validator refuses more). Times are counted in microseconds, and in Redis
/// they are Lua doubles, exact up to 2^53 µs (285 years) since 1970; a 50-year tolerance keeps
/// every sum exact until past 2200.
const MAX_TOLERANCE_US: u64 = sluice_proto::validate::MAX_BURST_AHEAD_US;

/// One rate limit: `limit` requests per `period`, `burst` more at once.
///
/// [`Rate::new`] and [`Rate::from_pb`] check that a rate can be enforced as written: at least
/// one request per period, an emission interval (`period / limit`) of at least one microsecond
/// (the step both limiters count in), and a tolerance (`burst * period / limit`) of at most 50
/// years. A rate written as a struct literal is not checked; the limiters then clamp it rather
/// than fail: limit 0 counts as 1, an interval below 1 µs as 1 µs, a tolerance above 50 years as
/// 50 years.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests allowed per period at the steady rate.
    pub limit: u64,
    pub period: Duration,
    /// Extra requests allowed at once above the steady rate.
    pub burst: u64,
}

impl Rate {
    /// A rate of `limit` requests per `period`, with `burst` extra requests allowed at once.
    /// The error says which value cannot be enforced and why.
    pub fn new(limit: u64, period: Duration, burst: u64) -> Result<Rate, String> {
        if limit == 0 {
            return Err("limit must be at least 1 request per period".to_owned());
        }
        let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX);
        let emission_us = period_us / limit;
        if emission_us == 0 {
            return Err(format!(
                "limit {limit} per {period:?} is more than one request per microsecond, the \
                 finest step the limiter counts in"
            ));
        }
        if emission_us
            .checked_mul(burst)
            .is_none_or(|us| us > MAX_TOLERANCE_US)
        {
            return Err(format!(
                "burst {burst} at {limit} per {period:?} allows requests more than 50 years ahead \
                 at once; the most is 50 years (burst × period / limit)"
            ));
        }
        Ok(Rate {
            limit,
            period,
            burst,
        })
    }

    /// Compiles a configured rate limit. The error names the field that is wrong.
    pub fn from_pb(rate: &pb::RateLimit) -> Result<Rate, String> {
        use pb::rate_limit::Period;
        let period = match Period::try_from(rate.period) {
            Ok(Period::Second) => Duration::from_secs(1),
            Ok(Period::Minute) => Duration::from_secs(60),
            Ok(Period::Hour) => Duration::from_secs(3600),
            Ok(Period::Day) => Duration::from_secs(86_400),
            Ok(Period::Unspecified) | Err(_) => {
                return Err(format!(
                    "period must be second, minute, hour or day (got {})",
                    rate.period
                ));
            }
        };
        Rate::new(rate.limit, period, rate.burst)
    }

    /// The steady spacing between requests, `period / limit` in whole microseconds (rounded
    /// down, so a rate that does not divide evenly lets through a hair more, never less: 3 per
    /// second is one per 333 333 µs).
    pub fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.emission_us())
    }

    /// How many requests pass at once when the budget is whole: `1 + burst`. This is the
    /// `limit` a [`Decision`] reports, so `remaining` never exceeds it.
    pub fn capacity(&self) -> u64 {
        self.burst.saturating_add(1)
    }

    /// `T`, in microseconds, clamped as the type's documentation says.
    fn emission_us(&self) -> u64 {
        let period_us = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        (period_us / self.limit.max(1)).max(1)
    }

    /// `T * burst`: how far ahead of now the TAT may be for a request to pass, in microseconds.
    fn tolerance_us(&self) -> u64 {
        self.emission_us()
            .saturating_mul(self.burst)
            .min(MAX_TOLERANCE_US)
    }

    fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX)
    }
}

impl TryFrom<&pb::RateLimit> for Rate {
    type Error = String;

    fn try_from(rate: &pb::RateLimit) -> Result<Rate, String> {
        Rate::from_pb(rate)
    }
}

/// Whose budget is counted. `scope` is a 16-byte id the caller derives (from the policy or plan
/// and where it is attached); `subject` says who within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BudgetKey {
    pub scope: [u8; 16],
    pub subject: Subject,
}

/// Who within a scope a budget belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Everyone calling what the policy is attached to shares one budget.
    Whole,
    /// One budget per consumer (the consumer's 16-byte id).
    Consumer([u8; 16]),
    /// One budget per client address. The caller decides how addresses are normalised (an
    /// IPv4-mapped IPv6 address is a different subject from the IPv4 address).
    Ip(IpAddr),
}

impl fmt::Display for Subject {
    /// The form used in Redis keys and logs: `whole`, `consumer-<hex>`, `ip-<address>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Whole => f.write_str("whole"),
            Subject::Consumer(id) => write!(f, "consumer-{}", hex::encode(id)),
            Subject::Ip(ip) => write!(f, "ip-{ip}"),
        }
    }
}

/// A budget to check: one key, counted against each of its rates.
#[derive(Debug, Clone, Copy)]
pub struct Budget<'a> {
    pub key: &'a BudgetKey,
    pub rates: &'a [Rate],
}

/// A monthly quota to check (Redis only): `per_month` requests per calendar month, UTC, counted
/// on the Redis server's clock. `per_month` 0 means no quota, as in the configuration, and is
/// not checked.
#[derive(Debug, Clone, Copy)]
pub struct Quota<'a> {
    pub key: &'a BudgetKey,
    pub per_month: u64,
}

/// The answer for one request: the most restrictive of what was checked, for the
/// `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// For a rate, `1 + burst` (requests that pass at once when the budget is whole); for a
    /// monthly quota, the quota.
    pub limit: u64,
    /// Requests that would still pass right now, after this one was counted.
    pub remaining: u64,
    /// Time until the budget is whole again (`RateLimit-Reset`, delta seconds): for a rate,
    /// until its TAT; for a quota, until the month ends.
    pub reset: Duration,
    /// On refusal, the time until one request would pass (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// Nothing was checked: allowed, with nothing to report. The identity of [`merge`](Self::merge).
    pub fn unlimited() -> Self {
        Decision {
            allowed: true,
            limit: u64::MAX,
            remaining: u64::MAX,
            reset: Duration::ZERO,
            retry_after: None,
        }
    }

    /// The more restrictive of two decisions: a refusal wins (between two refusals, the one that
    /// lasts longer, since the request needs both to pass); between two allowances, the one with
    /// fewer requests remaining (then the one whole later).
    pub fn merge(self, other: Decision) -> Decision {
        match (self.allowed, other.allowed) {
            (true, false) => other,
            (false, true) => self,
            (false, false) => {
                if other.retry_after > self.retry_after {
                    other
                } else {
                    self
                }
            }
            (true, true) => {
                if (other.remaining, std::cmp::Reverse(other.reset))
                    < (self.remaining, std::cmp::Reverse(self.reset))
                {
                    other
                } else {
                    self
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_from_pb_compiles_each_period() {
        let rate = |limit, period, burst| pb::RateLimit {
            limit,
            period,
            burst,
        };
        let per_minute = Rate::from_pb(&rate(120, 2, 5)).unwrap();
        assert_eq!(per_minute.period, Duration::from_secs(60));
        assert_eq!(per_minute.emission_interval(), Duration::from_millis(500));
        assert_eq!(per_minute.capacity(), 6);
        assert_eq!(
            Rate::from_pb(&rate(1, 4, 0)).unwrap().emission_interval(),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            Rate::from_pb(&rate(3, 1, 0)).unwrap().emission_interval(),
            Duration::from_micros(333_333)
        );
        assert_eq!(
            Rate::try_from(&rate(10, 3, 0)).unwrap().period,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn rate_from_pb_names_what_is_wrong() {
        let error = |limit, period, burst| {
            Rate::from_pb(&pb::RateLimit {
                limit,
                period,
                burst,
            })
            .unwrap_err()
        };
        assert!(error(0, 1, 0).contains("limit must be at least 1"));
        assert!(error(10, 0, 0).contains("period must be second, minute, hour or day (got 0)"));
        assert!(error(10, 9, 0).contains("(got 9)"));
        assert!(error(2_000_000, 1, 0).contains("more than one request per microsecond"));
        assert!(error(1, 4, 20_000).contains("burst 20000"));
        // The largest burst that fits is accepted.
        assert!(Rate::new(1, Duration::from_secs(86_400), 50 * 365).is_ok());
    }

    #[test]
    fn a_rate_written_by_hand_is_clamped_not_trusted() {
        let zero = Rate {
            limit: 0,
            period: Duration::from_secs(1),
            burst: 0,
        };
        assert_eq!(zero.emission_interval(), Duration::from_secs(1));
        let too_fast = Rate {
            limit: 10_000_000,
            period: Duration::from_secs(1),
            burst: u64::MAX,
        };
        assert_eq!(too_fast.emission_interval(), Duration::from_micros(1));
        assert_eq!(too_fast.tolerance_us(), MAX_TOLERANCE_US);
        assert_eq!(too_fast.capacity(), u64::MAX);
    }

    #[test]
    fn merge_prefers_refusal_then_fewest_remaining() {
        let allowed = |remaining, reset_ms| Decision {
            allowed: true,
            limit: 10,
            remaining,
            reset: Duration::from_millis(reset_ms),
            retry_after: None,
        };
        let refused = |retry_ms| Decision {
            allowed: false,
            limit: 10,
            remaining: 0,
            reset: Duration::from_millis(retry_ms * 2),
            retry_after: Some(Duration::from_millis(retry_ms)),
        };
        assert_eq!(allowed(3, 10).merge(refused(5)), refused(5));
        assert_eq!(refused(5).merge(allowed(0, 10)), refused(5));
        assert_eq!(refused(5).merge(refused(9)), refused(9));
        assert_eq!(refused(9).merge(refused(5)), refused(9));
        assert_eq!(allowed(3, 10).merge(allowed(2, 5)), allowed(2, 5));
        assert_eq!(allowed(2, 5).merge(allowed(3, 10)), allowed(2, 5));
        assert_eq!(allowed(2, 5).merge(allowed(2, 7)), allowed(2, 7));
        assert_eq!(Decision::unlimited().merge(allowed(4, 1)), allowed(4, 1));
        assert_eq!(allowed(4, 1).merge(Decision::unlimited()), allowed(4, 1));
    }

    #[test]
    fn subjects_display_as_key_parts() {
        assert_eq!(Subject::Whole.to_string(), "whole");
        assert_eq!(
            Subject::Consumer([0xab; 16]).to_string(),
            format!("consumer-{}", "ab".repeat(16))
        );
        assert_eq!(
            Subject::Ip("2001:db8::1".parse().unwrap()).to_string(),
            "ip-2001:db8::1"
        );
    }
}
