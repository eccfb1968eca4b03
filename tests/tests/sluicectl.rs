//! `sluicectl` against a real control plane: every command family, the output formats, and
//! errors a person can act on.

use std::process::{Command, Output};

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
    let export = ok(ctl(&cp, &["export"])?);
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
    let credentials = json(ctl(
        &cp,
        &["credentials", "--consumer", "acme", "list", "-o", "json"],
    )?);
    assert_eq!(credentials["items"].as_array().unwrap().len(), 4);

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
    Ok(())
}
