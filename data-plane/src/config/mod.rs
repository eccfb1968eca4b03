//! The data plane's configuration: one immutable [`CompiledConfig`], swapped atomically.
//!
//! A new configuration is loaded and fully validated off the request path, then published
//! with a single `store`; readers take a snapshot with `load` and keep it for the whole
//! request, so requests in flight finish on the config they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use sluice_proto::declarative::{self, Format};
use sluice_proto::{ConfigErrors, pb, snapshot};

/// Where the running configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A declarative file (standalone mode).
    File(PathBuf),
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
    pub resources: pb::ConfigSet,
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
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let resources = declarative::load(&text, Format::from_path(path)).map_err(|errors| {
            LoadError::Invalid {
                path: path.to_owned(),
                errors,
            }
        })?;
        Ok(Self {
            source: Source::File(path.to_owned()),
            content_hash: snapshot::content_hash(&snapshot::from_config(resources.clone())),
            loaded_at: SystemTime::now(),
            resources,
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
