//! When a failed try is tried again, and how often an upstream may be retried at all.
//!
//! A retry is safe only when the request can be sent again unchanged and sending it twice does
//! no harm: the request has no body (bodies are streamed, never kept), and either the first
//! try never reached the upstream (a connect error) or the method is idempotent and the
//! upstream answered with a status the upstream lists as retryable.
//!
//! Retries are budgeted so they cannot multiply load on an upstream that is already failing:
//! every request earns the upstream `budget_percent`/100 of a retry, every retry spends one,
//! and a small reserve lets a quiet upstream retry at all (as Finagle's and Linkerd's retry
//! budgets do). An empty budget means the failure goes back to the client as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use rand::Rng;
use sluice_proto::pb;

/// Retries an upstream may make before earning any (in thousandths of a retry below).
const RESERVE_RETRIES: u64 = 10;
/// The budget never holds more than this many retries, so a long calm cannot bank a storm.
const MAX_BANKED_RETRIES: u64 = 100;
const MILLI: u64 = 1000;
const DEFAULT_BUDGET_PERCENT: u64 = 20;
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An upstream's retry rules and budget.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    on_statuses: Vec<StatusCode>,
    backoff_base: Duration,
    /// Thousandths of a retry each request earns.
    earn_per_request: u64,
    /// Thousandths of a retry available.
    balance: AtomicU64,
}

/// Why a try failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// The connection could not be made: the request was never sent.
    Connect,
    /// The upstream answered with this status.
    Status(StatusCode),
}

impl RetryPolicy {
    pub fn new(config: Option<&pb::RetryPolicy>) -> Self {
        let config = config.cloned().unwrap_or_default();
        let percent = match config.budget_percent {
            0 => DEFAULT_BUDGET_PERCENT,
            p => u64::from(p),
        };
        RetryPolicy {
            attempts: config.attempts,
            on_statuses: config
                .on_statuses
                .iter()
                .filter_map(|s| u16::try_from(*s).ok())
                .filter_map(|s| StatusCode::from_u16(s).ok())
                .collect(),
            backoff_base: match config.backoff_base_ms {
                0 => DEFAULT_BACKOFF_BASE,
                ms => Duration::from_millis(ms),
            },
            earn_per_request: percent * MILLI / 100,
            balance: AtomicU64::new(RESERVE_RETRIES * MILLI),
        }
    }

    /// Credits the budget for one request (call once per request, not per try).
    pub fn earn(&self) {
        if self.attempts == 0 {
            return;
        }
        let cap = MAX_BANKED_RETRIES * MILLI;
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.earn_per_request).min(cap))
            });
    }

    /// Whether try number `tries` (1 for the first) that failed with `failure` may be tried
    /// again; spends one retry from the budget when it may.
    pub fn should_retry(
        &self,
        tries: u32,
        method: &Method,
        has_body: bool,
        failure: TryFailure,
    ) -> bool {
        if tries > self.attempts || has_body {
            return false;
        }
        let safe = match failure {
            TryFailure::Connect => true,
            TryFailure::Status(status) => {
                method.is_idempotent() && self.on_statuses.contains(&status)
            }
        };
        safe && self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(MILLI)
            })
            .is_ok()
    }

    /// How long to wait before retry number `retry` (1 for the first): exponential with full
    /// jitter, at most one second.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, statuses: &[u32], percent: u32) -> RetryPolicy {
        RetryPolicy::new(Some(&pb::RetryPolicy {
            attempts,
            on_statuses: statuses.to_vec(),
            backoff_base_ms: 10,
            budget_percent: percent,
        }))
    }

    #[test]
    fn only_safe_failures_are_retried() {
        let p = policy(2, &[503], 100);
        let unavailable = TryFailure::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert!(p.should_retry(1, &Method::GET, false, unavailable));
        assert!(p.should_retry(2, &Method::GET, false, unavailable));
        assert!(
            !p.should_retry(3, &Method::GET, false, unavailable),
            "attempts"
        );
        assert!(
            !p.should_retry(1, &Method::POST, false, unavailable),
            "not idempotent"
        );
        assert!(
            p.should_retry(1, &Method::POST, false, TryFailure::Connect),
            "never sent"
        );
        assert!(
            !p.should_retry(1, &Method::GET, true, TryFailure::Connect),
            "body gone"
        );
        let other = TryFailure::Status(StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!p.should_retry(1, &Method::GET, false, other), "not listed");
        assert!(!policy(0, &[503], 20).should_retry(1, &Method::GET, false, TryFailure::Connect));
    }

    #[test]
    fn the_budget_is_a_reserve_plus_a_share_of_requests() {
        let p = policy(5, &[], 20);
        let retry = || p.should_retry(1, &Method::GET, false, TryFailure::Connect);
        let reserve = (0..100).filter(|_| retry()).count();
        assert_eq!(reserve, RESERVE_RETRIES as usize);
        for _ in 0..100 {
            p.earn();
        }
        let earned = (0..100).filter(|_| retry()).count();
        assert_eq!(earned, 20, "20% of 100 requests");
        for _ in 0..10_000 {
            p.earn();
        }
        let banked = (0..1000).filter(|_| retry()).count();
        assert_eq!(banked, MAX_BANKED_RETRIES as usize);
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_a_cap() {
        let p = policy(5, &[], 20);
        for retry in 1..40 {
            let ceiling = Duration::from_millis(10 * (1 << (retry - 1).min(16))).min(MAX_BACKOFF);
            assert!(p.backoff(retry) <= ceiling);
        }
    }
}
