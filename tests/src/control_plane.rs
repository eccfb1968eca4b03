//! A real `sluice-cp` on its own database and ports, with a bootstrap admin token.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ports::free_addr;
use crate::postgres::TestDatabase;
use crate::process::Process;

/// The bootstrap admin token every test control plane gets.
pub const ADMIN_TOKEN: &str = "test-bootstrap-admin-token";

/// A running control plane. Dropping it stops the process, then drops its database.
#[derive(Debug)]
pub struct ControlPlane {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The discovery listener data planes stream from.
    pub discovery: SocketAddr,
    pub process: Process,
    /// The registry's database URL.
    pub database_url: String,
    /// Owned by the first replica only: dropped (after the process) when it is.
    _database: Option<TestDatabase>,
}

impl ControlPlane {
    /// Starts `sluice-cp` with `extra` arguments and waits until it answers.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        let url = database.url.clone();
        Self::start_on(&url, Some(database), extra)
    }

    /// Another replica on this one's registry database, with ports of its own. This one must
    /// outlive it (it owns the database).
    pub fn replica(&self, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(&self.database_url, None, extra)
    }

    /// A control plane on an existing registry database, which the caller owns.
    pub fn on_database(url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(url, None, extra)
    }

    /// Stops this replica (SIGTERM), waits up to `within` for it to exit by itself, then starts
    /// a new one with `extra` arguments on the same database and ports, awaited until it
    /// answers: one step of a rolling upgrade.
    pub fn replace(&mut self, within: Duration, extra: &[&str]) -> anyhow::Result<()> {
        self.stop(within)?;
        self.restart(extra)
    }

    /// Stops this replica (SIGTERM) and waits up to `within` for it to exit cleanly.
    pub fn stop(&mut self, within: Duration) -> anyhow::Result<()> {
        self.process.stop(within)
    }

    /// Starts this replica again after [`stop`](Self::stop), with `extra` arguments on the
    /// same database and ports, awaited until it answers.
    pub fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let next = Self::start_at(
            &self.database_url,
            None,
            (self.http, self.grpc, self.discovery),
            extra,
        )?;
        self.process = next.process;
        Ok(())
    }

    fn start_on(url: &str, database: Option<TestDatabase>, extra: &[&str]) -> anyhow::Result<Self> {
        let addrs = (free_addr(), free_addr(), free_addr());
        Self::start_at(url, database, addrs, extra)
    }

    fn start_at(
        url: &str,
        database: Option<TestDatabase>,
        (http, grpc, discovery): (SocketAddr, SocketAddr, SocketAddr),
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (http_arg, grpc_arg, discovery_arg) =
            (http.to_string(), grpc.to_string(), discovery.to_string());
        let mut args = vec![
            "--http-addr",
            &http_arg,
            "--grpc-addr",
            &grpc_arg,
            "--discovery-addr",
            &discovery_arg,
        ];
        args.extend_from_slice(extra);
        let mut process = Process::start(
            "sluice-cp",
            &args,
            &[("DATABASE_URL", url), ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)],
        )?;
        process.wait_ready(http, "/healthz", Duration::from_secs(30))?;
        Ok(Self {
            http,
            grpc,
            discovery,
            process,
            database_url: url.to_owned(),
            _database: database,
        })
    }

    /// `http://<rest addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `http://<discovery addr>`, for `sluice-dp --control-plane`.
    pub fn discovery_url(&self) -> String {
        format!("http://{}", self.discovery)
    }

    /// Applies a whole declarative YAML document as the admin; returns the new version.
    pub async fn apply(&self, document: &str) -> anyhow::Result<u64> {
        let response = reqwest::Client::new()
            .post(self.url("/v1/apply"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/yaml")
            .body(document.to_owned())
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status == 200, "apply answered {status}: {body}");
        body["version"]["number"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no version in {body}"))
    }

    /// The sum of a metric's series whose labels contain `labels` ("" for all), from the
    /// REST listener's `/metrics`.
    pub async fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let text = reqwest::Client::new()
            .get(self.url("/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(crate::http::metric_sum(&text, name, labels))
    }

    /// `GET /v1/dataplanes`: every node's status.
    pub async fn dataplanes(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let body = self.dataplanes_page("").await?;
        Ok(body["items"].as_array().cloned().unwrap_or_default())
    }

    /// `GET /v1/dataplanes?{query}`: one page, `{"items", "next"}`.
    pub async fn dataplanes_page(&self, query: &str) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::Client::new()
            .get(self.url(&format!("/v1/dataplanes?{query}")))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .json()
            .await?)
    }
}
