//! The large registry of the scale benchmarks: 100k consumers with 10 API keys each (1M
//! keys), 100k subscriptions, 1000 APIs of 20 routes (20k routes), 50 upstreams, 10 plans,
//! built directly as protobuf (what an apply commits).

use sluice_proto::declarative::normalize::{derived_id, derived_route_id, hash_api_key};
use sluice_proto::pb::{self, ConfigSet, ResourceKind};

pub const GROUP: &str = "default";
pub const CONSUMERS: usize = 100_000;
pub const APIS: usize = 1_000;
pub const ROUTES_PER_API: usize = 20;
pub const UPSTREAMS: usize = 50;
pub const PLANS: usize = 10;
pub const KEYS_PER_CONSUMER: usize = 10;

fn meta(kind: ResourceKind, name: String) -> Option<pb::Meta> {
    Some(pb::Meta {
        id: derived_id(kind, GROUP, &name),
        group: GROUP.into(),
        name,
        ..Default::default()
    })
}

pub fn id(kind: ResourceKind, name: &str) -> String {
    derived_id(kind, GROUP, name)
}

/// Everything but the API keys.
pub fn registry_config() -> ConfigSet {
    let mut set = ConfigSet::default();
    for u in 0..UPSTREAMS {
        set.upstreams.push(pb::Upstream {
            meta: meta(ResourceKind::Upstream, format!("svc-{u}")),
            targets: vec![pb::Target {
                url: format!("http://10.0.{}.{}:8080", u / 250, u % 250 + 1),
                weight: 0,
            }],
            ..Default::default()
        });
    }
    for p in 0..PLANS {
        set.plans.push(pb::Plan {
            meta: meta(ResourceKind::Plan, format!("plan-{p}")),
            rate_limits: vec![pb::RateLimit {
                limit: 100 * (p as u64 + 1),
                period: pb::rate_limit::Period::Second as i32,
                burst: 0,
            }],
            ..Default::default()
        });
    }
    for a in 0..APIS {
        let api_name = format!("api-{a}");
        let api_id = id(ResourceKind::Api, &api_name);
        let routes = (0..ROUTES_PER_API)
            .map(|r| {
                let name = format!("route-{r}");
                pb::Route {
                    id: derived_route_id(&api_id, &name),
                    name,
                    r#match: Some(pb::RouteMatch {
                        path: Some(pb::PathMatch {
                            kind: pb::path_match::Kind::Template as i32,
                            value: format!("/r{r}/{{id}}"),
                        }),
                        methods: vec!["GET".into()],
                        ..Default::default()
                    }),
                    action: Some(pb::route::Action::Proxy(pb::ProxyAction {
                        upstream_id: id(
                            ResourceKind::Upstream,
                            &format!("svc-{}", (a + r) % UPSTREAMS),
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }
            })
            .collect();
        set.apis.push(pb::Api {
            meta: meta(ResourceKind::Api, api_name.clone()),
            base_path: format!("/{api_name}"),
            routes,
            ..Default::default()
        });
    }
    for c in 0..CONSUMERS {
        let name = format!("c-{c}");
        set.consumers.push(pb::Consumer {
            meta: meta(ResourceKind::Consumer, name.clone()),
            custom_id: format!("CUST-{c}"),
            disabled: false,
            policy_ids: Vec::new(),
        });
        set.subscriptions.push(pb::Subscription {
            meta: meta(
                ResourceKind::Subscription,
                format!("{name}.api-{}", c % APIS),
            ),
            consumer_id: id(ResourceKind::Consumer, &name),
            api_id: id(ResourceKind::Api, &format!("api-{}", c % APIS)),
            plan_id: id(ResourceKind::Plan, &format!("plan-{}", c % PLANS)),
            status: pb::subscription::Status::Active as i32,
            expires_at: None,
        });
    }
    set
}

pub fn api_keys() -> Vec<pb::Credential> {
    let mut keys = Vec::with_capacity(CONSUMERS * KEYS_PER_CONSUMER);
    for c in 0..CONSUMERS {
        let consumer_id = id(ResourceKind::Consumer, &format!("c-{c}"));
        for k in 0..KEYS_PER_CONSUMER {
            let plaintext = format!("bench-key-{c}-{k}-0123456789");
            keys.push(pb::Credential {
                meta: meta(ResourceKind::Credential, format!("c-{c}-key-{k}")),
                consumer_id: consumer_id.clone(),
                kind: Some(pb::credential::Kind::ApiKey(pb::ApiKeyCredential {
                    key_sha256: hash_api_key(&plaintext),
                    prefix: plaintext[..6].into(),
                })),
                expires_at: None,
                revoked: false,
            });
        }
    }
    keys
}
