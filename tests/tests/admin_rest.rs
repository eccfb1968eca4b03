//! The REST admin API of a real `sluice-cp` on real Postgres: every endpoint, its error paths
//! and role checks.

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sluice_control_plane::api::rest::endpoints::{COLLECTIONS, ENDPOINTS};
use sluice_tests::control_plane::{ADMIN_TOKEN, ControlPlane};

const EXAMPLE: &str = include_str!("../../deploy/examples/sluice.yaml");
const PETSTORE: &str = include_str!("../fixtures/openapi/petstore.yaml");

/// One REST call: status, headers and body (JSON when it parses, else a string).
struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn call(
    cp: &ControlPlane,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut request = Client::new().request(method, cp.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Reply {
        status,
        headers,
        body,
    })
}

async fn admin(
    cp: &ControlPlane,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Reply> {
    call(cp, Some(ADMIN_TOKEN), method, path, body, &[]).await
}

async fn send_text(
    cp: &ControlPlane,
    path: &str,
    content_type: &str,
    text: &str,
) -> anyhow::Result<Reply> {
    let response = Client::new()
        .post(cp.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", content_type)
        .body(text.to_owned())
        .send()
        .await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn assert_problem(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(reply.body["status"], status.as_u16());
    assert!(
        reply.body["type"]
            .as_str()
            .unwrap()
            .starts_with("https://sluice.dev/problems/")
    );
}

async fn token(cp: &ControlPlane, name: &str, role: &str) -> anyhow::Result<String> {
    let reply = admin(
        cp,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "name": name, "role": role })),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    Ok(reply.body["token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn tokens_roles_and_distinct_401_and_403() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let missing = call(&cp, None, Method::GET, "/v1/apis", None, &[]).await?;
    assert_problem(&missing, StatusCode::UNAUTHORIZED);
    assert!(
        missing.headers["www-authenticate"]
            .to_str()?
            .starts_with("Bearer")
    );
    assert_problem(
        &call(&cp, Some("nope"), Method::GET, "/v1/apis", None, &[]).await?,
        StatusCode::UNAUTHORIZED,
    );

    let viewer = token(&cp, "ci-viewer", "viewer").await?;
    let editor = token(&cp, "ci-editor", "editor").await?;
    assert!(viewer.starts_with("sluice_"));
    assert_eq!(
        call(&cp, Some(&viewer), Method::GET, "/v1/apis", None, &[])
            .await?
            .status,
        StatusCode::OK
    );
    let body = json!({ "name": "svc", "targets": [{ "url": "http://127.0.0.1:1" }] });
    let denied = call(
        &cp,
        Some(&viewer),
        Method::POST,
        "/v1/upstreams",
        Some(body.clone()),
        &[],
    )
    .await?;
    assert_problem(&denied, StatusCode::FORBIDDEN);
    assert!(
        denied.body["detail"]
            .as_str()
            .unwrap()
            .contains("needs editor")
    );
    let created = call(
        &cp,
        Some(&editor),
        Method::POST,
        "/v1/upstreams",
        Some(body),
        &[],
    )
    .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_problem(
        &call(&cp, Some(&editor), Method::GET, "/v1/tokens", None, &[]).await?,
        StatusCode::FORBIDDEN,
    );

    // The actor of a version is the token's name.
    let versions = admin(&cp, Method::GET, "/v1/versions", None).await?;
    assert_eq!(versions.body["items"][0]["actor"], "ci-editor");

    let listed = admin(&cp, Method::GET, "/v1/tokens", None).await?;
    let names: Vec<&str> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ci-editor", "ci-viewer"]);
    assert!(
        !listed.body.to_string().contains(&viewer),
        "tokens are never listed"
    );
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "ci-viewer", "role": "viewer" })),
        )
        .await?,
        StatusCode::CONFLICT,
    );
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "x", "role": "root" })),
        )
        .await?,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert_eq!(
        admin(&cp, Method::DELETE, "/v1/tokens/ci-viewer", None)
            .await?
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &call(&cp, Some(&viewer), Method::GET, "/v1/apis", None, &[]).await?,
        StatusCode::UNAUTHORIZED,
    );
    assert_problem(
        &admin(&cp, Method::DELETE, "/v1/tokens/ci-viewer", None).await?,
        StatusCode::NOT_FOUND,
    );
    Ok(())
}

#[tokio::test]
async fn crud_on_every_collection_with_etags_and_errors() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let leaf = sluice_tests::pki::TestCa::new("Sluice test CA")?.leaf(&["api.example.com"])?;
    // One body per collection, created in reference order.
    let bodies = [
        ("brokers", json!({ "name": "bus", "memory": {} })),
        (
            "upstreams",
            json!({ "name": "svc", "targets": [{ "url": "http://127.0.0.1:8081" }] }),
        ),
        ("policies", json!({ "name": "keys", "key_auth": {} })),
        (
            "plans",
            json!({ "name": "gold", "rate_limits": [{ "limit": 10, "per": "second" }] }),
        ),
        (
            "apis",
            json!({ "name": "shop", "policies": ["keys"], "routes": [
            { "name": "items", "path": "/items/{id}", "proxy": { "upstream": "svc" } },
            { "name": "events", "path": "/events", "publish": { "broker": "bus", "topic": "events" } }
        ] }),
        ),
        ("consumers", json!({ "name": "acme", "custom_id": "C-1" })),
        (
            "subscriptions",
            json!({ "consumer": "acme", "api": "shop", "plan": "gold" }),
        ),
        (
            "certificates",
            json!({ "name": "edge", "cert_pem": leaf.cert_pem, "key_pem": leaf.key_pem,
                    "snis": ["api.example.com"] }),
        ),
    ];
    assert_eq!(bodies.len(), COLLECTIONS.len());
    let mut ids = Vec::new();
    // Each create is a version of its own, and a resource's ETag is the number of the version
    // that last wrote it.
    for (number, (collection, body)) in (1..).zip(&bodies) {
        let created = admin(
            &cp,
            Method::POST,
            &format!("/v1/{collection}"),
            Some(body.clone()),
        )
        .await?;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{collection}: {}",
            created.body
        );
        assert_eq!(created.headers["etag"], format!("\"{number}\"").as_str());
        let id = created.body["id"].as_str().unwrap().to_owned();
        assert_eq!(
            created.headers["location"].to_str()?,
            format!("/v1/{collection}/{id}")
        );
        // By id and by name.
        let by_id = admin(&cp, Method::GET, &format!("/v1/{collection}/{id}"), None).await?;
        assert_eq!(by_id.body, created.body);
        let name = created.body["name"].as_str().unwrap();
        assert_eq!(
            admin(&cp, Method::GET, &format!("/v1/{collection}/{name}"), None)
                .await?
                .body["id"],
            id
        );
        // Creating it again is a conflict.
        assert_problem(
            &admin(
                &cp,
                Method::POST,
                &format!("/v1/{collection}"),
                Some(body.clone()),
            )
            .await?,
            StatusCode::CONFLICT,
        );
        ids.push((collection.to_owned(), id));
    }
    // References were resolved from names to ids.
    let subscription = admin(&cp, Method::GET, "/v1/subscriptions/acme.shop", None).await?;
    assert_eq!(subscription.body["consumer"], ids[5].1);

    // Update with If-Match: current → 200 and a new ETag; stale → 412.
    let path = format!("/v1/upstreams/{}", ids[1].1);
    let mut body = admin(&cp, Method::GET, &path, None).await?.body;
    body["targets"][0]["weight"] = json!(50);
    let updated = call(
        &cp,
        Some(ADMIN_TOKEN),
        Method::PUT,
        &path,
        Some(body.clone()),
        &[("if-match", "\"2\"")],
    )
    .await?;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    let next = format!("\"{}\"", bodies.len() + 1);
    assert_eq!(updated.headers["etag"], next.as_str());
    assert_eq!(updated.body["targets"][0]["weight"], 50);
    assert_problem(
        &call(
            &cp,
            Some(ADMIN_TOKEN),
            Method::PUT,
            &path,
            Some(body.clone()),
            &[("if-match", "\"2\"")],
        )
        .await?,
        StatusCode::PRECONDITION_FAILED,
    );
    assert_problem(
        &call(
            &cp,
            Some(ADMIN_TOKEN),
            Method::DELETE,
            &path,
            None,
            &[("if-match", "\"2\"")],
        )
        .await?,
        StatusCode::PRECONDITION_FAILED,
    );
    // "0" is no version of anything, and a PUT never asks to create: it is refused before it
    // waits for the registry's commit lock (held here, as by a DELETE about to commit, which
    // the PUT would have followed by bringing the resource back).
    {
        use sqlx::Connection;
        let mut holder = sqlx::PgConnection::connect(&cp.database_url).await?;
        sqlx::query("BEGIN").execute(&mut holder).await?;
        sqlx::query("SELECT version FROM registry_head FOR UPDATE")
            .execute(&mut holder)
            .await?;
        let zero = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            call(
                &cp,
                Some(ADMIN_TOKEN),
                Method::PUT,
                &path,
                Some(body.clone()),
                &[("if-match", "\"0\"")],
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("a PUT with If-Match \"0\" waited for the commit lock"))??;
        assert_problem(&zero, StatusCode::PRECONDITION_FAILED);
        sqlx::query("ROLLBACK").execute(&mut holder).await?;
    }

    // Validation names every field.
    let invalid = admin(
        &cp,
        Method::POST,
        "/v1/upstreams",
        Some(json!({ "name": "Bad Name", "targets": [{ "url": "ftp://x" }], "colour": 1 })),
    )
    .await?;
    assert_problem(&invalid, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(invalid.body["errors"][0]["path"], "colour");
    let invalid = admin(
        &cp,
        Method::POST,
        "/v1/upstreams",
        Some(json!({ "name": "Bad Name", "targets": [{ "url": "ftp://x" }] })),
    )
    .await?;
    let paths: Vec<&str> = invalid.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["name", "targets[0].url"], "{}", invalid.body);
    let dangling = admin(
        &cp,
        Method::POST,
        "/v1/apis",
        Some(json!({ "name": "x", "routes": [{ "path": "/", "proxy": { "upstream": "ghost" } }] })),
    )
    .await?;
    assert_problem(&dangling, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        dangling.body["errors"][0]["path"],
        "routes[0].proxy.upstream"
    );
    let not_json = Client::new()
        .post(cp.url("/v1/plans"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{oops")
        .send()
        .await?;
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert_problem(
        &admin(&cp, Method::GET, "/v1/apis?colour=red", None).await?,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/apis?limit=1&limit=2", None).await?,
        StatusCode::BAD_REQUEST,
    );
    let not_object = admin(
        &cp,
        Method::PUT,
        &format!("/v1/plans/{}", ids[3].1),
        Some(json!([])),
    )
    .await?;
    assert_problem(&not_object, StatusCode::BAD_REQUEST);
    assert_problem(
        &admin(&cp, Method::GET, "/v1/upstreams/%FF%FE", None).await?,
        StatusCode::BAD_REQUEST,
    );
    // A name freed by a rename can be taken again.
    admin(
        &cp,
        Method::POST,
        "/v1/brokers",
        Some(json!({ "name": "m1", "memory": {} })),
    )
    .await?;
    admin(
        &cp,
        Method::PUT,
        "/v1/brokers/m1",
        Some(json!({ "name": "m2", "memory": {} })),
    )
    .await?;
    let again = admin(
        &cp,
        Method::POST,
        "/v1/brokers",
        Some(json!({ "name": "m1", "memory": {} })),
    )
    .await?;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(
        admin(&cp, Method::DELETE, "/v1/brokers/m1", None)
            .await?
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(&cp, Method::DELETE, "/v1/brokers/m2", None)
            .await?
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(&cp, Method::PATCH, "/v1/apis", None).await?,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    let huge = json!({ "name": "x".repeat(5 * 1024 * 1024) });
    assert_problem(
        &admin(&cp, Method::POST, "/v1/plans", Some(huge)).await?,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let lowercase = call(
        &cp,
        None,
        Method::GET,
        "/v1/apis",
        None,
        &[("authorization", &format!("bearer {ADMIN_TOKEN}"))],
    )
    .await?;
    assert_eq!(
        lowercase.status,
        StatusCode::OK,
        "the Bearer scheme is case-insensitive"
    );
    let moved = admin(&cp, Method::PUT, &format!("/v1/plans/{}", ids[3].1), Some(json!({ "name": "gold", "group": "prod", "rate_limits": [{ "limit": 1, "per": "second" }] }))).await?;
    assert_problem(&moved, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(moved.body["errors"][0]["path"], "group");
    assert_problem(
        &admin(&cp, Method::GET, "/v1/widgets", None).await?,
        StatusCode::NOT_FOUND,
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/apis/nope", None).await?,
        StatusCode::NOT_FOUND,
    );

    // Paging and filters.
    admin(
        &cp,
        Method::POST,
        "/v1/consumers",
        Some(json!({ "name": "globex" })),
    )
    .await?;
    let first = admin(&cp, Method::GET, "/v1/consumers?limit=1", None).await?;
    assert_eq!(first.body["items"].as_array().unwrap().len(), 1);
    let next = first.body["next"].as_str().unwrap();
    let second = admin(
        &cp,
        Method::GET,
        &format!("/v1/consumers?limit=1&after={next}"),
        None,
    )
    .await?;
    assert_eq!(second.body["items"].as_array().unwrap().len(), 1);
    assert!(second.body["next"].is_null());
    assert_ne!(first.body["items"][0]["id"], second.body["items"][0]["id"]);
    let by_consumer = admin(&cp, Method::GET, "/v1/subscriptions?consumer=acme", None).await?;
    assert_eq!(by_consumer.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        admin(&cp, Method::GET, "/v1/subscriptions?consumer=globex", None)
            .await?
            .body["items"],
        json!([])
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/apis?consumer=acme", None).await?,
        StatusCode::UNPROCESSABLE_ENTITY,
    );

    // Deleting something still referenced is refused; in reverse order, everything goes.
    let refused = admin(
        &cp,
        Method::DELETE,
        &format!("/v1/upstreams/{}", ids[1].1),
        None,
    )
    .await?;
    assert_problem(&refused, StatusCode::CONFLICT);
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("still referenced")
    );
    for (collection, id) in ids.iter().rev() {
        let deleted = admin(&cp, Method::DELETE, &format!("/v1/{collection}/{id}"), None).await?;
        assert_eq!(
            deleted.status,
            StatusCode::NO_CONTENT,
            "{collection}: {}",
            deleted.body
        );
        assert_problem(
            &admin(&cp, Method::GET, &format!("/v1/{collection}/{id}"), None).await?,
            StatusCode::NOT_FOUND,
        );
    }
    Ok(())
}

#[tokio::test]
async fn bodies_and_queries_the_registry_cannot_take_are_refused_with_their_reason()
-> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let policy =
        json!({ "name": "rl", "rate_limit": { "limits": [{ "limit": 5, "per": "second" }] } });
    let made = admin(&cp, Method::POST, "/v1/policies", Some(policy)).await?;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    // A consumer's policies are looked up by name, as an API's are.
    let consumer = json!({ "name": "acme", "policies": ["rl"] });
    let made = admin(&cp, Method::POST, "/v1/consumers", Some(consumer)).await?;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    // Credentials nested in a consumer's body would be dropped: refused, with where they go.
    let nested =
        json!({ "name": "beta", "credentials": [{ "api_key": { "key": "beta-key-0123456789" } }] });
    let refused = admin(&cp, Method::POST, "/v1/consumers", Some(nested)).await?;
    assert_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        refused.body.to_string().contains("/credentials"),
        "{}",
        refused.body
    );
    // A NUL character is the client's mistake, not the server's.
    let upstream = json!({ "name": "app", "targets": [{ "url": "http://127.0.0.1:9" }] });
    let refused = admin(
        &cp,
        Method::POST,
        "/v1/upstreams?message=a%00b",
        Some(upstream),
    )
    .await?;
    assert_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.body.to_string().contains("NUL"), "{}", refused.body);
    // An export format it does not write.
    let refused = admin(&cp, Method::GET, "/v1/export?format=xml", None).await?;
    assert_problem(&refused, StatusCode::BAD_REQUEST);
    // Token endpoints take no parameters either: `?dry_run` must not delete for real.
    let refused = admin(&cp, Method::GET, "/v1/tokens?limit=5", None).await?;
    assert_problem(&refused, StatusCode::BAD_REQUEST);
    // A filter the collection does not have, whether or not the name exists.
    let refused = admin(&cp, Method::GET, "/v1/apis?consumer=ghost", None).await?;
    assert_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        refused.body["errors"][0]["path"], "consumer",
        "{}",
        refused.body
    );
    // A bare `?dry_run` is a dry run.
    let document = "format_version: 1\nupstreams:\n  - name: dry\n    targets: [{ url: \"http://127.0.0.1:9\" }]\n";
    let dry = send_text(&cp, "/v1/apply?dry_run", "application/yaml", document).await?;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert_eq!(dry.body["dry_run"], true, "{}", dry.body);
    assert_problem(
        &admin(&cp, Method::GET, "/v1/upstreams/dry", None).await?,
        StatusCode::NOT_FOUND,
    );
    // The bootstrap token's name cannot be taken by a stored token.
    let refused = admin(
        &cp,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "name": "bootstrap-admin", "role": "admin" })),
    )
    .await?;
    assert_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY);
    Ok(())
}

#[tokio::test]
async fn consumer_credentials_and_api_keys() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    admin(
        &cp,
        Method::POST,
        "/v1/consumers",
        Some(json!({ "name": "acme" })),
    )
    .await?;

    let issued = admin(
        &cp,
        Method::POST,
        "/v1/consumers/acme/keys",
        Some(json!({ "name": "ci" })),
    )
    .await?;
    assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
    let key = issued.body["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk_") && key.len() > 60);
    let credential = &issued.body["credential"];
    assert_eq!(
        credential["api_key"]["key_sha256"],
        sluice_proto::declarative::normalize::hash_api_key(&key)
    );
    assert!(key.starts_with(credential["api_key"]["prefix"].as_str().unwrap()));
    let listed = admin(&cp, Method::GET, "/v1/consumers/acme/keys", None).await?;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    assert!(
        !listed.body.to_string().contains(&key),
        "the plaintext is shown once only"
    );
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/consumers/acme/keys",
            Some(json!({ "name": "ci" })),
        )
        .await?,
        StatusCode::CONFLICT,
    );
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/consumers/acme/keys",
            Some(json!({ "lifetime": 3 })),
        )
        .await?,
        StatusCode::UNPROCESSABLE_ENTITY,
    );

    // A grace period or expiry of the wrong type is refused, not read as none (which would
    // revoke the key at once, or issue one that never expires).
    for (path, body, field) in [
        (
            "/v1/consumers/acme/keys/ci/rotate",
            json!({ "grace_period": 3600 }),
            "grace_period",
        ),
        (
            "/v1/consumers/acme/keys",
            json!({ "expires_at": 1_924_992_000 }),
            "expires_at",
        ),
        ("/v1/consumers/acme/keys", json!({ "name": 5 }), "name"),
    ] {
        let refused = admin(&cp, Method::POST, path, Some(body)).await?;
        assert_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(refused.body["errors"][0]["path"], field, "{}", refused.body);
    }
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/consumers/acme/keys/ci/rotate",
            Some(json!(["1h"])),
        )
        .await?,
        StatusCode::BAD_REQUEST,
    );
    let rotated = admin(
        &cp,
        Method::POST,
        "/v1/consumers/acme/keys/ci/rotate",
        Some(json!({ "grace_period": "1h" })),
    )
    .await?;
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.body);
    assert_ne!(rotated.body["key"], key);
    assert!(
        rotated.body["previous"]["expires_at"].is_string(),
        "{}",
        rotated.body
    );
    assert_eq!(rotated.body["previous"]["revoked"], Value::Null);
    let fresh = rotated.body["credential"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let too_long = admin(
        &cp,
        Method::POST,
        &format!("/v1/consumers/acme/keys/{fresh}/rotate"),
        Some(json!({ "grace_period": "1000000years" })),
    )
    .await?;
    assert_problem(&too_long, StatusCode::UNPROCESSABLE_ENTITY);
    let revoked = admin(
        &cp,
        Method::POST,
        &format!("/v1/consumers/acme/keys/{fresh}/revoke"),
        None,
    )
    .await?;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    assert_eq!(revoked.body["revoked"], true);

    // Other credential kinds through /credentials.
    let jwt = admin(
        &cp,
        Method::POST,
        "/v1/consumers/acme/credentials",
        Some(json!({ "name": "svc-jwt", "jwt": { "issuer": "https://i/", "subject": "svc" } })),
    )
    .await?;
    assert_eq!(jwt.status, StatusCode::CREATED, "{}", jwt.body);
    assert_eq!(
        admin(&cp, Method::GET, "/v1/consumers/acme/credentials", None)
            .await?
            .body["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        admin(
            &cp,
            Method::GET,
            "/v1/consumers/acme/credentials/svc-jwt",
            None
        )
        .await?
        .body["jwt"]["subject"],
        "svc"
    );
    assert_problem(
        &admin(
            &cp,
            Method::POST,
            "/v1/consumers/acme/keys/svc-jwt/rotate",
            None,
        )
        .await?,
        StatusCode::BAD_REQUEST,
    );
    let bad = admin(
        &cp,
        Method::POST,
        "/v1/consumers/acme/credentials",
        Some(json!({ "api_key": { "key": "short" } })),
    )
    .await?;
    assert_problem(&bad, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.body["errors"][0]["path"], "api_key.key");
    // A consumer with credentials cannot be deleted before them.
    assert_problem(
        &admin(&cp, Method::DELETE, "/v1/consumers/acme", None).await?,
        StatusCode::CONFLICT,
    );
    assert_eq!(
        admin(
            &cp,
            Method::DELETE,
            "/v1/consumers/acme/credentials/svc-jwt",
            None
        )
        .await?
        .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/credentials", None).await?,
        StatusCode::NOT_FOUND,
    );
    Ok(())
}

#[tokio::test]
async fn apply_export_versions_diff_and_rollback() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&["--version-retention", "3"]).await?;
    let dry = send_text(&cp, "/v1/apply?dry_run=true", "application/yaml", EXAMPLE).await?;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert!(dry.body["version"].is_null());
    let resources = dry.body["changes"].as_array().unwrap().len();
    assert_eq!(resources, 18);
    assert!(
        admin(&cp, Method::GET, "/v1/versions", None).await?.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let applied = send_text(
        &cp,
        "/v1/apply?message=initial",
        "application/yaml",
        EXAMPLE,
    )
    .await?;
    assert_eq!(applied.body["version"]["number"], 1);
    assert_eq!(applied.body["version"]["message"], "initial");
    // Applying the export changes nothing.
    let export = Client::new()
        .get(cp.url("/v1/export"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(export.headers()["sluice-version"], "1");
    let exported = export.text().await?;
    let again = send_text(&cp, "/v1/apply", "application/yaml", &exported).await?;
    assert!(again.body["version"].is_null(), "{}", again.body);
    assert_eq!(again.body["changes"], json!([]));
    let as_json = Client::new()
        .get(cp.url("/v1/export?format=json"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json::<Value>()
        .await?;
    assert_eq!(as_json["format_version"], 1);

    // An invalid document: every error, nothing committed.
    let invalid = send_text(
        &cp,
        "/v1/apply",
        "application/yaml",
        "format_version: 1\napis: [{name: a, colour: red, hosts: 5}]\n",
    )
    .await?;
    assert_problem(&invalid, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        invalid.body["errors"].as_array().unwrap().len(),
        2,
        "{}",
        invalid.body
    );

    // Version 2 removes a route; diff and rollback.
    let smaller = EXAMPLE.replace(
        "      - name: demo-stream\n",
        "      - name: demo-stream-gone\n",
    );
    let v2 = send_text(&cp, "/v1/apply", "application/yaml", &smaller).await?;
    assert_eq!(v2.body["version"]["number"], 2, "{}", v2.body);
    let diff = admin(&cp, Method::GET, "/v1/versions/1/diff/2", None).await?;
    let change = &diff.body["changes"][0];
    assert_eq!(change["op"], "changed");
    assert_eq!(change["name"], "status");
    assert!(
        change["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"].as_str().unwrap().starts_with("routes[2]")),
        "{}",
        diff.body
    );
    let v0 = admin(&cp, Method::GET, "/v1/versions/0", None).await?;
    assert_eq!(v0.status, StatusCode::OK, "{}", v0.body);
    assert!(v0.body["version"].is_null());
    assert_eq!(v0.body["snapshot"]["format_version"], 1);
    let v1 = admin(&cp, Method::GET, "/v1/versions/1", None).await?;
    assert_eq!(v1.body["version"]["number"], 1);
    assert_eq!(v1.body["snapshot"]["apis"].as_array().unwrap().len(), 2);

    let rolled = admin(&cp, Method::POST, "/v1/versions/1/rollback", None).await?;
    assert_eq!(rolled.status, StatusCode::OK, "{}", rolled.body);
    assert_eq!(rolled.body["version"]["number"], 3);
    assert_eq!(rolled.body["version"]["message"], "rollback to 1");
    assert_eq!(
        rolled.body["version"]["content_hash"],
        applied.body["version"]["content_hash"]
    );
    let after = Client::new()
        .get(cp.url("/v1/export"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(after, exported);

    // Retention 3: after two more versions, version 1 is gone.
    admin(
        &cp,
        Method::POST,
        "/v1/consumers",
        Some(json!({ "name": "c1" })),
    )
    .await?;
    admin(
        &cp,
        Method::POST,
        "/v1/consumers",
        Some(json!({ "name": "c2" })),
    )
    .await?;
    let gone = admin(&cp, Method::POST, "/v1/versions/1/rollback", None).await?;
    assert_problem(&gone, StatusCode::GONE);
    assert!(
        gone.body["detail"]
            .as_str()
            .unwrap()
            .contains("no longer retained")
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/versions/99", None).await?,
        StatusCode::NOT_FOUND,
    );
    // Version 1 is past retention: its state cannot be shown either.
    assert_problem(
        &admin(&cp, Method::GET, "/v1/versions/1", None).await?,
        StatusCode::GONE,
    );
    assert_problem(
        &admin(&cp, Method::GET, "/v1/versions/x/diff/2", None).await?,
        StatusCode::BAD_REQUEST,
    );
    let listed = admin(&cp, Method::GET, "/v1/versions?limit=2", None).await?;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(listed.body["next"], 4);
    Ok(())
}

#[tokio::test]
async fn openapi_import_of_the_petstore() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let dry = send_text(
        &cp,
        "/v1/import/openapi?dry_run=true",
        "application/yaml",
        PETSTORE,
    )
    .await?;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert!(dry.body["version"].is_null());
    assert_eq!(dry.body["changes"].as_array().unwrap().len(), 2);
    assert_problem(
        &admin(&cp, Method::GET, "/v1/apis/swagger-petstore", None).await?,
        StatusCode::NOT_FOUND,
    );

    let imported = send_text(&cp, "/v1/import/openapi", "application/yaml", PETSTORE).await?;
    assert_eq!(imported.body["version"]["number"], 1, "{}", imported.body);
    let api = admin(&cp, Method::GET, "/v1/apis/swagger-petstore", None).await?;
    assert_eq!(api.body["base_path"], "/v1");
    let routes: Vec<(String, String)> = api.body["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["methods"][0].as_str().unwrap().to_owned(),
                r["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            ("GET".into(), "/pets".into()),
            ("POST".into(), "/pets".into()),
            ("GET".into(), "/pets/{petId}".into())
        ]
    );
    let upstream = admin(
        &cp,
        Method::GET,
        "/v1/upstreams/swagger-petstore-upstream",
        None,
    )
    .await?;
    assert_eq!(
        upstream.body["targets"][0]["url"],
        "http://petstore.swagger.io"
    );

    // What an operator attached since survives a new import of the spec: only what the spec
    // describes is replaced.
    let policy = json!({ "name": "keys", "key_auth": {} });
    let made = admin(&cp, Method::POST, "/v1/policies", Some(policy)).await?;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let mut edited = api.body.clone();
    edited["policies"] = json!(["keys"]);
    edited["hosts"] = json!(["pets.example.com"]);
    edited["routes"][0]["scopes"] = json!(["pets:read"]);
    let put = admin(&cp, Method::PUT, "/v1/apis/swagger-petstore", Some(edited)).await?;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    let again = send_text(&cp, "/v1/import/openapi", "application/yaml", PETSTORE).await?;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let kept = admin(&cp, Method::GET, "/v1/apis/swagger-petstore", None).await?;
    assert_eq!(
        kept.body["policies"],
        json!([made.body["id"]]),
        "{}",
        kept.body
    );
    assert_eq!(kept.body["hosts"], json!(["pets.example.com"]));
    assert_eq!(kept.body["routes"][0]["scopes"], json!(["pets:read"]));
    assert_eq!(kept.body["routes"].as_array().unwrap().len(), 3);

    // An upstream renamed since keeps its id, and the routes that go to it still do; the
    // import makes a new upstream of its own under the spec's name.
    let mut backend = upstream.body.clone();
    let held_id = backend["id"].clone();
    backend["name"] = json!("petstore-backend");
    let put = admin(
        &cp,
        Method::PUT,
        "/v1/upstreams/swagger-petstore-upstream",
        Some(backend),
    )
    .await?;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    let again = send_text(&cp, "/v1/import/openapi", "application/yaml", PETSTORE).await?;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let renamed = admin(&cp, Method::GET, "/v1/upstreams/petstore-backend", None).await?;
    assert_eq!(renamed.body["id"], held_id, "{}", renamed.body);
    let made = admin(
        &cp,
        Method::GET,
        "/v1/upstreams/swagger-petstore-upstream",
        None,
    )
    .await?;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    assert_ne!(made.body["id"], held_id);
    let kept = admin(&cp, Method::GET, "/v1/apis/swagger-petstore", None).await?;
    assert_eq!(
        kept.body["routes"][0]["proxy"]["upstream"], held_id,
        "a kept route still goes where the operator sent it"
    );

    // An upstream of the same name made through the API, under an id of its own, is updated by
    // a new import rather than clashing with it.
    let custom = admin(&cp, Method::POST, "/v1/upstreams", Some(json!({ "id": "0b5c1a3e-8d52-4c5e-9c1e-1f2a3b4c5d6e", "name": "other-upstream", "targets": [{ "url": "http://127.0.0.1:1" }] }))).await?;
    assert_eq!(custom.status, StatusCode::CREATED, "{}", custom.body);
    let renamed = send_text(
        &cp,
        "/v1/import/openapi?name=other",
        "application/yaml",
        PETSTORE,
    )
    .await?;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!(
        admin(&cp, Method::GET, "/v1/upstreams/other-upstream", None)
            .await?
            .body["id"],
        "0b5c1a3e-8d52-4c5e-9c1e-1f2a3b4c5d6e"
    );
    assert_eq!(
        admin(&cp, Method::GET, "/v1/upstreams/other-upstream", None)
            .await?
            .body["targets"][0]["url"],
        "http://petstore.swagger.io"
    );

    let swagger2 = send_text(
        &cp,
        "/v1/import/openapi",
        "application/yaml",
        "swagger: '2.0'\ninfo: {title: x, version: '1'}\npaths: {}\n",
    )
    .await?;
    assert_problem(&swagger2, StatusCode::UNPROCESSABLE_ENTITY);
    Ok(())
}

/// Every endpoint of the table is routed (none falls through to "no such endpoint" or 405),
/// and the OpenAPI document lists them all.
#[tokio::test]
async fn the_router_and_the_openapi_document_agree_with_the_endpoint_table() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let document = call(&cp, None, Method::GET, "/v1/openapi.json", None, &[])
        .await?
        .body;
    assert_eq!(document["openapi"], "3.1.0");
    for endpoint in ENDPOINTS {
        let path = endpoint
            .path
            .replace("{collection}", "apis")
            .replace("{key}", "k")
            .replace("{consumer}", "c")
            .replace("{credential}", "k")
            .replace("{number}", "1")
            .replace("{from}", "1")
            .replace("{to}", "1");
        let method = Method::from_bytes(endpoint.method.to_uppercase().as_bytes())?;
        let reply = admin(&cp, method, &path, None).await?;
        assert_ne!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{} {path}",
            endpoint.method
        );
        assert!(
            !reply.body.to_string().contains("no such endpoint"),
            "{} {path} is in the table but not routed",
            endpoint.method
        );
        let documented = endpoint.path.replace("{collection}", "apis");
        assert!(
            document["paths"][&documented][endpoint.method].is_object(),
            "{} {documented} missing from openapi.json",
            endpoint.method
        );
    }
    assert!(document["components"]["schemas"]["Upstream"]["properties"]["targets"].is_object());
    Ok(())
}

#[tokio::test]
async fn version_diffs_show_a_changed_private_key_only_as_a_fingerprint() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let ca = sluice_tests::pki::TestCa::new("Sluice test CA")?;
    let (first, renewed) = (
        ca.leaf(&["api.example.com"])?,
        ca.leaf(&["api.example.com"])?,
    );
    let body = |leaf: &sluice_tests::pki::Leaf| {
        json!({ "name": "edge", "cert_pem": leaf.cert_pem, "key_pem": leaf.key_pem,
                "snis": ["api.example.com"] })
    };
    let created = admin(&cp, Method::POST, "/v1/certificates", Some(body(&first))).await?;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let updated = admin(
        &cp,
        Method::PUT,
        "/v1/certificates/edge",
        Some(body(&renewed)),
    )
    .await?;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    let versions = admin(&cp, Method::GET, "/v1/versions?limit=2", None).await?;
    let (to, from) = (
        versions.body["items"][0]["number"].as_u64().unwrap(),
        versions.body["items"][1]["number"].as_u64().unwrap(),
    );
    let diff = admin(
        &cp,
        Method::GET,
        &format!("/v1/versions/{from}/diff/{to}"),
        None,
    )
    .await?;
    let text = diff.body.to_string();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let fields = diff.body["changes"][0]["fields"].as_array().unwrap();
    let key = fields
        .iter()
        .find(|f| f["path"] == "key_pem")
        .expect("the key change is listed");
    assert!(
        key["before"]
            .as_str()
            .unwrap()
            .starts_with("(redacted; sha256 ")
    );
    assert_ne!(key["before"], key["after"]);
    Ok(())
}

#[tokio::test]
async fn the_registry_is_reached_over_tls_when_the_url_asks_for_it() -> anyhow::Result<()> {
    let database = sluice_tests::postgres::TestDatabase::create().await?;
    let separator = if database.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", database.url);
    let cp = ControlPlane::on_database(&url, &[])?;
    let ready = Client::new().get(cp.url("/readyz")).send().await?;
    assert_eq!(ready.status(), StatusCode::OK);
    // Every connection the control plane holds to its database is encrypted.
    let mut check = database.connect().await?;
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(&database.name)
    .fetch_one(&mut check)
    .await?;
    assert!(total > 0, "the control plane holds no connection");
    assert_eq!(
        encrypted, total,
        "{total} connections, {encrypted} over TLS"
    );
    drop(cp);
    Ok(())
}
