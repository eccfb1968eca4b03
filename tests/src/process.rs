//! Sluice binaries started for a test, awaited until ready, killed when the test ends.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where cargo put the workspace's binaries: next to the `deps/` folder this test runs from.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a benchmark program from target/<profile>/.
    let dir = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .context("the program is not in a cargo target folder")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --workspace --bins` \
             (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running Sluice binary. Killed, and waited for, when dropped.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts binary `name` with `args` and `env`, its output going to a log file.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log)?;
        let child = Command::new(binary(name)?)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            _dir: dir,
        })
    }

    /// The operating system's id of the process.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `GET path` on `addr` answers 200, failing with the process's log when it
    /// exits first or `timeout` passes.
    pub fn wait_ready(
        &mut self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            match crate::http::get(addr, path, Duration::from_secs(1)) {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} was not ready at http://{addr}{path} within {timeout:?} (last: {last}); log:\n{}",
            self.name,
            self.log_text()
        )
    }

    /// Waits for the process to exit by itself, for at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} still running after {timeout:?}; log:\n{}",
            self.name,
            self.log_text()
        )
    }

    /// Stops the process gracefully (SIGTERM) and waits up to `within` for it to exit by
    /// itself, successfully.
    pub fn stop(&mut self, within: Duration) -> anyhow::Result<()> {
        self.terminate()?;
        let status = self.wait_exit(within)?;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} on SIGTERM; log:\n{}",
            self.name,
            self.log_text()
        );
        Ok(())
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        Ok(())
    }

    /// Everything the process has written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
