//! A `sluice-dp` in standalone mode for a test: its config file in a temp folder, its own
//! ports, awaited until ready, killed when the test ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::ports::free_addr;
use crate::process::Process;

#[derive(Debug)]
pub struct DataPlane {
    pub process: Process,
    /// The client listener.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    /// The command line it was started with, for [`DataPlane::replace`].
    command: Vec<String>,
    _dir: tempfile::TempDir,
}

impl DataPlane {
    /// Starts a node serving `config` (declarative YAML) with extra command-line `args`.
    pub fn start(config: &str, args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("sluice.yaml");
        std::fs::write(&config_path, config)?;
        let path_arg = config_path.display().to_string();
        Self::launch(dir, config_path, &["--config", &path_arg], args)
    }

    /// Starts a node in control-plane mode: its configuration streamed from `control_plane`
    /// (a discovery URL) for `group`. Returns once the node is ready (a config applied).
    pub fn start_from_control_plane(
        control_plane: &str,
        group: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let unused = dir.path().join("unused");
        Self::launch(
            dir,
            unused,
            &["--control-plane", control_plane, "--group", group],
            args,
        )
    }

    /// Starts `sluice-dp` with `source` arguments, its own ports and `args`, until ready.
    fn launch(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        source: &[&str],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let (addr, admin) = (free_addr(), free_addr());
        let (addr_arg, admin_arg) = (addr.to_string(), admin.to_string());
        let mut all = source.to_vec();
        all.extend(["--listen", &addr_arg, "--admin-listen", &admin_arg]);
        all.extend_from_slice(args);
        let command: Vec<String> = all.iter().map(|a| (*a).to_owned()).collect();
        Ok(Self {
            process: Self::spawn(&command, admin)?,
            addr,
            admin,
            config_path,
            command,
            _dir: dir,
        })
    }

    /// Starts `sluice-dp` with `command` and waits until its admin listener says it is ready.
    fn spawn(command: &[String], admin: SocketAddr) -> anyhow::Result<Process> {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let mut process = Process::start("sluice-dp", &args, &[])?;
        // Long enough for a first snapshot of a million keys (the scale benchmark).
        process.wait_ready(admin, "/readyz", Duration::from_secs(60))?;
        Ok(process)
    }

    /// Stops this node (SIGTERM: it drains), waits up to `within` for it to exit by itself,
    /// then starts a new one with the same command line (ports, node id, cache file), awaited
    /// until ready: one step of a rolling upgrade.
    pub fn replace(&mut self, within: Duration) -> anyhow::Result<()> {
        self.process.stop(within)?;
        self.process = Self::spawn(&self.command, self.admin)?;
        Ok(())
    }

    /// `http://ADDR{path}` on the client listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the config file atomically (write, then rename), as an operator's tooling
    /// should.
    pub fn write_config(&self, config: &str) -> anyhow::Result<()> {
        let temp = self.config_path.with_extension("tmp");
        std::fs::write(&temp, config)?;
        std::fs::rename(&temp, &self.config_path)?;
        Ok(())
    }

    /// The sum of a metric's series whose labels contain `labels` ("" for all), from
    /// `/metrics`. Async, so a test's in-process backends keep running meanwhile.
    pub async fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let response = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "/metrics answered {}",
            response.status()
        );
        let text = response.text().await?;
        Ok(crate::http::metric_sum(&text, name, labels))
    }
}
