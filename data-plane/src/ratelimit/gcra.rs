//! One GCRA step for one rate, on a clock counted in microseconds. [`LocalLimiter`] runs it in
//! Rust; the Redis script (`redis/check.lua`) runs the same arithmetic in Lua on the Redis
//! server's clock, so both limiters give the same answers.
//!
//! [`LocalLimiter`]: super::LocalLimiter

use std::time::Duration;

use super::{Decision, Rate};

/// The outcome of checking one rate at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Step {
    pub decision: Decision,
    /// The TAT to store if the request is counted; `None` when this rate refuses it.
    pub tat_after: Option<u64>,
}

/// Checks one request against `rate`, whose stored TAT is `stored_tat` (0 when the budget has no
/// entry: a TAT in the past means a whole budget).
pub(super) fn step(rate: &Rate, stored_tat: u64, now: u64) -> Step {
    let (emission, tolerance) = (rate.emission_us(), rate.tolerance_us());
    let tat = stored_tat.max(now);
    // How far ahead of the steady schedule the budget runs; the tolerance is how far it may.
    let debt = tat - now;
    if debt <= tolerance {
        let debt_after = debt + emission;
        Step {
            decision: Decision {
                allowed: true,
                limit: rate.capacity(),
                // Each further request adds one emission interval of debt; they pass while the
                // debt before them stays within the tolerance.
                remaining: (tolerance - debt) / emission,
                reset: Duration::from_micros(debt_after),
                retry_after: None,
            },
            tat_after: Some(tat.saturating_add(emission)),
        }
    } else {
        Step {
            decision: Decision {
                allowed: false,
                limit: rate.capacity(),
                remaining: 0,
                reset: Duration::from_micros(debt),
                retry_after: Some(Duration::from_micros(debt - tolerance)),
            },
            tat_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_passes_at_once_then_one_per_interval() {
        // 10 per second (T = 100 ms), burst 2: three at once.
        let rate = Rate::new(10, Duration::from_secs(1), 2).unwrap();
        let mut tat = 0;
        let now = 5_000_000;
        for expected_remaining in [2, 1, 0] {
            let step = step(&rate, tat, now);
            assert!(step.decision.allowed);
            assert_eq!(step.decision.remaining, expected_remaining);
            tat = step.tat_after.unwrap();
        }
        assert_eq!(tat, now + 300_000);
        let refused = step(&rate, tat, now);
        assert_eq!(refused.tat_after, None);
        assert_eq!(
            refused.decision.retry_after,
            Some(Duration::from_millis(100))
        );
        assert_eq!(refused.decision.reset, Duration::from_millis(300));
        // One interval later exactly one more passes.
        let later = step(&rate, tat, now + 100_000);
        assert!(later.decision.allowed);
        assert_eq!(later.decision.remaining, 0);
        assert!(
            !step(&rate, later.tat_after.unwrap(), now + 100_000)
                .decision
                .allowed
        );
    }
}
