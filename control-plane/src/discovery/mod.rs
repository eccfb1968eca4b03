//! The discovery server: data planes open one stream each, say who they are (`Hello`), and
//! receive their group's configuration, then every new one as versions commit.
//!
//! A node is sent a delta from the version it runs when that version is still in the change
//! log and the delta is smaller than the snapshot, else the whole snapshot; a NACKed delta is
//! answered with the snapshot. Pushes go out when the group's content hash changes, with
//! commits close together coalesced into one push; ACK/NACK recorded; heartbeats both ways.
//! Commits are learnt from Postgres `LISTEN` on the channel the commit path notifies, so a commit on any replica reaches the nodes of every replica, with a
//! periodic re-check as the catch-up for a missed notification or a lost connection. Each
//! node's status is kept in Postgres ([`status`]), so any replica can report it.

pub mod status;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use prost::Message;
use sluice_proto::pb::{self, discovery_request::Kind as RequestKind, discovery_response::Payload};
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use std::sync::Arc;

use std::collections::HashMap;

use crate::metrics::Metrics;
use crate::registry::{NOTIFY_CHANNEL, Registry};
use crate::snapshot::GroupSnapshot;

/// The least time between two pushes to one node (commits in between go out together).
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(50);
/// Interval of the server's heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A stream with nothing from its node for this long is closed.
const NODE_SILENCE: Duration = Duration::from_secs(15);
/// How often the head is re-checked without a notification (a missed one, or a lost
/// connection to Postgres).
const CATCH_UP: Duration = Duration::from_secs(5);
/// Responses queued per stream before the session waits for the node to read.
const OUTBOUND: usize = 4;

/// The Discovery gRPC service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    registry: Registry,
    /// Bumped on every commit this replica hears of.
    commits: watch::Receiver<u64>,
    coalesce: Duration,
    /// This replica's name in node status.
    replica: String,
    metrics: Arc<Metrics>,
    snapshots: Arc<SnapshotCache>,
    /// Turns true when this replica is stopping (see [`DiscoveryService::with_shutdown`]).
    stopping: Option<watch::Receiver<bool>>,
}

impl DiscoveryService {
    pub fn new(
        registry: Registry,
        commits: watch::Receiver<u64>,
        coalesce: Duration,
        replica: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        DiscoveryService {
            registry,
            commits,
            coalesce,
            replica,
            metrics,
            snapshots: Arc::default(),
            stopping: None,
        }
    }

    /// Ends every stream when `stopping` turns true. A stream would otherwise stay open as
    /// long as its node does, and the server waits for open streams before it exits: a
    /// replica being replaced would hold its nodes until it is killed. Ended with
    /// `UNAVAILABLE`, a node reconnects to another replica at once, serving its current
    /// configuration meanwhile.
    pub fn with_shutdown(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }
}

/// Resolves once `stopping` turns true; never without one (or when its sender is gone
/// without having said so).
async fn stopped(stopping: Option<watch::Receiver<bool>>) {
    if let Some(mut stopping) = stopping
        && stopping.wait_for(|stopping| *stopping).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Listens for commits (Postgres `LISTEN`) and publishes a counter that moves on each one,
/// and at least every few seconds as a catch-up. Reconnects on its own; never returns.
pub fn watch_commits(registry: &Registry) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let pool = registry.pool().clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for commits; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                tracing::warn!(error = %e, "cannot listen for commits; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = Duration::from_millis(100);
            // Whatever was missed while not listening.
            tx.send_modify(|n| *n += 1);
            loop {
                match tokio::time::timeout(CATCH_UP, listener.recv()).await {
                    Ok(Ok(_)) | Err(_) => tx.send_modify(|n| *n += 1),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "lost the commit listener; reconnecting");
                        break;
                    }
                }
            }
        }
    });
    rx
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamConfigStream = ResponseStream;

    async fn stream_config(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(NODE_SILENCE, inbound.message()).await {
            Ok(Ok(Some(pb::DiscoveryRequest {
                kind: Some(RequestKind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello in time")),
        };
        let node = hello
            .node
            .clone()
            .ok_or_else(|| Status::invalid_argument("Hello.node is required"))?;
        if node.id.is_empty() {
            return Err(Status::invalid_argument("Hello.node.id is required"));
        }
        sluice_proto::validate::check_name(&node.group)
            .map_err(|e| Status::invalid_argument(format!("Hello.node.group: {e}")))?;
        if node.protocol_version != pb::ProtocolVersion::Current as u32 {
            let reason = format!(
                "this control plane speaks discovery protocol {}, the node {}",
                pb::ProtocolVersion::Current as u32,
                node.protocol_version
            );
            if let Err(e) = status::refused(self.registry.pool(), &node, &reason).await {
                tracing::warn!(node = %node.id, error = %e, "cannot record node status");
            }
            return Err(Status::failed_precondition(reason));
        }
        let connected_since = status::connected(self.registry.pool(), &node, &self.replica, &hello)
            .await
            .map_err(|e| Status::unavailable(format!("cannot record node status: {e}")))?;
        let (tx, rx) = mpsc::channel(OUTBOUND);
        let session = Session {
            service: self.clone(),
            node,
            peer,
            connected_since,
            tx,
            nonce: 0,
        };
        tokio::spawn(session.run(hello, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The largest piece a snapshot is sent in: a node's receive buffer grows to the largest
/// message it gets, and keeps that size.
const SNAPSHOT_PART_BYTES: usize = 4 * 1024 * 1024;

/// Deltas kept for reuse; past this many the cache starts again.
const DELTAS_KEPT: usize = 256;

/// The latest snapshot of each group, and recent deltas, shared by every stream of this
/// replica, so a commit reads each group's state (and each delta) once rather than once per
/// node.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    /// group → (the commit counter it was read at, the snapshot).
    groups: tokio::sync::Mutex<HashMap<String, (u64, Arc<GroupSnapshot>)>>,
    /// (group, from, to) → the delta. Versions never change once committed, so an entry never
    /// goes stale.
    deltas: tokio::sync::Mutex<HashMap<(String, u64, u64), Arc<pb::Delta>>>,
}

impl SnapshotCache {
    /// The group's snapshot as of commit counter `seen` or later, and at version `at_least`
    /// or later when the registry has it (a node that says it runs a version this copy
    /// predates was served by a replica that heard of a commit first). One reader computes
    /// it while the others wait for it (the lock), so a push to many nodes reads it once.
    ///
    /// A copy whose version is still the registry's head is kept however often the counter
    /// moves: the periodic catch-up moves it every few seconds, and reading the group again
    /// each time would cost a full read per group while nothing changes.
    async fn get(
        &self,
        registry: &Registry,
        group: &str,
        seen: u64,
        at_least: u64,
    ) -> Result<Arc<GroupSnapshot>, crate::registry::RegistryError> {
        let mut groups = self.groups.lock().await;
        if let Some((at, snapshot)) = groups.get_mut(group) {
            if *at >= seen && snapshot.version >= at_least {
                return Ok(snapshot.clone());
            }
            // A head below `at_least` means the history was rewound (a restored database):
            // the registry's state is what the node must run.
            if registry.head().await?.0 == snapshot.version {
                *at = (*at).max(seen);
                return Ok(snapshot.clone());
            }
        }
        let snapshot = Arc::new(registry.snapshot(group).await?);
        groups.insert(group.to_owned(), (seen, snapshot.clone()));
        Ok(snapshot)
    }

    /// The delta of `group` from version `from` to `to`; an error when `from` is no longer
    /// retained.
    async fn delta(
        &self,
        registry: &Registry,
        group: &str,
        from: u64,
        to: u64,
    ) -> Result<Arc<pb::Delta>, crate::registry::RegistryError> {
        let key = (group.to_owned(), from, to);
        let mut deltas = self.deltas.lock().await;
        if let Some(delta) = deltas.get(&key) {
            return Ok(delta.clone());
        }
        let delta = Arc::new(registry.delta(group, from, to).await?);
        if deltas.len() >= DELTAS_KEPT {
            deltas.clear();
        }
        deltas.insert(key, delta.clone());
        Ok(delta)
    }
}

/// The longest a stream waits to record its node's status: the status is best effort, and a
/// slow registry must not hold the stream's heartbeats and pushes behind it (its node would
/// take the silence for a dead replica and move, adding to the registry's load).
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Records a status change within [`STATUS_WRITE_TIMEOUT`].
async fn recording(write: impl Future<Output = sqlx::Result<()>>) -> Result<(), String> {
    match tokio::time::timeout(STATUS_WRITE_TIMEOUT, write).await {
        Ok(written) => written.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {STATUS_WRITE_TIMEOUT:?}")),
    }
}

/// What a stream last sent its node.
struct Sent {
    /// The content hash the node runs or was sent: nothing is sent while the group's content
    /// is the same.
    hash: String,
    /// The version a delta can start from: what the node said it runs, then each version
    /// sent to it; unknown after it refuses a snapshot.
    base: Option<u64>,
    /// The nonce of the last push when it was a delta, whose NACK is answered with the
    /// snapshot.
    delta_nonce: Option<String>,
    /// When the last push went out, for coalescing.
    at: Option<tokio::time::Instant>,
}

/// One node's stream.
struct Session {
    /// The service's shared parts; its commit receiver is this stream's own copy.
    service: DiscoveryService,
    node: pb::Node,
    peer: Option<SocketAddr>,
    /// When this stream was recorded, which tells it from the node's later streams.
    connected_since: chrono::DateTime<chrono::Utc>,
    tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    nonce: u64,
}

impl Session {
    async fn run(self, hello: pb::Hello, inbound: Streaming<pb::DiscoveryRequest>) {
        let (pool, id, replica, since, metrics) = (
            self.service.registry.pool().clone(),
            self.node.id.clone(),
            self.service.replica.clone(),
            self.connected_since,
            self.service.metrics.clone(),
        );
        metrics.connected_nodes.inc();
        self.serve(hello, inbound).await;
        metrics.connected_nodes.dec();
        if let Err(e) = status::disconnected(&pool, &id, &replica, since).await {
            tracing::warn!(node = %id, error = %e, "cannot record node status");
        }
    }

    async fn serve(mut self, hello: pb::Hello, mut inbound: Streaming<pb::DiscoveryRequest>) {
        tracing::info!(node = %self.node.id, group = %self.node.group, peer = ?self.peer, version = hello.current_version, "data plane connected");
        let mut sent = Sent {
            hash: hello.current_hash,
            base: (hello.current_version > 0).then_some(hello.current_version),
            delta_nonce: None,
            at: None,
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = tokio::time::Instant::now();
        self.service.commits.mark_changed();
        let stopping = stopped(self.service.stopping.clone());
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                () = &mut stopping => {
                    tracing::info!(node = %self.node.id, "replica stopping; ending the stream so the node reconnects to another");
                    let _ = self.tx.send(Err(Status::unavailable("this control-plane replica is shutting down; reconnect to another"))).await;
                    return;
                }
                changed = self.service.commits.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // The first commit after a quiet spell is pushed at once; later ones wait
                    // out the window since the last push, so a burst becomes one push.
                    if let Some(last) = sent.at {
                        tokio::time::sleep_until(last + self.service.coalesce).await;
                    }
                    self.service.commits.mark_unchanged();
                    let seen = *self.service.commits.borrow();
                    let at_least = sent.base.unwrap_or(0);
                    match self.service.snapshots.get(&self.service.registry, &self.node.group, seen, at_least).await {
                        Ok(current) if current.content_hash != sent.hash => {
                            let base = sent.base;
                            if self.push(&current, base, &mut sent).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(node = %self.node.id, error = %e, "cannot read the group's snapshot"),
                    }
                }
                message = inbound.message() => {
                    last_heard = tokio::time::Instant::now();
                    let pool = self.service.registry.pool();
                    let recorded = match message {
                        Ok(Some(pb::DiscoveryRequest { kind: Some(RequestKind::Ack(ack)) })) => {
                            tracing::info!(node = %self.node.id, version = ack.version, nonce = %ack.nonce, "config applied");
                            if let Ok(Ok(Some(seconds))) = tokio::time::timeout(STATUS_WRITE_TIMEOUT, status::since_commit(pool, ack.version)).await {
                                self.service.metrics.commit_to_ack.observe(seconds);
                            }
                            recording(status::acked(pool, &self.node.id, &ack)).await
                        }
                        Ok(Some(pb::DiscoveryRequest { kind: Some(RequestKind::Nack(nack)) })) => {
                            tracing::warn!(node = %self.node.id, version = nack.version, nonce = %nack.nonce, message = %nack.message, errors = nack.errors.len(), "config refused; the node keeps its previous one");
                            let recorded = recording(status::nacked(pool, &self.node.id, &nack)).await;
                            if sent.delta_nonce.as_deref() == Some(nack.nonce.as_str()) {
                                // The node could not take the delta (another base, a hash
                                // that did not match): the whole snapshot sets it right.
                                let seen = *self.service.commits.borrow();
                                match self.service.snapshots.get(&self.service.registry, &self.node.group, seen, 0).await {
                                    Ok(current) => {
                                        if self.push(&current, None, &mut sent).await.is_err() {
                                            return;
                                        }
                                    }
                                    Err(e) => tracing::warn!(node = %self.node.id, error = %e, "cannot read the group's snapshot"),
                                }
                            } else {
                                // Its old config stands, whatever version it is.
                                sent.base = None;
                            }
                            recorded
                        }
                        Ok(Some(_)) => recording(status::seen(pool, &self.node.id)).await,
                        Ok(None) | Err(_) => {
                            tracing::info!(node = %self.node.id, "data plane disconnected");
                            return;
                        }
                    };
                    if let Err(e) = recorded {
                        tracing::warn!(node = %self.node.id, error = %e, "cannot record node status");
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > NODE_SILENCE {
                        tracing::warn!(node = %self.node.id, "data plane silent; closing its stream");
                        let _ = self.tx.send(Err(Status::deadline_exceeded("no heartbeat from the node"))).await;
                        return;
                    }
                    let beat = self.response(0, String::new(), Payload::Heartbeat(heartbeat_now()));
                    if self.tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends what brings the node from `base` to `current`: a delta when `base` is still in the
    /// change log and the delta is the smaller, else the snapshot. Fails when the stream is
    /// gone.
    async fn push(
        &mut self,
        current: &GroupSnapshot,
        base: Option<u64>,
        sent: &mut Sent,
    ) -> Result<(), ()> {
        let service = &self.service;
        let delta = match base {
            Some(base) if base < current.version => {
                match service
                    .snapshots
                    .delta(&service.registry, &self.node.group, base, current.version)
                    .await
                {
                    Ok(delta) => Some(delta),
                    Err(e) => {
                        tracing::debug!(node = %self.node.id, base, error = %e, "no delta; sending the snapshot");
                        None
                    }
                }
            }
            _ => None,
        };
        let kind = match delta {
            Some(delta) if delta.encoded_len() < current.encoded.len() => {
                let response = self.response(
                    current.version,
                    current.content_hash.clone(),
                    Payload::Delta(delta.as_ref().clone()),
                );
                sent.delta_nonce = Some(response.nonce.clone());
                self.tx.send(Ok(response)).await.map_err(|_| ())?;
                self.service.metrics.pushed("delta", delta.encoded_len());
                "delta"
            }
            _ => {
                self.send_snapshot(current).await?;
                sent.delta_nonce = None;
                self.service
                    .metrics
                    .pushed("snapshot", current.encoded.len());
                "snapshot"
            }
        };
        tracing::debug!(node = %self.node.id, version = current.version, kind, "pushed");
        sent.hash = current.content_hash.clone();
        sent.base = Some(current.version);
        sent.at = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Sends the snapshot in parts of at most [`SNAPSHOT_PART_BYTES`], slices of its one
    /// encoded copy, all under one nonce.
    async fn send_snapshot(&mut self, current: &GroupSnapshot) -> Result<(), ()> {
        let nonce = self.next_nonce();
        let total = current.encoded.len();
        let mut offset = 0;
        // An empty snapshot is still one (empty) part.
        loop {
            let end = (offset + SNAPSHOT_PART_BYTES).min(total);
            let part = pb::DiscoveryResponse {
                version: current.version,
                content_hash: current.content_hash.clone(),
                nonce: nonce.clone(),
                payload: Some(Payload::SnapshotPart(pb::SnapshotPart {
                    offset: offset as u64,
                    total_bytes: total as u64,
                    data: current.encoded.slice(offset..end),
                })),
            };
            self.tx.send(Ok(part)).await.map_err(|_| ())?;
            offset = end;
            if offset >= total {
                return Ok(());
            }
        }
    }

    fn response(
        &mut self,
        version: u64,
        content_hash: String,
        payload: Payload,
    ) -> pb::DiscoveryResponse {
        pb::DiscoveryResponse {
            version,
            content_hash,
            nonce: self.next_nonce(),
            payload: Some(payload),
        }
    }

    /// Unique per response on the stream (the parts of a snapshot share theirs).
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }
}

fn heartbeat_now() -> pb::Heartbeat {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pb::Heartbeat {
        sent_at: Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
    }
}
