//! `sluicectl` against a real control plane: every command family, the output formats, and
//! errors a person can act on.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::control_plane::{ADMIN_TOKEN, ControlPlane};
use sluice_tests::process::binary;

fn ctl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("sluicectl")?)
        .args(["--server", &cp.url(""), "--token", ADMIN_TOKEN])
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("SLUICE_SERVER")
        .env_remove("SLUICE_TOKEN")
        .output()?)
}

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn json(output: Output) -> Value {
    serde_json::from_str(&ok(output)).expect("--output json prints JSON")
}

/// The exit code and standard error of a run that must fail with nothing on standard output.
fn failed(output: &Output) -> (Option<i32>, String) {
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `sluicectl --server SERVER ARGS` with nothing from the environment: no config file, server
/// or token.
fn bare(server: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("sluicectl")?)
        .args(["--server", server])
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SLUICECTL_CONFIG")
        .env_remove("SLUICE_SERVER")
        .env_remove("SLUICE_TOKEN")
        .output()?)
}

/// A server that gives every request the same answer (`head`: status, then any headers), as
/// a proxy in front of the control plane might. Returns its URL.
fn answering(head: &str, body: &str) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let response = format!(
        "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // The whole request is read first, so that the client sees the answer rather
            // than a reset connection.
            let Ok(mut reader) = stream.try_clone().map(BufReader::new) else {
                continue;
            };
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                let _ = (&stream).write_all(response.as_bytes());
            }
        }
    });
    Ok(url)
}

fn example() -> String {
    format!(
        "{}/../deploy/examples/sluice.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[tokio::test]
async fn sluicectl_drives_the_whole_admin_api() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let dir = tempfile::tempdir()?;

    // apply (dry run, then real), export, versions.
    let dry = ok(ctl(&cp, &["apply", "-f", &example(), "--dry-run"])?);
    assert!(dry.contains("dry run: nothing committed"), "{dry}");
    let applied = ok(ctl(
        &cp,
        &["apply", "-f", &example(), "-m", "from the cli"],
    )?);
    assert!(applied.contains("version 1 (from the cli)"), "{applied}");
    let exported = ctl(&cp, &["export"])?;
    // The version goes to standard error, so that standard output is the document alone.
    assert_eq!(
        String::from_utf8_lossy(&exported.stderr).trim(),
        "exported version 1"
    );
    let export = ok(exported);
    let again = dir.path().join("export.yaml");
    std::fs::write(&again, &export)?;
    assert!(ok(ctl(&cp, &["apply", "-f", again.to_str().unwrap()])?).contains("no changes"));

    // Resources: list, get, create, update, delete.
    let apis = json(ctl(&cp, &["apis", "list", "-o", "json"])?);
    assert_eq!(apis["items"].as_array().unwrap().len(), 2);
    let table = ok(ctl(&cp, &["apis", "list"])?);
    assert!(
        table.contains("orders") && table.contains("NAME"),
        "{table}"
    );
    let upstream = dir.path().join("upstream.yaml");
    std::fs::write(
        &upstream,
        "name: billing\ntargets:\n  - url: http://127.0.0.1:9000\n",
    )?;
    let created = json(ctl(
        &cp,
        &[
            "upstreams",
            "create",
            "-f",
            upstream.to_str().unwrap(),
            "-o",
            "json",
        ],
    )?);
    // The number of the version that wrote it (the apply above came first).
    let version = created["resource_version"].as_u64().unwrap_or_default();
    assert!(version > 1, "{created}");
    let version = version.to_string();
    std::fs::write(
        &upstream,
        "name: billing\ntargets:\n  - url: http://127.0.0.1:9001\n",
    )?;
    let updated = json(ctl(
        &cp,
        &[
            "upstreams",
            "update",
            "billing",
            "-f",
            upstream.to_str().unwrap(),
            "--if-match",
            &version,
            "-o",
            "json",
        ],
    )?);
    assert_eq!(updated["targets"][0]["url"], "http://127.0.0.1:9001");
    let stale = ctl(
        &cp,
        &[
            "upstreams",
            "update",
            "billing",
            "-f",
            upstream.to_str().unwrap(),
            "--if-match",
            &version,
        ],
    )?;
    assert_eq!(stale.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(
        stderr.contains("412") && stderr.contains("hint:"),
        "{stderr}"
    );
    let got = ok(ctl(&cp, &["upstreams", "get", "billing", "-o", "yaml"])?);
    assert!(got.contains("name: billing"), "{got}");
    ok(ctl(&cp, &["upstreams", "delete", "billing"])?);
    let subs = json(ctl(
        &cp,
        &["subscriptions", "list", "--consumer", "acme", "-o", "json"],
    )?);
    assert_eq!(subs["items"].as_array().unwrap().len(), 1);

    // Keys and credentials.
    let issued = ok(ctl(
        &cp,
        &["keys", "--consumer", "acme", "create", "--name", "cli-key"],
    )?);
    assert!(
        issued.contains("key cli-key: sk_") && issued.contains("not shown again"),
        "{issued}"
    );
    let rotated = json(ctl(
        &cp,
        &[
            "keys",
            "--consumer",
            "acme",
            "rotate",
            "cli-key",
            "--grace-period",
            "10m",
            "-o",
            "json",
        ],
    )?);
    assert!(rotated["key"].as_str().unwrap().starts_with("sk_"));
    ok(ctl(
        &cp,
        &["keys", "--consumer", "acme", "revoke", "cli-key"],
    )?);
    let keys = ok(ctl(&cp, &["keys", "--consumer", "acme", "list"])?);
    assert!(
        keys.contains("PREFIX") && keys.contains("EXPIRES") && keys.contains("REVOKED"),
        "{keys}"
    );
    let revoked = keys
        .lines()
        .find(|l| l.contains("cli-key"))
        .unwrap_or_default();
    assert!(
        revoked.contains("sk_") && revoked.contains(" yes "),
        "{keys}"
    );
    let credentials = json(ctl(
        &cp,
        &["credentials", "--consumer", "acme", "list", "-o", "json"],
    )?);
    assert_eq!(credentials["items"].as_array().unwrap().len(), 4);
    let jwt = dir.path().join("jwt.yaml");
    std::fs::write(
        &jwt,
        "name: cli-jwt\njwt: {issuer: \"https://auth.example.com/\", subject: cli}\n",
    )?;
    let created = json(ctl(
        &cp,
        &[
            "credentials",
            "--consumer",
            "acme",
            "create",
            "-f",
            jwt.to_str().unwrap(),
            "-o",
            "json",
        ],
    )?);
    let at = created["resource_version"].as_u64().unwrap_or_default();
    let delete_at = |version: u64| {
        ctl(
            &cp,
            &[
                "credentials",
                "--consumer",
                "acme",
                "delete",
                "cli-jwt",
                "--if-match",
                &version.to_string(),
            ],
        )
    };
    let (code, stderr) = failed(&delete_at(at - 1)?);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("412"), "{stderr}");
    assert!(ok(delete_at(at)?).contains("deleted credential cli-jwt"));

    // Versions: list, show, diff, rollback.
    let versions = json(ctl(&cp, &["versions", "list", "-o", "json"])?);
    let newest = versions["items"][0]["number"].as_u64().unwrap();
    assert!(newest >= 6);
    let diff = ok(ctl(&cp, &["versions", "diff", "1", &newest.to_string()])?);
    assert!(
        diff.contains("added") && diff.contains("credential"),
        "{diff}"
    );
    let shown = ok(ctl(&cp, &["versions", "show", "1"])?);
    assert!(shown.contains("snapshot"), "{shown}");
    let rolled = ok(ctl(&cp, &["versions", "rollback", "1"])?);
    assert!(rolled.contains("rollback to 1"), "{rolled}");
    assert_eq!(ok(ctl(&cp, &["export"])?), export);

    // Import.
    let petstore = format!(
        "{}/fixtures/openapi/petstore.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let imported = ok(ctl(&cp, &["import", "openapi", &petstore])?);
    assert!(imported.contains("swagger-petstore"), "{imported}");

    // Tokens, and the errors a person can act on.
    let token = ok(ctl(
        &cp,
        &["tokens", "create", "cli-viewer", "--role", "viewer"],
    )?);
    let viewer = token.split_whitespace().nth(3).unwrap().to_owned();
    assert!(viewer.starts_with("sluice_"), "{token}");
    assert!(ok(ctl(&cp, &["tokens", "list"])?).contains("cli-viewer"));
    let forbidden = Command::new(binary("sluicectl")?)
        .args([
            "--server",
            &cp.url(""),
            "--token",
            &viewer,
            "upstreams",
            "delete",
            "orders-svc",
        ])
        .output()?;
    assert_eq!(forbidden.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("403"));
    let no_token = Command::new(binary("sluicectl")?)
        .args(["--server", &cp.url(""), "apis", "list"])
        .env("HOME", "/nonexistent")
        .env_remove("SLUICE_TOKEN")
        .output()?;
    assert!(
        String::from_utf8_lossy(&no_token.stderr).contains("--token"),
        "{}",
        String::from_utf8_lossy(&no_token.stderr)
    );
    let refused = Command::new(binary("sluicectl")?)
        .args(["--server", &cp.url(""), "apis", "list"])
        .env("HOME", "/nonexistent")
        .env("SLUICE_TOKEN", "sluice_not-a-token")
        .output()?;
    let (code, stderr) = failed(&refused);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("the token from SLUICE_TOKEN was refused"),
        "{stderr}"
    );
    ok(ctl(&cp, &["tokens", "delete", "cli-viewer"])?);

    // The config file supplies server and token.
    let config = dir.path().join("sluicectl.yaml");
    std::fs::write(
        &config,
        format!("server: {}\ntoken: {ADMIN_TOKEN}\n", cp.url("")),
    )?;
    let from_file = Command::new(binary("sluicectl")?)
        .args(["--config", config.to_str().unwrap(), "plans", "list"])
        .env_remove("SLUICE_SERVER")
        .env_remove("SLUICE_TOKEN")
        .output()?;
    assert!(ok(from_file).contains("gold"));
    Ok(())
}

#[test]
fn an_unreachable_server_is_explained() -> anyhow::Result<()> {
    let port = sluice_tests::ports::free_port();
    let output = Command::new(binary("sluicectl")?)
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            "x",
            "apis",
            "list",
        ])
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Is sluice-cp running?"), "{stderr}");
    // The cause, not only "error sending request".
    assert!(stderr.contains("Connection refused"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn status_shows_refused_nodes_and_the_errors_of_a_nack() -> anyhow::Result<()> {
    use sluice_proto::pb;
    let cp = ControlPlane::start(&[]).await?;
    let hello = |id: &str, protocol_version: u32| pb::DiscoveryRequest {
        kind: Some(pb::discovery_request::Kind::Hello(pb::Hello {
            node: Some(pb::Node {
                id: id.into(),
                group: "default".into(),
                build_version: "0.1.0".into(),
                protocol_version,
                ..Default::default()
            }),
            current_version: 0,
            current_hash: String::new(),
        })),
    };
    let mut client = pb::discovery_client::DiscoveryClient::connect(cp.discovery_url()).await?;
    client
        .stream_config(tokio_stream::iter([hello("future", 99)]))
        .await
        .expect_err("protocol 99 is refused");
    // A node that takes its first push, then refuses it; its stream stays open meanwhile.
    let (requests, inbound) = tokio::sync::mpsc::channel(4);
    requests
        .send(hello("picky", pb::ProtocolVersion::Current as u32))
        .await?;
    let mut responses = client
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await?
        .into_inner();
    let push = responses.message().await?.expect("a first push");
    let error = |path: &str, reason: &str| pb::ResourceError {
        path: path.into(),
        reason: reason.into(),
        ..Default::default()
    };
    requests
        .send(pb::DiscoveryRequest {
            kind: Some(pb::discovery_request::Kind::Nack(pb::Nack {
                nonce: push.nonce,
                version: 0,
                errors: vec![
                    error("routes[0].path", "must start with /"),
                    error("routes[1].path", "must start with /"),
                ],
                message: "2 errors".into(),
            })),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let nodes = cp.dataplanes().await?;
        let node = |id: &str| nodes.iter().find(|n| n["id"] == id).cloned();
        let nacked = node("picky").is_some_and(|n| !n["last_nack"].is_null());
        let refused = node("future").is_some_and(|n| n["refused_reason"] != "");
        if nacked && refused {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never recorded: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let table = ok(ctl(&cp, &["status"])?);
    let row = |id: &str| {
        table
            .lines()
            .skip_while(|l| !l.contains(id))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        table.contains("REFUSED") && row("future").contains("speaks discovery protocol"),
        "{table}"
    );
    assert!(
        row("picky").contains("2 errors, the first: routes[0].path: must start with /"),
        "{table}"
    );
    Ok(())
}

#[test]
fn a_proxy_answering_instead_of_the_control_plane_is_an_error() -> anyhow::Result<()> {
    let redirect = answering("302 Found\r\nLocation: https://login.example.com/start", "")?;
    let example = example();
    let writes: [&[&str]; 2] = [
        &["--token", "t", "keys", "--consumer", "acme", "create"],
        &["--token", "t", "apply", "-f", &example],
    ];
    for args in writes {
        let (code, stderr) = failed(&bare(&redirect, args)?);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("302 Found") && stderr.contains("https://login.example.com/start"),
            "{stderr}"
        );
    }
    // A login page with 200 is not a reply, nor an export.
    let login = answering(
        "200 OK\r\nContent-Type: text/html",
        "<html>sign in</html>\n",
    )?;
    let calls: [&[&str]; 3] = [
        &["keys", "--consumer", "acme", "create"],
        &["apis", "list"],
        &["export"],
    ];
    for args in calls {
        let (code, stderr) = failed(&bare(&login, args)?);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("text/html"), "{stderr}");
    }
    Ok(())
}

#[test]
fn usage_errors_are_found_before_anything_is_sent() -> anyhow::Result<()> {
    // Nothing listens there: exit 2, not 1, shows nothing was tried.
    let nowhere = format!("http://127.0.0.1:{}", sluice_tests::ports::free_port());
    let (code, stderr) = failed(&bare("127.0.0.1:7080", &["apis", "list"])?);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:7080"), "{stderr}");
    let dir = tempfile::tempdir()?;
    let notes = dir.path().join("notes.md");
    std::fs::write(&notes, "# Notes\nnot a declarative document\n")?;
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"format_version\": 1,}")?;
    let (notes, broken) = (notes.to_str().unwrap(), broken.to_str().unwrap());
    let uploads: [&[&str]; 3] = [
        &["apply", "-f", notes],
        &["apply", "-f", broken],
        &["import", "openapi", notes],
    ];
    for args in uploads {
        let (code, stderr) = failed(&bare(&nowhere, args)?);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
    }
    // An empty SLUICECTL_CONFIG counts as unset, offline and online.
    let empty_config = |args: &[&str]| -> anyhow::Result<Output> {
        Ok(Command::new(binary("sluicectl")?)
            .args(args)
            .env("HOME", "/nonexistent")
            .env("SLUICECTL_CONFIG", "")
            .env_remove("SLUICE_TOKEN")
            .output()?)
    };
    ok(empty_config(&["schema"])?);
    let (code, stderr) = failed(&empty_config(&["--server", &nowhere, "apis", "list"])?);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("Is sluice-cp running?"), "{stderr}");
    Ok(())
}
