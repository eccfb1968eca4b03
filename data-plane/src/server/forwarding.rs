//! Headers on the way through: hop-by-hop headers removed, `X-Forwarded-*` set, a request id
//! and a W3C `traceparent` on every request.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use rand::Rng;

use crate::auth::ip::parse_net;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The proxies in front of the node (load balancers, CDNs) whose word on the client is
/// taken: a request whose TCP peer is one of them is from the address its `X-Forwarded-For`
/// names, read from the right past every trusted hop (nginx's `real_ip_recursive`, Envoy's
/// trusted hops), and over the scheme its `X-Forwarded-Proto` names. Anyone else's
/// forwarding headers are claims the client made about itself: the client is the peer.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

/// Who a request is from, as far as the node can believe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The caller: the peer, or the address a trusted proxy vouched for. IP lists, per-address
    /// budgets, the brute-force brake and the access log use it.
    pub client: IpAddr,
    /// `http` or `https` as the caller spoke to the first trusted hop (or to the node).
    pub scheme: &'static str,
}

impl TrustedProxies {
    /// From addresses and CIDR networks (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let networks = entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref();
                parse_net(entry)
                    .ok_or_else(|| format!("{entry:?} is not an IP address or CIDR network"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { networks })
    }

    pub fn trusts(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.networks.iter().any(|net| net.contains(&address))
    }

    /// Who a request that came from `peer` over `scheme` with `headers` is from.
    pub fn origin(&self, peer: IpAddr, scheme: &'static str, headers: &HeaderMap) -> Origin {
        if self.networks.is_empty() || !self.trusts(peer) {
            return Origin {
                client: peer,
                scheme,
            };
        }
        // Every X-Forwarded-For line, in order, is one list; each hop appended its peer on
        // the right. The nearest hop not trusted is the client. A malformed entry ends the
        // walk at the last hop read: what lies left of it was written by nobody trusted.
        // Entries are read one by one from the raw bytes: a byte a client put in its own
        // entry (not ASCII, say) must not spoil the entries the proxies appended after it.
        let mut client = peer;
        let lines: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        'walk: for line in lines.iter().rev() {
            for entry in line.rsplit(|&b| b == b',') {
                let Some(address) = std::str::from_utf8(entry).ok().and_then(forwarded_address)
                else {
                    break 'walk;
                };
                client = address;
                if !self.trusts(address) {
                    break 'walk;
                }
            }
        }
        let scheme = match headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
            Some(b"https") => "https",
            Some(b"http") => "http",
            _ => scheme,
        };
        Origin { client, scheme }
    }
}

/// An `X-Forwarded-For` entry: an address, with a port as some load balancers write it
/// (`203.0.113.7:41234`, `[2001:db8::1]:41234`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|socket| socket.ip()))
        .ok()
}

/// Longest request id taken from a client.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `X-Request-Id` when it is sane (visible ASCII, at most 128 bytes), else a
/// new UUID.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_REQUEST_ID_LEN
                && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            // From the thread-local generator, not `Uuid::new_v4` (a getrandom syscall per
            // request on the hot path).
            let id = uuid::Builder::from_random_bytes(rand::thread_rng().r#gen()).into_uuid();
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut text).as_bytes())
                .expect("a UUID is a valid header value")
        })
}

/// The `traceparent` to send upstream: the client's trace continued with the gateway as the
/// new parent span, or a new trace when the client sent none (or a malformed one).
pub fn traceparent(headers: &HeaderMap) -> HeaderValue {
    let mut rng = rand::thread_rng();
    let span: u64 = rng.gen_range(1..=u64::MAX);
    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    // "00-" trace id (32) "-" span (16) "-" flags (2): written in place, no formatting.
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    match incoming {
        Some((trace_id, flags)) => {
            value[3..35].copy_from_slice(trace_id.as_bytes());
            value[53..].copy_from_slice(flags.as_bytes());
        }
        None => {
            let trace: u128 = rng.gen_range(1..=u128::MAX);
            write_hex(&mut value[3..35], trace);
            value[53..].copy_from_slice(b"01");
        }
    }
    value[35] = b'-';
    write_hex(&mut value[36..52], u128::from(span));
    value[52] = b'-';
    HeaderValue::from_bytes(&value).expect("hex digits are a valid header value")
}

/// Writes the low `out.len()` hex digits of `n`, lower case, most significant first.
fn write_hex(out: &mut [u8], mut n: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// `(trace id, flags)` of a version-00 traceparent, per W3C Trace Context.
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && lower_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && lower_hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && lower_hex(flags, 2);
    valid.then_some((trace_id, flags))
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including every header the `Connection` header names. `te: trailers` is kept: gRPC needs
/// it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names (cheap comparisons) spares
    // a hash lookup per hop-by-hop name.
    let any = headers.keys().any(|name| {
        name == header::CONNECTION
            || name == header::TE
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::TRAILER
            || name == header::PROXY_AUTHENTICATE
            || name == header::PROXY_AUTHORIZATION
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|t| {
            t.split(',')
                .any(|e| e.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The protocol a request asks to switch to (`Upgrade: websocket` with `Connection: upgrade`),
/// if any. Only HTTP/1.1 requests can upgrade.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Sets the forwarding headers on a request bound upstream: the peer's address appended to
/// `X-Forwarded-For` (the client's, or the trusted proxy's after what it wrote),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (the host the client asked for; the request's
/// own `Host` becomes the target's), the request id and `traceparent`.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    peer: IpAddr,
    proto: &'static str,
    original_host: Option<HeaderValue>,
    request_id: &HeaderValue,
    traceparent: HeaderValue,
) {
    // Every line the request came with, in order (a proxy may have added a line of its own
    // rather than appended to the client's), then the peer.
    let peer = peer.to_string();
    let mut forwarded_for = Vec::new();
    for line in headers.get_all(&X_FORWARDED_FOR) {
        let line = line.as_bytes().trim_ascii();
        if !line.is_empty() {
            forwarded_for.extend_from_slice(line);
            forwarded_for.extend_from_slice(b", ");
        }
    }
    forwarded_for.extend_from_slice(peer.as_bytes());
    let value = HeaderValue::from_bytes(&forwarded_for)
        .unwrap_or_else(|_| HeaderValue::from_str(&peer).expect("an address is a header value"));
    headers.insert(X_FORWARDED_FOR.clone(), value);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match original_host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    headers.insert(TRACEPARENT.clone(), traceparent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&headers).len(), 36);
        headers.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert_eq!(request_id(&headers).len(), 36);
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }

    #[test]
    fn traceparent_continues_the_trace_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(incoming));
        let out = traceparent(&headers);
        let out = out.to_str().unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming, "the gateway is the new parent");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            headers.insert(&TRACEPARENT, HeaderValue::from_static(bad));
            let made = traceparent(&headers);
            let made = made.to_str().unwrap();
            assert!(parse_traceparent(made).is_some(), "{made}");
            assert!(!made.contains("4bf92f"), "{bad} was not continued");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_nobody_else_does() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8", "2001:db8::/32"]).unwrap();
        let origin = |peer: &str, lines: &[&str], proto: Option<&str>| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(&X_FORWARDED_FOR, HeaderValue::from_str(line).unwrap());
            }
            if let Some(proto) = proto {
                headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_str(proto).unwrap());
            }
            trusted.origin(peer.parse().unwrap(), "http", &headers)
        };
        let at = |client: &str, scheme| Origin {
            client: client.parse().unwrap(),
            scheme,
        };
        // From the right, past every trusted hop, to the first address nobody trusted wrote.
        assert_eq!(
            origin(
                "10.0.0.1",
                &["198.51.100.1, 203.0.113.7, 10.0.0.2"],
                Some("https")
            ),
            at("203.0.113.7", "https")
        );
        assert_eq!(
            origin(
                "::ffff:10.0.0.1",
                &["198.51.100.1", "203.0.113.7:4123, 10.9.9.9"],
                None
            ),
            at("203.0.113.7", "http"),
            "lines joined in order; a port dropped; a dual-stack peer compared as IPv4"
        );
        assert_eq!(
            origin("2001:db8::5", &["[2001:db8::9]:443", "2001:db8::7"], None),
            at("2001:db8::9", "http"),
            "every hop trusted: the leftmost"
        );
        assert_eq!(
            origin("10.0.0.1", &["203.0.113.7, garbage, 10.0.0.3"], None),
            at("10.0.0.3", "http"),
            "a malformed entry ends the walk at the last hop read"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 203.0.113.7").unwrap(),
        );
        assert_eq!(
            trusted.origin("10.0.0.1".parse().unwrap(), "http", &headers),
            at("203.0.113.7", "http"),
            "a byte that is not ASCII spoils only its own entry"
        );
        assert_eq!(
            origin("10.0.0.1", &[], Some("gopher")),
            at("10.0.0.1", "http")
        );
        // An untrusted peer's forwarding headers are its own claims.
        assert_eq!(
            origin("203.0.113.50", &["10.0.0.9, 198.51.100.1"], Some("https")),
            at("203.0.113.50", "http")
        );
        assert_eq!(
            TrustedProxies::default().origin(
                "10.0.0.1".parse().unwrap(),
                "https",
                &HeaderMap::new()
            ),
            at("10.0.0.1", "https")
        );
        assert_eq!(
            TrustedProxies::parse(&["10.0.0.0/8", "lb"]).unwrap_err(),
            "\"lb\" is not an IP address or CIDR network"
        );
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let forward = |headers: &mut HeaderMap| {
            set_forwarding(
                headers,
                "10.0.0.1".parse().unwrap(),
                "http",
                Some(HeaderValue::from_static("api.example.com")),
                &HeaderValue::from_static("rid"),
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
        };
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        forward(&mut headers);
        assert_eq!(headers[&X_FORWARDED_FOR], "203.0.113.9, 10.0.0.1");
        // Every line, in order: a proxy may have added its own.
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        forward(&mut headers);
        assert_eq!(
            headers.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["6.6.6.6, 203.0.113.9, 10.0.0.1"]
        );
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
        assert_eq!(headers[&X_FORWARDED_HOST], "api.example.com");
        assert_eq!(headers[&X_REQUEST_ID], "rid");
    }
}
