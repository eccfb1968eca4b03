//! Free loopback ports for the servers a test starts.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// A loopback port that is free now and that this process has not handed out before. The
/// kernel picks ephemeral ports at random, so parallel test processes rarely collide; within
/// one process a port is never given twice.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding 127.0.0.1:0 works on a machine that runs tests")
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}
