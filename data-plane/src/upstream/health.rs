//! Active health checks: each target of an upstream with a `health_check.path` is probed with
//! `GET path` every interval. `unhealthy_threshold` consecutive failures take it out of
//! balancing; `healthy_threshold` consecutive successes bring it back. Targets start healthy,
//! so a new node serves at once.
//!
//! The checker holds only a weak reference to its upstream: it stops by itself when a config
//! swap drops the upstream, and an upstream carried over unchanged keeps its checker and the
//! health it has learned.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use sluice_proto::pb;

use super::{Upstream, empty_body};
use crate::telemetry::StateGauge;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_THRESHOLD: u32 = 2;

/// A target's health, as the checker last saw it.
#[derive(Debug)]
pub struct TargetHealth {
    healthy: AtomicBool,
    /// Consecutive results against the current state.
    streak: AtomicU32,
    gauge: StateGauge,
}

impl Default for TargetHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetHealth {
    /// Shown on its gauge once the configuration holding this is applied
    /// ([`TargetHealth::publish`]): until then the series may show a running target's state.
    pub fn new() -> Self {
        TargetHealth {
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            gauge: StateGauge::default(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Shows the state on `series` from now on.
    pub fn publish(&self, series: Gauge) {
        self.gauge.attach(series, i64::from(self.is_healthy()));
    }

    /// Counts one probe result; flips the state after `threshold` in a row against it.
    fn observe(&self, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> Option<bool> {
        let healthy = self.is_healthy();
        if ok == healthy {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let threshold = if healthy {
            unhealthy_threshold
        } else {
            healthy_threshold
        };
        if self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= threshold {
            self.streak.store(0, Ordering::Relaxed);
            self.healthy.store(ok, Ordering::Relaxed);
            self.gauge.set(i64::from(ok));
            return Some(ok);
        }
        None
    }
}

/// The checker's settings, from the upstream's `health_check`.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    path: http::uri::PathAndQuery,
    interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    expected: Vec<StatusCode>,
}

impl HealthSettings {
    /// `None` when active checks are off (no path).
    pub fn new(config: Option<&pb::HealthCheck>) -> Result<Option<Self>, String> {
        let Some(config) = config.filter(|c| !c.path.is_empty()) else {
            return Ok(None);
        };
        let ms = |ms: u64, default| match ms {
            0 => default,
            ms => Duration::from_millis(ms),
        };
        let threshold = |t: u32| if t == 0 { DEFAULT_THRESHOLD } else { t };
        Ok(Some(HealthSettings {
            path: config
                .path
                .parse()
                .map_err(|e| format!("health_check.path {:?}: {e}", config.path))?,
            interval: ms(config.interval_ms, DEFAULT_INTERVAL),
            timeout: ms(config.timeout_ms, DEFAULT_TIMEOUT),
            healthy_threshold: threshold(config.healthy_threshold),
            unhealthy_threshold: threshold(config.unhealthy_threshold),
            expected: config
                .expected_statuses
                .iter()
                .filter_map(|s| u16::try_from(*s).ok())
                .filter_map(|s| StatusCode::from_u16(s).ok())
                .collect(),
        }))
    }

    fn accepts(&self, status: StatusCode) -> bool {
        if self.expected.is_empty() {
            status.is_success() || status.is_redirection()
        } else {
            self.expected.contains(&status)
        }
    }
}

/// Starts probing `upstream`'s targets, until the upstream is dropped.
pub fn spawn_checker(upstream: &Arc<Upstream>, settings: HealthSettings) {
    let weak: Weak<Upstream> = Arc::downgrade(upstream);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(upstream) = weak.upgrade() else {
                return;
            };
            let mut probes = tokio::task::JoinSet::new();
            for i in 0..upstream.targets.len() {
                let (upstream, settings) = (upstream.clone(), settings.clone());
                probes.spawn(async move { (i, probe(&upstream, i, &settings).await) });
            }
            let results = probes.join_all().await;
            for (i, ok) in results {
                let health = &upstream.targets[i].health;
                if let Some(now) =
                    health.observe(ok, settings.healthy_threshold, settings.unhealthy_threshold)
                {
                    tracing::warn!(
                        upstream = %upstream.name,
                        target = %upstream.targets[i].authority,
                        healthy = now,
                        "target health changed"
                    );
                }
            }
        }
    });
}

async fn probe(upstream: &Upstream, target: usize, settings: &HealthSettings) -> bool {
    let target = &upstream.targets[target];
    let uri = http::Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(settings.path.clone())
        .build();
    let Ok(uri) = uri else { return false };
    let mut request = Request::new(empty_body());
    *request.uri_mut() = uri;
    if let Ok(host) = http::HeaderValue::from_str(target.authority.as_str())
        && !upstream.http2
    {
        request.headers_mut().insert(http::header::HOST, host);
    }
    if upstream.http2 {
        *request.version_mut() = http::Version::HTTP_2;
    }
    match upstream.send(request, settings.timeout).await {
        Ok(response) => {
            let ok = settings.accepts(response.status());
            // Read the body so the connection goes back to the pool.
            let _ = response.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_the_state_and_a_contrary_result_resets_the_streak() {
        let health = TargetHealth::new();
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(true, 2, 3), None, "the streak resets");
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), None);
        assert_eq!(health.observe(false, 2, 3), Some(false));
        assert!(!health.is_healthy());
        assert_eq!(health.gauge.get(), 0);
        assert_eq!(health.observe(true, 2, 3), None);
        assert_eq!(health.observe(true, 2, 3), Some(true));
        assert_eq!(health.gauge.get(), 1);
    }
}
