//! Message rate limits on subscribe routes (`message_rate_limits`): GCRA budgets in the
//! node's memory, one per subscription (per connection for anonymous callers), kept across
//! configuration changes like every local budget ([`crate::ratelimit::LocalLimiter`]).
//!
//! Events sent to a subscriber are **paced**: the stream waits until its budget allows the
//! next one. A subscriber limited below its topic's rate therefore falls behind, and is closed
//! as slow with its position once it is a feed's buffer behind: memory stays bounded. The
//! messages a WebSocket subscriber publishes have a budget of their own under the same limits;
//! one beyond them is refused.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::auth::AccessGuard;
use crate::ratelimit::{Budget, BudgetKey, Rate, Subject};

/// The shortest wait between two looks at a budget.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One subscriber's budgets.
#[derive(Debug)]
pub struct Pacer {
    guard: Arc<AccessGuard>,
    rates: Arc<[Rate]>,
    sent: BudgetKey,
    published: BudgetKey,
}

impl Pacer {
    /// `route`: the subscribe route's id; `subject`: the subscription's id (16 bytes), or a
    /// random one per connection.
    pub fn new(
        guard: Arc<AccessGuard>,
        rates: Arc<[Rate]>,
        route: &str,
        subject: [u8; 16],
    ) -> Self {
        let scope = |what: &str| {
            let digest = Sha256::digest(format!("message-rate:{what}:{route}"));
            let mut scope = [0u8; 16];
            scope.copy_from_slice(&digest[..16]);
            scope
        };
        Pacer {
            guard,
            rates,
            sent: BudgetKey {
                scope: scope("sent"),
                subject: Subject::Consumer(subject),
            },
            published: BudgetKey {
                scope: scope("published"),
                subject: Subject::Consumer(subject),
            },
        }
    }

    /// Waits until one more event may be sent, and counts it.
    pub async fn wait_to_send(&self) {
        loop {
            let decision = self.guard.local.check(&[Budget {
                key: &self.sent,
                rates: &self.rates,
            }]);
            if decision.allowed {
                return;
            }
            tokio::time::sleep(decision.retry_after.unwrap_or(MIN_WAIT).max(MIN_WAIT)).await;
        }
    }

    /// Counts one published message, or says how long until one would pass.
    pub fn take_publish(&self) -> Result<(), Duration> {
        let decision = self.guard.local.check(&[Budget {
            key: &self.published,
            rates: &self.rates,
        }]);
        if decision.allowed {
            Ok(())
        } else {
            Err(decision.retry_after.unwrap_or(MIN_WAIT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time: the limiter reads the clock itself.
    #[tokio::test]
    async fn events_are_paced_and_publishes_beyond_the_limit_refused() {
        let guard = Arc::new(AccessGuard::new(None, 1000, 0));
        let rates: Arc<[Rate]> = Arc::new([Rate::new(10, Duration::from_secs(1), 0).unwrap()]);
        let pacer = Pacer::new(guard.clone(), rates.clone(), "route", [1; 16]);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            pacer.wait_to_send().await;
        }
        // One at once, then one per 100 ms.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(390) && waited < Duration::from_millis(2000),
            "{waited:?}"
        );
        assert!(
            pacer.take_publish().is_ok(),
            "publishes have their own budget"
        );
        let retry = pacer.take_publish().unwrap_err();
        assert!(retry <= Duration::from_millis(100), "{retry:?}");
        let other = Pacer::new(guard, rates, "route", [2; 16]);
        assert!(
            other.take_publish().is_ok(),
            "each subscription has its own budget"
        );
    }
}
