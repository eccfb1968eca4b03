//! The large registry of the scale benchmarks: 100k consumers with 10 API keys each (1M
//! keys), 100k subscriptions, 1000 APIs of 20 routes (20k routes), 50 upstreams, 10 plans,
//! built directly as protobuf (what an apply commits).
//!
//! [`access_config`] turns it into the access-control benchmark's fixture: every API behind a
//! `key_auth` policy, every plan with a local rate limit no request reaches.

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
    registry_config_of(CONSUMERS)
}

/// [`registry_config`] with `consumers` consumers (and as many subscriptions): consumer `c`
/// subscribes to `api-{c % APIS}` under `plan-{c % PLANS}`.
pub fn registry_config_of(consumers: usize) -> ConfigSet {
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
    for c in 0..consumers {
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
    api_keys_of(CONSUMERS)
}

/// The plaintext of consumer `c`'s `k`th API key (what a client sends).
pub fn api_key(c: usize, k: usize) -> String {
    format!("bench-key-{c}-{k}-0123456789")
}

/// [`KEYS_PER_CONSUMER`] API keys for each of `consumers` consumers.
pub fn api_keys_of(consumers: usize) -> Vec<pb::Credential> {
    let mut keys = Vec::with_capacity(consumers * KEYS_PER_CONSUMER);
    for c in 0..consumers {
        let consumer_id = id(ResourceKind::Consumer, &format!("c-{c}"));
        for k in 0..KEYS_PER_CONSUMER {
            let plaintext = api_key(c, k);
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

/// The `key_auth` policy [`access_config`] puts on every API (the key in `x-api-key`).
pub const KEY_AUTH_POLICY: &str = "bench-keys";

/// The rate limit of every plan in [`access_config`]: a million requests a second with a
/// burst of a million, the most a local limit may count (one request per microsecond), so
/// that it is checked and counted on every request but never refuses one.
pub fn unreached_rate_limit() -> pb::RateLimit {
    pb::RateLimit {
        limit: 1_000_000,
        period: pb::rate_limit::Period::Second as i32,
        burst: 1_000_000,
    }
}

/// The large registry with `consumers` consumers and their API keys, every API behind
/// [`KEY_AUTH_POLICY`] and every plan limited by [`unreached_rate_limit`], counted in the
/// node's memory: a request with any of the keys is authenticated, its consumer and
/// subscription to the API of its consumer (`api-{c % APIS}`) checked, and counted against
/// its subscription's local budget.
pub fn access_config(consumers: usize) -> ConfigSet {
    let mut set = registry_config_of(consumers);
    let policy_id = id(ResourceKind::Policy, KEY_AUTH_POLICY);
    set.policies.push(pb::Policy {
        meta: meta(ResourceKind::Policy, KEY_AUTH_POLICY.into()),
        kind: Some(pb::policy::Kind::KeyAuth(pb::KeyAuthPolicy::default())),
    });
    for api in &mut set.apis {
        api.policy_ids = vec![policy_id.clone()];
    }
    for plan in &mut set.plans {
        plan.rate_limits = vec![unreached_rate_limit()];
        plan.mode = pb::rate_limit_policy::Mode::Local as i32;
    }
    set.credentials = api_keys_of(consumers);
    set
}
