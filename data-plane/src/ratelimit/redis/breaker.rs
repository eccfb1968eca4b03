//! The breaker in front of Redis: after a failure, checks are answered at once with
//! [`RedisUnavailable::BreakerOpen`] for [`COOLDOWN`], then one check goes through as a probe.
//! A dead Redis so costs a node one check's timeout per cooldown, not one per request.
//!
//! - Closed: checks go to Redis. Any failure opens the breaker.
//! - Open: checks fail at once until the cooldown is over; the next check is the probe.
//! - Probing: one check is out; the others fail at once. Its success closes the breaker, its
//!   failure opens it again. A probe dropped before it finished (its request went away) lets the
//!   next check probe at once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::RedisUnavailable;

/// How long Redis is left alone after a failure. Short enough that a Redis back from a restart
/// or a failover is used again within half a second; long enough that a dead one costs each
/// node at most two timeouts per second.
pub(super) const COOLDOWN: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(super) struct Breaker {
    state: Mutex<State>,
}

#[derive(Debug, Clone)]
enum State {
    Closed,
    Open { until: Instant, cause: Arc<str> },
    Probing { cause: Arc<str> },
}

/// Leave to send one check to Redis; report how it went with [`Pass::succeeded`] or
/// [`Pass::failed`].
#[derive(Debug)]
pub(super) struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub(super) fn new() -> Self {
        Breaker {
            state: Mutex::new(State::Closed),
        }
    }

    /// Leave to go to Redis, or the reason not to.
    pub(super) fn pass(&self) -> Result<Pass<'_>, RedisUnavailable> {
        let mut state = self.lock();
        let probe = match &*state {
            State::Closed => false,
            State::Open { until, cause } => {
                let now = Instant::now();
                if now < *until {
                    return Err(RedisUnavailable::BreakerOpen {
                        retry_in: *until - now,
                        cause: Arc::clone(cause),
                    });
                }
                *state = State::Probing {
                    cause: Arc::clone(cause),
                };
                true
            }
            State::Probing { cause } => {
                return Err(RedisUnavailable::BreakerOpen {
                    retry_in: Duration::ZERO,
                    cause: Arc::clone(cause),
                });
            }
        };
        Ok(Pass {
            breaker: self,
            probe,
            reported: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value, valid after any panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pass<'_> {
    pub(super) fn succeeded(mut self) {
        self.reported = true;
        if self.probe {
            *self.breaker.lock() = State::Closed;
        }
        // A check that set out while the breaker was closed and came back after another failed
        // does not close it: only the probe decides.
    }

    /// Opens the breaker (again) for the cooldown. True when this failure is what opened it,
    /// false when it only prolongs an open breaker (a check that set out before another
    /// failed), so that a Redis going down is logged once, not once per check in flight.
    pub(super) fn failed(mut self, error: &RedisUnavailable) -> bool {
        self.reported = true;
        let mut state = self.breaker.lock();
        let opened = !matches!(*state, State::Open { .. });
        *state = State::Open {
            until: Instant::now() + COOLDOWN,
            cause: Arc::from(error.to_string()),
        };
        opened
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let mut state = self.breaker.lock();
            if let State::Probing { cause } = &*state {
                *state = State::Open {
                    until: Instant::now(),
                    cause: Arc::clone(cause),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> RedisUnavailable {
        RedisUnavailable::Timeout {
            timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_failure_opens_for_the_cooldown_then_one_probe_decides() {
        let breaker = Breaker::new();
        let (first, late) = (breaker.pass().unwrap(), breaker.pass().unwrap());
        assert!(first.failed(&failure()));
        assert!(!late.failed(&failure()), "a second failure only prolongs");
        let Err(RedisUnavailable::BreakerOpen { retry_in, cause }) = breaker.pass() else {
            panic!("the breaker should be open");
        };
        assert!(
            retry_in > COOLDOWN - Duration::from_millis(100),
            "{retry_in:?}"
        );
        assert!(cause.contains("100 ms"), "{cause}");

        // Once the cooldown is over: one probe, the others still refused.
        *breaker.lock() = State::Open {
            until: Instant::now(),
            cause: cause.clone(),
        };
        let probe = breaker.pass().unwrap();
        assert!(probe.probe);
        assert!(breaker.pass().is_err());
        assert!(probe.failed(&failure()), "a failed probe opens the breaker");
        assert!(breaker.pass().is_err());

        *breaker.lock() = State::Open {
            until: Instant::now(),
            cause,
        };
        breaker.pass().unwrap().succeeded();
        let pass = breaker.pass().unwrap();
        assert!(!pass.probe);
        pass.succeeded();
    }

    #[test]
    fn a_dropped_probe_lets_the_next_check_probe() {
        let breaker = Breaker::new();
        *breaker.lock() = State::Open {
            until: Instant::now(),
            cause: Arc::from("earlier failure"),
        };
        drop(breaker.pass().unwrap());
        let probe = breaker.pass().unwrap();
        assert!(probe.probe);
    }
}
