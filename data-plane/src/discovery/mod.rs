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
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use sluice_proto::ConfigErrors;
use sluice_proto::pb::{self, discovery_request::Kind as RequestKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::config::{CompiledConfig, ConfigStore, Holdings, SnapshotReader, Source, worker};
use crate::telemetry::Metrics;
use wire::Payload;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A stream with nothing from the control plane for this long is reopened.
const SILENCE: Duration = Duration::from_secs(15);
/// How long the stream may take to open once the TCP connection is made.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
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
        tokio::task::spawn_blocking(move || {
            cache::remove_leftovers(&path);
            cache::load(&path)
        })
        .await
    };
    let cached = match cached {
        Ok(Ok(Some(cached))) => cached,
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
    let version = cached.version;
    match apply_whole(
        cached.snapshot,
        version,
        &cached.content_hash,
        store,
        metrics,
    )
    .await
    {
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
            let mut answered = false;
            let outcome = session(
                endpoint,
                &settings,
                &store,
                &metrics,
                cache.as_ref(),
                &mut answered,
            )
            .await;
            metrics.control_plane_connected.set(0);
            match outcome {
                Ok(()) => tracing::info!(control_plane = %endpoint, "discovery stream ended"),
                Err(e) => {
                    tracing::warn!(control_plane = %endpoint, error = %e, "discovery stream failed")
                }
            }
            // A control plane that answered was healthy, whether or not it had anything new
            // to send (a node reconnecting at the current version gets only heartbeats): the
            // backoff starts over, so a rolling restart of the replicas never leaves a node
            // waiting out a long pause. Only streams that fail before any answer add up.
            if answered {
                failures = 0;
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

/// One stream to one control plane, until it ends. `answered` is set once the control plane
/// has sent anything (a heartbeat, a configuration).
async fn session(
    endpoint: &str,
    settings: &ClientSettings,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
    cache: Option<&cache::Writer>,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let node = &settings.node;
    let endpoint_settings = Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
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
    // The TCP connect has its own timeout; the TLS and HTTP/2 handshakes and the stream's
    // response headers have this one, so a balancer that accepts and then stalls does not
    // keep the node from trying the next endpoint.
    let opening = async {
        let channel = endpoint_settings.connect().await?;
        anyhow::Ok(wire::stream_config(channel, ReceiverStream::new(rx), MAX_RESPONSE_BYTES).await?)
    };
    let mut inbound = tokio::time::timeout(OPEN_TIMEOUT, opening)
        .await
        .map_err(|_| anyhow::anyhow!("the stream did not open within {OPEN_TIMEOUT:?}"))??;
    tracing::info!(control_plane = %endpoint, "discovery stream open");
    metrics.control_plane_connected.set(1);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    // Reset by every message: one timer for the whole silence, which the heartbeats sent
    // meanwhile do not restart.
    let silence = tokio::time::sleep(SILENCE);
    tokio::pin!(silence);
    let mut parts = Parts::default();
    loop {
        // Biased: a message already waiting (one that came while the last was applied)
        // counts before the silence does; the heartbeat, due once in a while, goes first so a
        // long stream of snapshot parts cannot hold it back.
        let message = tokio::select! {
            biased;
            _ = heartbeat.tick() => {
                tx.send(request(RequestKind::Heartbeat(pb::Heartbeat { sent_at: None }))).await?;
                continue;
            }
            message = inbound.message() => message,
            () = &mut silence => anyhow::bail!("the control plane was silent for {SILENCE:?}"),
        };
        let response = match message {
            Err(status) => return Err(status.into()),
            Ok(None) => return Ok(()),
            Ok(Some(response)) => response,
        };
        silence
            .as_mut()
            .reset(tokio::time::Instant::now() + SILENCE);
        *answered = true;
        let (nonce, version, hash) = (
            response.nonce.clone(),
            response.version,
            response.content_hash.clone(),
        );
        let outcome = match response.payload {
            Some(Payload::SnapshotPart(part)) => {
                match parts.take_in(part, &nonce, version, &hash).await {
                    Ok(Some((reader, started))) => {
                        apply_snapshot(reader, version, &hash, started, store, metrics).await
                    }
                    Ok(None) => continue,
                    Err(errors) => Err(errors),
                }
            }
            Some(Payload::Snapshot(snapshot)) => {
                parts.abandon();
                apply_whole(snapshot, version, &hash, store, metrics).await
            }
            Some(Payload::Delta(delta)) => {
                parts.abandon();
                apply_delta(*delta, version, &hash, store, metrics).await
            }
            Some(Payload::Heartbeat(_)) | None => continue,
        };
        let reply = match outcome {
            Ok(holdings) => {
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

/// Reads in (on the configuration thread) and applies a snapshot whole in one message: the
/// on-disk copy.
async fn apply_whole(
    snapshot: Bytes,
    version: u64,
    expected_hash: &str,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
) -> Result<Holdings, ConfigErrors> {
    let started = std::time::Instant::now();
    let reader = worker::run(move || {
        let mut reader = SnapshotReader::default();
        reader.feed(&snapshot)?;
        Ok(reader)
    })
    .await
    .map_err(|e| ConfigErrors::single("", format!("reading the snapshot failed: {e}")))??;
    apply_snapshot(reader, version, expected_hash, started, store, metrics).await
}

/// The snapshot whose parts are arriving, taken in part by part.
#[derive(Default)]
struct Parts {
    reading: Option<Reading>,
    /// A snapshot whose parts are refused: the rest of its parts are let go by quietly.
    refused_nonce: Option<String>,
}

struct Reading {
    nonce: String,
    version: u64,
    content_hash: String,
    total: u64,
    next_offset: u64,
    reader: SnapshotReader,
    started: std::time::Instant,
}

impl Parts {
    /// Takes in one part; returns the reader once the last is in. Reading runs on the
    /// configuration thread: taking in the resources checks all of them.
    async fn take_in(
        &mut self,
        part: pb::SnapshotPart,
        nonce: &str,
        version: u64,
        content_hash: &str,
    ) -> Result<Option<(SnapshotReader, std::time::Instant)>, ConfigErrors> {
        if self.refused_nonce.as_deref() == Some(nonce) {
            return Ok(None);
        }
        let follows = |r: &Reading| {
            r.nonce == nonce
                && r.version == version
                && r.content_hash == content_hash
                && r.total == part.total_bytes
                && r.next_offset == part.offset
        };
        let mut reading = match self.reading.take() {
            Some(reading) if follows(&reading) => reading,
            _ if part.offset == 0 => Reading {
                nonce: nonce.to_owned(),
                version,
                content_hash: content_hash.to_owned(),
                total: part.total_bytes,
                next_offset: 0,
                reader: SnapshotReader::default(),
                started: std::time::Instant::now(),
            },
            _ => {
                return Err(self.refuse(
                    nonce,
                    ConfigErrors::single(
                        "snapshot_part.offset",
                        format!(
                            "a part at offset {} of a snapshot whose earlier parts did not come",
                            part.offset
                        ),
                    ),
                ));
            }
        };
        let end = part.offset + part.data.len() as u64;
        if end > part.total_bytes {
            return Err(self.refuse(
                nonce,
                ConfigErrors::single(
                    "snapshot_part.data",
                    format!(
                        "the part ends at byte {end}, past the snapshot's {} bytes",
                        part.total_bytes
                    ),
                ),
            ));
        }
        let mut reader = reading.reader;
        let (reader, fed) = worker::run(move || {
            let fed = reader.feed(&part.data);
            (reader, fed)
        })
        .await
        .map_err(|e| ConfigErrors::single("", format!("reading the snapshot failed: {e}")))?;
        if let Err(errors) = fed {
            return Err(self.refuse(nonce, errors));
        }
        reading.reader = reader;
        reading.next_offset = end;
        if end == reading.total {
            return Ok(Some((reading.reader, reading.started)));
        }
        self.reading = Some(reading);
        Ok(None)
    }

    /// Refuses the snapshot of `nonce`: the rest of its parts are let go.
    fn refuse(&mut self, nonce: &str, errors: ConfigErrors) -> ConfigErrors {
        self.refused_nonce = Some(nonce.to_owned());
        errors
    }

    /// Another response came: a snapshot not yet whole is not coming.
    fn abandon(&mut self) {
        self.reading = None;
    }
}

/// Validates, compiles and swaps in a snapshot, off the request path. Returns what the new
/// config holds, for the on-disk copy.
async fn apply_snapshot(
    reader: SnapshotReader,
    version: u64,
    expected_hash: &str,
    started: std::time::Instant,
    store: &Arc<ConfigStore>,
    metrics: &Arc<Metrics>,
) -> Result<Holdings, ConfigErrors> {
    let (store_, metrics_) = (store.clone(), metrics.clone());
    let expected_hash = expected_hash.to_owned();
    let compiled = worker::run(move || {
        let previous = store_.current();
        let compiled = CompiledConfig::compile_snapshot(
            reader,
            Source::ControlPlane { version },
            previous.as_deref(),
            &metrics_,
            &store_.jwks,
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
    let _ = swap(compiled, version, "snapshot", started, store, metrics);
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
    let (previous_, metrics_, store_) = (previous.clone(), metrics.clone(), store.clone());
    let expected = expected_hash.to_owned();
    let compiled = worker::run(move || {
        CompiledConfig::with_delta(
            &previous_,
            &delta,
            version,
            expected,
            &metrics_,
            &store_.jwks,
        )
    })
    .await
    .map_err(|e| ConfigErrors::single("", format!("applying failed: {e}")))??;
    let holdings = compiled.holdings.clone();
    let applied = swap(compiled, version, "delta", started, store, metrics);
    let to_check = holdings.clone();
    let checked = match worker::run(move || to_check.content_hash()).await {
        Ok(held_hash) if held_hash == expected_hash => {
            store.confirm(&applied);
            return Ok(holdings);
        }
        Ok(held_hash) => hash_mismatch("delta", &held_hash, expected_hash),
        Err(e) => ConfigErrors::single("", format!("checking failed: {e}")),
    };
    // Served since the swap but not what the control plane has: back to the version the node
    // reports, whatever kept the check from passing. (The swap above was logged and counted
    // as applied; this says it did not stay, and the refusal is counted with the NACK.)
    tracing::warn!(
        version,
        back_to = running_version,
        error = %checked,
        "configuration delta rolled back: it did not hold what the control plane sent"
    );
    store.restore(previous);
    metrics
        .config_version
        .set(i64::try_from(running_version).unwrap_or(i64::MAX));
    Err(checked)
}

fn hash_mismatch(what: &str, held: &str, expected: &str) -> ConfigErrors {
    ConfigErrors::single(
        "content_hash",
        format!(
            "after the {what} this node holds a configuration hashing to {held}, not to the {expected} it was sent with"
        ),
    )
}

/// Swaps `compiled` in. A snapshot was checked before it was compiled; a delta is checked
/// once swapped in, and confirmed ([`ConfigStore::confirm`]) with what this returns.
fn swap(
    compiled: CompiledConfig,
    version: u64,
    kind: &'static str,
    started: std::time::Instant,
    store: &ConfigStore,
    metrics: &Metrics,
) -> Arc<CompiledConfig> {
    tracing::info!(version, kind, content_hash = %compiled.content_hash, "configuration applied");
    let applied = store.apply_unconfirmed(compiled);
    if kind != "delta" {
        store.confirm(&applied);
    }
    metrics.config_applied(kind, started.elapsed().as_secs_f64());
    metrics.config_swaps.inc();
    metrics
        .config_version
        .set(i64::try_from(version).unwrap_or(i64::MAX));
    applied
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

#[cfg(test)]
mod tests {
    use prost::Message;
    use sluice_proto::declarative::{self, Format};
    use sluice_proto::snapshot;

    use super::*;

    fn parts_of(encoded: &Bytes, size: usize) -> Vec<pb::SnapshotPart> {
        (0..encoded.len())
            .step_by(size)
            .map(|offset| pb::SnapshotPart {
                offset: offset as u64,
                total_bytes: encoded.len() as u64,
                data: encoded.slice(offset..(offset + size).min(encoded.len())),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_snapshot_in_parts_is_read_once_all_are_in_and_a_gap_is_refused() {
        let config = declarative::load(
            r#"
format_version: 1
upstreams:
  - name: backend
    targets: [{ url: "http://127.0.0.1:9" }]
consumers:
  - name: acme
    credentials:
      - name: main
        api_key: { key_sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" }
"#,
            Format::Yaml,
        )
        .unwrap();
        let snapshot = snapshot::from_config(config);
        let encoded = Bytes::from(snapshot.encode_to_vec());
        let hash = snapshot::content_hash(&snapshot);

        let mut parts = Parts::default();
        let all = parts_of(&encoded, 50);
        assert!(all.len() > 2, "the snapshot is cut into several parts");
        let last = all.len() - 1;
        for (i, part) in all.into_iter().enumerate() {
            let read = parts.take_in(part, "1", 4, &hash).await.unwrap();
            match read {
                Some((reader, _)) => {
                    assert_eq!(i, last, "read only once the last part is in");
                    let held = reader.finish().unwrap();
                    assert_eq!(held.content_hash(), hash);
                }
                None => assert!(i < last),
            }
        }

        // A part that does not follow the one before is refused, and the rest of that
        // snapshot's parts are let go without another refusal.
        let mut parts = Parts::default();
        let mut all = parts_of(&encoded, 50).into_iter();
        assert!(
            parts
                .take_in(all.next().unwrap(), "2", 4, &hash)
                .await
                .unwrap()
                .is_none()
        );
        let _skipped = all.next();
        let error = parts
            .take_in(all.next().unwrap(), "2", 4, &hash)
            .await
            .unwrap_err();
        assert_eq!(error.0[0].path, "snapshot_part.offset", "{error}");
        for part in all {
            assert!(parts.take_in(part, "2", 4, &hash).await.unwrap().is_none());
        }
        // The next snapshot starts afresh.
        for part in parts_of(&encoded, encoded.len()) {
            let (reader, _) = parts.take_in(part, "3", 5, &hash).await.unwrap().unwrap();
            assert_eq!(reader.finish().unwrap().content_hash(), hash);
        }
    }
}
