//! Free loopback ports for the servers a test starts.
//!
//! Tests run in parallel processes (nextest runs each test in its own), and a port is picked
//! here long before the server that will listen on it binds it. Two things can take the port
//! in between, and both have made a node fail to start with "Address already in use":
//! - another test process picking the same port: ports are claimed with an exclusive lock on
//!   a file per port in a folder every test process shares, held until the process exits (the
//!   kernel drops it then, even after a crash, so nothing goes stale);
//! - any process's outgoing connection taking it as its local port: ports are picked below
//!   the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), which outgoing
//!   connections never use.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where test servers' ports come from: below Linux's default ephemeral range (32768–60999)
/// and above the well-known services this machine runs (Postgres, Redis, RabbitMQ, NATS…).
const PORTS: Range<u16> = 20_000..32_768;

/// A loopback port that no other test process holds, that this process has not handed out
/// before, that nothing listens on now, and that no outgoing connection will take.
pub fn free_port() -> u16 {
    // The lock files stay open for the life of the process: closing one would release the port.
    static CLAIMED: Mutex<Vec<File>> = Mutex::new(Vec::new());
    let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    let dir = lock_dir();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create the port-lock folder {}: {e}", dir.display()));
    let span = u32::from(PORTS.end - PORTS.start);
    let start = start_offset() % span;
    for step in 0..span {
        let port = PORTS.start + ((start + step) % span) as u16;
        let path = dir.join(format!("{port}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        // Fails when another process, or this one through an earlier claim, holds it.
        if lock.try_lock().is_err() {
            continue;
        }
        // Something outside the tests (a service, a server left running) may listen on it.
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        claimed.push(lock);
        return port;
    }
    panic!(
        "no free port in {}..{}: every one is locked by a test process or in use",
        PORTS.start, PORTS.end
    );
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The folder of per-port lock files, shared by every test process of this user.
fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("sluice-test-ports")
}

/// Where this process starts looking, different per process so parallel processes seldom try
/// the same ports first (a collision only costs a retry: the lock decides).
fn start_offset() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id().wrapping_mul(7_919).wrapping_add(nanos)
}
