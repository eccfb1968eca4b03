//! JWT and client-certificate authentication end to end: a real `sluice-dp`, a JWKS served by
//! a test HTTP server, tokens signed here; and a TLS listener asking for client certificates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use sluice_tests::backend::EchoBackend;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::http::problem_kind as problem;
use sluice_tests::pki::{Leaf, TestCa};
use sluice_tests::ports::free_addr;
use tokio::net::TcpListener;

const PRIVATE_KEY: &str = include_str!("../fixtures/jwt-rsa.pem");
const PUBLIC_KEY: &str = include_str!("../fixtures/jwt-rsa.pub.pem");
const JWK: &str = include_str!("../fixtures/jwt-rsa.jwk.json");
const ISSUER: &str = "https://id.example.com/";
/// A second issuer of the policy, whose tokens are signed with a shared secret.
const PARTNER: &str = "https://partner.example.com/";
const PARTNER_SECRET: &[u8] = b"partner-secret-of-32-bytes-or-more!!";

/// A JWKS endpoint that counts its requests.
struct JwksServer {
    addr: SocketAddr,
    fetches: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start(document: Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fetches = Arc::new(AtomicU64::new(0));
        let counter = fetches.clone();
        let body = Bytes::from(document.to_string());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counter, body) = (counter.clone(), body.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(body))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer { addr, fetches }
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Value, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(PRIVATE_KEY.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn claims(subject: &str) -> Value {
    json!({
        "iss": ISSUER, "sub": subject, "aud": "orders",
        "exp": now() + 300, "iat": now(), "scope": "orders:read", "tenant": "t-42",
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token whose header and signature are made by hand (what no library will sign).
fn forged(header: &Value, claims: &Value, sign_with_hmac_key: Option<&[u8]>) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    match sign_with_hmac_key {
        None => format!("{signing_input}."),
        Some(secret) => {
            let key = EncodingKey::from_secret(secret);
            let signature =
                jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256)
                    .unwrap();
            format!("{signing_input}.{signature}")
        }
    }
}

fn jwt_config(backend: &EchoBackend, jwks: &JwksServer) -> String {
    format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{backend}" }}]
policies:
  - name: tokens
    jwt:
      issuers:
        - issuer: "{ISSUER}"
          audiences: [orders]
          algorithms: [RS256]
          jwks_url: "http://{jwks}/jwks.json"
          claim_headers: {{ tenant: x-tenant }}
        - issuer: "{PARTNER}"
          algorithms: [HS256]
          jwks: {{ keys: [{{ kty: oct, kid: p1, k: "{partner_key}" }}] }}
apis:
  - name: orders
    policies: [tokens]
    routes:
      - {{ name: list, path: /orders, scopes: ["orders:read"], proxy: {{ upstream: app }} }}
plans:
  - name: basic
consumers:
  - name: acme
    credentials:
      - jwt: {{ issuer: "{ISSUER}", subject: acme-service }}
  - name: partner
    credentials:
      - jwt: {{ issuer: "{PARTNER}", subject: partner-service }}
subscriptions:
  - {{ consumer: acme, api: orders, plan: basic }}
  - {{ consumer: partner, api: orders, plan: basic }}
"#,
        backend = backend.url(),
        jwks = jwks.addr,
        partner_key = b64(PARTNER_SECRET),
    )
}

async fn call(node: &DataPlane, token: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .get(node.url("/orders"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn tokens_are_checked_against_the_issuers_jwks_and_mapped_to_consumers() {
    let mut jwk: Value = serde_json::from_str(JWK).unwrap();
    jwk["kid"] = json!("k1");
    let jwks = JwksServer::start(json!({ "keys": [jwk] })).await;
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&jwt_config(&backend, &jwks), &[]).unwrap();

    let (status, _, echo) = call(&node, &sign(&claims("acme-service"), "k1")).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "acme");
    assert_eq!(
        echo["headers"]["x-tenant"], "t-42",
        "a claim passed as a header"
    );
    // Another issuer of the policy maps no claims: its tokens' `tenant` is not passed on.
    let mut partner = claims("partner-service");
    partner["iss"] = json!(PARTNER);
    let partner = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &partner,
        &EncodingKey::from_secret(PARTNER_SECRET),
    )
    .unwrap();
    let (status, _, echo) = call(&node, &partner).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "partner");
    assert!(echo["headers"].get("x-tenant").is_none(), "{echo}");

    let mut expired = claims("acme-service");
    expired["exp"] = json!(now() - 120);
    let mut early = claims("acme-service");
    early["nbf"] = json!(now() + 120);
    let mut wrong_audience = claims("acme-service");
    wrong_audience["aud"] = json!("billing");
    let mut wrong_issuer = claims("acme-service");
    wrong_issuer["iss"] = json!("https://evil.example.com/");
    let mut no_scope = claims("acme-service");
    no_scope["scope"] = json!("orders:write");
    let good = sign(&claims("acme-service"), "k1");
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let mut tampered_claims = claims("acme-service");
    tampered_claims["sub"] = json!("someone-else");
    let tampered = format!(
        "{head}.{}.{signature}",
        b64(tampered_claims.to_string().as_bytes())
    );
    let none = forged(
        &json!({"alg": "none", "typ": "JWT"}),
        &claims("acme-service"),
        None,
    );
    let confused = forged(
        &json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}),
        &claims("acme-service"),
        Some(PUBLIC_KEY.as_bytes()),
    );
    for (what, token, reason) in [
        ("expired", sign(&expired, "k1"), "token-expired"),
        ("nbf ahead", sign(&early, "k1"), "token-not-yet-valid"),
        ("wrong aud", sign(&wrong_audience, "k1"), "bad-audience"),
        ("wrong iss", sign(&wrong_issuer, "k1"), "unknown-issuer"),
        ("alg none", none, "algorithm-not-allowed"),
        (
            "HS256 with the RSA public key",
            confused,
            "algorithm-not-allowed",
        ),
        ("tampered", tampered, "bad-signature"),
        (
            "no credential",
            sign(&claims("stranger"), "k1"),
            "unknown-subject",
        ),
    ] {
        let (status, headers, body) = call(&node, &token).await;
        assert_eq!((status, problem(&body)), (401, reason), "{what}: {body}");
        // What is configured (issuers, key ids, algorithms) is the node's, not the caller's.
        let detail = body["detail"].as_str().unwrap_or_default();
        // (A verified token's own issuer may be quoted back: its holder knows it.)
        let issuer = if what == "no credential" { "-" } else { ISSUER };
        for secret in [issuer, "k1", "RS256", &jwks.addr.to_string()] {
            assert!(!detail.contains(secret), "{what}: {detail}");
        }
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("Bearer") && challenge.contains("invalid_token"),
            "{what}: {challenge}"
        );
    }
    let (status, _, body) = call(&node, &sign(&no_scope, "k1")).await;
    assert_eq!(
        (status, problem(&body)),
        (403, "insufficient-scope"),
        "{body}"
    );

    // An unknown kid makes the node fetch the JWKS once more, not once per request.
    let before = jwks.fetches();
    let (status, _, body) = call(&node, &sign(&claims("acme-service"), "k2")).await;
    assert_eq!((status, problem(&body)), (401, "unknown-key"), "{body}");
    assert!(!body["detail"].as_str().unwrap().contains("k2"), "{body}");
    assert_eq!(
        jwks.fetches(),
        before + 1,
        "one refetch for the unknown kid"
    );
    for _ in 0..3 {
        let (status, _, _) = call(&node, &sign(&claims("acme-service"), "k3")).await;
        assert_eq!(status, 401);
    }
    assert_eq!(jwks.fetches(), before + 1, "no refetch within the cooldown");
}

async fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(u16, Value)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("api.example.com")?, stream)
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get("https://api.example.com/orders")
        .header("host", "api.example.com")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A node's config for client-certificate tests: an API whose one route needs a certificate
/// chaining to `cas` (PEM), served with `server`'s certificate for every name, and
/// `consumers` (YAML list items), each subscribed to the API.
fn mtls_config(backend: &EchoBackend, cas: &str, server: &Leaf, consumers: &str) -> String {
    let subscriptions: String = consumers
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- name: "))
        .map(|name| format!("  - {{ consumer: {name}, api: orders, plan: basic }}\n"))
        .collect();
    format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{backend}" }}]
policies:
  - name: certificates
    mtls:
      ca_pem: {cas}
apis:
  - name: orders
    policies: [certificates]
    routes:
      - {{ name: list, path: /orders, proxy: {{ upstream: app }} }}
plans:
  - name: basic
consumers:
{consumers}subscriptions:
{subscriptions}certificates:
  - name: api
    snis: ["*"]
    cert_pem: {cert}    key_pem: {key}"#,
        backend = backend.url(),
        cas = Leaf::yaml_block(cas, 8),
        cert = Leaf::yaml_block(&server.cert_pem, 6),
        key = Leaf::yaml_block(&server.key_pem, 6),
    )
}

#[tokio::test]
async fn client_certificates_must_chain_to_the_policy_ca_and_be_valid() {
    let server_ca = TestCa::new("server-ca").unwrap();
    let client_ca = TestCa::new("client-ca").unwrap();
    let foreign_ca = TestCa::new("foreign-ca").unwrap();
    let server = server_ca.leaf(&["api.example.com"]).unwrap();
    let good = client_ca.client_leaf("acme-client", false).unwrap();
    let expired = client_ca.client_leaf("acme-client", true).unwrap();
    let foreign = foreign_ca.client_leaf("acme-client", false).unwrap();
    let unknown = client_ca.client_leaf("nobody", false).unwrap();
    let backend = EchoBackend::start("app").await.unwrap();
    let config = mtls_config(
        &backend,
        &client_ca.cert_pem(),
        &server,
        r#"  - name: acme
    credentials:
      - mtls: { subject: "CN=acme-client" }
"#,
    );
    let tls = free_addr();
    let node = DataPlane::start(&config, &["--tls-listen", &tls.to_string()]).unwrap();

    let (status, body) = https_get(
        tls,
        server_ca.client_config_with_certificate(&good).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-consumer-name"], "acme");

    for (what, certificate, reason) in [
        ("expired", &expired, "certificate-expired"),
        ("foreign CA", &foreign, "certificate-untrusted"),
        ("no credential", &unknown, "unknown-certificate"),
    ] {
        let config = server_ca
            .client_config_with_certificate(certificate)
            .unwrap();
        let (status, body) = https_get(tls, config).await.unwrap();
        assert_eq!((status, problem(&body)), (401, reason), "{what}: {body}");
    }
    let (status, body) = https_get(tls, server_ca.client_config(&[]).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (status, problem(&body)),
        (401, "missing-credential"),
        "no certificate: {body}"
    );
    assert_eq!(backend.requests(), 1);
    drop(node);
}

#[tokio::test]
async fn a_subject_credential_tied_to_a_ca_matches_only_what_that_ca_issued() {
    let server_ca = TestCa::new("server-ca").unwrap();
    let own_ca = TestCa::new("own-ca").unwrap();
    let partner_ca = TestCa::new("partner-ca").unwrap();
    let server = server_ca.leaf(&["api.example.com"]).unwrap();
    let backend = EchoBackend::start("app").await.unwrap();
    // One policy trusting both CAs. "CN=shared-client" names acme under the own CA and
    // globex under the partner's; "CN=any-client" names initech under either.
    let config = mtls_config(
        &backend,
        &(own_ca.cert_pem() + &partner_ca.cert_pem()),
        &server,
        &format!(
            r#"  - name: acme
    credentials:
      - mtls: {{ subject: "CN=shared-client", ca_sha256: "{own}" }}
  - name: globex
    credentials:
      - mtls: {{ subject: "CN=shared-client", ca_sha256: "{partner}" }}
  - name: initech
    credentials:
      - mtls: {{ subject: "CN=any-client" }}
"#,
            own = own_ca.fingerprint_sha256(),
            partner = partner_ca.fingerprint_sha256(),
        ),
    );
    let tls = free_addr();
    let node = DataPlane::start(&config, &["--tls-listen", &tls.to_string()]).unwrap();
    for (ca, name, consumer) in [
        (&own_ca, "shared-client", "acme"),
        (&partner_ca, "shared-client", "globex"),
        (&own_ca, "any-client", "initech"),
        (&partner_ca, "any-client", "initech"),
    ] {
        let leaf = ca.client_leaf(name, false).unwrap();
        let (status, body) = https_get(
            tls,
            server_ca.client_config_with_certificate(&leaf).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(
            body["headers"]["x-consumer-name"], consumer,
            "CN={name} should be {consumer}"
        );
    }
    drop(node);
}
