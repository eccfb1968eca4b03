//! Passive ejection (outlier detection): a target that fails live requests several times in
//! a row is taken out of balancing for a while, longer each time it is ejected again, without
//! waiting for an active health check to notice.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_proto::pb;

const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// An ejection lasts at most this many base ejections.
const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// An upstream's outlier detection settings.
#[derive(Debug, Clone)]
pub struct OutlierSettings {
    consecutive_failures: u32,
    base_ejection: Duration,
    max_ejection_percent: u32,
}

impl OutlierSettings {
    /// `None` when passive ejection is off.
    pub fn new(config: Option<&pb::OutlierDetection>) -> Option<Self> {
        let config = config.filter(|c| c.consecutive_failures > 0)?;
        Some(OutlierSettings {
            consecutive_failures: config.consecutive_failures,
            base_ejection: match config.base_ejection_ms {
                0 => DEFAULT_BASE_EJECTION,
                ms => Duration::from_millis(ms),
            },
            max_ejection_percent: match config.max_ejection_percent {
                0 => DEFAULT_MAX_EJECTION_PERCENT,
                p => p.min(100),
            },
        })
    }

    /// How many of `targets` may be out at once: the configured share, and never all.
    pub fn max_ejected(&self, targets: usize) -> usize {
        (targets * self.max_ejection_percent as usize / 100).min(targets.saturating_sub(1))
    }
}

/// One target's passive health.
#[derive(Debug, Default)]
pub struct Ejection {
    /// Failures in a row since the last success or ejection.
    failures: AtomicU32,
    /// Until when the target is out, in [`now_ms`]; 0 when it never was.
    until_ms: AtomicU64,
    /// How many times it was ejected: each ejection lasts one base longer.
    times: AtomicU32,
}

impl Ejection {
    pub fn is_ejected(&self) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Records one try's result; true when this failure completes a run of
    /// `consecutive_failures` and the target should be ejected (if the upstream can spare
    /// it: see `Upstream::report`). Results that arrive while the target is out (tries that
    /// were in flight when it was ejected) do not count.
    pub fn record(&self, failed: bool, settings: &OutlierSettings) -> bool {
        if self.is_ejected() {
            return false;
        }
        if !failed {
            self.failures.store(0, Ordering::Relaxed);
            return false;
        }
        self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= settings.consecutive_failures
    }

    /// Takes the target out; returns for how long: one base per ejection so far, up to ten.
    /// A target that stayed in for ten bases since its last ejection starts again at one.
    pub fn eject(&self, settings: &OutlierSettings) -> Duration {
        let now = now_ms();
        let last_until = self.until_ms.load(Ordering::Relaxed);
        let calm = settings.base_ejection * MAX_EJECTION_MULTIPLIER;
        if last_until != 0 && u128::from(now.saturating_sub(last_until)) > calm.as_millis() {
            self.times.store(0, Ordering::Relaxed);
        }
        let times = (self.times.fetch_add(1, Ordering::Relaxed) + 1).min(MAX_EJECTION_MULTIPLIER);
        let length = settings.base_ejection * times;
        self.until_ms.store(
            now + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2),
            Ordering::Relaxed,
        );
        self.failures.store(0, Ordering::Relaxed);
        length
    }
}

/// Milliseconds since the first call: a monotonic clock that fits an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that no deadline is ever 0, which means "never ejected".
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(failures: u32, base_ms: u64, percent: u32) -> OutlierSettings {
        OutlierSettings::new(Some(&pb::OutlierDetection {
            consecutive_failures: failures,
            base_ejection_ms: base_ms,
            max_ejection_percent: percent,
        }))
        .unwrap()
    }

    #[test]
    fn consecutive_failures_call_for_ejection_and_a_success_resets_the_count() {
        let s = settings(3, 60_000, 50);
        let e = Ejection::default();
        assert!(!e.record(true, &s));
        assert!(!e.record(true, &s));
        assert!(!e.record(false, &s), "a success resets");
        assert!(!e.record(true, &s));
        assert!(!e.record(true, &s));
        assert!(e.record(true, &s));
        assert_eq!(e.eject(&s), Duration::from_secs(60));
        assert!(e.is_ejected());
        // Tries that were in flight when it was ejected do not count.
        for _ in 0..5 {
            assert!(!e.record(true, &s));
        }
    }

    #[test]
    fn an_ejection_lasts_longer_each_time() {
        let s = settings(1, 2, 50);
        let e = Ejection::default();
        assert_eq!(e.eject(&s), Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!e.is_ejected());
        assert!(e.record(true, &s));
        assert_eq!(e.eject(&s), Duration::from_millis(4));
        // In for longer than ten bases: the next ejection is one base again.
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(e.eject(&s), Duration::from_millis(2));
    }

    #[test]
    fn never_all_targets() {
        let s = settings(1, 1, 100);
        assert_eq!(s.max_ejected(1), 0);
        assert_eq!(s.max_ejected(2), 1);
        assert_eq!(settings(1, 1, 50).max_ejected(4), 2);
        assert_eq!(settings(1, 1, 10).max_ejected(4), 0);
        assert!(OutlierSettings::new(Some(&pb::OutlierDetection::default())).is_none());
    }
}
