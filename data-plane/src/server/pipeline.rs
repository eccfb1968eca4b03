//! The request pipeline: what happens to one request, phase by phase, in order.
//!
//! 1. [`check_framing`]: refuse requests whose length is ambiguous (smuggling), first, before
//!    any other phase reads the body or headers it cannot trust.
//! 2. Take the current config once; the request finishes on it even if a new one is swapped
//!    in meanwhile.
//! 3. [`path::normalize`] the path once: the router and the upstream see the same path.
//! 4. Route: host, path, methods, headers, query (a CORS preflight by the method it asks
//!    about).
//! 5. A CORS preflight is answered here, from the route's `cors` policy.
//! 6. Enforce the body size limit (the node's, or the route's `request_size` if smaller):
//!    declared lengths at once, streamed bodies as they arrive.
//! 7. Access control ([`crate::auth`]): IP lists, authentication, subscription, scopes,
//!    rate limits.
//! 8. Dispatch: a direct response; proxy to the route's upstream with the caller's identity
//!    headers (the client's own copies removed); publish the request as an event
//!    ([`crate::events::publish`]); or stream a topic to the client
//!    ([`crate::events::subscribe`]).
//! 9. Response headers (`X-Request-Id`, CORS, `RateLimit-*`), metrics and one access-log
//!    line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderName, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::GatewayError;
use super::forwarding::{self, Origin, TrustedProxies, X_REQUEST_ID};
use crate::auth::cors::Cors;
use crate::auth::mtls::ClientCertificate;
use crate::auth::{AccessGuard, Caller, Denial, Identity, RouteAccess, rate_limit_headers};
use crate::config::ConfigStore;
use crate::events::caller_headers;
use crate::events::idempotency::Idempotency;
use crate::events::publish::PublishContext;
use crate::events::subscribe::SubscribeContext;
use crate::events::websocket::{self, MessageCharge, WebSocketContext};
use crate::ratelimit::Decision;
use crate::router::path;
use crate::router::{Action, DirectResponse, Matched, ProxyAction, RequestParts, Route};
use crate::telemetry::Metrics;
use crate::upstream::retry::TryFailure;
use crate::upstream::{Lease, ProxyBody, Target, Upstream, UpstreamError, empty_body};

/// Node-wide request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted, declared or streamed (413 beyond).
    pub max_body_bytes: u64,
    /// How long a publish route remembers an `Idempotency-Key`'s answer.
    pub idempotency_ttl: std::time::Duration,
    /// How long an upstream's response body may send nothing before it is cut off (as
    /// nginx's `proxy_read_timeout`): a backend that sent its headers and hung holds neither
    /// the client nor its upstream slot for ever. Zero: no limit.
    pub upstream_idle_timeout: std::time::Duration,
}

/// What the pipeline knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The TCP peer: the client, or a proxy in front of the node (see
    /// [`forwarding::TrustedProxies`]).
    pub peer: SocketAddr,
    /// Whether the request's forwarding headers may name the client (a PROXY protocol
    /// header that named nobody says they may not: [`super::proxy_protocol::Behind`]).
    pub forwarding: bool,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The certificate the client presented in its TLS handshake, if any.
    pub certificate: Option<Arc<ClientCertificate>>,
}

/// The data plane's request handler.
#[derive(Debug)]
pub struct Gateway {
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    limits: Limits,
    guard: Arc<AccessGuard>,
    /// Publish routes' idempotency keys (in Redis when the guard has it, else here).
    idempotency: Arc<Idempotency>,
    /// Whose `X-Forwarded-For` names the client.
    trusted_proxies: TrustedProxies,
    /// Work that outlives the request it was for (a publish whose client left, a WebSocket
    /// session); the node's drain waits for it.
    tasks: TaskTracker,
    /// Cancelled when the node stops: event streams (SSE, WebSocket) then end at once with
    /// their resume position, so their clients move to another node rather than wait out the
    /// drain and lose the connection without one.
    streams_stopping: CancellationToken,
}

/// What one request amounted to, for the access log and metrics.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<Arc<Route>>,
    upstream: Option<Arc<str>>,
    /// Why the gateway answered itself, or why access control let the request through.
    reason: Option<&'static str>,
    /// Access control's verdict (`allow`, `deny`), on routes with policies.
    decision: Option<&'static str>,
    consumer: Option<uuid::Uuid>,
    /// The route's CORS policy and the request's `Origin`, to decorate the answer with.
    cors: Option<(Arc<Cors>, HeaderValue)>,
    /// The tightest rate-limit budget the request was counted against.
    rate: Option<Decision>,
}

impl Gateway {
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        limits: Limits,
        guard: Arc<AccessGuard>,
        trusted_proxies: TrustedProxies,
    ) -> Self {
        let idempotency = Idempotency::new(limits.idempotency_ttl, guard.redis.clone());
        Gateway {
            store,
            metrics,
            limits,
            guard,
            idempotency: Arc::new(idempotency),
            trusted_proxies,
            tasks: TaskTracker::new(),
            streams_stopping: CancellationToken::new(),
        }
    }

    /// Ends every event stream, now and to come, with its resume position: the node is
    /// stopping.
    pub fn stop_event_streams(&self) {
        self.streams_stopping.cancel();
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whose forwarding headers (and PROXY protocol headers) name the client.
    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.trusted_proxies
    }

    /// Waits, up to `deadline`, for the work requests left behind ([`Gateway::tasks`]), once
    /// the connections have drained (no request is left to start more).
    pub async fn finish_tasks(&self, deadline: std::time::Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
    }

    /// Serves one request. Never fails: every error becomes a problem+json response.
    /// `ambiguous_framing`: the connection's [`super::framing`] guard found this request's
    /// length ambiguous (both `Content-Length` and `Transfer-Encoding`, or several
    /// `Content-Length`s), which hyper settles without telling.
    pub async fn handle(
        &self,
        connection: ConnectionInfo,
        request: Request<Incoming>,
        ambiguous_framing: bool,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = forwarding::request_id(request.headers());
        let method = request.method().clone();
        let raw_path = request.uri().path().to_owned();
        let peer = connection.peer.ip();
        let origin = if connection.forwarding {
            self.trusted_proxies
                .origin(peer, connection.scheme, request.headers())
        } else {
            Origin {
                client: peer,
                scheme: connection.scheme,
            }
        };
        self.metrics.in_flight.inc();
        let mut outcome = Outcome::default();
        let mut response = match self
            .serve(
                connection,
                origin,
                request,
                ambiguous_framing,
                &request_id,
                &mut outcome,
            )
            .await
        {
            Ok(response) => response,
            Err(error) => {
                let (_, reason) = error.classify();
                // Access control named its own reason (a hidden API answers as no route).
                outcome.reason.get_or_insert(reason);
                match &error {
                    GatewayError::Upstream(_) => {
                        tracing::warn!(request_id = ?request_id, error = %error, "upstream error");
                    }
                    GatewayError::Publish(_) | GatewayError::Subscribe(_) => {
                        tracing::warn!(request_id = ?request_id, error = %error, "broker error");
                    }
                    _ => {}
                }
                error.to_response(&request_id)
            }
        };
        let upstream_refused = response.status() == StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if let Some((cors, origin)) = &outcome.cors {
            cors.decorate(Some(origin), headers);
        }
        // The tightest budget is told: the gateway's replaces an upstream's, unless the
        // upstream refused the request itself or reports fewer requests left.
        if let Some(rate) = &outcome.rate {
            let upstreams_is_tighter = upstream_refused
                || headers
                    .get("ratelimit-remaining")
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .is_some_and(|theirs| theirs < rate.remaining);
            if !upstreams_is_tighter {
                rate_limit_headers(headers, Some(rate), None);
            }
        }
        self.metrics.in_flight.dec();

        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        match &outcome.route {
            Some(route) => route.metrics.record(status, elapsed.as_secs_f64()),
            None => self.metrics.unrouted(outcome.reason.unwrap_or("unknown")),
        }
        tracing::info!(
            target: "sluice::access",
            request_id = request_id.to_str().unwrap_or_default(),
            client = %origin.client,
            // The proxy that vouched for the client, when one did.
            peer = (peer != origin.client).then_some(tracing::field::display(peer)),
            method = %method,
            path = %raw_path,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            api = outcome.route.as_ref().map(|r| &*r.api_name),
            route = outcome.route.as_ref().map(|r| &*r.name),
            upstream = outcome.upstream.as_deref(),
            consumer = outcome.consumer.map(tracing::field::display),
            decision = outcome.decision,
            reason = outcome.reason,
        );
        response
    }

    async fn serve(
        &self,
        connection: ConnectionInfo,
        origin: Origin,
        mut request: Request<Incoming>,
        ambiguous_framing: bool,
        request_id: &HeaderValue,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        host_from_authority(&mut request);
        if ambiguous_framing {
            return Err(GatewayError::Malformed(
                "ambiguous length: Content-Length with Transfer-Encoding, or several Content-Lengths",
            ));
        }
        check_framing(&request)?;
        let config = self.store.current().ok_or(GatewayError::NotReady)?;
        let normalized = path::normalize(request.uri().path()).map_err(GatewayError::BadPath)?;
        let host = request_host(&request);
        let parts = RequestParts {
            host: &host,
            method: request.method(),
            path: &normalized,
            query: request.uri().query(),
            headers: request.headers(),
        };
        let no_route = || GatewayError::NoRoute {
            method: request.method().to_string(),
            path: normalized.to_string(),
        };
        let preflight = Cors::is_preflight(request.method(), request.headers());
        let matched = match config.router.route(&parts) {
            Some(matched) => matched,
            // A preflight asks about another method, which the route may be limited to.
            None if preflight => {
                let asked = request
                    .headers()
                    .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                    .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok())
                    .ok_or_else(no_route)?;
                let parts = RequestParts {
                    method: &asked,
                    ..parts
                };
                // Only a route with a CORS policy answers for it: any other would be sent an
                // OPTIONS request it does not take.
                config
                    .router
                    .route(&parts)
                    .filter(|matched| matched.route.access.cors.is_some())
                    .ok_or_else(no_route)?
            }
            None => return Err(no_route()),
        };
        let route = matched.route.clone();
        outcome.route = Some(route.clone());
        let access = &route.access;
        if let Some(cors) = &access.cors {
            if preflight {
                return match cors.preflight(request.headers()) {
                    Ok((status, headers)) => {
                        let mut response = Response::new(empty_body());
                        *response.status_mut() = status;
                        *response.headers_mut() = headers;
                        Ok(response)
                    }
                    Err(refusal) => {
                        outcome.reason = Some("cors_refused");
                        Err(GatewayError::Denied(Box::new(Denial {
                            status: StatusCode::FORBIDDEN,
                            reason: "cors_refused",
                            detail: refusal.0,
                            challenge: None,
                            rate: None,
                            retry_after: None,
                        })))
                    }
                };
            }
            if let Some(origin) = request.headers().get(header::ORIGIN) {
                outcome.cors = Some((cors.clone(), origin.clone()));
            }
        }
        let max_body_bytes = access
            .max_body_bytes
            .map_or(self.limits.max_body_bytes, |m| {
                m.min(self.limits.max_body_bytes)
            });
        check_declared_length(&request, max_body_bytes)?;
        let filters_by_identity =
            matches!(&route.action, Action::Subscribe(s) if s.filters_by_identity());
        let (identity, identity_filters) = if access.is_open() && !filters_by_identity {
            (None, Vec::new())
        } else {
            let caller = Caller {
                ip: origin.client,
                headers: request.headers(),
                query: request.uri().query(),
                certificate: connection.certificate.as_deref(),
            };
            let checked = access
                .check(&caller, &config.holdings, &config.access, &self.guard)
                .await
                .and_then(|admission| match &route.action {
                    // A subscriber lacking a value its stream is filtered by is refused here,
                    // so that the refusal is counted and logged as access control's.
                    Action::Subscribe(subscribe) => {
                        // It was counted: its answer carries the budget, as any counted one
                        // does.
                        let rate = admission.rate.map(|r| r.decision);
                        subscribe
                            .bind_identity(admission.identity.as_ref())
                            .map(|filters| (admission, filters))
                            .map_err(|mut denial| {
                                denial.rate = rate;
                                denial
                            })
                    }
                    _ => Ok((admission, Vec::new())),
                });
            match checked {
                Ok((admission, identity_filters)) => {
                    self.metrics.access_decision("allow", admission.reason);
                    outcome.decision = Some("allow");
                    outcome.reason = Some(admission.reason);
                    outcome.rate = admission.rate.map(|r| r.decision);
                    outcome.consumer = admission.identity.as_ref().map(|i| i.consumer_id);
                    (admission.identity, identity_filters)
                }
                Err(denial) => {
                    self.metrics.access_decision("deny", denial.reason);
                    outcome.decision = Some("deny");
                    outcome.reason = Some(denial.reason);
                    if denial.status == StatusCode::NOT_FOUND {
                        // The API hides itself: the answer is the one for no route at all.
                        return Err(no_route());
                    }
                    return Err(GatewayError::Denied(denial));
                }
            }
        };
        match &route.action {
            Action::DirectResponse(direct) => Ok(direct_response(direct)),
            Action::Publish(publish) => {
                let context = PublishContext {
                    route_id: &route.id,
                    params: &matched.params,
                    identity: identity.as_ref(),
                    client: origin.client,
                    request_id,
                    max_body_bytes,
                    metrics: &self.metrics,
                    idempotency: &self.idempotency,
                    tasks: &self.tasks,
                };
                publish.serve(request, context).await
            }
            Action::Subscribe(subscribe) if websocket::is_upgrade(&request) => {
                let pacer = subscribe.pacer(SubscribeContext {
                    identity: identity.as_ref(),
                    metrics: &self.metrics,
                    guard: &self.guard,
                    stopping: &self.streams_stopping,
                });
                let context = WebSocketContext {
                    headers: caller_headers(identity.as_ref(), request_id, request.headers()),
                    identity_filters,
                    pacer,
                    max_message_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
                    metrics: self.metrics.clone(),
                    stopping: self.streams_stopping.clone(),
                    access: identity
                        .as_ref()
                        .map(|identity| self.store.watch_stream(identity)),
                    charge: (subscribe.websocket_publish && !access.is_open()).then(|| {
                        MessageCharge {
                            route: route.clone(),
                            store: self.store.clone(),
                            guard: self.guard.clone(),
                            client: origin.client,
                            grant: identity.as_ref().map(|identity| identity.grant),
                        }
                    }),
                    tasks: self.tasks.clone(),
                };
                subscribe.serve_websocket(request, context).await
            }
            Action::Subscribe(subscribe) => {
                subscribe
                    .serve(
                        &request,
                        SubscribeContext {
                            identity: identity.as_ref(),
                            metrics: &self.metrics,
                            guard: &self.guard,
                            stopping: &self.streams_stopping,
                        },
                        identity_filters,
                        identity
                            .as_ref()
                            .map(|identity| self.store.watch_stream(identity)),
                    )
                    .await
            }
            Action::Proxy(proxy) => {
                let upstream = proxy
                    .traffic
                    .choose(&proxy.upstream, request.headers())
                    .clone();
                outcome.upstream = Some(upstream.name.clone());
                let forwarded_path = forwarded_path(proxy, &matched, &normalized);
                self.proxy(
                    Forward {
                        proxy,
                        upstream: &upstream,
                        access,
                        identity: identity.as_ref(),
                        max_body_bytes,
                    },
                    connection,
                    origin,
                    request,
                    forwarded_path,
                    request_id,
                )
                .await
            }
        }
    }

    /// Phase 6 for proxy routes: pick a target of the chosen upstream (the route's own or a
    /// canary), rewrite the request for it, send it (and its shadow copy, when the route
    /// mirrors) and stream the response back.
    async fn proxy(
        &self,
        forward: Forward<'_>,
        connection: ConnectionInfo,
        origin: Origin,
        request: Request<Incoming>,
        forwarded_path: String,
        request_id: &HeaderValue,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let Forward {
            proxy,
            upstream,
            access,
            identity,
            max_body_bytes,
        } = forward;
        let pass = match &upstream.circuit {
            Some(circuit) => {
                Some(
                    circuit
                        .admit()
                        .map_err(|retry_after| UpstreamError::CircuitOpen {
                            upstream: upstream.name.clone(),
                            retry_after,
                        })?,
                )
            }
            None => None,
        };
        let lease = upstream.lease(request.headers())?;
        // WebSocket only: a tunnel skips everything per request that follows (routing, access,
        // identity headers, body limits), and other protocols (h2c above all) would carry
        // requests the gateway never sees. Any other `Upgrade` is dropped with the hop-by-hop
        // headers and the request proxied as it is.
        let upgrade = (request.version() == Version::HTTP_11)
            .then(|| forwarding::requested_upgrade(request.headers()))
            .flatten()
            .filter(|protocol| protocol.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let mut request = request;
        // Taken before the request is consumed: resolves with the client's connection once
        // the 101 has been sent to it.
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let client_version = parts.version;
        let query = match identity {
            Some(identity) => identity.forwarded_query(parts.uri.query()),
            None => parts.uri.query().map(std::borrow::Cow::Borrowed),
        };
        let path_and_query = PathAndQuery::try_from(match query {
            Some(query) => format!("{forwarded_path}?{query}"),
            None => forwarded_path,
        })
        .map_err(|_| GatewayError::Malformed("the rewritten path is not a valid URI"))?;
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        forwarding::strip_hop_by_hop(&mut parts.headers);
        // Only the gateway says who the caller is.
        for reserved in access.reserved_headers() {
            parts.headers.remove(reserved);
        }
        // Nor in another spelling: upstreams that read headers CGI-style take `X-Consumer_Id`
        // for `X-Consumer-Id` (both become `HTTP_X_CONSUMER_ID`).
        let respelled: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|name| {
                name.as_str().contains('_')
                    && access
                        .reserved_headers()
                        .any(|reserved| same_but_for_underscores(reserved.as_str(), name.as_str()))
            })
            .cloned()
            .collect();
        for name in respelled {
            parts.headers.remove(name);
        }
        if let Some(identity) = identity {
            identity.apply(&mut parts.headers);
        }
        let traceparent = forwarding::traceparent(&parts.headers);
        forwarding::set_forwarding(
            &mut parts.headers,
            connection.peer.ip(),
            origin.scheme,
            original_host,
            request_id,
            traceparent,
        );
        if let Some(protocol) = &upgrade {
            // Upgrade and Connection are hop-by-hop, but an upgrade is asked of each hop:
            // the node asks the upstream in its turn.
            parts.headers.insert(header::UPGRADE, protocol.clone());
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let http2 = upstream.http2 && upgrade.is_none();
        // Only a request without a body can be sent again as it is: bodies are streamed, never
        // kept. Its headers are kept for the retries when the upstream allows any.
        let has_body = !body.is_end_stream();
        let method = parts.method.clone();
        let retry_template = (upstream.retry.attempts > 0 && !has_body && upgrade.is_none())
            .then(|| parts.headers.clone());
        let limit = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
        let body_state = Arc::new(BodyState {
            fault: OnceLock::new(),
            done: AtomicBool::new(!has_body),
            waiting_on_client: AtomicBool::new(false),
        });
        let mut body = ClientBody {
            inner: Limited::new(body, limit),
            state: body_state.clone(),
        }
        .boxed();
        if let Some(mirror) = &proxy.traffic.mirror
            && upgrade.is_none()
            && mirror.roll()
        {
            body = super::mirror::spawn(
                mirror.upstream.clone(),
                self.metrics.clone(),
                parts.method.clone(),
                parts.headers.clone(),
                path_and_query.clone(),
                body,
            );
        }
        let mut request = Request::from_parts(parts, body);
        aim(&mut request, lease.target(), &path_and_query, http2)?;

        upstream.retry.earn();
        let deadline = Instant::now() + proxy.timeout.unwrap_or(upstream.total_timeout);
        let mut lease = lease;
        let mut tries = 0;
        let response = loop {
            tries += 1;
            let sent = Instant::now();
            let outcome = upstream
                .send(request, deadline.saturating_duration_since(sent))
                .await;
            upstream.duration.observe(sent.elapsed().as_secs_f64());
            // A try that failed while the client's body was failing, or timed out while the
            // upload waited on the client (a client that stalls its upload makes the upstream
            // time out), is not the target's fault; one that never connected always is.
            let clients_doing =
                body_state.clients_fault(matches!(outcome, Err(UpstreamError::Timeout(_))));
            if !clients_doing || matches!(outcome, Err(UpstreamError::Connect { .. })) {
                upstream.report(lease.index(), is_target_failure(&outcome));
            }
            let Some(headers) = &retry_template else {
                break outcome;
            };
            let failure = match &outcome {
                Ok(response) => TryFailure::Status(response.status()),
                Err(UpstreamError::Connect { .. }) => TryFailure::Connect,
                Err(_) => break outcome,
            };
            if !upstream
                .retry
                .should_retry(tries, &method, has_body, failure)
            {
                break outcome;
            }
            let pause = upstream.retry.backoff(tries);
            if Instant::now() + pause >= deadline {
                break outcome;
            }
            // With no target to retry on, the failed try's answer stands (the upstream's 5xx
            // with its body, or 502 for a connect error), not a 503 of the gateway's.
            if lease.retarget(headers).is_err() {
                break outcome;
            }
            drop(outcome);
            tokio::time::sleep(pause).await;
            request = Request::new(empty_body());
            *request.method_mut() = method.clone();
            *request.headers_mut() = headers.clone();
            aim(&mut request, lease.target(), &path_and_query, http2)?;
        };
        // A failure of the client's doing (as for outlier ejection above) is not counted: it
        // would let any client open the breaker for everyone with a few oversized or stalled
        // uploads. Its pass is let go unrecorded.
        let clients_fault =
            body_state.clients_fault(matches!(response, Err(UpstreamError::Timeout(_))));
        if let Some(pass) = pass {
            match &response {
                Err(UpstreamError::Connect { .. }) => pass.record(false),
                Err(_) if clients_fault => drop(pass),
                outcome => pass.record(matches!(outcome, Ok(r) if !r.status().is_server_error())),
            }
        }
        // A failure while sending is the client's when its body was what failed, or when the
        // time ran out while its body was still coming (408, not the upstream's 504).
        let response = response.map_err(|e| match body_state.fault.get() {
            Some(BodyFault::TooLarge) => GatewayError::BodyTooLarge {
                limit: max_body_bytes,
            },
            Some(BodyFault::Malformed) => {
                GatewayError::Malformed("the request body is not validly framed")
            }
            // With no body fault, the client's doing is a timeout while the upload waited.
            None if clients_fault => GatewayError::BodyTimeout,
            None => GatewayError::Upstream(e),
        })?;
        let mut response = response;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, lease));
            let (mut parts, _) = response.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            forwarding::strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = protocol {
                parts.headers.insert(header::UPGRADE, protocol);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            parts.version = client_version;
            return Ok(Response::from_parts(parts, empty_body()));
        }
        let (mut parts, body) = response.into_parts();
        forwarding::strip_hop_by_hop(&mut parts.headers);
        // The client's connection has its own protocol: an HTTP/1.0 backend must not turn the
        // client's keep-alive HTTP/1.1 connection into a one-shot one.
        parts.version = client_version;
        Ok(Response::from_parts(
            parts,
            LeasedBody {
                inner: body,
                _lease: lease,
                idle_timeout: self.limits.upstream_idle_timeout,
                idle: None,
                progressed: false,
            }
            .boxed(),
        ))
    }
}

/// What a proxied request is sent with, besides the request itself.
struct Forward<'a> {
    proxy: &'a ProxyAction,
    /// The route's upstream or a canary.
    upstream: &'a Arc<Upstream>,
    access: &'a RouteAccess,
    identity: Option<&'a Identity>,
    max_body_bytes: u64,
}

/// Copies bytes both ways between an upgraded client connection and the upgraded upstream
/// connection until either side closes. The lease is held for the tunnel's lifetime, so the
/// upstream's concurrency cap counts open WebSockets.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, lease: Lease) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
    drop(lease);
}

/// Whether a try's result counts against its target for passive ejection: it could not be
/// reached, did not answer in time, or answered that it cannot serve.
fn is_target_failure(outcome: &Result<Response<Incoming>, UpstreamError>) -> bool {
    match outcome {
        Ok(response) => matches!(
            response.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        Err(
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout(_)
            | UpstreamError::Failed { .. },
        ) => true,
        Err(_) => false,
    }
}

/// Points a request at `target`: its URI and protocol version, and for HTTP/1.1 its `Host`
/// (HTTP/2 carries the authority in the URI).
pub(super) fn aim(
    request: &mut Request<ProxyBody>,
    target: &Target,
    path_and_query: &PathAndQuery,
    http2: bool,
) -> Result<(), GatewayError> {
    *request.uri_mut() = Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(path_and_query.clone())
        .build()
        .map_err(|_| GatewayError::Malformed("the rewritten path is not a valid URI"))?;
    if http2 {
        *request.version_mut() = Version::HTTP_2;
        request.headers_mut().remove(header::HOST);
    } else {
        *request.version_mut() = Version::HTTP_11;
        let host = HeaderValue::from_str(target.authority.as_str())
            .map_err(|_| GatewayError::Malformed("the upstream authority is not a valid header"))?;
        request.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// Phase 1. Requests whose length is ambiguous are how requests are smuggled past a proxy:
/// both `Content-Length` and `Transfer-Encoding`, or several `Content-Length`s. On HTTP/1,
/// hyper settles these before the service sees them, and the [`super::framing`] guard flags
/// them (`ambiguous_framing`). This check is defence in depth for whatever reaches the
/// service with both still present, whatever the protocol. The connection is closed after
/// the 400 (see [`GatewayError::closes_connection`]).
fn check_framing(request: &Request<Incoming>) -> Result<(), GatewayError> {
    let headers = request.headers();
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Err(GatewayError::Malformed("several Content-Length headers"));
    }
    if lengths == 1 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(GatewayError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(())
}

/// Phase 5, for declared lengths: refused before a byte of the body is read.
fn check_declared_length(request: &Request<Incoming>, limit: u64) -> Result<(), GatewayError> {
    match request.body().size_hint().exact() {
        Some(length) if length > limit => Err(GatewayError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

/// How a client's request body failed while it was streamed upstream.
#[derive(Debug, Clone, Copy)]
enum BodyFault {
    TooLarge,
    Malformed,
}

/// The client's request body on its way upstream: size-limited, and remembering how it failed
/// so the failure is answered as the client's (413, 400), not as the upstream's (502).
struct ClientBody {
    inner: Limited<Incoming>,
    state: Arc<BodyState>,
}

/// What the pipeline learns of the client's body as it streams upstream.
#[derive(Debug)]
struct BodyState {
    /// How it failed, if it did.
    fault: OnceLock<BodyFault>,
    /// Set once the whole body has been read.
    done: AtomicBool,
    /// Whether the body's last poll found nothing from the client yet: the upload is waiting
    /// on the client. (An upstream that stops reading stops polling: the last poll then had
    /// a frame, and a failure is the upstream's.)
    waiting_on_client: AtomicBool,
}

impl BodyState {
    /// Whether a failed try is the client's doing: its body failed, or the try timed out
    /// while the upload was waiting on the client. (Any other failure mid-upload, a reset or
    /// an early 5xx, is the upstream's, however the upload was going.)
    fn clients_fault(&self, timed_out: bool) -> bool {
        self.fault.get().is_some()
            || (timed_out
                && !self.done.load(Ordering::Relaxed)
                && self.waiting_on_client.load(Ordering::Relaxed))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.state
            .waiting_on_client
            .store(polled.is_pending(), Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                let fault = if e.is::<LengthLimitError>() {
                    BodyFault::TooLarge
                } else {
                    BodyFault::Malformed
                };
                let _ = this.state.fault.set(fault);
            }
            Poll::Ready(None) => this.state.done.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.state.done.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request that names its host twice (an absolute URI or HTTP/2's `:authority`, and a
/// `Host` header) is about the URI's: RFC 9112 section 3.2.2 has a proxy replace `Host`
/// with it. Routing, policies, `X-Forwarded-Host` and the upstream then all see the one host
/// the request was routed by; a `Host: evil.example` riding on
/// `GET http://api.example.com/…` cannot reach a backend as the host it builds links with.
///
/// The value is the authority's host and port, never its userinfo (`user:pw@`).
fn host_from_authority<B>(request: &mut Request<B>) {
    let Some(authority) = request.uri().authority() else {
        return;
    };
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    let differs = request
        .headers()
        .get(header::HOST)
        .is_some_and(|given| !given.as_bytes().eq_ignore_ascii_case(host.as_bytes()));
    if differs && let Ok(value) = HeaderValue::from_str(&host) {
        request.headers_mut().insert(header::HOST, value);
    }
}

/// The request's host, lower-case, without port: from the URI (HTTP/2, absolute-form) or the
/// `Host` header.
fn request_host(request: &Request<Incoming>) -> String {
    let host = request.uri().host().or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    });
    let Some(host) = host else {
        return String::new();
    };
    let without_port = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// The path sent upstream: the rewrite with its parameters filled in, else the normalised
/// path, less the matched prefix when `strip_prefix` is set.
fn forwarded_path(proxy: &ProxyAction, matched: &Matched<'_>, normalized: &str) -> String {
    if let Some(rewrite) = &proxy.path_rewrite {
        let mut path = rewrite.clone();
        for (name, value) in &matched.params {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        return path;
    }
    if proxy.strip_prefix {
        let rest = &normalized[matched.prefix_len.min(normalized.len())..];
        return if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        };
    }
    normalized.to_owned()
}

fn direct_response(direct: &DirectResponse) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(direct.body.clone())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = direct.status;
    *response.headers_mut() = direct.headers.clone();
    response
}

/// A response body that holds its upstream lease until the body is done, so in-flight counts
/// and the concurrency cap cover streaming responses too; and that ends with an error once
/// the upstream has sent nothing for [`Limits::upstream_idle_timeout`].
struct LeasedBody {
    inner: Incoming,
    _lease: Lease,
    idle_timeout: std::time::Duration,
    /// Armed the first time the upstream makes the body wait (a body that comes whole with
    /// its headers never needs a timer); reset when it waits again after progress.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.progressed = true;
                return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
            }
            Poll::Pending if this.idle_timeout.is_zero() => return Poll::Pending,
            Poll::Pending => {}
        }
        // The clock is read only to arm or reset the timer, not at every wait. A limit too
        // far off to be a time is no limit.
        let rearm = this.idle.is_none() || std::mem::take(&mut this.progressed);
        if rearm {
            let Some(deadline) = tokio::time::Instant::now().checked_add(this.idle_timeout) else {
                return Poll::Pending;
            };
            match &mut this.idle {
                Some(idle) => idle.as_mut().reset(deadline),
                None => this.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.progressed = false;
        }
        let Some(idle) = &mut this.idle else {
            return Poll::Pending;
        };
        match idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the upstream sent nothing for {:?}",
                this.idle_timeout
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether two header names are the same once `_` is read as `-`.
fn same_but_for_underscores(a: &str, b: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}
