//! Traffic shaping of a proxy route: canary splits between upstream versions, a header that
//! forces a version, and shadow traffic (a share mirrored to another upstream).

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use rand::Rng;
use sluice_proto::pb;

use crate::upstream::Upstream;

/// The version name of a route's own upstream when `primary_version` is not set.
const DEFAULT_PRIMARY_VERSION: &str = "primary";

/// How a proxy route spreads its requests.
#[derive(Debug, Default)]
pub struct Traffic {
    /// In declaration order; each with its cumulative upper bound in per cent.
    canaries: Vec<Canary>,
    version_header: Option<HeaderName>,
    primary_version: Box<str>,
    pub mirror: Option<Mirror>,
}

#[derive(Debug)]
struct Canary {
    upstream: Arc<Upstream>,
    /// A roll in [0, 100) below this (and above the previous canary's) picks this canary.
    upper: f64,
    version: Box<str>,
}

/// Shadow traffic: `percent` of the route's requests copied to `upstream`.
#[derive(Debug)]
pub struct Mirror {
    pub upstream: Arc<Upstream>,
    percent: f64,
}

impl Mirror {
    /// Whether this request is copied.
    pub fn roll(&self) -> bool {
        self.percent >= 100.0 || rand::thread_rng().gen_range(0.0..100.0) < self.percent
    }
}

impl Traffic {
    pub fn compile(
        proxy: &pb::ProxyAction,
        upstream: &dyn Fn(&str) -> Option<Arc<Upstream>>,
    ) -> Result<Self, String> {
        let find = |id: &str| upstream(id).ok_or_else(|| format!("no upstream has the id {id}"));
        let mut upper = 0.0;
        let mut canaries = Vec::with_capacity(proxy.canaries.len());
        for canary in &proxy.canaries {
            let upstream = find(&canary.upstream_id)?;
            upper += canary.percent;
            let version = if canary.version.is_empty() {
                upstream.name.as_ref().into()
            } else {
                canary.version.as_str().into()
            };
            canaries.push(Canary {
                upstream,
                upper,
                version,
            });
        }
        let version_header = match proxy.version_header.as_str() {
            "" => None,
            name => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?),
        };
        let mirror = match &proxy.mirror {
            Some(m) => Some(Mirror {
                upstream: find(&m.upstream_id)?,
                percent: m.percent,
            }),
            None => None,
        };
        Ok(Traffic {
            canaries,
            version_header,
            primary_version: match proxy.primary_version.as_str() {
                "" => DEFAULT_PRIMARY_VERSION.into(),
                v => v.into(),
            },
            mirror,
        })
    }

    /// The upstream this request goes to: the version its header forces, else a canary by
    /// its share, else `primary`. A header naming no version is ignored.
    pub fn choose<'a>(
        &'a self,
        primary: &'a Arc<Upstream>,
        headers: &HeaderMap,
    ) -> &'a Arc<Upstream> {
        if let Some(name) = &self.version_header
            && let Some(wanted) = headers.get(name).and_then(|v| v.to_str().ok())
        {
            if wanted == &*self.primary_version {
                return primary;
            }
            if let Some(canary) = self.canaries.iter().find(|c| wanted == &*c.version) {
                return &canary.upstream;
            }
        }
        if self.canaries.is_empty() {
            return primary;
        }
        self.pick(rand::thread_rng().gen_range(0.0..100.0))
            .unwrap_or(primary)
    }

    /// The canary a roll in [0, 100) falls to, if any.
    fn pick(&self, roll: f64) -> Option<&Arc<Upstream>> {
        self.canaries
            .iter()
            .find(|c| roll < c.upper)
            .map(|c| &c.upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn upstream(name: &str, metrics: &Metrics) -> Arc<Upstream> {
        let config = pb::Upstream {
            meta: Some(pb::Meta {
                id: format!("id-{name}"),
                name: name.into(),
                ..Default::default()
            }),
            targets: vec![pb::Target {
                url: "http://127.0.0.1:1".into(),
                weight: 0,
            }],
            ..Default::default()
        };
        Upstream::reuse(&config, None, metrics).unwrap()
    }

    #[test]
    fn rolls_fall_to_canaries_by_cumulative_share_and_headers_force_versions() {
        let metrics = Metrics::new();
        let all = [
            upstream("v1", &metrics),
            upstream("v2", &metrics),
            upstream("v3", &metrics),
        ];
        let find = |id: &str| all.iter().find(|u| &*u.id == id).cloned();
        let proxy = pb::ProxyAction {
            upstream_id: "id-v1".into(),
            canaries: vec![
                pb::Canary {
                    upstream_id: "id-v2".into(),
                    percent: 10.0,
                    version: "beta".into(),
                },
                pb::Canary {
                    upstream_id: "id-v3".into(),
                    percent: 0.5,
                    version: String::new(),
                },
            ],
            version_header: "x-version".into(),
            ..Default::default()
        };
        let traffic = Traffic::compile(&proxy, &find).unwrap();
        let name = |u: Option<&Arc<Upstream>>| u.map(|u| u.name.to_string());
        assert_eq!(name(traffic.pick(0.0)), Some("v2".into()));
        assert_eq!(name(traffic.pick(9.99)), Some("v2".into()));
        assert_eq!(name(traffic.pick(10.0)), Some("v3".into()));
        assert_eq!(name(traffic.pick(10.49)), Some("v3".into()));
        assert_eq!(
            name(traffic.pick(10.5)),
            None,
            "the rest stays on the primary"
        );

        let primary = &all[0];
        let forced = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-version", value.parse().unwrap());
            traffic.choose(primary, &headers).name.to_string()
        };
        assert_eq!(forced("beta"), "v2");
        assert_eq!(
            forced("v3"),
            "v3",
            "a canary without a version is named by its upstream"
        );
        for _ in 0..100 {
            assert_eq!(forced("primary"), "v1");
        }
        assert!(
            Traffic::compile(
                &pb::ProxyAction {
                    mirror: Some(pb::Mirror {
                        upstream_id: "missing".into(),
                        percent: 1.0
                    }),
                    ..proxy.clone()
                },
                &find
            )
            .is_err()
        );
    }
}
