//! A second look at HTTP/1 request framing, below hyper, so that ambiguous framing gets a 400.
//!
//! hyper's parser settles two smuggling shapes on its own before the service sees them: with
//! both `Content-Length` and `Transfer-Encoding` it frames by `Transfer-Encoding`, drops
//! `Content-Length` and closes the connection after the response; identical repeated
//! `Content-Length`s it reads as one. Both are safe, but a gateway should refuse them
//! (RFC 9112 §6.3 lets a server reject them; the request may be an attack on another hop).
//!
//! [`FramingGuard`] wraps a client connection's byte stream and reads the same bytes hyper
//! reads, head by head: it parses each request head (httparse, as hyper), notes whether its
//! framing is ambiguous, and skips the body (by length, or chunk by chunk) to find the next
//! head. Verdicts are kept by request number in [`Verdicts`], which the service consults for
//! the request hyper hands it. The guard gives up (and marks nothing more) on anything it
//! does not follow: HTTP/2, a head larger than the limit, bytes it cannot parse, and bytes
//! that do not start like a request where one should start (the tunnel after an accepted
//! upgrade). hyper's own checks still apply to those, so giving up never lets through what
//! hyper alone would refuse.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Headers parsed on the stack; a head with more is parsed again with room for the node's
/// `--max-headers` (past that hyper refuses it).
const STACK_HEADERS: usize = 128;
const NONE: u64 = u64::MAX;

/// What the guard learned about a connection's requests.
#[derive(Debug)]
pub struct Verdicts {
    /// Request heads the service has been handed so far.
    served: AtomicU64,
    /// The number (from 0) of the first request with ambiguous framing, or [`NONE`].
    first_bad: AtomicU64,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts {
            served: AtomicU64::new(0),
            first_bad: AtomicU64::new(NONE),
        }
    }
}

impl Verdicts {
    /// Called once per request, in the order hyper hands them over (HTTP/1 requests on a
    /// connection are served in order): whether this one's framing was ambiguous.
    pub fn next_is_ambiguous(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        self.first_bad.load(Ordering::Relaxed) == n
    }
}

/// Where the guard is in the request stream.
#[derive(Debug)]
enum State {
    /// Reading a head; `partial` holds its bytes so far when it spans reads.
    Head { partial: Vec<u8> },
    /// Skipping a body of known length.
    Body { remaining: u64 },
    /// Skipping a chunked body.
    Chunked(Chunk),
    /// No longer following the stream.
    Off,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// In a chunk-size line; `size` so far and whether the extension started.
    Size {
        size: u64,
        digits: u8,
        extension: bool,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `line_len` bytes into the current line.
    Trailer {
        line_len: usize,
        cr: bool,
    },
}

/// A client connection's bytes, watched for ambiguous request framing on the way to hyper.
#[derive(Debug)]
pub struct FramingGuard<S> {
    inner: S,
    state: State,
    heads: u64,
    max_head_bytes: usize,
    max_headers: usize,
    verdicts: std::sync::Arc<Verdicts>,
}

impl<S> FramingGuard<S> {
    pub fn new(
        inner: S,
        max_head_bytes: usize,
        max_headers: usize,
        verdicts: std::sync::Arc<Verdicts>,
    ) -> Self {
        FramingGuard {
            inner,
            state: State::Head {
                partial: Vec::new(),
            },
            heads: 0,
            max_head_bytes,
            max_headers,
            verdicts,
        }
    }

    /// Follows `bytes`, just read from the client.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match &mut self.state {
                State::Off => return,
                State::Head { partial } => {
                    if partial.is_empty() {
                        // The empty lines a server skips before a request line (RFC 9112
                        // section 2.2): taken for a head of their own, they would end the
                        // guard before the request that follows them.
                        let blank = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[blank..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    if partial.is_empty() && !starts_like_a_request(bytes[0]) {
                        // Not a request line: the tunnel of an accepted upgrade or CONNECT
                        // (or garbage hyper refuses). Nothing more to follow.
                        self.state = State::Off;
                        return;
                    }
                    if partial.is_empty() {
                        match head_end(bytes, 0) {
                            Some(end) => {
                                let (head, rest) = bytes.split_at(end);
                                self.judge(head);
                                rest
                            }
                            None => {
                                partial.extend_from_slice(bytes);
                                self.check_head_size();
                                return;
                            }
                        }
                    } else {
                        // Look for the end across the seam with what came before.
                        let seen = partial.len();
                        partial.extend_from_slice(bytes);
                        match head_end(partial, seen.saturating_sub(2)) {
                            Some(end) => {
                                let head = std::mem::take(partial);
                                let used = end - seen;
                                self.judge(&head[..end]);
                                &bytes[used..]
                            }
                            None => {
                                self.check_head_size();
                                return;
                            }
                        }
                    }
                }
                State::Body { remaining } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::Head {
                            partial: Vec::new(),
                        };
                    }
                    &bytes[take..]
                }
                State::Chunked(chunk) => {
                    let (used, done) = match step_chunked(chunk, bytes) {
                        Some(step) => step,
                        None => {
                            self.state = State::Off;
                            return;
                        }
                    };
                    if done {
                        self.state = State::Head {
                            partial: Vec::new(),
                        };
                    }
                    &bytes[used..]
                }
            };
        }
    }

    fn check_head_size(&mut self) {
        if let State::Head { partial } = &self.state
            && partial.len() > self.max_head_bytes
        {
            // hyper answers 431 for it; nothing after it is served.
            self.state = State::Off;
        }
    }

    /// Judges one complete head and sets the state for what follows it.
    fn judge(&mut self, head: &[u8]) {
        let number = self.heads;
        self.heads += 1;
        let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
        let mut more_headers;
        let mut request = httparse::Request::new(&mut headers);
        let mut parsed = request.parse(head);
        if matches!(parsed, Err(httparse::Error::TooManyHeaders))
            && self.max_headers > STACK_HEADERS
        {
            more_headers = vec![httparse::EMPTY_HEADER; self.max_headers];
            request = httparse::Request::new(&mut more_headers);
            parsed = request.parse(head);
        }
        let Ok(httparse::Status::Complete(_)) = parsed else {
            // HTTP/2's preface, or a head hyper refuses on its own (400, 431).
            self.state = State::Off;
            return;
        };
        let (mut lengths, mut length, mut chunked, mut encoded) = (0, None, false, false);
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                encoded = true;
                chunked = header
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
        }
        if lengths > 1 || (lengths == 1 && encoded) {
            let _ = self.verdicts.first_bad.compare_exchange(
                NONE,
                number,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            // The connection closes after the 400.
            self.state = State::Off;
            return;
        }
        // After an upgrade request, what follows is the next request (the upgrade was refused)
        // or the tunnel's bytes (it was accepted), which `starts_like_a_request` tells apart.
        self.state = if encoded && chunked {
            State::Chunked(Chunk::Size {
                size: 0,
                digits: 0,
                extension: false,
            })
        } else if encoded {
            // Not chunked last: hyper refuses it.
            State::Off
        } else {
            match (lengths, length) {
                (0, _) | (_, Some(0)) => State::Head {
                    partial: Vec::new(),
                },
                (_, Some(n)) => State::Body { remaining: n },
                // An unparsable length: hyper refuses it.
                (_, None) => State::Off,
            }
        };
    }
}

/// The index just past the blank line that ends a head, searching from `from`: `\n\r\n` or
/// `\n\n`, since httparse (and so hyper) accepts bare LF line endings.
fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &bytes[from..])
        .map(|i| from + i)
        .find_map(|i| match bytes.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        })
}

/// Whether a head may start with this byte: a method's first letter (the empty lines a
/// server skips before a request line are skipped before this is asked).
fn starts_like_a_request(byte: u8) -> bool {
    byte.is_ascii_uppercase()
}

/// Advances a chunked body over `bytes`: how many bytes it used and whether the body ended.
/// `None` when the bytes are not valid chunked framing (hyper refuses those).
fn step_chunked(chunk: &mut Chunk, bytes: &[u8]) -> Option<(usize, bool)> {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        *chunk = match *chunk {
            Chunk::Size {
                size,
                digits,
                extension,
            } => match b {
                b'\r' if digits > 0 => Chunk::SizeLf { size },
                _ if extension => *chunk,
                b';' | b' ' | b'\t' if digits > 0 => Chunk::Size {
                    size,
                    digits,
                    extension: true,
                },
                _ => {
                    let digit = (b as char).to_digit(16)?;
                    if digits >= 16 {
                        return None;
                    }
                    Chunk::Size {
                        size: size * 16 + u64::from(digit),
                        digits: digits + 1,
                        extension: false,
                    }
                }
            },
            Chunk::SizeLf { size } => match b {
                b'\n' if size == 0 => Chunk::Trailer {
                    line_len: 0,
                    cr: false,
                },
                b'\n' => Chunk::Data { remaining: size },
                _ => return None,
            },
            Chunk::Data { remaining } => {
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += take;
                let remaining = remaining - take as u64;
                *chunk = if remaining == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { remaining }
                };
                continue;
            }
            Chunk::DataCr if b == b'\r' => Chunk::DataLf,
            Chunk::DataLf if b == b'\n' => Chunk::Size {
                size: 0,
                digits: 0,
                extension: false,
            },
            Chunk::DataCr | Chunk::DataLf => return None,
            Chunk::Trailer { line_len, cr } => match b {
                b'\r' => Chunk::Trailer { line_len, cr: true },
                b'\n' if cr && line_len == 0 => return Some((i + 1, true)),
                b'\n' if cr => Chunk::Trailer {
                    line_len: 0,
                    cr: false,
                },
                _ => Chunk::Trailer {
                    line_len: line_len + 1,
                    cr: false,
                },
            },
        };
        i += 1;
    }
    Some((i, false))
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled
            && !matches!(this.state, State::Off)
        {
            this.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Feeds `reads` to a guard and returns, per request the service would be handed, whether
    /// it was judged ambiguous; `requests` is how many the service sees.
    fn verdicts(reads: &[&[u8]], requests: usize) -> Vec<bool> {
        let verdicts = Arc::new(Verdicts::default());
        let mut guard = FramingGuard::new((), 64 * 1024, 200, verdicts.clone());
        for read in reads {
            guard.observe(read);
        }
        (0..requests)
            .map(|_| verdicts.next_is_ambiguous())
            .collect()
    }

    fn bytewise(text: &[u8]) -> Vec<&[u8]> {
        text.chunks(1).collect()
    }

    #[test]
    fn plain_requests_pass_whole_or_byte_by_byte() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /last HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(verdicts(&[stream], 4), [false, false, false, true]);
        assert_eq!(verdicts(&bytewise(stream), 4), [false, false, false, true]);
    }

    #[test]
    fn both_lengths_are_ambiguous_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\ncontent-length: 3\r\nCONTENT-LENGTH: 4\r\n\r\n"[..],
        ] {
            assert_eq!(
                verdicts(&[head], 1),
                [true],
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn empty_lines_before_a_request_do_not_end_the_guard() {
        let stream: &[u8] = b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts(&[stream], 1), [true]);
        assert_eq!(verdicts(&bytewise(stream), 1), [true]);
        // Between two requests too.
        let between: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n\n\
            POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(verdicts(&[between], 2), [false, true]);
    }

    #[test]
    fn bare_line_feeds_and_many_headers_are_followed() {
        let bare: &[u8] = b"GET / HTTP/1.1\nHost: a\n\n\
            POST / HTTP/1.1\nContent-Length: 5\nContent-Length: 5\n\nhello";
        assert_eq!(verdicts(&[bare], 2), [false, true]);
        assert_eq!(verdicts(&bytewise(bare), 2), [false, true]);
        let many = format!(
            "POST / HTTP/1.1\r\n{}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            (0..150)
                .map(|i| format!("X-H{i}: 1\r\n"))
                .collect::<String>()
        );
        assert_eq!(verdicts(&[many.as_bytes()], 1), [true]);
    }

    #[test]
    fn the_guard_stops_following_what_it_cannot() {
        // A refused upgrade: the next request is still judged.
        let refused: &[u8] =
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(verdicts(&[refused], 2), [false, true]);
        // An accepted one: the tunnel's bytes (a WebSocket frame) are not a request.
        let tunnel: &[u8] =
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            \x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58\r\n\r\n";
        assert_eq!(verdicts(&[tunnel], 2), [false, false]);
        // HTTP/2's preface.
        assert_eq!(verdicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], 1), [false]);
        // Bad chunk framing: hyper refuses the body; nothing after it is judged.
        let bad_chunks: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\
            GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(verdicts(&[bad_chunks], 2), [false, false]);
    }
}
