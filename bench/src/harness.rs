//! The harness of the proxy benchmarks (`proxy`, `access`, `publish`): nginx and oha found or
//! installed, servers started in process groups of their own on free ports, load runs with oha
//! against a target, and the proxy's CPU (every process of its group), memory and latency
//! percentiles, with the CPU that other processes used during each run so a busy machine is
//! reported.
//!
//! Every target sits in front of the same backend (an nginx of its own answering `200 ok`), and
//! each proxy runs alone. See docs/benchmarks.md for what is measured and why.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sluice_tests::ports::free_port;

use crate::load_avg;

/// A run is flagged when processes outside the benchmark used more than this share of a core.
pub const BUSY_SHARE: f64 = 0.15;

/// The settings every load run shares, from the environment.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub seconds: u64,
    pub warmup_seconds: u64,
    pub connections: u32,
    pub rate: u32,
    pub workers: u32,
    /// `SLUICE_BENCH_ONLY`: the proxies measured (comma-separated); empty for all.
    pub only: Vec<String>,
}

impl Settings {
    /// nginx's `worker_processes` for the worker count (0: `auto`, one per CPU, as sluice-dp's
    /// `--workers 0`).
    pub fn nginx_workers(&self) -> String {
        match self.workers {
            0 => "auto".to_owned(),
            n => n.to_string(),
        }
    }

    /// The settings of `SLUICE_BENCH_*`; `targets` are the proxies `SLUICE_BENCH_ONLY` may name.
    pub fn from_env(targets: &[&str]) -> anyhow::Result<Self> {
        let only: Vec<String> = std::env::var("SLUICE_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(unknown) = only.iter().find(|t| !targets.contains(&t.as_str())) {
            bail!(
                "SLUICE_BENCH_ONLY names {unknown:?}: expected {} (comma-separated)",
                targets.join(", ")
            );
        }
        let settings = Self {
            seconds: env_num("SLUICE_BENCH_SECONDS", 10)?,
            warmup_seconds: env_num("SLUICE_BENCH_WARMUP", 2)?,
            connections: env_num("SLUICE_BENCH_CONNECTIONS", 50)?,
            rate: env_num("SLUICE_BENCH_RATE", 10_000)?,
            workers: env_num("SLUICE_BENCH_WORKERS", 1)?,
            only,
        };
        if settings.seconds == 0 || settings.connections == 0 || settings.rate == 0 {
            bail!("SLUICE_BENCH_SECONDS, _CONNECTIONS and _RATE must be at least 1");
        }
        Ok(settings)
    }

    /// Whether the proxy `target` is measured in this run.
    pub fn measures(&self, target: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|t| t == target)
    }
}

pub fn env_num<T: FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        _ => Ok(default),
    }
}

pub fn workspace_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// A command line as a shell would take it back.
pub fn shell_line(program: &Path, args: &[String]) -> String {
    let mut line = program.display().to_string();
    for arg in args {
        line.push(' ');
        if arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            && !arg.is_empty()
        {
            line.push_str(arg);
        } else {
            let _ = write!(line, "'{}'", arg.replace('\'', r"'\''"));
        }
    }
    line
}

// ------------------------------------------------------------------ tools ---

#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    pub nginx: PathBuf,
    pub nginx_version: String,
    pub oha: PathBuf,
    pub oha_version: String,
}

/// nginx and oha: from SLUICE_BENCH_NGINX / SLUICE_BENCH_OHA, else from
/// `scripts/bench-tools.sh` (which installs what is missing, and is quick otherwise).
pub fn tools(program: &str) -> anyhow::Result<Tools> {
    let mut nginx = std::env::var_os("SLUICE_BENCH_NGINX").map(PathBuf::from);
    let mut oha = std::env::var_os("SLUICE_BENCH_OHA").map(PathBuf::from);
    if nginx.is_none() || oha.is_none() {
        let script = workspace_root().join("scripts/bench-tools.sh");
        eprintln!("{program}: finding the tools with {}", script.display());
        let out = std::process::Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !out.status.success() {
            bail!("{} failed ({})", script.display(), out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((key, value)) = line
                .strip_prefix("export ")
                .and_then(|kv| kv.split_once('='))
            else {
                continue;
            };
            if value.contains(['\\', '\'', '"', '$']) {
                bail!("{key}={value}: use a path without quotes or escapes");
            }
            match key {
                "SLUICE_BENCH_NGINX" => nginx = nginx.or_else(|| Some(value.into())),
                "SLUICE_BENCH_OHA" => oha = oha.or_else(|| Some(value.into())),
                _ => {}
            }
        }
    }
    let nginx = nginx.context("bench-tools.sh printed no SLUICE_BENCH_NGINX")?;
    let oha = oha.context("bench-tools.sh printed no SLUICE_BENCH_OHA")?;
    let nginx_out = std::process::Command::new(&nginx)
        .arg("-v")
        .output()
        .with_context(|| format!("cannot run {} -v", nginx.display()))?;
    let nginx_version = String::from_utf8_lossy(&nginx_out.stderr)
        .trim()
        .trim_start_matches("nginx version: ")
        .to_owned();
    let oha_out = std::process::Command::new(&oha)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", oha.display()))?;
    let oha_version = String::from_utf8_lossy(&oha_out.stdout).trim().to_owned();
    Ok(Tools {
        nginx,
        nginx_version,
        oha,
        oha_version,
    })
}

/// Builds `sluice-dp` with this program's profile (release under `make bench`) and returns its
/// path, next to this program's own binary.
pub async fn build_sluice_dp(program: &str) -> anyhow::Result<PathBuf> {
    crate::build_binaries(program, &["sluice-data-plane"]).await?;
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("this program has no folder")?
        .join("sluice-dp");
    if !path.exists() {
        bail!("{} is missing after cargo build", path.display());
    }
    Ok(path)
}

// ------------------------------------------------------------------- /proc ---

/// Clock ticks per second, for /proc/PID/stat's utime and stime.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after `(comm)`: index 0 is field 3 (state).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// Field `n` of /proc/PID/stat as numbered in proc(5) (14 is utime), from [`stat_fields`].
fn field(fields: &[&str], n: usize) -> u64 {
    fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// CPU and memory of every live process in a process group.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupUsage {
    pub processes: usize,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

pub fn group_usage(pgid: u32) -> GroupUsage {
    let mut usage = GroupUsage::default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = stat_fields(&stat) else {
            continue;
        };
        if field(&fields, 5) != u64::from(pgid) || fields.first() == Some(&"Z") {
            continue;
        }
        usage.processes += 1;
        usage.cpu_ticks += field(&fields, 14) + field(&fields, 15);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        for line in status.lines() {
            let kb = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                usage.rss_kb += kb(line);
            } else if line.starts_with("VmHWM:") {
                usage.hwm_kb += kb(line);
            }
        }
    }
    usage
}

/// Busy ticks of the whole machine (all cores), from /proc/stat.
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal (guest is counted in user).
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0))
        .sum()
}

/// This program's CPU ticks, including its reaped children (each oha run).
pub fn own_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_fields(&stat).map_or(0, |f| {
        field(&f, 14) + field(&f, 15) + field(&f, 16) + field(&f, 17)
    })
}

// ---------------------------------------------------------------- servers ---

/// A server started for the benchmark in a process group of its own: the proxy's CPU and
/// memory are those of every process in the group (nginx's master and worker alike). Stopped
/// when dropped (SIGTERM to the group, SIGKILL after 5 s), so also on an error or Ctrl-C.
#[derive(Debug)]
pub struct Server {
    name: String,
    child: std::process::Child,
    pgid: u32,
    log: PathBuf,
    /// How it was started, as a shell line.
    pub command: String,
}

impl Server {
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = std::process::Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}: {}", program.display()))?;
        let pgid = child.id();
        Ok(Self {
            name: name.to_owned(),
            child,
            pgid,
            log,
            command: shell_line(program, args),
        })
    }

    pub fn usage(&self) -> GroupUsage {
        group_usage(self.pgid)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Waits until `GET path` on `addr`, with `headers` (`name: value`), answers 200 with a body
    /// containing `body`, failing with the server's log when it exits first or 20 s pass.
    pub async fn wait_ready(
        &mut self,
        addr: SocketAddr,
        path: &str,
        headers: &[String],
        body: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            match probe(addr, path, headers) {
                Ok((200, text)) if text.contains(body) => return Ok(()),
                Ok((status, text)) => last = format!("{status} {}", text.trim()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} did not answer 200 at http://{addr}{path} within 20 s (last: {last}); log:\n{}",
            self.name,
            self.log_text()
        )
    }

    fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .args([format!("-{signal}"), "--".into(), format!("-{}", self.pgid)])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.usage().processes == 0 {
            let _ = self.child.wait();
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let _ = self.child.try_wait(); // reaps the leader, so it stops counting
            if self.usage().processes == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

/// `GET path` with `Connection: close` and `headers` (`name: value`): the status and the body
/// (as sent: a chunked body keeps its chunk sizes, which is enough to look for a word in it).
pub fn probe(addr: SocketAddr, path: &str, headers: &[String]) -> anyhow::Result<(u16, String)> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut response = Vec::new();
    stream.take(1 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

const NGINX_COMMON: &str = "
    access_log off;
    # Keep the load generator's connections open however many requests they carry, as
    # sluice-dp does (nginx closes them after 1000 by default).
    keepalive_requests 1000000;
    keepalive_timeout 75s;";

/// Temporary-file folders inside `dir`, so that nginx needs nothing from its install's paths.
fn nginx_temp_paths(dir: &Path, name: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| {
            format!(
                "    {t}_temp_path {};\n",
                dir.join("tmp").join(format!("{name}-{t}")).display()
            )
        })
        .collect()
}

/// The backend: answers every request with `200 ok\n`.
pub fn backend_conf(dir: &Path, port: u16) -> String {
    format!(
        "worker_processes 1;
pid {dir}/backend.pid;
error_log {dir}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{{NGINX_COMMON}
{temp}    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 \"ok\\n\";
        }}
    }}
}}
",
        dir = dir.display(),
        temp = nginx_temp_paths(dir, "backend"),
    )
}

/// nginx as a keep-alive reverse proxy to the backend.
pub fn nginx_proxy_conf(
    dir: &Path,
    port: u16,
    backend: u16,
    workers: &str,
    connections: u32,
) -> String {
    format!(
        "worker_processes {workers};
pid {dir}/nginx-proxy.pid;
error_log {dir}/nginx-proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{{NGINX_COMMON}
{temp}    upstream backend {{
        server 127.0.0.1:{backend};
        # Idle upstream connections kept per worker: at least one per client connection.
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        dir = dir.display(),
        temp = nginx_temp_paths(dir, "nginx-proxy"),
        keepalive = connections.max(64),
    )
}

pub fn start_nginx(tools: &Tools, dir: &Path, name: &str, conf: &str) -> anyhow::Result<Server> {
    let file = dir.join(format!("{name}.conf"));
    std::fs::write(&file, conf)?;
    let args = vec![
        "-p".to_owned(),
        dir.display().to_string(),
        "-e".to_owned(),
        dir.join(format!("{name}-error.log")).display().to_string(),
        "-c".to_owned(),
        file.display().to_string(),
        "-g".to_owned(),
        "daemon off;".to_owned(),
    ];
    Server::start(name, &tools.nginx, &args, &[], dir)
}

// -------------------------------------------------------------- load runs ---

#[derive(Debug, Deserialize)]
struct OhaOutput {
    summary: OhaSummary,
    #[serde(rename = "latencyPercentiles")]
    latency_percentiles: BTreeMap<String, Option<f64>>,
    #[serde(rename = "statusCodeDistribution")]
    status_codes: BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution")]
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct OhaSummary {
    total: f64,
}

/// A service a proxy calls on every request (Redis for shared rate limits), whose CPU is
/// counted beside the proxy's.
pub trait CpuMeter: fmt::Debug {
    /// What it is, for the table (`redis`).
    fn name(&self) -> &str;
    /// CPU seconds it has used so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64>;
}

/// What every request of a load run is: `GET /` answered 200 ([`Request::GET`]) unless a
/// benchmark says otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// oha's `-m`.
    pub method: &'a str,
    pub path: &'a str,
    /// A file sent as every request's body (oha's `-D`) and its `Content-Type` (`-T`).
    pub body: Option<(&'a Path, &'a str)>,
    /// The status of an answer that counts as a request served; any other is a failure.
    pub status: u16,
}

impl Request<'static> {
    pub const GET: Self = Request {
        method: "GET",
        path: "/",
        body: None,
        status: 200,
    };
}

/// Where a load run sends its requests.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    pub port: u16,
    /// What it sends.
    pub request: Request<'a>,
    /// Sent with every request, as `name: value` (oha's `-H`).
    pub headers: &'a [String],
    /// A service the proxy calls per request, measured during each run.
    pub service: Option<&'a dyn CpuMeter>,
    /// The status a request without [`headers`](Self::headers) must get (the proxy checks
    /// them): asked once the proxy is ready.
    pub unauthenticated: Option<u16>,
}

impl Endpoint<'_> {
    /// Plain requests to `port`.
    pub fn plain(port: u16) -> Self {
        Endpoint {
            port,
            request: Request::GET,
            headers: &[],
            service: None,
            unauthenticated: None,
        }
    }
}

/// One load run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub target: String,
    pub load: String,
    pub command: String,
    pub seconds: f64,
    /// Answers with the expected status ([`Request::status`], 200 unless told otherwise).
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Answers with another status and errors other than oha aborting in-flight requests at
    /// the end.
    pub failures: BTreeMap<String, u64>,
    pub proxy_cpu_s: Option<f64>,
    pub requests_per_proxy_cpu_s: Option<f64>,
    /// The service the proxy called per request ([`Endpoint::service`]) and its CPU seconds
    /// during the run.
    pub service: Option<String>,
    pub service_cpu_s: Option<f64>,
    /// Requests per CPU-second of the proxy and its service together.
    pub requests_per_cpu_s_with_service: Option<f64>,
    /// CPU seconds used during the run by processes outside the benchmark.
    pub other_cpu_s: f64,
    pub load_avg: f64,
}

fn oha_args(
    settings: &Settings,
    seconds: u64,
    rate: Option<u32>,
    endpoint: &Endpoint<'_>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{seconds}s"),
        "-c",
        &settings.connections.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(rate) = rate {
        args.extend(["-q".into(), rate.to_string(), "--latency-correction".into()]);
    }
    let request = &endpoint.request;
    if request.method != "GET" {
        args.extend(["-m".to_owned(), request.method.to_owned()]);
    }
    if let Some((file, content_type)) = request.body {
        args.extend([
            "-D".to_owned(),
            file.display().to_string(),
            "-T".to_owned(),
            content_type.to_owned(),
        ]);
    }
    for header in endpoint.headers {
        args.extend(["-H".to_owned(), header.clone()]);
    }
    args.push(format!(
        "http://127.0.0.1:{}{}",
        endpoint.port, request.path
    ));
    args
}

/// What every load run shares: the program, the settings, the tools and the backend.
#[derive(Debug)]
pub struct Bench<'a> {
    /// The benchmark program, for its messages.
    pub program: &'a str,
    pub settings: &'a Settings,
    pub tools: &'a Tools,
    /// Clock ticks per second.
    pub ticks: f64,
    pub backend: &'a Server,
}

impl Bench<'_> {
    /// Runs oha once; `proxy` is the process whose CPU is accounted as the proxy's.
    pub async fn load(
        &self,
        target: &str,
        what: &str,
        endpoint: &Endpoint<'_>,
        proxy: Option<&Server>,
        rate: Option<u32>,
        seconds: u64,
    ) -> anyhow::Result<Measurement> {
        let args = oha_args(self.settings, seconds, rate, endpoint);
        let command = shell_line(&self.tools.oha, &args);
        let load = rate.map_or_else(|| "max rate".to_owned(), |r| format!("{r} req/s"));
        eprintln!("{}: {target}, {load}, {what}: {command}", self.program);
        let service_cpu = || {
            endpoint
                .service
                .map(|s| s.cpu_seconds().with_context(|| format!("{} CPU", s.name())))
                .transpose()
        };
        let load_before = load_avg();
        let proxy_before = proxy.map(Server::usage);
        let backend_before = self.backend.usage();
        let service_before = service_cpu()?;
        let machine_before = machine_busy_ticks();
        let own_before = own_ticks();
        let out = tokio::process::Command::new(&self.tools.oha)
            .args(&args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run oha")?;
        let proxy_after = proxy.map(Server::usage);
        let backend_after = self.backend.usage();
        let service_after = service_cpu()?;
        let machine = machine_busy_ticks().saturating_sub(machine_before);
        let own = own_ticks().saturating_sub(own_before);
        if !out.status.success() {
            bail!(
                "{command} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: OhaOutput = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("unexpected output from {command}"))?;
        let proxy_ticks = proxy_before
            .zip(proxy_after)
            .map(|(b, a)| a.cpu_ticks.saturating_sub(b.cpu_ticks));
        let service_cpu_s = service_before
            .zip(service_after)
            .map(|(b, a)| (a - b).max(0.0));
        let ours = own
            + proxy_ticks.unwrap_or(0)
            + backend_after
                .cpu_ticks
                .saturating_sub(backend_before.cpu_ticks)
            + (service_cpu_s.unwrap_or(0.0) * self.ticks).round() as u64;
        let served = endpoint.request.status.to_string();
        let requests = result.status_codes.get(&served).copied().unwrap_or(0);
        let mut failures: BTreeMap<String, u64> = result
            .status_codes
            .iter()
            .filter(|(code, _)| **code != served)
            .map(|(code, n)| (format!("status {code}"), *n))
            .collect();
        failures.extend(
            result
                .errors
                .into_iter()
                .filter(|(e, _)| !e.contains("aborted due to deadline")),
        );
        let percentile = |p: &str| {
            result
                .latency_percentiles
                .get(p)
                .copied()
                .flatten()
                .unwrap_or(f64::NAN)
                * 1e6
        };
        let proxy_cpu_s = proxy_ticks.map(|t| t as f64 / self.ticks);
        let per_cpu_s = |s: f64| (s > 0.0).then(|| requests as f64 / s);
        let m = Measurement {
            target: target.to_owned(),
            load,
            command,
            seconds: result.summary.total,
            requests,
            requests_per_s: requests as f64 / result.summary.total,
            p50_us: percentile("p50"),
            p99_us: percentile("p99"),
            p999_us: percentile("p99.9"),
            failures,
            proxy_cpu_s,
            requests_per_proxy_cpu_s: proxy_cpu_s.and_then(per_cpu_s),
            service: endpoint.service.map(|s| s.name().to_owned()),
            service_cpu_s,
            requests_per_cpu_s_with_service: proxy_cpu_s
                .zip(service_cpu_s)
                .and_then(|(p, s)| per_cpu_s(p + s)),
            other_cpu_s: machine.saturating_sub(ours) as f64 / self.ticks,
            load_avg: load_before,
        };
        let failed: u64 = m.failures.values().sum();
        if failed * 1000 > requests.max(1) {
            bail!(
                "{target}: {failed} of {} requests failed ({:?}); the figures would be meaningless",
                requests + failed,
                m.failures
            );
        }
        Ok(m)
    }

    /// Warm-up, the max-rate run and the fixed-rate run against one target.
    pub async fn measure(
        &self,
        target: &str,
        endpoint: &Endpoint<'_>,
        proxy: Option<&Server>,
    ) -> anyhow::Result<(Measurement, Measurement)> {
        if self.settings.warmup_seconds > 0 {
            let seconds = self.settings.warmup_seconds;
            self.load(target, "warm-up", endpoint, proxy, None, seconds)
                .await
                .context("warm-up")?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seconds = self.settings.seconds;
        let max = self
            .load(target, "measured", endpoint, proxy, None, seconds)
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rate = Some(self.settings.rate);
        let fixed = self
            .load(target, "measured", endpoint, proxy, rate, seconds)
            .await?;
        Ok((max, fixed))
    }
}

/// Everything measured about one target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub started_as: Option<String>,
    pub idle_rss_mb: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub processes: Option<usize>,
    pub max: Measurement,
    pub fixed: Measurement,
}

/// Measures the backend on its own (`direct`): the baseline for the latency a proxy adds.
pub async fn measure_direct(bench: &Bench<'_>, backend_port: u16) -> anyhow::Result<Target> {
    let (max, fixed) = bench
        .measure("direct", &Endpoint::plain(backend_port), None)
        .await?;
    Ok(Target {
        name: "direct".into(),
        started_as: Some(bench.backend.command.clone()),
        idle_rss_mb: None,
        peak_rss_mb: None,
        processes: None,
        max,
        fixed,
    })
}

/// Starts a proxy, lets it settle, records its idle RSS, measures it, records its peak RSS
/// and stops it. `ready` is where it says it is ready (its admin address and path).
pub async fn measure_proxy(
    bench: &Bench<'_>,
    name: &str,
    mut server: Server,
    endpoint: &Endpoint<'_>,
    ready: (SocketAddr, &str),
) -> anyhow::Result<Target> {
    server.wait_ready(ready.0, ready.1, &[], "").await?;
    // Through the proxy, to the backend.
    let through = SocketAddr::from(([127, 0, 0, 1], endpoint.port));
    server
        .wait_ready(through, "/", endpoint.headers, "ok")
        .await?;
    if let Some(expected) = endpoint.unauthenticated {
        let (status, body) = probe(through, "/", &[])?;
        if status != expected {
            bail!(
                "{name}: a request without {:?} got {status} rather than {expected}: {}",
                endpoint.headers,
                body.trim()
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = server.usage();
    let (max, fixed) = bench.measure(name, endpoint, Some(&server)).await?;
    let peak = server.usage();
    Ok(Target {
        name: name.to_owned(),
        started_as: Some(server.command.clone()),
        idle_rss_mb: Some(idle.rss_kb as f64 / 1024.0),
        peak_rss_mb: Some(peak.hwm_kb as f64 / 1024.0),
        processes: Some(idle.processes),
        max,
        fixed,
    })
}

// ----------------------------------------------------------------- report ---

/// The table of every run of every target, memory, the services' CPU and every command line.
pub fn print_targets(settings: &Settings, tools: &Tools, targets: &[&Target]) {
    println!(
        "\nload generator: {} ({}), {} connections, keep-alive, {} s per run after a {} s \
         warm-up; fixed rate {} req/s with --latency-correction",
        tools.oha_version,
        tools.oha.display(),
        settings.connections,
        settings.seconds,
        settings.warmup_seconds,
        settings.rate
    );
    println!(
        "{:<10} {:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>5}",
        "target",
        "load",
        "req/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "cpu-s",
        "req/cpu-s",
        "other-cpu",
        "load"
    );
    let opt =
        |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
    for t in targets {
        for m in [&t.max, &t.fixed] {
            println!(
                "{:<10} {:<12} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>11} {:>9.2} {:>5.2}",
                m.target,
                m.load,
                m.requests_per_s,
                m.p50_us,
                m.p99_us,
                m.p999_us,
                opt(m.proxy_cpu_s, 2),
                opt(m.requests_per_proxy_cpu_s, 0),
                m.other_cpu_s,
                m.load_avg
            );
        }
    }
    for m in targets.iter().flat_map(|t| [&t.max, &t.fixed]) {
        if let (Some(service), Some(cpu)) = (&m.service, m.service_cpu_s) {
            println!(
                "{:<10} {:<12} {service} used {cpu:.2} CPU-s: {} requests per CPU-s of the proxy \
                 and {service} together",
                m.target,
                m.load,
                opt(m.requests_per_cpu_s_with_service, 0)
            );
        }
    }
    for t in targets {
        if let (Some(idle), Some(peak)) = (t.idle_rss_mb, t.peak_rss_mb) {
            println!(
                "{:<10} RSS idle {idle:.1} MB, peak (VmHWM) {peak:.1} MB, {} process(es)",
                t.name,
                t.processes.unwrap_or(0)
            );
        }
    }
    println!("commands:");
    for t in targets {
        if let Some(started) = &t.started_as {
            println!("  {:<10} {started}", t.name);
        }
    }
    for t in targets {
        println!("  {:<10} {}", t.name, t.max.command);
        println!("  {:<10} {}", t.name, t.fixed.command);
    }
}

/// Runs that say less than they seem to: the machine was busy, or a target could not keep
/// the fixed rate (its latency is then queueing in front of it, not proxying).
pub fn warnings(settings: &Settings, targets: &[&Target]) -> usize {
    let mut warnings = 0;
    for m in targets.iter().map(|t| &t.fixed) {
        if m.requests_per_s < 0.95 * f64::from(settings.rate) {
            warnings += 1;
            println!(
                "WARNING: {} sustained only {:.0} of {} req/s: its latency at that rate is \
                 mostly queueing",
                m.target, m.requests_per_s, settings.rate
            );
        }
    }
    for m in targets.iter().flat_map(|t| [&t.max, &t.fixed]) {
        let share = m.other_cpu_s / m.seconds.max(0.001);
        if share > BUSY_SHARE {
            warnings += 1;
            println!(
                "WARNING: during {} {}, processes outside the benchmark used {:.1} CPU-s \
                 ({:.0}% of a core): the machine was busy and these figures are skewed",
                m.target,
                m.load,
                m.other_cpu_s,
                share * 100.0
            );
        }
    }
    warnings
}

/// The load average before a benchmark, with a warning when the machine is already busy.
pub fn check_start_load(program: &str) -> (usize, f64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start_load = load_avg();
    if start_load > 0.5 * cores as f64 {
        eprintln!(
            "{program}: WARNING: load average {start_load:.2} on {cores} cores before the \
             benchmark: the machine is busy; each run below also reports the CPU others used"
        );
    }
    (cores, start_load)
}

/// A fresh `target/bench/NAME/` for the generated configurations and the servers' logs, kept
/// after the run so that every command printed can be re-run.
pub fn fresh_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join(format!("target/bench/{name}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(dir.join("tmp"))?;
    // nginx workers run as `nobody` when started by root: let them in.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Starts the backend (an nginx answering `200 ok`) on a free port and waits until it answers.
pub async fn start_backend(tools: &Tools, dir: &Path) -> anyhow::Result<(Server, u16)> {
    let port = free_port();
    let mut backend = start_nginx(tools, dir, "backend", &backend_conf(dir, port))?;
    backend
        .wait_ready(SocketAddr::from(([127, 0, 0, 1], port)), "/", &[], "ok")
        .await?;
    Ok((backend, port))
}

/// Starts nginx as a reverse proxy to the backend on a free port and measures it.
pub async fn measure_nginx(bench: &Bench<'_>, dir: &Path, backend: u16) -> anyhow::Result<Target> {
    let port = free_port();
    let settings = bench.settings;
    let conf = nginx_proxy_conf(
        dir,
        port,
        backend,
        &settings.nginx_workers(),
        settings.connections,
    );
    let server = start_nginx(bench.tools, dir, "nginx-proxy", &conf)?;
    let ready = SocketAddr::from(([127, 0, 0, 1], port));
    measure_proxy(bench, "nginx", server, &Endpoint::plain(port), (ready, "/")).await
}

/// `sluice-dp` built, and whether it has `--workers`; fails when it cannot proxy.
pub async fn sluice_dp(program: &str) -> anyhow::Result<(PathBuf, bool)> {
    let path = build_sluice_dp(program).await?;
    let help = std::process::Command::new(&path).arg("--help").output()?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    if !help.contains("--listen") {
        bail!(
            "{} has no --listen option: this build of the data plane does not proxy yet \
             (SLUICE_BENCH_ONLY=nginx measures nginx alone)",
            path.display()
        );
    }
    Ok((path, help.contains("--workers")))
}

/// A `sluice-dp` to measure: its configuration and what its clients send.
#[derive(Debug)]
pub struct SluiceTarget<'a> {
    /// The target's name in the table, and of its files in the benchmark's folder.
    pub name: &'a str,
    /// The declarative configuration (YAML).
    pub config: String,
    /// More `sluice-dp` arguments.
    pub args: Vec<String>,
    /// Sent with every request (`name: value`).
    pub headers: &'a [String],
    /// A service it calls per request, measured beside it.
    pub service: Option<&'a dyn CpuMeter>,
    /// The status of a request without `headers` (401 when they carry its credential).
    pub unauthenticated: Option<u16>,
}

/// Starts `sluice-dp` on the target's configuration (written to `dir/NAME.yaml`) on free
/// ports, with the settings' worker count and no per-request logs, and measures it.
pub async fn measure_sluice(
    bench: &Bench<'_>,
    dp: &(PathBuf, bool),
    dir: &Path,
    target: &SluiceTarget<'_>,
) -> anyhow::Result<Target> {
    measure_sluice_with(bench, dp, dir, target, Request::GET).await
}

/// [`measure_sluice`] with load runs that send `request` (readiness is still `GET /` through
/// the proxy, so the configuration keeps a route `/` to the backend).
pub async fn measure_sluice_with(
    bench: &Bench<'_>,
    dp: &(PathBuf, bool),
    dir: &Path,
    target: &SluiceTarget<'_>,
    request: Request<'_>,
) -> anyhow::Result<Target> {
    let (path, has_workers) = dp;
    let port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let file = dir.join(format!("{}.yaml", target.name));
    std::fs::write(&file, &target.config)?;
    let mut args = vec![
        "--config".to_owned(),
        file.display().to_string(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--admin-listen".to_owned(),
        admin.to_string(),
    ];
    if *has_workers {
        args.extend(["--workers".to_owned(), bench.settings.workers.to_string()]);
    } else {
        eprintln!(
            "{}: WARNING: sluice-dp has no --workers option; it runs with its default worker \
             threads, not {}",
            bench.program, bench.settings.workers
        );
    }
    args.extend_from_slice(&target.args);
    // No per-request logs: nginx runs with access_log off.
    let server = Server::start(target.name, path, &args, &[("RUST_LOG", "warn")], dir)?;
    let endpoint = Endpoint {
        port,
        request,
        headers: target.headers,
        service: target.service,
        unauthenticated: target.unauthenticated,
    };
    measure_proxy(bench, target.name, server, &endpoint, (admin, "/readyz")).await
}

/// Writes `target/bench/NAME-runs.json`: every run of every target with its command line, the
/// settings and the tools.
pub fn write_runs(
    name: &str,
    settings: &Settings,
    tools: &Tools,
    (cores, start_load): (usize, f64),
    targets: &[&Target],
) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Runs<'a> {
        settings: &'a Settings,
        tools: &'a Tools,
        cores: usize,
        load_avg_at_start: f64,
        targets: &'a [&'a Target],
    }
    let runs = Runs {
        settings,
        tools,
        cores,
        load_avg_at_start: start_load,
        targets,
    };
    let out = workspace_root().join(format!("target/bench/{name}-runs.json"));
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&runs)?)?;
    println!("written: {}", out.display());
    Ok(())
}

/// The `proxy` benchmark's `sluice-dp` configuration: one route, prefix `/`, to the backend.
/// The `access` and `publish` benchmarks measure against the same bare proxy.
pub fn bare_proxy_conf(backend: u16) -> String {
    format!(
        "format_version: 1
upstreams:
  - name: backend
    targets: [{{ url: \"http://127.0.0.1:{backend}\" }}]
apis:
  - name: bench
    routes:
      - name: all
        path: /
        proxy: {{ upstream: backend }}
"
    )
}

/// ` (NAME sustained only N req/s)` for each target that fell short of the fixed `rate`.
pub fn short_of_rate(targets: &[&Target], rate: f64) -> String {
    targets
        .iter()
        .filter(|t| t.fixed.requests_per_s < 0.95 * rate)
        .map(|t| {
            format!(
                " ({} sustained only {:.0} req/s)",
                t.name, t.fixed.requests_per_s
            )
        })
        .collect()
}
