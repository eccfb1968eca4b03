//! The data plane's configuration: one immutable [`CompiledConfig`], swapped atomically.
//!
//! A new configuration is loaded, validated and compiled off the request path (router,
//! upstream runtimes, per-route metrics), then published with a single `store`; readers take
//! a snapshot with `load` and keep it for the whole request, so requests in flight finish on
//! the config they started with. Upstream runtimes (connection pools, counters) are carried
//! over from the previous config when their upstream did not change.

pub mod chunked;
pub mod hashed;
pub mod holdings;
pub mod keys;
pub mod watch;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use sluice_proto::declarative::{self, Format};
use sluice_proto::{ConfigErrors, pb, snapshot};

pub use holdings::{Holdings, SnapshotReader};

use crate::auth::jwks::JwksCache;
use crate::auth::standing::{OpenStreams, StreamAccess};
use crate::auth::{AccessPolicies, Identity};
use crate::events::Broker;
use crate::router::Router;
use crate::telemetry::Metrics;
use crate::tls::CertificateStore;
use crate::upstream::Upstream;

/// A resource's encoding without what does not change the runtime built from it (its version,
/// labels and description): a new configuration keeps a runtime (an upstream's pools, a
/// broker's producer) whose resource has the same fingerprint.
pub fn runtime_fingerprint<M: prost::Message + Clone>(
    resource: &M,
    meta: impl FnOnce(&mut M) -> Option<&mut pb::Meta>,
) -> Vec<u8> {
    let mut resource = resource.clone();
    if let Some(meta) = meta(&mut resource) {
        meta.resource_version = 0;
        meta.labels.clear();
        meta.description.clear();
    }
    resource.encode_to_vec()
}

/// Where the running configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A declarative file (standalone mode).
    File(PathBuf),
    /// A control plane's discovery stream: the config version it sent.
    ControlPlane { version: u64 },
}

impl Source {
    /// The control-plane version, for a config that came from one.
    pub fn control_plane_version(&self) -> Option<u64> {
        match self {
            Source::ControlPlane { version } => Some(*version),
            Source::File(_) => None,
        }
    }
}

/// How many resources of each kind a configuration has (for `/config`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub apis: usize,
    pub routes: usize,
    pub upstreams: usize,
    pub consumers: usize,
    pub credentials: usize,
    pub plans: usize,
    pub subscriptions: usize,
    pub policies: usize,
    pub brokers: usize,
    pub certificates: usize,
}

impl Counts {
    fn of(held: &Holdings, routes: usize) -> Self {
        use pb::ResourceKind as Kind;
        Counts {
            apis: held.count(Kind::Api),
            routes,
            upstreams: held.count(Kind::Upstream),
            consumers: held.count(Kind::Consumer),
            credentials: held.count(Kind::Credential),
            plans: held.count(Kind::Plan),
            subscriptions: held.count(Kind::Subscription),
            policies: held.count(Kind::Policy),
            brokers: held.count(Kind::Broker),
            certificates: held.count(Kind::Certificate),
        }
    }
}

/// A validated configuration, ready to serve.
#[derive(Debug)]
pub struct CompiledConfig {
    pub source: Source,
    /// Lowercase hex SHA-256 of the configuration as a discovery snapshot
    /// ([`sluice_proto::snapshot::content_hash`]): the hash the control plane gives the same
    /// configuration, whichever way it reached the node.
    pub content_hash: String,
    pub loaded_at: SystemTime,
    pub counts: Counts,
    pub router: Arc<Router>,
    /// By upstream id.
    pub upstreams: Arc<HashMap<Arc<str>, Arc<Upstream>>>,
    /// Broker runtimes (producers, subscriber feeds, the memory broker's events), by id.
    pub brokers: Arc<HashMap<Arc<str>, Arc<Broker>>>,
    /// What the TLS listener presents, by SNI.
    pub certificates: Arc<CertificateStore>,
    /// Policies and plans, compiled; routes hold what they need of them.
    pub access: Arc<AccessPolicies>,
    /// The resources it was compiled from, which the next delta applies to. Shares its
    /// structure with the previous config's.
    pub holdings: Holdings,
    /// Whether callers' standing may differ from the configuration before (false only for a
    /// delta that changed no API, consumer, credential or subscription): whether the open
    /// event streams are looked at again when it is applied.
    pub standing_changed: bool,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {errors}")]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

impl CompiledConfig {
    /// Reads a declarative file, whole.
    pub fn read_file(path: &Path) -> Result<String, LoadError> {
        std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads, validates and compiles a declarative file.
    pub fn from_file(
        path: &Path,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, LoadError> {
        Self::from_text(path, &Self::read_file(path)?, previous, metrics, jwks)
    }

    /// Validates and compiles `text`, a declarative file read from `path`.
    pub fn from_text(
        path: &Path,
        text: &str,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, LoadError> {
        let invalid = |errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        };
        let started = std::time::Instant::now();
        let resources = declarative::load(text, Format::from_path(path)).map_err(invalid)?;
        let compiled = Self::compile(
            resources,
            Source::File(path.to_owned()),
            previous,
            metrics,
            jwks,
        )
        .map_err(invalid)?;
        metrics.config_applied("file", started.elapsed().as_secs_f64());
        Ok(compiled)
    }

    /// Compiles validated resources. `previous` lends its upstream runtimes to unchanged
    /// upstreams.
    pub fn compile(
        resources: pb::ConfigSet,
        source: Source,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, ConfigErrors> {
        let holdings = Holdings::from_snapshot(&snapshot::from_config(resources))?;
        let content_hash = holdings.content_hash();
        Self::build(holdings, content_hash, source, previous, metrics, jwks)
    }

    /// Checks and compiles a discovery snapshot, read in by `reader`.
    pub fn compile_snapshot(
        reader: SnapshotReader,
        source: Source,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, ConfigErrors> {
        let holdings = reader.finish()?;
        let content_hash = holdings.content_hash();
        Self::build(holdings, content_hash, source, previous, metrics, jwks)
    }

    /// `previous` with a delta applied, as `version`. Only a change to an API, upstream,
    /// plan, policy, broker or certificate recompiles the router, upstreams and certificates;
    /// consumers, credentials and subscriptions change in place (structurally shared), so a
    /// small delta costs the same however large the config is. The content hash is the one the
    /// delta was sent with, unchecked: re-encoding a large config to check it takes longer
    /// than the apply, so the caller checks it after the swap ([`Holdings::content_hash`]).
    pub fn with_delta(
        previous: &CompiledConfig,
        delta: &pb::Delta,
        version: u64,
        content_hash: String,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, ConfigErrors> {
        let (holdings, changed) = previous.holdings.apply(delta)?;
        let source = Source::ControlPlane { version };
        if changed.structural {
            let mut config = Self::build(
                holdings,
                content_hash,
                source,
                Some(previous),
                metrics,
                jwks,
            )?;
            config.standing_changed = changed.standing;
            return Ok(config);
        }
        Ok(Self {
            source,
            content_hash,
            loaded_at: SystemTime::now(),
            counts: Counts::of(&holdings, previous.counts.routes),
            router: previous.router.clone(),
            upstreams: previous.upstreams.clone(),
            brokers: previous.brokers.clone(),
            certificates: previous.certificates.clone(),
            access: previous.access.clone(),
            holdings,
            standing_changed: changed.standing,
        })
    }

    /// Compiles the router, upstream runtimes and certificates of `holdings`.
    fn build(
        holdings: Holdings,
        content_hash: String,
        source: Source,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
        jwks: &JwksCache,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let mut upstreams = HashMap::new();
        for (i, upstream) in holdings.upstreams().enumerate() {
            let id = upstream.meta.as_ref().map_or("", |m| m.id.as_str());
            let old = previous.and_then(|p| p.upstreams.get(id));
            match Upstream::reuse(&upstream, old, metrics) {
                Ok(runtime) => {
                    upstreams.insert(runtime.id.clone(), runtime);
                }
                Err(reason) => errors.push(sluice_proto::FieldError {
                    path: format!("upstreams[{i}]"),
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Upstream as i32,
                        id: id.to_owned(),
                    }),
                }),
            }
        }
        let mut brokers = HashMap::new();
        for (i, broker) in holdings.brokers().enumerate() {
            let id = broker.meta.as_ref().map_or("", |m| m.id.as_str());
            let old = previous.and_then(|p| p.brokers.get(id));
            match Broker::reuse(&broker, old, metrics) {
                Ok(runtime) => {
                    brokers.insert(runtime.id.clone(), runtime);
                }
                Err(reason) => errors.push(sluice_proto::FieldError {
                    path: format!("brokers[{i}]"),
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Broker as i32,
                        id: id.to_owned(),
                    }),
                }),
            }
        }
        let certificates: Vec<pb::Certificate> = holdings.certificates().collect();
        let certificates = CertificateStore::compile(&certificates)
            .map_err(|(i, reason)| {
                errors.push(sluice_proto::FieldError {
                    path: format!("certificates[{i}]"),
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Certificate as i32,
                        id: certificates[i]
                            .meta
                            .as_ref()
                            .map_or(String::new(), |m| m.id.clone()),
                    }),
                })
            })
            .unwrap_or_default();
        let access = match AccessPolicies::compile(&holdings, jwks) {
            Ok(access) => access,
            Err(ConfigErrors(more)) => {
                errors.extend(more);
                AccessPolicies::default()
            }
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let apis: Vec<pb::Api> = holdings.apis().collect();
        let router = Router::compile(
            &apis,
            &|id| upstreams.get(id).cloned(),
            &|id| brokers.get(id).cloned(),
            &access,
            metrics,
        )
        .map_err(|e| ConfigErrors::single("apis", e.to_string()))?;
        let routes = apis.iter().map(|a| a.routes.len()).sum();
        Ok(Self {
            source,
            content_hash,
            loaded_at: SystemTime::now(),
            counts: Counts::of(&holdings, routes),
            router: Arc::new(router),
            upstreams: Arc::new(upstreams),
            brokers: Arc::new(brokers),
            certificates: Arc::new(certificates),
            access: Arc::new(access),
            holdings,
            standing_changed: true,
        })
    }
}

/// The one place the running configuration lives. Empty until a config is applied; the node
/// is not ready before then. It also keeps what every configuration is compiled against and
/// that must outlive each one: the JWKS sources.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwapOption<CompiledConfig>,
    pub jwks: JwksCache,
    /// Where the running upstreams' state is shown.
    metrics: Arc<Metrics>,
    /// The open event streams of identified callers, whose standing each configuration
    /// applied is looked at in.
    streams: Arc<OpenStreams>,
}

impl ConfigStore {
    pub fn new(jwks: JwksCache, metrics: Arc<Metrics>) -> Self {
        ConfigStore {
            current: ArcSwapOption::empty(),
            jwks,
            metrics,
            streams: Arc::default(),
        }
    }

    /// After a swap from `before` to `now`: the running upstreams' state on their gauges,
    /// and the gauges of upstreams and targets no longer configured gone. With
    /// `forget_series`, the series of routes and upstreams `now` lacks go too; not when `now`
    /// is a configuration put back ([`ConfigStore::restore`]), whose runtimes still hold their
    /// series and would count into ones no longer exported.
    fn show(&self, before: Option<&CompiledConfig>, now: &CompiledConfig, forget_series: bool) {
        let loaded_at = now
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.metrics.config_loaded_at.set(loaded_at);
        if let Some(before) = before
            && forget_series
            && !Arc::ptr_eq(&before.router, &now.router)
        {
            self.forget_routes(&before.router, &now.router);
        }
        if !before.is_some_and(|b| Arc::ptr_eq(&b.certificates, &now.certificates)) {
            self.show_certificates(before, now);
        }
        // The same runtimes (a delta of consumers, say): already shown.
        if before.is_some_and(|b| Arc::ptr_eq(&b.upstreams, &now.upstreams)) {
            return;
        }
        for upstream in now.upstreams.values() {
            upstream.publish_state(&self.metrics);
        }
        let Some(before) = before else {
            return;
        };
        let by_name: HashMap<&str, &Upstream> =
            now.upstreams.values().map(|u| (&*u.name, &**u)).collect();
        for old in before.upstreams.values() {
            let kept = by_name.get(&*old.name);
            match kept {
                None if forget_series => self.metrics.forget_upstream_series(&old.name),
                None => self.metrics.forget_upstream(&old.name),
                Some(u) if u.circuit.is_none() => self.metrics.forget_upstream(&old.name),
                Some(_) => {}
            }
            for target in &old.targets {
                if !kept.is_some_and(|u| u.targets.iter().any(|t| t.url == target.url)) {
                    self.metrics.forget_target(&old.name, &target.url);
                }
            }
        }
    }

    /// When each certificate `now` serves expires, and no expiry of one it no longer serves.
    fn show_certificates(&self, before: Option<&CompiledConfig>, now: &CompiledConfig) {
        for (group, name, not_after) in &now.certificates.expiries {
            self.metrics.certificate_expires(group, name, *not_after);
        }
        let kept: HashSet<(&str, &str)> = now
            .certificates
            .expiries
            .iter()
            .map(|(group, name, _)| (group.as_str(), name.as_str()))
            .collect();
        for (group, name, _) in before.map_or(&[][..], |b| &b.certificates.expiries[..]) {
            if !kept.contains(&(group.as_str(), name.as_str())) {
                self.metrics.forget_certificate(group, name);
            }
        }
    }

    /// Drops the series of the routes `before` had and `now` has not: routes renamed or
    /// removed would otherwise stay in every scrape until the node restarts.
    fn forget_routes(&self, before: &Router, now: &Router) {
        let kept: HashSet<(&str, &str)> = now
            .routes()
            .map(|route| (&*route.api_name, &*route.name))
            .collect();
        for route in before.routes() {
            if !kept.contains(&(&*route.api_name, &*route.name)) {
                self.metrics.forget_route(&route.api_name, &route.name);
            }
        }
    }

    /// The configuration to serve a request with, if any is applied.
    pub fn current(&self) -> Option<Arc<CompiledConfig>> {
        self.current.load_full()
    }

    /// Publishes a fully built configuration.
    pub fn apply(&self, config: CompiledConfig) {
        let config = self.apply_unconfirmed(config);
        self.confirm(&config);
    }

    /// Publishes a configuration whose content is yet to be checked (a delta, checked
    /// against its content hash after the swap): [`ConfigStore::confirm`] once it is,
    /// [`ConfigStore::restore`] the one before if not. The streams already open are not
    /// looked at in it until then, so that one that does not stay ends none of them. (A
    /// stream opened meanwhile is admitted by it, as every request meanwhile is.)
    pub fn apply_unconfirmed(&self, config: CompiledConfig) -> Arc<CompiledConfig> {
        let config = Arc::new(config);
        let before = self.current.swap(Some(config.clone()));
        self.show(before.as_deref(), &config, true);
        config
    }

    /// Looks at the open event streams in `config`, applied and now checked, when it may
    /// have changed their callers' standing.
    pub fn confirm(&self, config: &CompiledConfig) {
        if config.standing_changed {
            self.streams.recheck(&config.holdings);
        }
    }

    /// Puts back a configuration that was replaced (a delta that proved wrong).
    pub fn restore(&self, config: Arc<CompiledConfig>) {
        let before = self.current.swap(Some(config.clone()));
        self.show(before.as_deref(), &config, false);
        self.streams.recheck(&config.holdings);
    }

    /// Watches an event stream of `identity`'s caller: it ends when the caller's access
    /// expires, or when a configuration applied no longer admits them.
    pub fn watch_stream(&self, identity: &Identity) -> Box<StreamAccess> {
        Box::new(self.streams.watch(identity, || self.current()))
    }
}
