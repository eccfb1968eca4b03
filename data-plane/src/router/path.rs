//! Request path normalisation, done once per request before routing.
//!
//! The path routes are matched against is also the path forwarded upstream, so the gateway and
//! the backend can never disagree about which resource was asked for:
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, once; every
//!   other escape stays encoded (with upper-case hex), so `%252e` is never turned into `.`;
//! - dot segments are removed (RFC 3986 §5.2.4), never above the root, after that decoding, so
//!   `/a/%2e%2e/b` is `/b` both here and upstream;
//! - paths that mean different things to different servers are refused: encoded `/` or `\`,
//!   encoded NUL, raw `\`, control characters, malformed escapes.

use std::borrow::Cow;

/// Why a request path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains an encoded '/' or '\\' (%2F, %5C)")]
    EncodedSeparator,
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
    #[error("the path contains a backslash or a control character")]
    ForbiddenCharacter,
}

/// The normalised form of `raw` (a path without its query), borrowed when nothing changed.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = raw.as_bytes();
    if bytes.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7f) {
        return Err(PathError::ForbiddenCharacter);
    }
    let needs_work = raw.contains('%') || has_dot_segment(raw);
    if !needs_work {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(bytes)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// Decodes the escapes of unreserved characters and upper-cases the others. Bytes other than
/// escapes are copied as they are: a path may carry raw UTF-8 (`/files/café`), which must
/// reach the upstream as the same bytes, not as one Latin-1 character per byte.
fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
            return Err(PathError::BadEscape);
        };
        let (Some(hi), Some(lo)) = (hex_value(hi), hex_value(lo)) else {
            return Err(PathError::BadEscape);
        };
        let value = hi << 4 | lo;
        match value {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0 => return Err(PathError::EncodedNul),
            v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                out.push(v);
            }
            v => {
                out.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 0xf)]])
            }
        }
        i += 3;
    }
    // UTF-8 still: the input was, and only whole escapes (ASCII) were replaced by ASCII.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §5.2.4 for an absolute path: `..` at the root stays at the root.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path[1..].split('/') {
        match segment {
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            other => {
                segments.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_utf8_passes_through_a_path_that_is_decoded() {
        assert_eq!(
            normalize("/files/café%20menu.pdf").unwrap(),
            "/files/café%20menu.pdf"
        );
        assert_eq!(normalize("/a/./ünï/../b%7e").unwrap(), "/a/b~");
        assert_eq!(normalize("/ünï/./x").unwrap(), "/ünï/x");
    }

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for path in ["/", "/users/1", "/a//b", "/a/b/", "/caf%C3%A9"] {
            let normalized = normalize(path).unwrap();
            assert_eq!(normalized, path);
        }
        assert!(matches!(normalize("/users/1").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn dot_segments_never_climb_above_the_root() {
        assert_eq!(normalize("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(normalize("/a/./b").unwrap(), "/a/b");
        assert_eq!(normalize("/../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(normalize("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize("/..").unwrap(), "/");
        assert_eq!(normalize("/a/%2e%2e/%2E%2e/b").unwrap(), "/b");
    }

    #[test]
    fn escapes_are_decoded_once_and_only_when_unreserved() {
        assert_eq!(normalize("/%7Euser/%41").unwrap(), "/~user/A");
        // %25 is '%': it stays encoded, so %252e can never become '.'.
        assert_eq!(normalize("/a/%252e%252e/b").unwrap(), "/a/%252e%252e/b");
        assert_eq!(normalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize("/a%20b").unwrap(), "/a%20b");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%2f..%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%00"), Err(PathError::EncodedNul));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a\\..\\b"), Err(PathError::ForbiddenCharacter));
        assert_eq!(normalize("/a\tb"), Err(PathError::ForbiddenCharacter));
    }
}
