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

    /// Records one try's result. Returns the ejection's length when this failure ejects the
    /// target; `may_eject` says whether the upstream can spare another target.
    pub fn observe(
        &self,
        failed: bool,
        settings: &OutlierSettings,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if !failed {
            self.failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < settings.consecutive_failures || self.is_ejected() || !may_eject() {
            return None;
        }
        let times = (self.times.fetch_add(1, Ordering::Relaxed) + 1).min(MAX_EJECTION_MULTIPLIER);
        let length = settings.base_ejection * times;
        self.until_ms.store(
            now_ms() + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2),
            Ordering::Relaxed,
        );
        self.failures.store(0, Ordering::Relaxed);
        Some(length)
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
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let s = settings(3, 60_000, 50);
        let e = Ejection::default();
        assert_eq!(e.observe(true, &s, || true), None);
        assert_eq!(e.observe(true, &s, || true), None);
        assert_eq!(e.observe(false, &s, || true), None, "a success resets");
        assert_eq!(e.observe(true, &s, || true), None);
        assert_eq!(e.observe(true, &s, || true), None);
        assert!(!e.is_ejected());
        assert_eq!(e.observe(true, &s, || true), Some(Duration::from_secs(60)));
        assert!(e.is_ejected());
    }

    #[test]
    fn an_ejection_lasts_longer_each_time_and_the_cap_is_respected() {
        let s = settings(1, 1, 50);
        let e = Ejection::default();
        assert_eq!(e.observe(true, &s, || true), Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(e.observe(true, &s, || true), Some(Duration::from_millis(2)));
        let spared = Ejection::default();
        assert_eq!(
            spared.observe(true, &s, || false),
            None,
            "no target to spare"
        );
        assert!(!spared.is_ejected());
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
