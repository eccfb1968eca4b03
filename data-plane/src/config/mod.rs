//! The data plane's configuration: one immutable [`CompiledConfig`], swapped atomically.
//!
//! A new configuration is loaded, validated and compiled off the request path (router,
//! upstream runtimes, per-route metrics), then published with a single `store`; readers take
//! a snapshot with `load` and keep it for the whole request, so requests in flight finish on
//! the config they started with. Upstream runtimes (connection pools, counters) are carried
//! over from the previous config when their upstream did not change.

pub mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use sluice_proto::declarative::{self, Format};
use sluice_proto::{ConfigErrors, pb, snapshot};

use crate::router::Router;
use crate::telemetry::Metrics;
use crate::tls::CertificateStore;
use crate::upstream::Upstream;

/// Where the running configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A declarative file (standalone mode).
    File(PathBuf),
    /// A control plane's discovery stream: the config version it sent.
    ControlPlane { version: u64 },
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
    fn of(r: &pb::ConfigSet) -> Self {
        Counts {
            apis: r.apis.len(),
            routes: r.apis.iter().map(|a| a.routes.len()).sum(),
            upstreams: r.upstreams.len(),
            consumers: r.consumers.len(),
            credentials: r.credentials.len(),
            plans: r.plans.len(),
            subscriptions: r.subscriptions.len(),
            policies: r.policies.len(),
            brokers: r.brokers.len(),
            certificates: r.certificates.len(),
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
    pub router: Router,
    /// By upstream id.
    pub upstreams: HashMap<Arc<str>, Arc<Upstream>>,
    /// What the TLS listener presents, by SNI.
    pub certificates: CertificateStore,
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
    /// Reads, validates and compiles a declarative file.
    pub fn from_file(
        path: &Path,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
    ) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        };
        let resources = declarative::load(&text, Format::from_path(path)).map_err(invalid)?;
        Self::compile(resources, Source::File(path.to_owned()), previous, metrics).map_err(invalid)
    }

    /// Compiles validated resources. `previous` lends its upstream runtimes to unchanged
    /// upstreams.
    pub fn compile(
        resources: pb::ConfigSet,
        source: Source,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
    ) -> Result<Self, ConfigErrors> {
        Self::compile_snapshot(snapshot::from_config(resources), source, previous, metrics)
    }

    /// Compiles a validated discovery snapshot (its packed API keys are for the access
    /// issue's authentication, not used yet).
    pub fn compile_snapshot(
        snapshot: pb::Snapshot,
        source: Source,
        previous: Option<&CompiledConfig>,
        metrics: &Metrics,
    ) -> Result<Self, ConfigErrors> {
        let content_hash = snapshot::content_hash(&snapshot);
        let packed_keys = snapshot.api_keys.len();
        let resources = snapshot.resources.unwrap_or_default();
        let mut errors = Vec::new();
        let mut upstreams = HashMap::new();
        for (i, upstream) in resources.upstreams.iter().enumerate() {
            let id = upstream.meta.as_ref().map_or("", |m| m.id.as_str());
            let old = previous.and_then(|p| p.upstreams.get(id));
            match Upstream::reuse(upstream, old, metrics) {
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
        let certificates = CertificateStore::compile(&resources.certificates)
            .map_err(|(i, reason)| {
                errors.push(sluice_proto::FieldError {
                    path: format!("certificates[{i}]"),
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Certificate as i32,
                        id: resources.certificates[i]
                            .meta
                            .as_ref()
                            .map_or(String::new(), |m| m.id.clone()),
                    }),
                })
            })
            .unwrap_or_default();
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let router = Router::compile(&resources.apis, &|id| upstreams.get(id).cloned(), metrics)
            .map_err(|e| ConfigErrors::single("apis", e.to_string()))?;
        let mut counts = Counts::of(&resources);
        counts.credentials += packed_keys;
        Ok(Self {
            source,
            content_hash,
            loaded_at: SystemTime::now(),
            counts,
            router,
            upstreams,
            certificates,
        })
    }
}

/// The one place the running configuration lives. Empty until a config is applied; the node
/// is not ready before then.
#[derive(Debug, Default)]
pub struct ConfigStore {
    current: ArcSwapOption<CompiledConfig>,
}

impl ConfigStore {
    /// The configuration to serve a request with, if any is applied.
    pub fn current(&self) -> Option<Arc<CompiledConfig>> {
        self.current.load_full()
    }

    /// Publishes a fully built configuration.
    pub fn apply(&self, config: CompiledConfig) {
        self.current.store(Some(Arc::new(config)));
    }
}
