//! Turning other API descriptions into Sluice declarative documents.

pub mod openapi;

use sluice_proto::declarative::normalize::derived_route_id;
use sluice_proto::pb;

/// What an import writes over an API and upstream registered under its names: only what the
/// spec describes. The spec owns the API's routes (which exist, what they match), base path
/// and description, and the upstream's targets; everything an operator attached since stays:
/// the API's hosts, policies, labels and `hide_when_forbidden`, each surviving route's
/// policies, scopes, priority and action settings, and the upstream's balancing, timeouts,
/// retries, health checks, circuit breaker and TLS. Routes the spec no longer has go.
pub fn onto_registered(
    imported: &mut pb::ConfigSet,
    api: Option<pb::Api>,
    upstream: Option<pb::Upstream>,
) {
    if let (Some(registered), Some(new)) = (api, imported.apis.first_mut()) {
        let imported_id = new.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        let registered_id = registered
            .meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        let routes = std::mem::take(&mut new.routes)
            .into_iter()
            .map(|mut route| {
                match registered.routes.iter().find(|r| r.name == route.name) {
                    // Kept with its id, so that what refers to the route still does.
                    Some(kept) => pb::Route {
                        r#match: route.r#match,
                        ..kept.clone()
                    },
                    None => {
                        // A new route's id follows the API it joins, as the API's own
                        // routes' do (the registered API's id need not be its name's).
                        if route.id == derived_route_id(&imported_id, &route.name) {
                            route.id = derived_route_id(&registered_id, &route.name);
                        }
                        route
                    }
                }
            })
            .collect();
        let description = new.meta.as_ref().map(|m| m.description.clone());
        *new = pb::Api {
            base_path: std::mem::take(&mut new.base_path),
            routes,
            ..registered
        };
        if let (Some(meta), Some(description)) = (new.meta.as_mut(), description) {
            meta.description = description;
        }
    }
    if let (Some(registered), Some(new)) = (upstream, imported.upstreams.first_mut()) {
        let imported_id = new.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        *new = pb::Upstream {
            targets: std::mem::take(&mut new.targets),
            ..registered
        };
        // The registered upstream keeps its id (it may not be the one its name derives):
        // the spec's routes go to it under that id.
        let registered_id = new.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        give_upstream_id(imported, &imported_id, &registered_id);
    }
}

/// Gives the import's upstream, now `from`, the id `to`, and points the import's routes to
/// it there.
pub fn give_upstream_id(imported: &mut pb::ConfigSet, from: &str, to: &str) {
    for upstream in &mut imported.upstreams {
        if let Some(meta) = upstream.meta.as_mut()
            && meta.id == from
        {
            meta.id = to.to_owned();
        }
    }
    for route in imported
        .apis
        .iter_mut()
        .flat_map(|api| api.routes.iter_mut())
    {
        if let Some(pb::route::Action::Proxy(proxy)) = &mut route.action
            && proxy.upstream_id == from
        {
            proxy.upstream_id = to.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, path: &str, policies: &[&str]) -> pb::Route {
        pb::Route {
            id: derived_route_id("derived", name),
            action: Some(pb::route::Action::Proxy(pb::ProxyAction {
                upstream_id: "derived-upstream".into(),
                ..Default::default()
            })),
            name: name.into(),
            r#match: Some(pb::RouteMatch {
                path: Some(pb::PathMatch {
                    kind: pb::path_match::Kind::Exact as i32,
                    value: path.into(),
                }),
                ..Default::default()
            }),
            policy_ids: policies.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }
    }

    fn meta(id: &str, description: &str) -> Option<pb::Meta> {
        Some(pb::Meta {
            id: id.into(),
            name: "petstore".into(),
            description: description.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_reimport_replaces_what_the_spec_describes_and_keeps_the_rest() {
        let registered_api = pb::Api {
            meta: meta("registered", "old"),
            hosts: vec!["pets.example.com".into()],
            base_path: "/v1".into(),
            policy_ids: vec!["auth".into()],
            hide_when_forbidden: true,
            routes: vec![
                route("list", "/pets", &["per-route"]),
                route("gone", "/old", &[]),
            ],
        };
        let registered_upstream = pb::Upstream {
            meta: meta("registered-upstream", ""),
            targets: vec![pb::Target {
                url: "http://old:80".into(),
                weight: 1,
            }],
            health_check: Some(pb::HealthCheck::default()),
            ..Default::default()
        };
        let mut imported = pb::ConfigSet {
            apis: vec![pb::Api {
                meta: meta("derived", "new"),
                base_path: "/v2".into(),
                routes: vec![
                    route("list", "/animals", &[]),
                    route("add", "/animals", &[]),
                ],
                ..Default::default()
            }],
            upstreams: vec![pb::Upstream {
                meta: meta("derived-upstream", ""),
                targets: vec![pb::Target {
                    url: "http://new:80".into(),
                    weight: 1,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        onto_registered(
            &mut imported,
            Some(registered_api),
            Some(registered_upstream),
        );
        let api = &imported.apis[0];
        let meta = api.meta.as_ref().unwrap();
        assert_eq!(
            (meta.id.as_str(), meta.description.as_str()),
            ("registered", "new")
        );
        assert_eq!(api.hosts, ["pets.example.com"]);
        assert_eq!(api.policy_ids, ["auth"]);
        assert!(api.hide_when_forbidden);
        assert_eq!(api.base_path, "/v2");
        let names: Vec<&str> = api.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["list", "add"], "the spec's routes; `gone` is gone");
        let list = &api.routes[0];
        assert_eq!(list.policy_ids, ["per-route"]);
        let Some(pb::route::Action::Proxy(proxy)) = &api.routes[1].action else {
            panic!("a proxy route");
        };
        assert_eq!(
            proxy.upstream_id, "registered-upstream",
            "a new route goes to the upstream as registered"
        );
        assert_eq!(
            api.routes[1].id,
            derived_route_id("registered", "add"),
            "a new route's id follows the API it joins"
        );
        assert_eq!(
            list.id,
            derived_route_id("derived", "list"),
            "a kept route's id stays"
        );
        assert_eq!(list.r#match, route("x", "/animals", &[]).r#match);
        let upstream = &imported.upstreams[0];
        assert_eq!(upstream.meta.as_ref().unwrap().id, "registered-upstream");
        assert_eq!(upstream.targets[0].url, "http://new:80");
        assert!(upstream.health_check.is_some());
    }
}
