use super::*;
use sluice_proto::declarative::{self, Format};

fn router(doc: &str) -> Router {
    let config = declarative::load(doc, Format::Yaml).unwrap();
    let metrics = Metrics::new();
    let upstreams: HashMap<String, Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| {
            let runtime = Upstream::reuse(u, None, &metrics).unwrap();
            (runtime.id.to_string(), runtime)
        })
        .collect();
    Router::compile(
        &config.apis,
        &|id| upstreams.get(id).cloned(),
        &|_| None,
        &AccessPolicies::default(),
        &metrics,
    )
    .unwrap()
}

fn route<'a>(router: &'a Router, host: &str, method: &str, path: &str) -> Option<Matched<'a>> {
    route_with(router, host, method, path, None, &HeaderMap::new())
}

fn route_with<'a>(
    router: &'a Router,
    host: &str,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<Matched<'a>> {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    router.route(&RequestParts {
        host,
        method: &method,
        path,
        query,
        headers,
    })
}

fn name_of(router: &Router, host: &str, method: &str, path: &str) -> Option<String> {
    route(router, host, method, path).map(|m| m.route.name.to_string())
}

const DOC: &str = r#"
format_version: 1
upstreams:
  - name: backend
    targets: [{ url: "http://127.0.0.1:9" }]
apis:
  - name: users
    base_path: /v1
    routes:
      - name: list
        path: /users
        path_match: exact
        methods: [GET]
        proxy: { upstream: backend }
      - name: one
        path: "/users/{id}"
        proxy: { upstream: backend }
      - name: files
        path: "/files/{*rest}"
        proxy: { upstream: backend }
      - name: everything
        path: /
        proxy: { upstream: backend }
      - name: beta
        priority: 10
        path: /users
        headers: [{ name: x-beta, exact: "yes" }]
        proxy: { upstream: backend }
      - name: search
        path: /search
        path_match: exact
        query: [{ name: q, regex: "[a-z]+" }]
        proxy: { upstream: backend }
  - name: tenant
    hosts: ["*.example.com"]
    routes:
      - name: wild
        path: /
        direct_response: { status: 200, body: wild }
  - name: exact-host
    hosts: ["api.example.com"]
    routes:
      - name: exact
        path: /only
        direct_response: { status: 200, body: exact }
"#;

#[test]
fn exact_paths_beat_templates_and_templates_beat_prefixes() {
    let r = router(DOC);
    assert_eq!(
        name_of(&r, "x", "GET", "/v1/users").as_deref(),
        Some("list")
    );
    assert_eq!(
        name_of(&r, "x", "POST", "/v1/users").as_deref(),
        Some("everything")
    );
    assert_eq!(
        name_of(&r, "x", "GET", "/v1/users/7").as_deref(),
        Some("one")
    );
    assert_eq!(
        name_of(&r, "x", "GET", "/v1/users/7/x").as_deref(),
        Some("everything")
    );
    assert_eq!(
        name_of(&r, "x", "GET", "/v1").as_deref(),
        Some("everything")
    );
    assert_eq!(
        name_of(&r, "x", "GET", "/v1x"),
        None,
        "prefixes end at a segment"
    );
    assert_eq!(name_of(&r, "x", "GET", "/v2/users"), None);
}

#[test]
fn templates_capture_parameters_and_the_literal_head() {
    let r = router(DOC);
    let m = route(&r, "x", "GET", "/v1/users/42").unwrap();
    assert_eq!(m.params, [("id", "42".to_owned())]);
    assert_eq!(m.prefix_len, "/v1/users".len());
    let m = route(&r, "x", "GET", "/v1/files/a/b/c.txt").unwrap();
    assert_eq!(m.params, [("rest", "a/b/c.txt".to_owned())]);
    let m = route(&r, "x", "GET", "/v1/files").unwrap();
    assert_eq!(m.route.name.as_ref(), "files");
    assert_eq!(m.params, [("rest", String::new())]);
    assert_eq!(
        name_of(&r, "x", "GET", "/v1/users/").as_deref(),
        Some("everything")
    );
}

#[test]
fn priority_wins_but_only_when_every_matcher_matches() {
    let r = router(DOC);
    let mut headers = HeaderMap::new();
    headers.insert("x-beta", HeaderValue::from_static("yes"));
    let m = route_with(&r, "x", "GET", "/v1/users", None, &headers).unwrap();
    assert_eq!(m.route.name.as_ref(), "beta");
    headers.insert("x-beta", HeaderValue::from_static("no"));
    let m = route_with(&r, "x", "GET", "/v1/users", None, &headers).unwrap();
    assert_eq!(m.route.name.as_ref(), "list");
}

#[test]
fn query_matchers_use_decoded_values() {
    let r = router(DOC);
    let name = |q| {
        route_with(&r, "x", "GET", "/v1/search", q, &HeaderMap::new())
            .map(|m| m.route.name.to_string())
    };
    assert_eq!(name(Some("q=abc")).as_deref(), Some("search"));
    assert_eq!(name(Some("x=1&q=%61bc")).as_deref(), Some("search"));
    assert_eq!(
        name(Some("q=ABC")).as_deref(),
        Some("everything"),
        "regexes are anchored"
    );
    assert_eq!(name(None).as_deref(), Some("everything"));
}

#[test]
fn exact_hosts_then_wildcards_then_any_host() {
    let r = router(DOC);
    assert_eq!(
        name_of(&r, "api.example.com", "GET", "/only/x").as_deref(),
        Some("exact")
    );
    // The exact host's API has no route for this path: the wildcard tier answers.
    assert_eq!(
        name_of(&r, "api.example.com", "GET", "/other").as_deref(),
        Some("wild")
    );
    assert_eq!(
        name_of(&r, "a.b.example.com", "GET", "/v1/users").as_deref(),
        Some("wild")
    );
    assert_eq!(
        name_of(&r, "example.com", "GET", "/v1/users").as_deref(),
        Some("list")
    );
}

#[test]
fn twenty_thousand_routes_compile_and_route_by_index() {
    let mut doc = String::from(
        "format_version: 1\nupstreams:\n  - name: b\n    targets: [{ url: \"http://127.0.0.1:9\" }]\napis:\n",
    );
    for a in 0..1000 {
        doc.push_str(&format!(
            "  - name: api-{a}\n    base_path: /a{a}\n    routes:\n"
        ));
        for r in 0..20 {
            doc.push_str(&format!(
                "      - name: r{r}\n        path: \"/r{r}/{{id}}\"\n        proxy: {{ upstream: b }}\n"
            ));
        }
    }
    let r = router(&doc);
    assert_eq!(r.len(), 20_000);
    let m = route(&r, "x", "GET", "/a999/r19/abc").unwrap();
    assert_eq!(&*m.route.api_name, "api-999");
    assert_eq!(&*m.route.name, "r19");
    assert_eq!(r.any_host.by_first_segment["a999"].len(), 20);
}
