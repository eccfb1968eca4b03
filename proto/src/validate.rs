//! The checks every [`ConfigSet`] must pass before anyone uses it.
//!
//! The control plane runs them before it commits, a data plane before it applies a snapshot,
//! and the declarative loader on every document: one set of rules, so nothing the control
//! plane accepts can be refused by a data plane for its shape. Every problem is reported, not
//! just the first, with a path in the document's vocabulary (`apis[0].routes[1].path`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::error::{ConfigErrors, FieldError};
use crate::pb::{self, ConfigSet, ResourceKind};

/// Longest name of a resource or group.
pub const MAX_NAME_LEN: usize = 128;

/// JWT algorithms an issuer may allow. `none` is not among them, on purpose.
pub const JWT_ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// How far ahead of the steady rate a burst may let requests run: the data plane's limiter
/// counts in microseconds and bounds this.
pub const MAX_BURST_AHEAD_US: u64 = 50 * 365 * 86_400 * 1_000_000;

/// Request headers the data plane sets from the caller's identity, lower-case. Copies sent by
/// the client are removed first, so an upstream can trust them; nothing else may set them.
pub const IDENTITY_HEADERS: &[&str] = &[
    "x-consumer-id",
    "x-consumer-name",
    "x-consumer-custom-id",
    "x-subscription-id",
    "x-credential-id",
];

/// Where a resource sits in the source the [`ConfigSet`] came from, for error paths.
pub trait Locate {
    /// The path of the `index`-th resource of `kind` in the config set.
    fn locate(&self, kind: ResourceKind, index: usize) -> String;
}

/// Paths into the config set's own lists (`credentials[3]`): for snapshots and registry state.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByPosition;

impl Locate for ByPosition {
    fn locate(&self, kind: ResourceKind, index: usize) -> String {
        format!("{}[{index}]", list_name(kind))
    }
}

/// The list a kind of resource lives in, in documents and config sets.
pub fn list_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Api => "apis",
        ResourceKind::Upstream => "upstreams",
        ResourceKind::Consumer => "consumers",
        ResourceKind::Credential => "credentials",
        ResourceKind::Plan => "plans",
        ResourceKind::Subscription => "subscriptions",
        ResourceKind::Policy => "policies",
        ResourceKind::Broker => "brokers",
        ResourceKind::Certificate => "certificates",
        ResourceKind::Unspecified => "resources",
    }
}

/// The name of one resource of a kind, as errors say it.
pub fn kind_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Api => "api",
        ResourceKind::Upstream => "upstream",
        ResourceKind::Consumer => "consumer",
        ResourceKind::Credential => "credential",
        ResourceKind::Plan => "plan",
        ResourceKind::Subscription => "subscription",
        ResourceKind::Policy => "policy",
        ResourceKind::Broker => "broker",
        ResourceKind::Certificate => "certificate",
        ResourceKind::Unspecified => "resource",
    }
}

/// Checks a config set, with paths into its own lists.
pub fn config_set(config: &ConfigSet) -> Result<(), ConfigErrors> {
    config_set_located(config, &ByPosition)
}

/// Checks a config set, with paths given by `locate`.
pub fn config_set_located(config: &ConfigSet, locate: &dyn Locate) -> Result<(), ConfigErrors> {
    let mut checker = Checker::new(config, locate);
    checker.run(config);
    if checker.errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(checker.errors))
    }
}

/// Checks some resources in the context of those they refer to: checks `config`, but
/// reports only the errors about resources that `judged` accepts, and errors about no
/// resource. The context resources were valid when they were written; their errors (a
/// reference to something not in the set, say) are not the judged ones'.
pub fn config_set_judging(
    config: &ConfigSet,
    locate: &dyn Locate,
    judged: impl Fn(&pb::ResourceRef) -> bool,
) -> Result<(), ConfigErrors> {
    match config_set_located(config, locate) {
        Ok(()) => Ok(()),
        Err(ConfigErrors(errors)) => {
            let errors: Vec<FieldError> = errors
                .into_iter()
                .filter(|e| e.resource.as_ref().is_none_or(&judged))
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// A name of a resource or a group: lowercase letters, digits, `-`, `_`, `.`, starting with a
/// letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("must be at most {MAX_NAME_LEN} characters"));
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or_default();
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!(
            "{name:?} must start with a lowercase letter or a digit"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{name:?} has {bad:?}; use lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// An id: a UUID in its one canonical spelling (lowercase, hyphenated). Ids are compared as
/// text in many places; two spellings of one UUID must not pass for two resources.
pub fn check_id(id: &str) -> Result<(), String> {
    match uuid::Uuid::parse_str(id) {
        Ok(parsed) if parsed.hyphenated().to_string() == id => Ok(()),
        Ok(parsed) => Err(format!(
            "{id:?} is not written canonically; write {}",
            parsed.hyphenated()
        )),
        Err(_) => Err(format!("{id:?} is not a UUID")),
    }
}

/// A route path or path template: absolute, with no empty, `.` or `..` segment, no `%`-escape
/// of `/`, and well-formed `{param}` segments.
pub fn check_path(kind: pb::path_match::Kind, path: &str) -> Result<(), String> {
    use pb::path_match::Kind;
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.contains('?') || path.contains('#') {
        return Err(format!(
            "{path:?} must not contain '?' or '#'; match the query with `query`"
        ));
    }
    if path.to_ascii_lowercase().contains("%2f") {
        return Err(format!("{path:?} must not contain an encoded '/' (%2F)"));
    }
    if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(format!(
            "{path:?} must not contain spaces or control characters"
        ));
    }
    if path == "/" {
        return Ok(());
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = body[1..].split('/').collect();
    let mut params = HashSet::new();
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(format!("{path:?} has an empty segment ('//')"));
        }
        if *segment == "." || *segment == ".." {
            return Err(format!("{path:?} has a '{segment}' segment"));
        }
        let has_brace = segment.contains('{') || segment.contains('}');
        if !has_brace {
            continue;
        }
        if kind != Kind::Template {
            return Err(format!(
                "{path:?} has '{{' or '}}'; path parameters need path_match: template"
            ));
        }
        let Some(inner) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
            return Err(format!(
                "{path:?}: segment {segment:?} must be a whole '{{name}}' or plain text"
            ));
        };
        let (name, catch_all) = match inner.strip_prefix('*') {
            Some(rest) => (rest, true),
            None => (inner, false),
        };
        if catch_all && i + 1 != segments.len() {
            return Err(format!("{path:?}: '{{*{name}}}' must be the last segment"));
        }
        if name.is_empty()
            || !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "{path:?}: parameter {inner:?} must be a name of letters, digits and '_'"
            ));
        }
        if !params.insert(name) {
            return Err(format!("{path:?}: parameter {name:?} appears twice"));
        }
    }
    Ok(())
}

/// The parameters a template path captures, in order.
pub fn template_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.trim_start_matches('*'))
        .collect()
}

/// An IP network ("10.0.0.0/8") or a single address.
pub fn check_cidr(value: &str) -> Result<(), String> {
    let ok = match value.split_once('/') {
        Some((addr, len)) => match (addr.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(len)) => len <= 32,
            (Ok(IpAddr::V6(_)), Ok(len)) => len <= 128,
            _ => false,
        },
        None => value.parse::<IpAddr>().is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not an IP address or CIDR (\"10.0.0.0/8\", \"2001:db8::/32\")"
        ))
    }
}

/// A Kafka topic name.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err("must be 1 to 249 characters".into());
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a valid topic name"));
    }
    if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{topic:?} has {bad:?}; topics use letters, digits, '.', '_', '-'"
        ));
    }
    Ok(())
}

/// A host an API answers for: a DNS name, optionally with a leading `*.` wildcard.
fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "{host:?} is not a lowercase host name (\"api.example.com\" or \"*.example.com\")"
        ));
    }
    Ok(())
}

fn check_header_name(name: &str) -> Result<(), String> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid header name"))
    }
}

fn check_method(method: &str) -> Result<(), String> {
    if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "{method:?} is not an upper-case HTTP method (\"GET\", \"POST\", ...)"
        ))
    }
}

fn check_status(status: u32) -> Result<(), String> {
    if (100..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!("{status} is not an HTTP status (100-599)"))
    }
}

fn check_target_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{raw:?}: scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{raw:?} must not carry credentials"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{raw:?} must be scheme, host and port only; rewrite paths on the route"
        ));
    }
    Ok(())
}

fn check_host_port(value: &str) -> Result<(), String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("{value:?} must be host:port")),
    }
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Ids, names and groups of every resource, for reference checks.
struct Index<'a> {
    /// id → (kind, group)
    by_id: HashMap<&'a str, (ResourceKind, &'a str)>,
    /// Kafka brokers whose own `acks` is 0: they acknowledge nothing a durable publish could
    /// wait for.
    brokers_without_acks: HashSet<&'a str>,
}

struct Checker<'a> {
    errors: Vec<FieldError>,
    index: Index<'a>,
    locate: &'a dyn Locate,
    /// The resource being checked, attached to its errors.
    current: Option<pb::ResourceRef>,
    /// Its group, for reference checks.
    group: &'a str,
}

impl<'a> Checker<'a> {
    fn new(config: &'a ConfigSet, locate: &'a dyn Locate) -> Self {
        let mut by_id = HashMap::new();
        for_each_meta(config, |kind, _, meta| {
            by_id
                .entry(meta.id.as_str())
                .or_insert((kind, meta.group.as_str()));
        });
        let brokers_without_acks = config
            .brokers
            .iter()
            .filter(|broker| broker_sends_no_acks(broker))
            .filter_map(|broker| broker.meta.as_ref().map(|meta| meta.id.as_str()))
            .collect();
        Self {
            errors: Vec::new(),
            index: Index {
                by_id,
                brokers_without_acks,
            },
            locate,
            current: None,
            group: "",
        }
    }

    fn error(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            reason: reason.into(),
            resource: self.current.clone(),
        });
    }

    fn check(&mut self, path: impl FnOnce() -> String, result: Result<(), String>) {
        if let Err(reason) = result {
            self.error(path(), reason);
        }
    }

    fn run(&mut self, config: &'a ConfigSet) {
        self.check_identities(config);
        for (i, api) in config.apis.iter().enumerate() {
            let base = self.enter(ResourceKind::Api, i, api.meta.as_ref());
            self.api(&base, api);
        }
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let base = self.enter(ResourceKind::Upstream, i, upstream.meta.as_ref());
            self.upstream(&base, upstream);
        }
        let policies: HashMap<&str, &pb::Policy> = config
            .policies
            .iter()
            .filter_map(|p| Some((p.meta.as_ref()?.id.as_str(), p)))
            .collect();
        for (i, consumer) in config.consumers.iter().enumerate() {
            let base = self.enter(ResourceKind::Consumer, i, consumer.meta.as_ref());
            self.consumer_policies(&base, consumer, &policies);
        }
        self.credentials(config);
        for (i, plan) in config.plans.iter().enumerate() {
            let base = self.enter(ResourceKind::Plan, i, plan.meta.as_ref());
            if plan.monthly_quota > i64::MAX as u64 {
                self.error(
                    format!("{base}.monthly_quota"),
                    format!("must be at most {}", i64::MAX),
                );
            }
            for (j, limit) in plan.rate_limits.iter().enumerate() {
                self.rate_limit(&format!("{base}.rate_limits[{j}]"), limit);
            }
            if pb::rate_limit_policy::Mode::try_from(plan.mode).is_err() {
                self.error(format!("{base}.mode"), "unknown mode");
            }
        }
        self.subscriptions(config);
        for (i, policy) in config.policies.iter().enumerate() {
            let base = self.enter(ResourceKind::Policy, i, policy.meta.as_ref());
            self.policy(&base, policy);
        }
        for (i, broker) in config.brokers.iter().enumerate() {
            let base = self.enter(ResourceKind::Broker, i, broker.meta.as_ref());
            self.broker(&base, broker);
        }
        self.certificates(config);
    }

    /// Every resource has a well-formed, unique id and a name unique in its kind and group.
    fn check_identities(&mut self, config: &'a ConfigSet) {
        let mut metas = Vec::new();
        for_each_meta(config, |kind, i, meta| metas.push((kind, i, meta)));
        let mut ids: HashMap<&str, String> = HashMap::new();
        let mut names: HashMap<(ResourceKind, &str, &str), String> = HashMap::new();
        for (kind, i, meta) in metas {
            let base = self.locate.locate(kind, i);
            self.current = Some(resource_ref(kind, &meta.id));
            self.check(|| format!("{base}.group"), check_name(&meta.group));
            let mut name_clash = false;
            if let Err(reason) = check_name(&meta.name) {
                self.error(format!("{base}.name"), reason);
            } else if let Some(first) = names.insert(
                (kind, meta.group.as_str(), meta.name.as_str()),
                base.clone(),
            ) {
                name_clash = true;
                self.error(
                    format!("{base}.name"),
                    format!(
                        "{:?} is also the name of {first} in group {:?}",
                        meta.name, meta.group
                    ),
                );
            }
            if let Err(reason) = check_id(&meta.id) {
                self.error(format!("{base}.id"), reason);
            } else if let Some(first) = ids.insert(meta.id.as_str(), base.clone())
                && !name_clash
            {
                // Two resources with the same name get the same derived id: the name error
                // above already says what to fix.
                self.error(
                    format!("{base}.id"),
                    format!("id {} is also used by {first}", meta.id),
                );
            }
        }
        // Route ids share the id space of resources.
        for (i, api) in config.apis.iter().enumerate() {
            let base = self.locate.locate(ResourceKind::Api, i);
            self.current = api
                .meta
                .as_ref()
                .map(|m| resource_ref(ResourceKind::Api, &m.id));
            let mut route_names = HashSet::new();
            for (j, route) in api.routes.iter().enumerate() {
                let path = format!("{base}.routes[{j}].id");
                let name_clash = !route_names.insert(route.name.as_str());
                if let Err(reason) = check_id(&route.id) {
                    self.error(path, reason);
                } else if let Some(first) = ids.insert(route.id.as_str(), path.clone())
                    && !name_clash
                {
                    self.error(path, format!("id {} is also used by {first}", route.id));
                }
            }
        }
    }

    /// Starts checking one resource: returns its path, and reports a missing `meta`.
    fn enter(&mut self, kind: ResourceKind, index: usize, meta: Option<&'a pb::Meta>) -> String {
        let base = self.locate.locate(kind, index);
        match meta {
            Some(meta) => {
                self.current = Some(resource_ref(kind, &meta.id));
                self.group = meta.group.as_str();
            }
            None => {
                self.current = None;
                self.group = "";
                self.error(base.clone(), "has no meta (id, group, name)");
            }
        }
        base
    }

    /// Checks that `id` names a resource of `kind` in the current group.
    fn reference(&mut self, path: impl FnOnce() -> String, kind: ResourceKind, id: &str) {
        let what = kind_name(kind);
        if id.is_empty() {
            self.error(path(), format!("names no {what}"));
            return;
        }
        match self.index.by_id.get(id) {
            Some((found, group)) if *found == kind && *group == self.group => {}
            Some((found, _)) if *found == kind => {
                let group = self.group.to_owned();
                self.error(
                    path(),
                    format!("{what} {id} is in another group than {group:?}"),
                );
            }
            _ => {
                let group = self.group.to_owned();
                self.error(path(), format!("no {what} {id} in group {group:?}"));
            }
        }
    }

    /// A consumer's policies follow it on every API, before any route is known: only those
    /// that need nothing but the caller (see [`consumer_cannot_hold`]).
    fn consumer_policies(
        &mut self,
        base: &str,
        consumer: &pb::Consumer,
        policies: &HashMap<&str, &pb::Policy>,
    ) {
        for (j, id) in consumer.policy_ids.iter().enumerate() {
            let path = || format!("{base}.policies[{j}]");
            self.reference(path, ResourceKind::Policy, id);
            // A dangling reference was named just above.
            let Some(kind) = policies
                .get(id.as_str())
                .and_then(|p| consumer_cannot_hold(p))
            else {
                continue;
            };
            self.error(
                path(),
                format!("policy {id} is {kind}; {CONSUMER_POLICY_KINDS}"),
            );
        }
    }

    fn api(&mut self, base: &str, api: &pb::Api) {
        for (j, host) in api.hosts.iter().enumerate() {
            self.check(|| format!("{base}.hosts[{j}]"), check_host(host));
        }
        if !api.base_path.is_empty() {
            let ok = api.base_path.starts_with('/')
                && !api.base_path.ends_with('/')
                && check_path(pb::path_match::Kind::Exact, &api.base_path).is_ok();
            if !ok {
                self.error(
                    format!("{base}.base_path"),
                    format!(
                        "{:?} must be an absolute path with no trailing '/', like \"/v1\"",
                        api.base_path
                    ),
                );
            }
        }
        for (j, id) in api.policy_ids.iter().enumerate() {
            self.reference(|| format!("{base}.policies[{j}]"), ResourceKind::Policy, id);
        }
        let mut route_names = HashMap::new();
        for (j, route) in api.routes.iter().enumerate() {
            let at = format!("{base}.routes[{j}]");
            if route.name.is_empty() {
                self.error(format!("{at}.name"), "must not be empty");
            } else if let Some(first) = route_names.insert(route.name.as_str(), j) {
                self.error(
                    format!("{at}.name"),
                    format!(
                        "{:?} is also the name of routes[{first}]; give the routes distinct names",
                        route.name
                    ),
                );
            }
            self.route(&at, route);
        }
    }

    fn route(&mut self, at: &str, route: &pb::Route) {
        use pb::route::Action;
        let mut params = Vec::new();
        match route.r#match.as_ref().and_then(|m| m.path.as_ref()) {
            None => self.error(format!("{at}.path"), "is required"),
            Some(path) => match pb::path_match::Kind::try_from(path.kind) {
                Ok(pb::path_match::Kind::Unspecified) | Err(_) => {
                    self.error(
                        format!("{at}.path_match"),
                        "must be exact, prefix or template",
                    );
                }
                Ok(kind) => {
                    self.check(|| format!("{at}.path"), check_path(kind, &path.value));
                    if kind == pb::path_match::Kind::Template {
                        params = template_params(&path.value);
                    }
                }
            },
        }
        if let Some(matcher) = &route.r#match {
            for (j, method) in matcher.methods.iter().enumerate() {
                self.check(|| format!("{at}.methods[{j}]"), check_method(method));
            }
            for (j, header) in matcher.headers.iter().enumerate() {
                let path = format!("{at}.headers[{j}]");
                self.check(|| format!("{path}.name"), check_header_name(&header.name));
                self.string_match(&path, header.value.as_ref());
            }
            for (j, query) in matcher.query.iter().enumerate() {
                let path = format!("{at}.query[{j}]");
                if query.name.is_empty() {
                    self.error(format!("{path}.name"), "must not be empty");
                }
                self.string_match(&path, query.value.as_ref());
            }
        }
        for (j, id) in route.policy_ids.iter().enumerate() {
            self.reference(|| format!("{at}.policies[{j}]"), ResourceKind::Policy, id);
        }
        match &route.action {
            None => self.error(
                at.to_owned(),
                "needs exactly one action: proxy, publish, subscribe or direct_response",
            ),
            Some(Action::Proxy(proxy)) => {
                let path = format!("{at}.proxy");
                self.reference(
                    || format!("{path}.upstream"),
                    ResourceKind::Upstream,
                    &proxy.upstream_id,
                );
                for param in rewrite_params(&proxy.path_rewrite) {
                    if !params.contains(&param) {
                        self.error(
                            format!("{path}.path_rewrite"),
                            format!("uses {{{param}}}, which the route's path does not capture"),
                        );
                    }
                }
                if !proxy.path_rewrite.is_empty() && !proxy.path_rewrite.starts_with('/') {
                    self.error(format!("{path}.path_rewrite"), "must start with '/'");
                }
                self.traffic(&path, proxy);
            }
            Some(Action::Publish(publish)) => {
                let path = format!("{at}.publish");
                self.reference(
                    || format!("{path}.broker"),
                    ResourceKind::Broker,
                    &publish.broker_id,
                );
                self.check(|| format!("{path}.topic"), check_topic(&publish.topic));
                if let Some(key) = &publish.key {
                    self.value_source(&format!("{path}.key"), key, &params);
                }
                let delivery = pb::publish_action::Delivery::try_from(publish.delivery);
                if delivery.is_err() {
                    self.error(format!("{path}.delivery"), "unknown delivery mode");
                }
                match pb::publish_action::Acks::try_from(publish.acks) {
                    Err(_) => self.error(format!("{path}.acks"), "unknown acks"),
                    Ok(pb::publish_action::Acks::None)
                        if delivery != Ok(pb::publish_action::Delivery::FireAndForget) =>
                    {
                        self.error(
                            format!("{path}.acks"),
                            "none sends no acknowledgement for a durable publish to wait \
                             for; set delivery to fire_and_forget, or acks to leader or all",
                        );
                    }
                    Ok(pb::publish_action::Acks::Unspecified)
                        if publish_takes_broker_acks(publish)
                            && self
                                .index
                                .brokers_without_acks
                                .contains(publish.broker_id.as_str()) =>
                    {
                        self.error(
                            format!("{path}.acks"),
                            "the broker's properties set acks 0, which sends no acknowledgement \
                             for a durable publish to wait for; set acks to leader or all here, \
                             or delivery to fire_and_forget",
                        );
                    }
                    Ok(_) => {}
                }
                if pb::publish_action::CloudEvents::try_from(publish.cloud_events).is_err() {
                    self.error(format!("{path}.cloud_events"), "unknown CloudEvents mode");
                }
                if !publish.json_schema.is_empty() {
                    self.check(
                        || format!("{path}.json_schema"),
                        check_json_schema(&publish.json_schema),
                    );
                }
                for (j, rule) in publish.topic_rules.iter().enumerate() {
                    self.topic_rule(&format!("{path}.topic_rules[{j}]"), rule, &params);
                }
            }
            Some(Action::Subscribe(subscribe)) => {
                let path = format!("{at}.subscribe");
                self.reference(
                    || format!("{path}.broker"),
                    ResourceKind::Broker,
                    &subscribe.broker_id,
                );
                self.check(|| format!("{path}.topic"), check_topic(&subscribe.topic));
                if subscribe.websocket_publish
                    && self
                        .index
                        .brokers_without_acks
                        .contains(subscribe.broker_id.as_str())
                {
                    self.error(
                        format!("{path}.websocket_publish"),
                        "messages are published durably, and the broker's properties set acks \
                         0, which sends no acknowledgement to wait for",
                    );
                }
                if !subscribe.websocket_json_schema.is_empty() {
                    if subscribe.websocket_publish {
                        self.check(
                            || format!("{path}.websocket_json_schema"),
                            check_json_schema(&subscribe.websocket_json_schema),
                        );
                    } else {
                        self.error(
                            format!("{path}.websocket_json_schema"),
                            "checks the messages WebSocket subscribers publish, and the route \
                             takes none: set websocket_publish: true",
                        );
                    }
                }
                if pb::subscribe_action::Start::try_from(subscribe.default_start).is_err() {
                    self.error(format!("{path}.start"), "unknown start position");
                }
                for (j, filter) in subscribe.identity_filters.iter().enumerate() {
                    self.identity_filter(&format!("{path}.identity_filters[{j}]"), filter);
                }
                for (j, limit) in subscribe.message_rate_limits.iter().enumerate() {
                    self.rate_limit(&format!("{path}.message_rate_limits[{j}]"), limit);
                }
            }
            Some(Action::DirectResponse(direct)) => {
                let path = format!("{at}.direct_response");
                self.check(|| format!("{path}.status"), check_status(direct.status));
                for name in direct.headers.keys() {
                    self.check(|| format!("{path}.headers.{name}"), check_header_name(name));
                }
            }
        }
    }

    /// Canaries, the version header and the mirror of a proxy route.
    fn traffic(&mut self, path: &str, proxy: &pb::ProxyAction) {
        let valid_share = |percent: f64| percent > 0.0 && percent <= 100.0;
        let mut total = 0.0;
        let mut versions = HashSet::new();
        versions.insert(if proxy.primary_version.is_empty() {
            "primary"
        } else {
            proxy.primary_version.as_str()
        });
        for (j, canary) in proxy.canaries.iter().enumerate() {
            let at = format!("{path}.canaries[{j}]");
            self.reference(
                || format!("{at}.upstream"),
                ResourceKind::Upstream,
                &canary.upstream_id,
            );
            if canary.upstream_id == proxy.upstream_id {
                self.error(
                    format!("{at}.upstream"),
                    "is the route's own upstream; a canary goes to another",
                );
            }
            if !valid_share(canary.percent) {
                self.error(
                    format!("{at}.percent"),
                    "must be more than 0 and at most 100",
                );
            }
            total += canary.percent;
            if !canary.version.is_empty() {
                self.check(|| format!("{at}.version"), check_name(&canary.version));
                if !versions.insert(canary.version.as_str()) {
                    self.error(
                        format!("{at}.version"),
                        format!("{:?} names another version of this route", canary.version),
                    );
                }
            }
        }
        if total > 100.0 + 1e-9 {
            self.error(
                format!("{path}.canaries"),
                format!("the canaries' shares add up to {total}%, more than 100%"),
            );
        }
        if !proxy.version_header.is_empty() {
            self.check(
                || format!("{path}.version_header"),
                check_header_name(&proxy.version_header),
            );
        }
        if !proxy.primary_version.is_empty() {
            self.check(
                || format!("{path}.primary_version"),
                check_name(&proxy.primary_version),
            );
        }
        if let Some(mirror) = &proxy.mirror {
            self.reference(
                || format!("{path}.mirror.upstream"),
                ResourceKind::Upstream,
                &mirror.upstream_id,
            );
            if !valid_share(mirror.percent) {
                self.error(
                    format!("{path}.mirror.percent"),
                    "must be more than 0 and at most 100",
                );
            }
        }
    }

    fn string_match(&mut self, path: &str, value: Option<&pb::StringMatch>) {
        use pb::string_match::Kind;
        match value.and_then(|v| v.kind.as_ref()) {
            None => self.error(
                path.to_owned(),
                "needs exactly one of exact, prefix, regex, present",
            ),
            Some(Kind::Regex(pattern)) => {
                self.check(|| format!("{path}.regex"), check_regex(pattern));
            }
            Some(Kind::Present(false)) => {
                self.error(
                    format!("{path}.present"),
                    "must be true; use invert to match absence",
                );
            }
            Some(_) => {}
        }
    }

    fn identity_filter(&mut self, path: &str, filter: &pb::IdentityFilter) {
        use pb::identity_filter::{Attribute, EventValue, Identity};
        match &filter.event_value {
            None => self.error(
                path.to_owned(),
                "needs exactly one of json_pointer, record_header, key",
            ),
            Some(EventValue::JsonPointer(pointer)) if !pointer.starts_with('/') => self.error(
                format!("{path}.json_pointer"),
                format!("{pointer:?} is not a JSON pointer (\"/customerId\")"),
            ),
            Some(EventValue::RecordHeader(name)) if name.is_empty() => {
                self.error(format!("{path}.record_header"), "must not be empty");
            }
            Some(EventValue::Key(false)) => {
                self.error(format!("{path}.key"), "must be true when set");
            }
            Some(_) => {}
        }
        match &filter.identity {
            None => self.error(
                path.to_owned(),
                "needs exactly one of consumer, claim_header",
            ),
            Some(Identity::Consumer(attribute)) => {
                if !matches!(
                    Attribute::try_from(*attribute),
                    Ok(Attribute::ConsumerId | Attribute::CustomId | Attribute::ConsumerName)
                ) {
                    self.error(format!("{path}.consumer"), "unknown consumer attribute");
                }
            }
            Some(Identity::ClaimHeader(name)) => {
                self.check(|| format!("{path}.claim_header"), check_header_name(name));
            }
        }
    }

    fn topic_rule(&mut self, path: &str, rule: &pb::TopicRule, params: &[&str]) {
        use pb::topic_rule::Condition;
        match rule.source.as_ref().and_then(|s| s.kind.as_ref()) {
            None | Some(pb::value_source::Kind::ConsumerId(_)) => self.error(
                path.to_owned(),
                "needs exactly one of path_param, header, json_pointer",
            ),
            Some(_) => {
                if let Some(source) = &rule.source {
                    self.value_source(path, source, params);
                }
            }
        }
        match &rule.condition {
            None => self.error(
                path.to_owned(),
                "needs exactly one of equals, one_of, regex",
            ),
            Some(Condition::OneOf(list)) if list.values.is_empty() => {
                self.error(format!("{path}.one_of"), "needs at least one value");
            }
            Some(Condition::Regex(pattern)) => {
                self.check(|| format!("{path}.regex"), check_regex(pattern));
            }
            Some(_) => {}
        }
        self.check(|| format!("{path}.topic"), check_topic(&rule.topic));
    }

    fn value_source(&mut self, path: &str, source: &pb::ValueSource, params: &[&str]) {
        use pb::value_source::Kind;
        match &source.kind {
            None => self.error(
                path.to_owned(),
                "needs exactly one of path_param, header, json_pointer, consumer_id",
            ),
            Some(Kind::PathParam(param)) if !params.contains(&param.as_str()) => self.error(
                format!("{path}.path_param"),
                format!("{param:?} is not captured by the route's path"),
            ),
            Some(Kind::Header(name)) => {
                self.check(|| format!("{path}.header"), check_header_name(name));
            }
            Some(Kind::JsonPointer(pointer))
                if !pointer.is_empty() && !pointer.starts_with('/') =>
            {
                self.error(
                    format!("{path}.json_pointer"),
                    format!("{pointer:?} is not a JSON pointer (\"/order/id\")"),
                );
            }
            Some(Kind::ConsumerId(false)) => {
                self.error(format!("{path}.consumer_id"), "must be true when set");
            }
            Some(_) => {}
        }
    }

    fn upstream(&mut self, base: &str, upstream: &pb::Upstream) {
        if upstream.targets.is_empty() {
            self.error(format!("{base}.targets"), "needs at least one target");
        }
        let mut schemes = HashSet::new();
        for (j, target) in upstream.targets.iter().enumerate() {
            self.check(
                || format!("{base}.targets[{j}].url"),
                check_target_url(&target.url),
            );
            if let Some((scheme, _)) = target.url.split_once("://") {
                schemes.insert(scheme.to_owned());
            }
            if target.weight > 10_000 {
                self.error(format!("{base}.targets[{j}].weight"), "must be 1 to 10000");
            }
        }
        if schemes.len() > 1 {
            self.error(format!("{base}.targets"), "mixes http and https targets");
        }
        if let Some(lb) = &upstream.load_balancing {
            use pb::load_balancing::{Algorithm, HashOn};
            match Algorithm::try_from(lb.algorithm) {
                Err(_) => self.error(
                    format!("{base}.load_balancing.algorithm"),
                    "unknown algorithm",
                ),
                Ok(Algorithm::ConsistentHash) => match &lb.hash_on {
                    None => self.error(
                        format!("{base}.load_balancing"),
                        "consistent_hash needs hash_header or hash_cookie",
                    ),
                    Some(HashOn::Header(name)) => self.check(
                        || format!("{base}.load_balancing.hash_header"),
                        check_header_name(name),
                    ),
                    Some(HashOn::Cookie(name)) if name.is_empty() => {
                        self.error(
                            format!("{base}.load_balancing.hash_cookie"),
                            "must not be empty",
                        );
                    }
                    Some(_) => {}
                },
                Ok(_) if lb.hash_on.is_some() => self.error(
                    format!("{base}.load_balancing"),
                    "hash_header and hash_cookie only apply to consistent_hash",
                ),
                Ok(_) => {}
            }
        }
        if let Some(t) = &upstream.timeouts
            && t.per_try_ms > 0
            && t.total_ms > 0
            && t.per_try_ms > t.total_ms
        {
            self.error(
                format!("{base}.timeouts.per_try"),
                "must not exceed timeouts.total",
            );
        }
        if let Some(retry) = &upstream.retry {
            if retry.attempts > 10 {
                self.error(format!("{base}.retry.attempts"), "must be 0 to 10");
            }
            for (j, status) in retry.on_statuses.iter().enumerate() {
                self.check(
                    || format!("{base}.retry.on_statuses[{j}]"),
                    check_status(*status),
                );
            }
            if retry.budget_percent > 100 {
                self.error(format!("{base}.retry.budget_percent"), "must be 1 to 100");
            }
        }
        if let Some(hc) = &upstream.health_check {
            if !hc.path.starts_with('/') {
                self.error(format!("{base}.health_check.path"), "must start with '/'");
            }
            for (j, status) in hc.expected_statuses.iter().enumerate() {
                self.check(
                    || format!("{base}.health_check.expected_statuses[{j}]"),
                    check_status(*status),
                );
            }
        }
        if let Some(od) = &upstream.outlier_detection
            && od.max_ejection_percent > 100
        {
            self.error(
                format!("{base}.outlier_detection.max_ejection_percent"),
                "must be 0 to 100",
            );
        }
        if let Some(tls) = &upstream.tls {
            if !tls.server_name.is_empty() {
                self.check(
                    || format!("{base}.tls.server_name"),
                    check_host(&tls.server_name),
                );
            }
            if !tls.ca_pem.is_empty() {
                self.check(
                    || format!("{base}.tls.ca_pem"),
                    crate::tls::parse_chain(&tls.ca_pem).map(drop),
                );
            }
        }
        if pb::UpstreamProtocol::try_from(upstream.protocol).is_err() {
            self.error(format!("{base}.protocol"), "unknown protocol");
        }
        if upstream.tls.is_some() && !schemes.contains("https") {
            self.error(format!("{base}.tls"), "is set but no target uses https");
        }
    }

    fn credentials(&mut self, config: &'a ConfigSet) {
        use pb::credential::Kind;
        let mut keys: HashMap<(&str, &str), String> = HashMap::new();
        let mut jwt_subjects: HashMap<(&str, String), String> = HashMap::new();
        let mut certificates: HashMap<(&str, String), String> = HashMap::new();
        for (i, credential) in config.credentials.iter().enumerate() {
            let base = self.enter(ResourceKind::Credential, i, credential.meta.as_ref());
            self.reference(
                || format!("{base}.consumer"),
                ResourceKind::Consumer,
                &credential.consumer_id,
            );
            match &credential.kind {
                None => self.error(base.clone(), "needs exactly one of api_key, jwt, mtls"),
                Some(Kind::ApiKey(key)) => {
                    if !is_sha256_hex(&key.key_sha256) {
                        self.error(
                            format!("{base}.api_key.key_sha256"),
                            "must be 64 lowercase hex digits",
                        );
                    } else if let Some(first) =
                        keys.insert((self.group, key.key_sha256.as_str()), base.clone())
                    {
                        self.error(
                            format!("{base}.api_key"),
                            format!("the same key is used by {first}"),
                        );
                    }
                }
                Some(Kind::Jwt(jwt)) => {
                    if jwt.issuer.is_empty() {
                        self.error(format!("{base}.jwt.issuer"), "must not be empty");
                    }
                    if jwt.subject.is_empty() {
                        self.error(format!("{base}.jwt.subject"), "must not be empty");
                    }
                    let identity = format!("{}\u{0}{}", jwt.issuer, jwt.subject);
                    if let Some(first) = jwt_subjects.insert((self.group, identity), base.clone()) {
                        self.error(
                            format!("{base}.jwt"),
                            format!("the same issuer and subject are used by {first}"),
                        );
                    }
                }
                Some(Kind::Mtls(mtls)) => {
                    match (mtls.subject.is_empty(), mtls.fingerprint_sha256.is_empty()) {
                        (true, true) | (false, false) => self.error(
                            format!("{base}.mtls"),
                            "needs exactly one of subject, fingerprint_sha256",
                        ),
                        (true, false) if !is_sha256_hex(&mtls.fingerprint_sha256) => self.error(
                            format!("{base}.mtls.fingerprint_sha256"),
                            "must be 64 lowercase hex digits",
                        ),
                        _ => {}
                    }
                    if mtls.subject.chars().any(char::is_control) {
                        self.error(
                            format!("{base}.mtls.subject"),
                            "must not hold control characters (a certificate's subject shows \
                             them escaped, as \\00)",
                        );
                    }
                    // One certificate, or one subject under one CA, names one consumer.
                    let identity = if mtls.fingerprint_sha256.is_empty() {
                        format!("subject\u{0}{}\u{0}{}", mtls.ca_sha256, mtls.subject)
                    } else {
                        format!("sha256\u{0}{}", mtls.fingerprint_sha256)
                    };
                    if let Some(first) = certificates.insert((self.group, identity), base.clone()) {
                        self.error(
                            format!("{base}.mtls"),
                            format!("the same certificate (or subject under the same CA) is used by {first}"),
                        );
                    }
                    if !mtls.ca_sha256.is_empty() {
                        if !mtls.fingerprint_sha256.is_empty() {
                            self.error(
                                format!("{base}.mtls.ca_sha256"),
                                "goes with subject only (a fingerprint names one certificate \
                                 already)",
                            );
                        } else if !is_sha256_hex(&mtls.ca_sha256) {
                            self.error(
                                format!("{base}.mtls.ca_sha256"),
                                "must be 64 lowercase hex digits",
                            );
                        }
                    }
                }
            }
        }
    }

    fn subscriptions(&mut self, config: &'a ConfigSet) {
        let mut pairs: HashMap<(&str, &str), String> = HashMap::new();
        for (i, subscription) in config.subscriptions.iter().enumerate() {
            let base = self.enter(ResourceKind::Subscription, i, subscription.meta.as_ref());
            self.reference(
                || format!("{base}.consumer"),
                ResourceKind::Consumer,
                &subscription.consumer_id,
            );
            self.reference(
                || format!("{base}.api"),
                ResourceKind::Api,
                &subscription.api_id,
            );
            self.reference(
                || format!("{base}.plan"),
                ResourceKind::Plan,
                &subscription.plan_id,
            );
            if pb::subscription::Status::try_from(subscription.status).is_err() {
                self.error(format!("{base}.status"), "unknown status");
            }
            if let Some(first) = pairs.insert(
                (
                    subscription.consumer_id.as_str(),
                    subscription.api_id.as_str(),
                ),
                base.clone(),
            ) {
                self.error(
                    base,
                    format!("the consumer is already subscribed to this API by {first}"),
                );
            }
        }
    }

    /// Also the bounds the data plane's limiter counts within (microsecond steps), so a
    /// limit accepted here always compiles on a node.
    fn rate_limit(&mut self, path: &str, limit: &pb::RateLimit) {
        use pb::rate_limit::Period;
        if limit.limit == 0 {
            self.error(format!("{path}.limit"), "must be at least 1");
        }
        let period_us: u64 = match Period::try_from(limit.period) {
            Ok(Period::Unspecified) | Err(_) => {
                self.error(format!("{path}.per"), "must be second, minute, hour or day");
                return;
            }
            Ok(Period::Second) => 1_000_000,
            Ok(Period::Minute) => 60_000_000,
            Ok(Period::Hour) => 3_600_000_000,
            Ok(Period::Day) => 86_400_000_000,
        };
        if limit.limit == 0 {
            return;
        }
        let spacing_us = period_us / limit.limit;
        if spacing_us == 0 {
            self.error(
                format!("{path}.limit"),
                format!("must be at most {period_us} per period (one request per microsecond)"),
            );
        } else if spacing_us
            .checked_mul(limit.burst)
            .is_none_or(|us| us > MAX_BURST_AHEAD_US)
        {
            self.error(
                format!("{path}.burst"),
                "lets requests run more than 50 years ahead (burst × period / limit)",
            );
        }
    }

    fn policy(&mut self, base: &str, policy: &pb::Policy) {
        use pb::policy::Kind;
        match &policy.kind {
            None => self.error(
                base.to_owned(),
                "needs exactly one of key_auth, jwt, mtls, rate_limit, cors, ip_restriction, request_size",
            ),
            Some(Kind::KeyAuth(key_auth)) => {
                for (j, header) in key_auth.headers.iter().enumerate() {
                    self.check(|| format!("{base}.key_auth.headers[{j}]"), check_header_name(header));
                }
            }
            Some(Kind::Jwt(jwt)) => {
                if jwt.issuers.is_empty() {
                    self.error(format!("{base}.jwt.issuers"), "needs at least one issuer");
                }
                for (j, issuer) in jwt.issuers.iter().enumerate() {
                    self.jwt_issuer(&format!("{base}.jwt.issuers[{j}]"), issuer);
                }
            }
            Some(Kind::Mtls(mtls)) => {
                if !mtls.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
                    self.error(format!("{base}.mtls.ca_pem"), "must hold PEM certificates");
                }
            }
            Some(Kind::RateLimit(rate_limit)) => {
                if rate_limit.limits.is_empty() {
                    self.error(format!("{base}.rate_limit.limits"), "needs at least one limit");
                }
                for (j, limit) in rate_limit.limits.iter().enumerate() {
                    self.rate_limit(&format!("{base}.rate_limit.limits[{j}]"), limit);
                }
                if pb::rate_limit_policy::Scope::try_from(rate_limit.scope).is_err() {
                    self.error(format!("{base}.rate_limit.scope"), "unknown scope");
                }
                if pb::rate_limit_policy::Mode::try_from(rate_limit.mode).is_err() {
                    self.error(format!("{base}.rate_limit.mode"), "unknown mode");
                }
            }
            Some(Kind::Cors(cors)) => {
                if cors.allow_origins.is_empty() {
                    self.error(format!("{base}.cors.allow_origins"), "needs at least one origin");
                }
                for (j, origin) in cors.allow_origins.iter().enumerate() {
                    let ok = origin == "*"
                        || url::Url::parse(origin).is_ok_and(|u| {
                            matches!(u.scheme(), "http" | "https")
                                && u.path() == "/"
                                && !origin.ends_with('/')
                        });
                    if !ok {
                        self.error(
                            format!("{base}.cors.allow_origins[{j}]"),
                            format!("{origin:?} is not an origin (\"https://app.example.com\") or \"*\""),
                        );
                    }
                }
                if cors.allow_credentials && cors.allow_origins.iter().any(|o| o == "*") {
                    self.error(
                        format!("{base}.cors.allow_credentials"),
                        "cannot be used with the origin \"*\"; list the origins",
                    );
                }
                for (j, method) in cors.allow_methods.iter().enumerate() {
                    self.check(|| format!("{base}.cors.allow_methods[{j}]"), check_method(method));
                }
            }
            Some(Kind::IpRestriction(ip)) => {
                if ip.allow.is_empty() && ip.deny.is_empty() {
                    self.error(format!("{base}.ip_restriction"), "needs allow or deny");
                }
                for (j, cidr) in ip.allow.iter().enumerate() {
                    self.check(|| format!("{base}.ip_restriction.allow[{j}]"), check_cidr(cidr));
                }
                for (j, cidr) in ip.deny.iter().enumerate() {
                    self.check(|| format!("{base}.ip_restriction.deny[{j}]"), check_cidr(cidr));
                }
            }
            Some(Kind::RequestSize(size)) => {
                if size.max_body_bytes == 0 {
                    self.error(format!("{base}.request_size.max_body_bytes"), "must be at least 1");
                }
            }
        }
    }

    fn jwt_issuer(&mut self, path: &str, issuer: &pb::JwtIssuer) {
        use pb::jwt_issuer::Keys;
        if issuer.issuer.is_empty() {
            self.error(format!("{path}.issuer"), "must not be empty");
        }
        if issuer.algorithms.is_empty() {
            self.error(
                format!("{path}.algorithms"),
                "must list the allowed algorithms",
            );
        }
        for (j, alg) in issuer.algorithms.iter().enumerate() {
            if !JWT_ALGORITHMS.contains(&alg.as_str()) {
                self.error(
                    format!("{path}.algorithms[{j}]"),
                    format!("{alg:?} is not one of {}", JWT_ALGORITHMS.join(", ")),
                );
            }
        }
        let hmac = issuer
            .algorithms
            .iter()
            .filter(|a| a.starts_with("HS"))
            .count();
        if hmac > 0 && hmac < issuer.algorithms.len() {
            self.error(
                format!("{path}.algorithms"),
                "mixes HMAC (HS*) with public-key algorithms, which allows key confusion; \
                 use separate issuers",
            );
        }
        for (claim, header) in &issuer.claim_headers {
            if claim.is_empty() {
                self.error(format!("{path}.claim_headers"), "a claim name is empty");
            }
            let at = || format!("{path}.claim_headers.{claim}");
            self.check(at, check_header_name(header));
            self.check(at, check_claim_header(header));
        }
        match &issuer.keys {
            None => self.error(path.to_owned(), "needs exactly one of jwks_url, jwks"),
            Some(Keys::JwksUrl(url)) => {
                if !url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
                    self.error(
                        format!("{path}.jwks_url"),
                        format!("{url:?} is not an http(s) URL"),
                    );
                }
                if hmac > 0 {
                    self.error(
                        format!("{path}.jwks_url"),
                        "HMAC (HS*) secrets are not taken from a URL; give them in an inline jwks",
                    );
                }
            }
            Some(Keys::JwksJson(json)) => {
                let keys = serde_json::from_str::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v.get("keys").map(serde_json::Value::is_array));
                if keys != Some(true) {
                    self.error(
                        format!("{path}.jwks"),
                        "must be a JWKS: an object with a \"keys\" array",
                    );
                }
            }
        }
    }

    /// Each certificate parses as PEM (a chain and one private key) and names server names no
    /// other certificate of its group names. Whether the key matches the certificate is
    /// checked by the data plane, which has the cryptography to check it.
    fn certificates(&mut self, config: &'a ConfigSet) {
        let mut owners: HashMap<(&str, &str), String> = HashMap::new();
        for (i, certificate) in config.certificates.iter().enumerate() {
            let base = self.enter(ResourceKind::Certificate, i, certificate.meta.as_ref());
            self.check(
                || format!("{base}.cert_pem"),
                crate::tls::parse_chain(&certificate.cert_pem).map(drop),
            );
            self.check(
                || format!("{base}.key_pem"),
                crate::tls::parse_private_key(&certificate.key_pem).map(drop),
            );
            if certificate.snis.is_empty() {
                self.error(
                    format!("{base}.snis"),
                    "needs at least one server name (\"*\" for the default certificate)",
                );
            }
            for (j, sni) in certificate.snis.iter().enumerate() {
                let path = format!("{base}.snis[{j}]");
                if sni != "*"
                    && let Err(reason) = check_host(sni)
                {
                    self.error(path, reason);
                } else if let Some(first) = owners.insert((self.group, sni.as_str()), base.clone())
                {
                    self.error(path, format!("{sni:?} is also served by {first}"));
                }
            }
        }
    }

    fn broker(&mut self, base: &str, broker: &pb::Broker) {
        use pb::broker::Kind;
        match &broker.kind {
            None => self.error(base.to_owned(), "needs exactly one of kafka, memory"),
            Some(Kind::Kafka(kafka)) => {
                if kafka.bootstrap_servers.is_empty() {
                    self.error(
                        format!("{base}.kafka.bootstrap_servers"),
                        "needs at least one host:port",
                    );
                }
                for (j, server) in kafka.bootstrap_servers.iter().enumerate() {
                    self.check(
                        || format!("{base}.kafka.bootstrap_servers[{j}]"),
                        check_host_port(server),
                    );
                }
                if kafka.properties.contains_key("bootstrap.servers")
                    || kafka.properties.contains_key("metadata.broker.list")
                {
                    self.error(
                        format!("{base}.kafka.properties"),
                        "set bootstrap.servers with bootstrap_servers",
                    );
                }
                for key in ["message.timeout.ms", "delivery.timeout.ms"] {
                    if let Some(value) = kafka.properties.get(key)
                        && !value.parse::<u64>().is_ok_and(|ms| ms > 0)
                    {
                        self.error(
                            format!("{base}.kafka.properties"),
                            format!(
                                "{key} is the delivery timeout: a number of milliseconds above \
                                 0 (librdkafka takes 0 as no limit), not {value:?}"
                            ),
                        );
                    }
                }
                // Sorted, so that errors come in a stable order.
                let mut keys: Vec<&String> = kafka.properties.keys().collect();
                keys.sort();
                for key in keys {
                    if let Some(other) = crate::kafka::alias_of(key)
                        && key.as_str() < other
                        && kafka.properties.contains_key(other)
                    {
                        self.error(
                            format!("{base}.kafka.properties"),
                            format!("{key} and {other} are one librdkafka setting: set only one"),
                        );
                    }
                }
            }
            Some(Kind::Memory(_)) => {}
        }
    }
}

/// What a consumer's policies may be, said after a refusal.
pub const CONSUMER_POLICY_KINDS: &str =
    "a consumer's policies may only be ip_restriction, or rate_limit with scope consumer";

/// A consumer's policies follow it on every API, before any route is known, so they may only
/// be those that need nothing but the caller: IP lists, and rate limits counted per consumer.
/// `None` when a consumer may hold `policy` (or it has no kind, refused on its own), else what
/// it is ("a jwt policy").
pub fn consumer_cannot_hold(policy: &pb::Policy) -> Option<&'static str> {
    use pb::policy::Kind;
    use pb::rate_limit_policy::Scope;
    match policy.kind.as_ref()? {
        Kind::IpRestriction(_) => None,
        Kind::RateLimit(r)
            if matches!(
                Scope::try_from(r.scope),
                Ok(Scope::Consumer | Scope::Unspecified)
            ) =>
        {
            None
        }
        Kind::RateLimit(_) => Some("a rate_limit policy not counted per consumer"),
        Kind::KeyAuth(_) => Some("a key_auth policy"),
        Kind::Jwt(_) => Some("a jwt policy"),
        Kind::Mtls(_) => Some("an mtls policy"),
        Kind::Cors(_) => Some("a cors policy"),
        Kind::RequestSize(_) => Some("a request_size policy"),
    }
}

/// Whether a Kafka broker's own properties set `acks` 0: it acknowledges nothing a durable
/// publish could wait for.
pub fn broker_sends_no_acks(broker: &pb::Broker) -> bool {
    match &broker.kind {
        Some(pb::broker::Kind::Kafka(kafka)) => ["acks", "request.required.acks"]
            .iter()
            // As librdkafka reads it: a number, so `00` and `+0` are 0 too.
            .any(|key| {
                kafka
                    .properties
                    .get(*key)
                    .is_some_and(|v| v.trim().parse::<i64>() == Ok(0))
            }),
        _ => false,
    }
}

/// The routes of `api` that wait for acknowledgements from broker `broker_id` with the
/// broker's own `acks`: durable publishes that set no `acks` of their own, and subscriptions
/// whose WebSocket clients publish. Such a broker must not set `acks` 0.
pub fn routes_taking_broker_acks<'a>(api: &'a pb::Api, broker_id: &str) -> Vec<&'a str> {
    use pb::route::Action;
    api.routes
        .iter()
        .filter(|route| match &route.action {
            Some(Action::Publish(publish)) => {
                publish.broker_id == broker_id && publish_takes_broker_acks(publish)
            }
            Some(Action::Subscribe(subscribe)) => {
                subscribe.broker_id == broker_id && subscribe.websocket_publish
            }
            _ => false,
        })
        .map(|route| route.name.as_str())
        .collect()
}

/// A durable publish with no `acks` of its own waits for the broker's.
fn publish_takes_broker_acks(publish: &pb::PublishAction) -> bool {
    publish.acks == pb::publish_action::Acks::Unspecified as i32
        && publish.delivery != pb::publish_action::Delivery::FireAndForget as i32
}

/// Calls `f` with the kind, list position and meta of every resource that has a meta, in
/// list order.
pub fn for_each_meta<'a>(
    config: &'a ConfigSet,
    mut f: impl FnMut(ResourceKind, usize, &'a pb::Meta),
) {
    macro_rules! each {
        ($list:ident, $kind:expr) => {
            for (i, resource) in config.$list.iter().enumerate() {
                if let Some(meta) = resource.meta.as_ref() {
                    f($kind, i, meta);
                }
            }
        };
    }
    each!(apis, ResourceKind::Api);
    each!(upstreams, ResourceKind::Upstream);
    each!(consumers, ResourceKind::Consumer);
    each!(credentials, ResourceKind::Credential);
    each!(plans, ResourceKind::Plan);
    each!(subscriptions, ResourceKind::Subscription);
    each!(policies, ResourceKind::Policy);
    each!(brokers, ResourceKind::Broker);
    each!(certificates, ResourceKind::Certificate);
}

fn resource_ref(kind: ResourceKind, id: &str) -> pb::ResourceRef {
    pb::ResourceRef {
        kind: kind as i32,
        id: id.to_owned(),
    }
}

/// The `{param}` names a path rewrite uses.
fn rewrite_params(rewrite: &str) -> Vec<&str> {
    let mut params = Vec::new();
    let mut rest = rewrite;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        params.push(&rest[start + 1..start + len]);
        rest = &rest[start + len + 1..];
    }
    params
}

fn check_regex(pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern).map(|_| ()).map_err(|e| {
        // The regex crate draws a multi-line caret diagram; its last line says why.
        let e = e.to_string();
        let why = e
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        format!("is not a valid regex: {why}")
    })
}

fn check_json_schema(text: &str) -> Result<(), String> {
    let schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not JSON: {e}"))?;
    jsonschema::validator_for(&schema)
        .map(|_| ())
        .map_err(|e| format!("is not a valid JSON Schema: {e}"))
}

/// Headers a token's claim may not be passed upstream as: the identity headers the gateway
/// sets from the consumer, under any spelling an upstream may read as theirs (`_` for `-`:
/// CGI-style servers read both as one), headers that carry the request's framing, routing
/// or credentials, and the forwarding headers the gateway sets.
fn check_claim_header(header: &str) -> Result<(), String> {
    const RESERVED: &[&str] = &[
        "host",
        "authorization",
        "proxy-authorization",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "cookie",
        // Set by the gateway from the connection: a claim must not pass for the client's
        // address or scheme.
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ];
    let name = header.to_ascii_lowercase().replace('_', "-");
    if IDENTITY_HEADERS.contains(&name.as_str()) {
        return Err(format!(
            "{header:?} is set by the gateway from the consumer; pick another header"
        ));
    }
    if RESERVED.contains(&name.as_str()) {
        return Err(format!(
            "{header:?} carries the request's framing, routing or credentials; pick another header"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::path_match::Kind;

    #[test]
    fn acks_zero_is_known_however_it_is_spelled() {
        let broker = |key: &str, value: &str| pb::Broker {
            meta: None,
            kind: Some(pb::broker::Kind::Kafka(pb::KafkaBroker {
                properties: [(key.to_owned(), value.to_owned())].into(),
                ..Default::default()
            })),
        };
        for zero in ["0", "00", "+0", " 0 "] {
            assert!(broker_sends_no_acks(&broker("acks", zero)), "{zero:?}");
        }
        assert!(broker_sends_no_acks(&broker("request.required.acks", "0")));
        for other in ["1", "-1", "all", "10"] {
            assert!(!broker_sends_no_acks(&broker("acks", other)), "{other:?}");
        }
    }

    #[test]
    fn claims_pass_upstream_in_headers_of_their_own() {
        assert!(check_claim_header("x-tenant").is_ok());
        for bad in [
            "x-consumer-id",
            "X-Consumer_Id",
            "x_subscription_id",
            "content-length",
            "Transfer-Encoding",
            "host",
            "authorization",
        ] {
            assert!(check_claim_header(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn paths() {
        assert!(check_path(Kind::Prefix, "/").is_ok());
        assert!(check_path(Kind::Prefix, "/users/").is_ok());
        assert!(check_path(Kind::Template, "/users/{id}/orders/{order_id}").is_ok());
        assert!(check_path(Kind::Template, "/files/{*rest}").is_ok());
        for bad in [
            "users", "/a//b", "/a/./b", "/a/../b", "/a%2Fb", "/a?x=1", "/a b",
        ] {
            assert!(
                check_path(Kind::Prefix, bad).is_err(),
                "{bad} should be refused"
            );
        }
        for bad in ["/{*rest}/x", "/{id}/{id}", "/a{id}", "/{}", "/{1x}"] {
            assert!(
                check_path(Kind::Template, bad).is_err(),
                "{bad} should be refused"
            );
        }
        assert!(
            check_path(Kind::Exact, "/{id}").is_err(),
            "braces need a template"
        );
        assert_eq!(template_params("/a/{id}/b/{*rest}"), ["id", "rest"]);
    }

    #[test]
    fn names_hosts_topics_cidrs() {
        assert!(check_name("orders-v2.internal_x").is_ok());
        for bad in ["", "Orders", "-x", "a b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(check_host("*.example.com").is_ok());
        assert!(check_host("api.example.com").is_ok());
        for bad in ["", "API.example.com", "a..b", "*.", "-a.com", "a_b.com"] {
            assert!(check_host(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(check_topic("orders.events_v1-x").is_ok());
        for bad in ["", ".", "..", "a b", "a/b"] {
            assert!(check_topic(bad).is_err(), "{bad:?} should be refused");
        }
        for good in [
            "10.0.0.0/8",
            "10.1.2.3",
            "::1",
            "2001:db8::/32",
            "0.0.0.0/0",
        ] {
            assert!(check_cidr(good).is_ok(), "{good} should be accepted");
        }
        for bad in ["10.0.0.0/33", "::/129", "10.0.0", "x/8", "10.0.0.0/"] {
            assert!(check_cidr(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ids_have_one_spelling() {
        assert!(check_id("6a1f27c4-9b3e-4d8a-a5f0-3c2e81d75b19").is_ok());
        for other in [
            "6A1F27C4-9B3E-4D8A-A5F0-3C2E81D75B19",
            "{6a1f27c4-9b3e-4d8a-a5f0-3c2e81d75b19}",
            "6a1f27c49b3e4d8aa5f03c2e81d75b19",
            "urn:uuid:6a1f27c4-9b3e-4d8a-a5f0-3c2e81d75b19",
        ] {
            let reason = check_id(other).unwrap_err();
            assert!(
                reason.contains("6a1f27c4-9b3e-4d8a-a5f0-3c2e81d75b19"),
                "{reason}"
            );
        }
        assert!(check_id("nope").is_err());
    }

    #[test]
    fn target_urls() {
        assert!(check_target_url("http://127.0.0.1:8080").is_ok());
        assert!(check_target_url("https://svc.internal").is_ok());
        for bad in [
            "127.0.0.1:80",
            "ftp://x",
            "http://u:p@x",
            "http://x/path",
            "http://x?q=1",
        ] {
            assert!(check_target_url(bad).is_err(), "{bad} should be refused");
        }
    }
}
