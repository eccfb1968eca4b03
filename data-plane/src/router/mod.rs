//! The router, compiled once per configuration: which route answers a request.
//!
//! Order of decision (documented in `docs/data-plane.md`):
//!
//! 1. **Host**: APIs listing the request's host exactly are tried first, then APIs with a
//!    wildcard host (`*.example.com`, longest suffix first), then APIs with no hosts. When no
//!    route of a tier matches, the next tier is tried.
//! 2. Within a tier, routes are tried by **priority** (higher first), then **specificity**
//!    (an exact path, then the longest literal part of a prefix or template), then declaration
//!    order. The first route whose path, methods, headers and query all match wins.
//!
//! Paths are normalised once ([`path::normalize`]) before matching; template parameters are
//! captured from the normalised path and reach later steps (rewrites, event keys).
//! Lookups do not scan every route: each tier indexes its routes by the first path segment.

pub mod path;
pub mod traffic;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use sluice_proto::pb;

use crate::auth::{AccessPolicies, RouteAccess};
use crate::events::Broker;
use crate::events::publish::PublishRoute;
use crate::events::subscribe::SubscribeRoute;
use crate::telemetry::{Metrics, RouteMetrics};
use crate::upstream::Upstream;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub api_id: Arc<str>,
    pub api_name: Arc<str>,
    pub action: Action,
    /// Authentication, authorization and limits.
    pub access: RouteAccess,
    pub metrics: RouteMetrics,
    pattern: Pattern,
    methods: Vec<Method>,
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryMatcher>,
}

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    Proxy(ProxyAction),
    DirectResponse(DirectResponse),
    Publish(PublishRoute),
    Subscribe(SubscribeRoute),
}

#[derive(Debug)]
pub struct ProxyAction {
    pub upstream: Arc<Upstream>,
    pub strip_prefix: bool,
    /// The forwarded path, with `{param}` placeholders.
    pub path_rewrite: Option<String>,
    /// Overall deadline for the response headers, retries included; `None` means the
    /// upstream's total timeout.
    pub timeout: Option<Duration>,
    /// Canaries, the version header and the mirror.
    pub traffic: traffic::Traffic,
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A request's route and what matching captured.
#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a Arc<Route>,
    /// Template parameters, in template order, as they appear in the normalised path.
    pub params: Vec<(&'a str, String)>,
    /// Length of the path's matched literal head (base path plus the route's prefix or the
    /// template's literal segments): what `strip_prefix` removes.
    pub prefix_len: usize,
}

/// Why a configuration's routes cannot be compiled. The shared validator has already checked
/// the configuration, so this means a rule the validator does not know about.
#[derive(Debug, thiserror::Error)]
#[error("route {route}: {reason}")]
pub struct CompileError {
    pub route: String,
    pub reason: String,
}

/// All routes of a configuration, ready to match.
#[derive(Debug, Default)]
pub struct Router {
    /// Every route, sorted by rank: lists below hold indices into this, ascending.
    routes: Vec<Arc<Route>>,
    exact_hosts: HashMap<String, Tier>,
    /// `(".example.com", tier)` for `*.example.com`, longest suffix first.
    wildcard_hosts: Vec<(String, Tier)>,
    any_host: Tier,
}

/// The routes of one host tier, indexed by the first segment of their literal path.
#[derive(Debug, Default)]
struct Tier {
    by_first_segment: HashMap<String, Vec<usize>>,
    /// Routes whose first segment is not literal (`/`, `/{id}`).
    others: Vec<usize>,
}

impl Tier {
    fn insert(&mut self, first_segment: Option<&str>, index: usize) {
        match first_segment {
            Some(segment) => self
                .by_first_segment
                .entry(segment.to_owned())
                .or_default()
                .push(index),
            None => self.others.push(index),
        }
    }

    /// Candidate route indices for a path whose first segment is `first`, in rank order.
    fn candidates<'a>(&'a self, first: &str) -> impl Iterator<Item = usize> + 'a {
        let indexed = self
            .by_first_segment
            .get(first)
            .map_or(&[][..], Vec::as_slice);
        Merge {
            a: indexed,
            b: &self.others,
        }
    }
}

/// Merges two ascending index lists.
struct Merge<'a> {
    a: &'a [usize],
    b: &'a [usize],
}

impl Iterator for Merge<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(*first)
    }
}

/// A request, as the router sees it.
#[derive(Debug)]
pub struct RequestParts<'a> {
    /// Lower-case, without port.
    pub host: &'a str,
    pub method: &'a Method,
    /// Normalised ([`path::normalize`]).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Router {
    /// Compiles the routes of `apis`. `upstream` resolves an upstream id to its runtime;
    /// each route gets its metric series from `metrics`.
    pub fn compile(
        apis: &[pb::Api],
        upstream: &dyn Fn(&str) -> Option<Arc<Upstream>>,
        broker: &dyn Fn(&str) -> Option<Arc<Broker>>,
        policies: &AccessPolicies,
        metrics: &Metrics,
    ) -> Result<Self, CompileError> {
        struct Ranked {
            route: Route,
            hosts: Vec<String>,
            rank: (i32, u8, usize),
            order: usize,
            first_segment: Option<String>,
        }
        let mut ranked = Vec::new();
        for api in apis {
            let meta = api.meta.clone().unwrap_or_default();
            let api_id: Arc<str> = meta.id.into();
            let api_name: Arc<str> = meta.name.into();
            for route in &api.routes {
                let error = |reason: String| CompileError {
                    route: format!("{}/{}", api_name, route.name),
                    reason,
                };
                let matcher = route.r#match.clone().unwrap_or_default();
                let path = matcher.path.unwrap_or_default();
                let pattern = Pattern::compile(&api.base_path, &path).map_err(error)?;
                let methods = matcher
                    .methods
                    .iter()
                    .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| error(e.to_string())))
                    .collect::<Result<_, _>>()?;
                let headers = matcher
                    .headers
                    .iter()
                    .map(|h| {
                        Ok(HeaderMatcher {
                            name: HeaderName::from_bytes(h.name.as_bytes())
                                .map_err(|e| error(e.to_string()))?,
                            value: StringMatcher::compile(h.value.as_ref()).map_err(error)?,
                            invert: h.invert,
                        })
                    })
                    .collect::<Result<_, CompileError>>()?;
                let query = matcher
                    .query
                    .iter()
                    .map(|q| {
                        Ok(QueryMatcher {
                            name: q.name.clone(),
                            value: StringMatcher::compile(q.value.as_ref()).map_err(error)?,
                            invert: q.invert,
                        })
                    })
                    .collect::<Result<_, CompileError>>()?;
                let action = Action::compile(route, upstream, broker).map_err(error)?;
                let access = RouteAccess::compile(api, route, policies).map_err(error)?;
                let first_segment = pattern.first_literal_segment().map(str::to_owned);
                let rank = (route.priority, pattern.exactness(), pattern.literal_len());
                let name: Arc<str> = route.name.as_str().into();
                ranked.push(Ranked {
                    route: Route {
                        id: route.id.as_str().into(),
                        metrics: metrics.route(&api_name, &name),
                        name,
                        api_id: api_id.clone(),
                        api_name: api_name.clone(),
                        action,
                        access,
                        pattern,
                        methods,
                        headers,
                        query,
                    },
                    hosts: api.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    rank,
                    order: ranked.len(),
                    first_segment,
                });
            }
        }
        // Higher priority, then more exact, then longer literal part, then declaration order.
        ranked.sort_by(|a, b| b.rank.cmp(&a.rank).then(a.order.cmp(&b.order)));
        let mut router = Router::default();
        let mut wildcards: HashMap<String, Tier> = HashMap::new();
        for (index, entry) in ranked.into_iter().enumerate() {
            let first = entry.first_segment.as_deref();
            if entry.hosts.is_empty() {
                router.any_host.insert(first, index);
            }
            for host in &entry.hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => wildcards
                        .entry(suffix.to_owned())
                        .or_default()
                        .insert(first, index),
                    None => router
                        .exact_hosts
                        .entry(host.clone())
                        .or_default()
                        .insert(first, index),
                }
            }
            router.routes.push(Arc::new(entry.route));
        }
        router.wildcard_hosts = wildcards.into_iter().collect();
        router
            .wildcard_hosts
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(router)
    }

    /// Every route, by rank.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().map(|route| &**route)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for `request`, if any.
    pub fn route<'a>(&'a self, request: &RequestParts<'_>) -> Option<Matched<'a>> {
        let first = first_segment(request.path);
        let mut query: Option<Vec<(String, String)>> = None;
        let exact = self.exact_hosts.get(request.host);
        let wildcards = self
            .wildcard_hosts
            .iter()
            .filter(|(suffix, _)| {
                request.host.len() > suffix.len() && request.host.ends_with(suffix.as_str())
            })
            .map(|(_, tier)| tier);
        for tier in exact.into_iter().chain(wildcards).chain([&self.any_host]) {
            for index in tier.candidates(first) {
                let route = &self.routes[index];
                if let Some(matched) = route.matches(request, &mut query) {
                    return Some(Matched {
                        route,
                        params: matched.0,
                        prefix_len: matched.1,
                    });
                }
            }
        }
        None
    }
}

type Captures<'a> = (Vec<(&'a str, String)>, usize);

impl Route {
    fn matches<'a>(
        &'a self,
        request: &RequestParts<'_>,
        query: &mut Option<Vec<(String, String)>>,
    ) -> Option<Captures<'a>> {
        if !self.methods.is_empty() && !self.methods.contains(request.method) {
            return None;
        }
        let captures = self.pattern.matches(request.path)?;
        for header in &self.headers {
            let found = request
                .headers
                .get_all(&header.name)
                .iter()
                .any(|value| header.value.matches_header(value));
            if found == header.invert {
                return None;
            }
        }
        if !self.query.is_empty() {
            let pairs = query.get_or_insert_with(|| {
                url::form_urlencoded::parse(request.query.unwrap_or_default().as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            });
            for matcher in &self.query {
                let found = pairs
                    .iter()
                    .filter(|(k, _)| *k == matcher.name)
                    .any(|(_, v)| matcher.value.matches(v));
                if found == matcher.invert {
                    return None;
                }
            }
        }
        Some(captures)
    }
}

fn first_segment(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split('/').next().unwrap_or_default()
}

impl Action {
    fn compile(
        route: &pb::Route,
        upstream: &dyn Fn(&str) -> Option<Arc<Upstream>>,
        broker: &dyn Fn(&str) -> Option<Arc<Broker>>,
    ) -> Result<Self, String> {
        use pb::route::Action as A;
        Ok(match &route.action {
            Some(A::Proxy(proxy)) => Action::Proxy(ProxyAction {
                upstream: upstream(&proxy.upstream_id)
                    .ok_or_else(|| format!("no upstream has the id {}", proxy.upstream_id))?,
                strip_prefix: proxy.strip_prefix,
                path_rewrite: (!proxy.path_rewrite.is_empty()).then(|| proxy.path_rewrite.clone()),
                timeout: (proxy.timeout_ms > 0).then(|| Duration::from_millis(proxy.timeout_ms)),
                traffic: traffic::Traffic::compile(proxy, upstream)?,
            }),
            Some(A::DirectResponse(direct)) => {
                let mut headers = HeaderMap::new();
                for (name, value) in &direct.headers {
                    headers.insert(
                        HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
                        HeaderValue::from_str(value).map_err(|e| e.to_string())?,
                    );
                }
                Action::DirectResponse(DirectResponse {
                    status: StatusCode::from_u16(
                        u16::try_from(direct.status).map_err(|e| e.to_string())?,
                    )
                    .map_err(|e| e.to_string())?,
                    headers,
                    body: Bytes::from(direct.body.clone()),
                })
            }
            Some(A::Publish(publish)) => Action::Publish(PublishRoute::compile(publish, broker)?),
            Some(A::Subscribe(subscribe)) => {
                Action::Subscribe(SubscribeRoute::compile(&route.id, subscribe, broker)?)
            }
            None => return Err("has no action".into()),
        })
    }
}

/// A route's path, joined with its API's base path.
#[derive(Debug)]
enum Pattern {
    Exact(String),
    /// Matches the prefix itself and anything below it (segment boundary).
    Prefix(String),
    Template(Vec<Segment>),
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Param(String),
    /// `{*name}`: the rest of the path, possibly empty.
    Rest(String),
}

impl Pattern {
    fn compile(base_path: &str, path: &pb::PathMatch) -> Result<Self, String> {
        let full = join(base_path, &path.value);
        Ok(match pb::path_match::Kind::try_from(path.kind) {
            Ok(pb::path_match::Kind::Exact) => Pattern::Exact(full),
            Ok(pb::path_match::Kind::Prefix) | Ok(pb::path_match::Kind::Unspecified) => {
                Pattern::Prefix(full.trim_end_matches('/').to_owned())
            }
            Ok(pb::path_match::Kind::Template) => Pattern::Template(
                full.split('/')
                    .skip(1)
                    .map(|segment| {
                        if let Some(name) =
                            segment.strip_prefix("{*").and_then(|s| s.strip_suffix('}'))
                        {
                            Segment::Rest(name.to_owned())
                        } else if let Some(name) =
                            segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
                        {
                            Segment::Param(name.to_owned())
                        } else {
                            Segment::Literal(segment.to_owned())
                        }
                    })
                    .collect(),
            ),
            Err(_) => return Err(format!("unknown path match kind {}", path.kind)),
        })
    }

    /// 2 for exact paths, 1 for templates, 0 for prefixes: an exact path beats a template of
    /// the same length, and a template beats a prefix.
    fn exactness(&self) -> u8 {
        match self {
            Pattern::Exact(_) => 2,
            Pattern::Template(_) => 1,
            Pattern::Prefix(_) => 0,
        }
    }

    fn literal_len(&self) -> usize {
        match self {
            Pattern::Exact(p) | Pattern::Prefix(p) => p.len(),
            Pattern::Template(segments) => segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => l.len() + 1,
                    _ => 1,
                })
                .sum(),
        }
    }

    fn first_literal_segment(&self) -> Option<&str> {
        match self {
            Pattern::Exact(p) => Some(first_segment(p)),
            Pattern::Prefix(p) if p.is_empty() => None,
            Pattern::Prefix(p) => Some(first_segment(p)),
            Pattern::Template(segments) => match segments.first() {
                Some(Segment::Literal(l)) => Some(l),
                _ => None,
            },
        }
    }

    fn matches<'a>(&'a self, path: &str) -> Option<Captures<'a>> {
        match self {
            Pattern::Exact(p) => (p == path).then(|| (Vec::new(), p.len())),
            Pattern::Prefix(p) => {
                let rest = path.strip_prefix(p.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then(|| (Vec::new(), p.len()))
            }
            Pattern::Template(segments) => {
                let mut params = Vec::new();
                let mut rest = path.strip_prefix('/')?;
                let mut prefix_len = 0;
                let mut literal_head = true;
                for (i, segment) in segments.iter().enumerate() {
                    if let Segment::Rest(name) = segment {
                        params.push((name.as_str(), rest.to_owned()));
                        return Some((params, prefix_len));
                    }
                    let (value, tail) = match rest.split_once('/') {
                        Some((value, tail)) => (value, Some(tail)),
                        None => (rest, None),
                    };
                    match segment {
                        Segment::Literal(l) if l == value => {
                            if literal_head {
                                prefix_len += 1 + l.len();
                            }
                        }
                        Segment::Param(name) if !value.is_empty() => {
                            literal_head = false;
                            params.push((name.as_str(), value.to_owned()));
                        }
                        _ => return None,
                    }
                    match tail {
                        Some(tail) => rest = tail,
                        None if i + 1 == segments.len() => return Some((params, prefix_len)),
                        None => {
                            // The path ended; only a trailing `{*rest}` may still match.
                            return match segments.get(i + 1) {
                                Some(Segment::Rest(name)) if i + 2 == segments.len() => {
                                    params.push((name.as_str(), String::new()));
                                    Some((params, prefix_len))
                                }
                                _ => None,
                            };
                        }
                    }
                }
                None
            }
        }
    }
}

/// `base_path` + `path`, where a route path of `/` under a base path means the base path.
fn join(base_path: &str, path: &str) -> String {
    let base = base_path.trim_end_matches('/');
    if base.is_empty() {
        return if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        };
    }
    if path.is_empty() || path == "/" {
        return base.to_owned();
    }
    format!("{base}{path}")
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    value: StringMatcher,
    invert: bool,
}

#[derive(Debug)]
struct QueryMatcher {
    name: String,
    value: StringMatcher,
    invert: bool,
}

#[derive(Debug)]
enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
}

impl StringMatcher {
    fn compile(value: Option<&pb::StringMatch>) -> Result<Self, String> {
        use pb::string_match::Kind;
        Ok(match value.and_then(|v| v.kind.as_ref()) {
            Some(Kind::Exact(s)) => StringMatcher::Exact(s.clone()),
            Some(Kind::Prefix(s)) => StringMatcher::Prefix(s.clone()),
            Some(Kind::Regex(r)) => StringMatcher::Regex(
                Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("regex {r:?}: {e}"))?,
            ),
            Some(Kind::Present(_)) | None => StringMatcher::Present,
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(s) => value.starts_with(s.as_str()),
            StringMatcher::Regex(r) => r.is_match(value),
            StringMatcher::Present => true,
        }
    }

    fn matches_header(&self, value: &HeaderValue) -> bool {
        match value.to_str() {
            Ok(text) => self.matches(text),
            // Opaque bytes only satisfy "present".
            Err(_) => matches!(self, StringMatcher::Present),
        }
    }
}

#[cfg(test)]
mod tests;
