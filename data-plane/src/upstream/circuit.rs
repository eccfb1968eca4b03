//! The circuit breaker of one upstream: closed (requests flow), open (refused at once, so a
//! failing upstream gets time to recover instead of a queue), half-open (a few probes decide).
//!
//! - Closed: `failure_threshold` consecutive failed requests open it. A request fails when its
//!   last try (after any retries) was a connect error, a timeout, a broken exchange or a 5xx
//!   answer.
//! - Open: every request is refused with 503 and `Retry-After` until `open_for` has passed.
//! - Half-open: up to `half_open_requests` requests go through as probes. As many successes
//!   close the breaker; one failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use sluice_proto::pb;

use crate::telemetry::StateGauge;

const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);

/// Values of the `sluice_upstream_circuit_state` gauge.
const CLOSED: i64 = 0;
const OPEN: i64 = 1;
const HALF_OPEN: i64 = 2;

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    probes: u32,
    phase: Mutex<Phase>,
    state_gauge: StateGauge,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// A request let through the breaker. Its outcome is reported with [`Pass::record`]; a pass
/// dropped unreported (the request ended before reaching the upstream) gives its probe slot
/// back without counting.
#[derive(Debug)]
pub struct Pass<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    recorded: bool,
}

impl Pass<'_> {
    /// Reports how the request went.
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        self.breaker.record(self.probe, success);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.probe {
            let mut phase = self.breaker.lock();
            if let Phase::HalfOpen { in_flight, .. } = &mut *phase {
                *in_flight = in_flight.saturating_sub(1);
            }
        }
    }
}

impl CircuitBreaker {
    /// `None` when the upstream has no breaker (`failure_threshold` 0).
    /// Shown on its gauge once the configuration holding this is applied
    /// ([`CircuitBreaker::publish`]): until then the series may show a running breaker.
    pub fn new(config: Option<&pb::CircuitBreaker>) -> Option<Self> {
        let config = config.filter(|c| c.failure_threshold > 0)?;
        Some(CircuitBreaker {
            threshold: config.failure_threshold,
            open_for: match config.open_ms {
                0 => DEFAULT_OPEN_FOR,
                ms => Duration::from_millis(ms),
            },
            probes: config.half_open_requests.max(1),
            phase: Mutex::new(Phase::Closed { failures: 0 }),
            state_gauge: StateGauge::default(),
        })
    }

    /// Shows the state on `series` from now on.
    pub fn publish(&self, series: Gauge) {
        let state = match *self.lock() {
            Phase::Closed { .. } => CLOSED,
            Phase::Open { .. } => OPEN,
            Phase::HalfOpen { .. } => HALF_OPEN,
        };
        self.state_gauge.attach(series, state);
    }

    /// Lets a request through, or says how long until the breaker will try again.
    pub fn admit(&self) -> Result<Pass<'_>, Duration> {
        let mut phase = self.lock();
        let now = Instant::now();
        if let Phase::Open { until } = *phase {
            if now < until {
                return Err(until - now);
            }
            *phase = Phase::HalfOpen {
                in_flight: 0,
                successes: 0,
            };
            self.state_gauge.set(HALF_OPEN);
        }
        let pass = |probe| Pass {
            breaker: self,
            probe,
            recorded: false,
        };
        match &mut *phase {
            Phase::Closed { .. } => Ok(pass(false)),
            Phase::HalfOpen { in_flight, .. } if *in_flight < self.probes => {
                *in_flight += 1;
                Ok(pass(true))
            }
            // Probes are out; the answer comes within a request's time.
            Phase::HalfOpen { .. } => Err(Duration::from_secs(1)),
            Phase::Open { .. } => unreachable!("handled above"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, probe: bool, success: bool) {
        let mut phase = self.lock();
        let next = match (*phase, probe, success) {
            (Phase::Closed { .. }, false, true) => Phase::Closed { failures: 0 },
            (Phase::Closed { failures }, false, false) if failures + 1 >= self.threshold => {
                self.open()
            }
            (Phase::Closed { failures }, false, false) => Phase::Closed {
                failures: failures + 1,
            },
            (
                Phase::HalfOpen {
                    in_flight,
                    successes,
                },
                true,
                true,
            ) => {
                if successes + 1 >= self.probes {
                    self.state_gauge.set(CLOSED);
                    Phase::Closed { failures: 0 }
                } else {
                    Phase::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes: successes + 1,
                    }
                }
            }
            (Phase::HalfOpen { .. }, true, false) => self.open(),
            // Late answers from before a transition do not move the breaker.
            (current, _, _) => current,
        };
        *phase = next;
    }

    fn open(&self) -> Phase {
        self.state_gauge.set(OPEN);
        Phase::Open {
            until: Instant::now() + self.open_for,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(Some(&pb::CircuitBreaker {
            failure_threshold: threshold,
            open_ms,
            half_open_requests: probes,
        }))
        .unwrap()
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let b = breaker(3, 60_000, 1);
        for _ in 0..2 {
            b.admit().unwrap().record(false);
        }
        b.admit().unwrap().record(true);
        for _ in 0..2 {
            b.admit().unwrap().record(false);
        }
        assert!(
            b.admit().is_ok(),
            "two failures after a success do not open it"
        );
        b.admit().unwrap().record(false);
        let wait = b.admit().unwrap_err();
        assert!(wait > Duration::from_secs(59));
        assert_eq!(b.state_gauge.get(), OPEN);
    }

    #[test]
    fn half_open_probes_close_or_reopen_it() {
        let b = breaker(1, 1, 2);
        b.admit().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(5));
        let (p1, p2) = (b.admit().unwrap(), b.admit().unwrap());
        assert!(b.admit().is_err(), "only two probes at once");
        assert_eq!(b.state_gauge.get(), HALF_OPEN);
        p1.record(true);
        p2.record(true);
        assert_eq!(b.state_gauge.get(), CLOSED);
        assert!(b.admit().is_ok());

        b.admit().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(5));
        // A probe that never reached the upstream gives its slot back.
        drop(b.admit().unwrap());
        let (probe, other) = (b.admit().unwrap(), b.admit().unwrap());
        assert!(b.admit().is_err(), "both probe slots are taken again");
        probe.record(false);
        drop(other);
        assert_eq!(b.state_gauge.get(), OPEN, "a failed probe opens it again");
    }

    #[test]
    fn no_threshold_means_no_breaker() {
        assert!(CircuitBreaker::new(Some(&pb::CircuitBreaker::default())).is_none());
        assert!(CircuitBreaker::new(None).is_none());
    }
}
