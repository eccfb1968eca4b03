//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer that forwards TCP
//! (AWS NLB, GCP's TCP proxy, HAProxy in `mode tcp`) cannot write `X-Forwarded-For`, so it
//! puts the client's address in a header before the connection's first byte, ahead of TLS.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::forwarding::TrustedProxies;

/// Longest header read: version 1's is at most 107 bytes, version 2's 16 plus its addresses
/// and TLVs (a cloud load balancer's endpoint ids are a few dozen bytes). Past this the
/// connection is refused rather than buffered.
const MAX_HEADER: usize = 1024;

/// The longest version 1 line, CRLF included.
const V1_MAX: usize = 107;

/// How soon a connection that has sent part of its header is looked at again, first and at
/// most (doubling in between): as for the HTTP/2 preface, a peek cannot wait for more bytes.
const RECHECK: Duration = Duration::from_millis(5);
const RECHECK_MAX: Duration = Duration::from_millis(250);

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection closed before its PROXY protocol header")]
    Closed,
    #[error("the connection did not start with a PROXY protocol header: {0}")]
    Invalid(String),
    #[error("the PROXY protocol header is longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Who a connection that started with a PROXY header is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    /// The address the header names when the peer is a trusted proxy; otherwise, and for a
    /// header that names no address (a load balancer's own health check: version 2's
    /// `LOCAL`, version 1's `UNKNOWN`), the peer itself.
    pub client: SocketAddr,
    /// Whether the request's forwarding headers may name the client (when `client` is a
    /// trusted proxy). Not when a trusted load balancer's header named nobody: an L4 load
    /// balancer writes no `X-Forwarded-For`, so any there is the end client's own claim.
    pub forwarding: bool,
}

/// Reads the PROXY header `stream` starts with, leaving what follows it (the TLS handshake
/// or the first request) in the socket, and answers who the connection is from.
pub async fn read_client(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
) -> Result<Behind, HeaderError> {
    // Peeked, not read, until the whole header is there: what follows it must stay in the
    // socket for the TLS acceptor or the HTTP/2 sniff. A peer that stops halfway is waited
    // for until the caller's timeout (a peek keeps returning the bytes already there).
    let mut buffer = vec![0u8; MAX_HEADER];
    let mut recheck = RECHECK;
    let (length, source) = loop {
        let read = stream.peek(&mut buffer).await?;
        if read == 0 {
            return Err(HeaderError::Closed);
        }
        // Version 2 starts `\r\n`, version 1 `PROXY`: each one's own error, not the other's.
        let bytes = &buffer[..read];
        let header: HeaderResult<'_> = if bytes[0] == b'\r' {
            v2::Header::try_from(bytes).into()
        } else {
            v1::Header::try_from(bytes).into()
        };
        // A version 1 line that has ended (or could not be longer) is whole: the parser
        // calls a line missing its ports "incomplete" however many bytes follow it.
        let v1_whole = bytes[0] != b'\r' && (bytes.contains(&b'\n') || read >= V1_MAX);
        if header.is_incomplete() {
            if read == buffer.len() {
                return Err(HeaderError::TooLong);
            }
            if v1_whole {
                return Err(HeaderError::Invalid(
                    "a version 1 PROXY line that is not whole: PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT"
                        .into(),
                ));
            }
            tokio::time::sleep(recheck).await;
            recheck = (recheck * 2).min(RECHECK_MAX);
            continue;
        }
        break match header {
            HeaderResult::V1(Ok(header)) => (header.header.len(), v1_source(header.addresses)),
            HeaderResult::V2(Ok(header)) => (header.len(), v2_source(&header)),
            HeaderResult::V1(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
        };
    };
    stream.read_exact(&mut buffer[..length]).await?;
    let trusted = trusted.trusts(peer.ip());
    Ok(match source {
        Some(source) if trusted => Behind {
            client: source,
            forwarding: true,
        },
        None if trusted => Behind {
            client: peer,
            forwarding: false,
        },
        _ => Behind {
            client: peer,
            forwarding: true,
        },
    })
}

fn v1_source(addresses: v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
        v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connection whose client end wrote `parts` (the last after a pause), and what
    /// `read_client` made of it, with what was left in the socket after.
    async fn read(parts: &[&[u8]], trusted: &[&str]) -> (Result<Behind, HeaderError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, peer) = listener.accept().await.unwrap();
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for (index, part) in parts.iter().enumerate() {
                if index > 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                client.write_all(part).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        let trusted = TrustedProxies::parse(trusted).unwrap();
        let result = read_client(&mut server, peer, &trusted).await;
        let _client = writer.await.unwrap();
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        (result, rest)
    }

    /// A version 2 header: `command` 1 (PROXY) for TCP over IPv4, 0 (LOCAL) unspecified.
    fn v2(command: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.push(0x20 | command);
        header.push(if command == 1 { 0x11 } else { 0x00 });
        header.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        header.extend_from_slice(addresses);
        header
    }

    #[tokio::test]
    async fn a_trusted_peers_header_names_the_client_and_the_request_follows_it() {
        let (client, rest) = read(
            &[b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n\r\n"],
            &["127.0.0.1"],
        )
        .await;
        assert_eq!(
            client.unwrap(),
            Behind {
                client: "203.0.113.7:51000".parse().unwrap(),
                forwarding: true
            }
        );
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");

        // Version 2, in two parts, with a TLV after the addresses.
        let mut addresses = vec![198, 51, 100, 9, 10, 0, 0, 1];
        addresses.extend_from_slice(&40000u16.to_be_bytes());
        addresses.extend_from_slice(&443u16.to_be_bytes());
        addresses.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]); // a no-op TLV
        let header = v2(1, &addresses);
        let (first, second) = header.split_at(10);
        let (client, rest) = read(
            &[first, &[second, b"\x16\x03\x01"].concat()],
            &["127.0.0.1"],
        )
        .await;
        assert_eq!(
            client.unwrap().client,
            "198.51.100.9:40000".parse().unwrap()
        );
        assert_eq!(rest, b"\x16\x03\x01", "the TLS handshake is left to read");
    }

    #[tokio::test]
    async fn a_header_that_names_nobody_or_comes_from_an_untrusted_peer_leaves_the_peer() {
        let who = |client: Result<Behind, HeaderError>| {
            let behind = client.unwrap();
            (behind.client.ip().to_string(), behind.forwarding)
        };
        // A load balancer's health check: the peer, whose forwarding headers (an L4 load
        // balancer writes none) are not believed.
        let (client, rest) = read(&[b"PROXY UNKNOWN\r\nGET /"], &["127.0.0.1"]).await;
        assert_eq!(who(client), ("127.0.0.1".into(), false));
        assert_eq!(rest, b"GET /");
        let (client, _) = read(&[&v2(0, &[])], &["127.0.0.1"]).await;
        assert_eq!(who(client), ("127.0.0.1".into(), false));
        // Anyone may send a header; only a trusted proxy is believed.
        let (client, rest) = read(
            &[b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET /"],
            &["10.0.0.0/8"],
        )
        .await;
        assert_eq!(who(client), ("127.0.0.1".into(), true));
        assert_eq!(rest, b"GET /", "the header is read all the same");
    }

    #[tokio::test]
    async fn a_connection_without_a_header_is_refused() {
        let trusted = &["127.0.0.1"];
        let (client, _) = read(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], trusted).await;
        assert!(matches!(client, Err(HeaderError::Invalid(_))), "{client:?}");
        // A line that has ended but names no ports is refused at once, not waited on.
        let (client, _) = read(&[b"PROXY TCP4 nonsense\r\nGET / HTTP/1.1\r\n"], trusted).await;
        assert!(matches!(client, Err(HeaderError::Invalid(_))), "{client:?}");
        let (client, _) = read(&[b""], trusted).await;
        assert!(matches!(client, Err(HeaderError::Closed)), "{client:?}");
        // Half a header waits for the rest (the caller's header read timeout ends the wait).
        let half = read(&[b"PROXY TCP4 203.0.113.7"], trusted);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), half)
                .await
                .is_err()
        );
        let (client, _) = read(&[&v2(1, &[0; 2000])], trusted).await;
        assert!(matches!(client, Err(HeaderError::TooLong)), "{client:?}");
    }
}
