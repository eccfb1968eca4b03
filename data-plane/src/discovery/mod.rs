//! The discovery client: the node's configuration from a control plane's stream instead of a
//! file. Each snapshot goes through the same validate-compile-swap path as a file, off the
//! request path; the node ACKs what it applied and NACKs (keeping its config) what it could
//! not, with an error per resource. Lost streams are reopened, trying every control-plane
//! address in turn, with exponential backoff and jitter.
//!
//! With a cache file, every applied snapshot is also written to disk ([`cache`]), and a node
//! starts from it before any control plane answers (static stability).
//!
//! A delta is applied to the resources the running config holds ([`Holdings`]), structurally
//! shared, and swapped in at once; the node then re-encodes what it holds and checks the
//! content hash the delta was sent with before it ACKs. A mismatch puts the previous config
//! back and NACKs, and the control plane answers with a snapshot.

pub mod cache;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sluice_proto::pb::{self, discovery_request::Kind as RequestKind, discovery_response::Payload};
use sluice_proto::{ConfigErrors, snapshot};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::config::{CompiledConfig, ConfigStore, Holdings, Source};
use crate::telemetry::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A stream with nothing from the control plane for this long is reopened.
const SILENCE: Duration = Duration::from_secs(15);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Largest response accepted: a snapshot of a million API keys is about 100 MB.
const MAX_RESPONSE_BYTES: usize = 512 * 1024 * 1024;

/// Who this node is, and where its control planes are.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `http://host:port` of each control plane's discovery listener.
    pub endpoints: Vec<String>,
    pub node: pb::Node,
    /// Where the last applied snapshot is kept, if anywhere.
    pub cache: Option<PathBuf>,
}

/// Applies the cached copy, if there is a usable one: the node is then ready before any
/// control plane answers. A damaged or unusable copy is logged and skipped.
pub async fn start_from_cache(
    settings: &ClientSettings,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
) {
    let Some(path) = &settings.cache else { return };
    let cached = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || cache::load(&path)).await
    };
    let response = match cached {
        Ok(Ok(Some(response))) => response,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the cached configuration cannot be used");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the cached configuration failed");
            return;
        }
    };
    let (version, hash) = (response.version, response.content_hash.clone());
    let Some(Payload::Snapshot(snapshot)) = response.payload else {
        return;
    };
    match apply_snapshot(snapshot, version, &hash, store, metrics).await {
        Ok(_) => {
            tracing::info!(version, path = %path.display(), "serving the cached configuration until a control plane answers")
        }
        Err(errors) => tracing::warn!(errors = %errors, "the cached configuration does not apply"),
    }
}

/// Streams configuration from the control planes until the process ends.
pub async fn run(settings: ClientSettings, store: Arc<ConfigStore>, metrics: Arc<Metrics>) {
    let cache = settings.cache.clone().map(cache::Writer::spawn);
    let mut failures: u32 = 0;
    loop {
        for endpoint in &settings.endpoints {
            match session(endpoint, &settings, &store, &metrics, cache.as_ref()).await {
                Ok(applied) => {
                    if applied {
                        failures = 0;
                    }
                    tracing::info!(control_plane = %endpoint, "discovery stream ended");
                }
                Err(e) => {
                    tracing::warn!(control_plane = %endpoint, error = %e, "discovery stream failed")
                }
            }
        }
        failures = failures.saturating_add(1);
        // Full jitter: a fleet that lost its control plane does not come back in step.
        let cap = BACKOFF_BASE
            .saturating_mul(2u32.saturating_pow(failures.min(16)))
            .min(BACKOFF_CAP);
        let pause = rand::thread_rng().gen_range(Duration::ZERO..=cap);
        tokio::time::sleep(pause).await;
    }
}

/// One stream to one control plane. Returns whether anything was applied on it.
async fn session(
    endpoint: &str,
    settings: &ClientSettings,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
    cache: Option<&cache::Writer>,
) -> anyhow::Result<bool> {
    let node = &settings.node;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = pb::discovery_client::DiscoveryClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let (tx, rx) = mpsc::channel(8);
    let running = store.current();
    let hello = pb::Hello {
        node: Some(node.clone()),
        current_version: running
            .as_ref()
            .and_then(|c| c.source.control_plane_version())
            .unwrap_or(0),
        current_hash: running
            .as_ref()
            .map(|c| c.content_hash.clone())
            .unwrap_or_default(),
    };
    tx.send(request(RequestKind::Hello(hello))).await?;
    let mut inbound = client
        .stream_config(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control_plane = %endpoint, "discovery stream open");
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut applied = false;
    loop {
        let message = tokio::select! {
            message = tokio::time::timeout(SILENCE, inbound.message()) => message,
            _ = heartbeat.tick() => {
                tx.send(request(RequestKind::Heartbeat(pb::Heartbeat { sent_at: None }))).await?;
                continue;
            }
        };
        let response = match message {
            Err(_) => anyhow::bail!("the control plane was silent for {SILENCE:?}"),
            Ok(Err(status)) => return Err(status.into()),
            Ok(Ok(None)) => return Ok(applied),
            Ok(Ok(Some(response))) => response,
        };
        let (nonce, version, hash) = (
            response.nonce.clone(),
            response.version,
            response.content_hash.clone(),
        );
        let outcome = match response.payload {
            Some(Payload::Snapshot(snapshot)) => {
                apply_snapshot(snapshot, version, &hash, store, metrics).await
            }
            Some(Payload::Delta(delta)) => apply_delta(delta, version, &hash, store, metrics).await,
            Some(Payload::Heartbeat(_)) | None => continue,
        };
        let reply = match outcome {
            Ok(holdings) => {
                applied = true;
                if let Some(cache) = cache {
                    cache.save(version, &hash, holdings);
                }
                RequestKind::Ack(pb::Ack {
                    nonce,
                    version,
                    content_hash: hash,
                })
            }
            Err(errors) => {
                tracing::warn!(version, errors = %errors, "configuration refused; the previous one keeps serving");
                metrics.config_rejections.inc();
                nack(nonce, store, &errors)
            }
        };
        tx.send(request(reply)).await?;
    }
}

/// Validates, compiles and swaps in a snapshot, off the request path. Returns what the new
/// config holds, for the on-disk copy.
async fn apply_snapshot(
    snapshot: pb::Snapshot,
    version: u64,
    expected_hash: &str,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
) -> Result<Holdings, ConfigErrors> {
    let started = std::time::Instant::now();
    let (store_, metrics_) = (store.clone(), metrics.clone());
    let expected_hash = expected_hash.to_owned();
    let compiled = tokio::task::spawn_blocking(move || {
        snapshot::validate(&snapshot)?;
        let previous = store_.current();
        let compiled = CompiledConfig::compile_snapshot(
            snapshot,
            Source::ControlPlane { version },
            previous.as_deref(),
            &metrics_,
        )?;
        if compiled.content_hash != expected_hash {
            return Err(hash_mismatch(
                "snapshot",
                &compiled.content_hash,
                &expected_hash,
            ));
        }
        Ok(compiled)
    })
    .await
    .map_err(|e| ConfigErrors::single("", format!("applying failed: {e}")))??;
    let holdings = compiled.holdings.clone();
    swap(compiled, version, "snapshot", started, store, metrics);
    Ok(holdings)
}

/// Applies a delta to the running config and swaps the result in, then checks that what the
/// node now holds hashes as the control plane said. The check re-encodes the whole config
/// (a tenth of a second for a million keys), so it runs after the swap rather than before:
/// the swap is as quick as the delta is small. On a mismatch the previous config is put back.
async fn apply_delta(
    delta: pb::Delta,
    version: u64,
    expected_hash: &str,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
) -> Result<Holdings, ConfigErrors> {
    let started = std::time::Instant::now();
    let running = store.current();
    let running_version = running
        .as_ref()
        .and_then(|c| c.source.control_plane_version());
    let (Some(previous), Some(running_version)) = (running, running_version) else {
        return Err(ConfigErrors::single(
            "base_version",
            "this node runs no configuration from a control plane to apply a delta to; send a snapshot",
        ));
    };
    if running_version != delta.base_version {
        return Err(ConfigErrors::single(
            "base_version",
            format!(
                "the delta applies to version {}, but this node runs version {running_version}; send a snapshot",
                delta.base_version
            ),
        ));
    }
    let (previous_, metrics_) = (previous.clone(), metrics.clone());
    let expected = expected_hash.to_owned();
    let compiled = tokio::task::spawn_blocking(move || {
        CompiledConfig::with_delta(&previous_, &delta, version, expected, &metrics_)
    })
    .await
    .map_err(|e| ConfigErrors::single("", format!("applying failed: {e}")))??;
    let holdings = compiled.holdings.clone();
    swap(compiled, version, "delta", started, store, metrics);
    let to_check = holdings.clone();
    let held_hash = tokio::task::spawn_blocking(move || to_check.content_hash())
        .await
        .map_err(|e| ConfigErrors::single("", format!("checking failed: {e}")))?;
    if held_hash != expected_hash {
        store.restore(previous);
        metrics
            .config_version
            .set(i64::try_from(running_version).unwrap_or(i64::MAX));
        return Err(hash_mismatch("delta", &held_hash, expected_hash));
    }
    Ok(holdings)
}

fn hash_mismatch(what: &str, held: &str, expected: &str) -> ConfigErrors {
    ConfigErrors::single(
        "content_hash",
        format!(
            "after the {what} this node holds a configuration hashing to {held}, not to the {expected} it was sent with"
        ),
    )
}

fn swap(
    compiled: CompiledConfig,
    version: u64,
    kind: &'static str,
    started: std::time::Instant,
    store: &ConfigStore,
    metrics: &Metrics,
) {
    tracing::info!(version, kind, content_hash = %compiled.content_hash, "configuration applied");
    store.apply(compiled);
    metrics.config_applied(kind, started.elapsed().as_secs_f64());
    metrics.config_swaps.inc();
    metrics
        .config_version
        .set(i64::try_from(version).unwrap_or(i64::MAX));
}

fn nack(nonce: String, store: &ConfigStore, errors: &ConfigErrors) -> RequestKind {
    let version = store
        .current()
        .and_then(|c| c.source.control_plane_version())
        .unwrap_or(0);
    RequestKind::Nack(pb::Nack {
        nonce,
        version,
        errors: errors
            .0
            .iter()
            .map(|e| pb::ResourceError {
                resource: e.resource.clone(),
                path: e.path.clone(),
                reason: e.reason.clone(),
            })
            .collect(),
        message: errors.to_string(),
    })
}

fn request(kind: RequestKind) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest { kind: Some(kind) }
}
