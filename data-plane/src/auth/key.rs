//! API keys: where a request carries one, and how it is taken out before proxying.

use http::HeaderMap;
use http::header::HeaderName;
use sha2::{Digest, Sha256};
use sluice_proto::pb;

/// A `key_auth` policy: where to look for the key.
#[derive(Debug, Clone)]
pub struct KeyAuth {
    headers: Vec<HeaderName>,
    query_params: Vec<String>,
    /// Remove the key before proxying.
    pub hide_credentials: bool,
}

/// Where a request's key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    Header(HeaderName),
    Query(String),
}

/// A key found in a request: its SHA-256 (keys are held only as hashes) and where it was.
#[derive(Debug, Clone)]
pub struct PresentedKey {
    pub sha256: [u8; 32],
    pub location: KeyLocation,
}

impl KeyAuth {
    pub fn compile(policy: &pb::KeyAuthPolicy) -> Result<Self, String> {
        let headers = if policy.headers.is_empty() {
            vec![HeaderName::from_static("x-api-key")]
        } else {
            policy
                .headers
                .iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("headers: {h:?} is not a header name"))
                })
                .collect::<Result<_, _>>()?
        };
        Ok(KeyAuth {
            headers,
            query_params: policy.query_params.clone(),
            hide_credentials: policy.hide_credentials,
        })
    }

    /// The scheme named in `WWW-Authenticate` when a key is missing or refused.
    pub fn challenge(&self) -> String {
        format!("ApiKey realm=\"sluice\", header=\"{}\"", self.headers[0])
    }

    /// The first key the request carries, in the policy's order: headers, then query
    /// parameters. An empty value is no key.
    pub fn find(&self, headers: &HeaderMap, query: Option<&str>) -> Option<PresentedKey> {
        for name in &self.headers {
            if let Some(value) = headers.get(name)
                && !value.is_empty()
            {
                return Some(PresentedKey {
                    sha256: Sha256::digest(value.as_bytes()).into(),
                    location: KeyLocation::Header(name.clone()),
                });
            }
        }
        let query = query?;
        for param in &self.query_params {
            if let Some((_, value)) = url::form_urlencoded::parse(query.as_bytes())
                .find(|(name, value)| name == param && !value.is_empty())
            {
                return Some(PresentedKey {
                    sha256: Sha256::digest(value.as_bytes()).into(),
                    location: KeyLocation::Query(param.clone()),
                });
            }
        }
        None
    }
}

/// `query` without the parameter `name` (every occurrence); `None` when nothing is left.
pub fn query_without(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let decoded: String = url::form_urlencoded::parse(key.as_bytes())
                .map(|(k, _)| k.into_owned())
                .next()
                .unwrap_or_default();
            !pair.is_empty() && decoded != name
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(headers: &[&str], params: &[&str]) -> KeyAuth {
        KeyAuth::compile(&pb::KeyAuthPolicy {
            headers: headers.iter().map(|s| s.to_string()).collect(),
            query_params: params.iter().map(|s| s.to_string()).collect(),
            hide_credentials: false,
        })
        .unwrap()
    }

    #[test]
    fn headers_come_before_query_parameters() {
        let policy = auth(&["x-key", "authorization-key"], &["apikey"]);
        let mut headers = HeaderMap::new();
        headers.insert("authorization-key", "secret-two".parse().unwrap());
        let found = policy.find(&headers, Some("apikey=secret-three")).unwrap();
        assert_eq!(
            found.location,
            KeyLocation::Header(HeaderName::from_static("authorization-key"))
        );
        assert_eq!(
            found.sha256,
            <[u8; 32]>::from(Sha256::digest(b"secret-two"))
        );
        let found = policy
            .find(&HeaderMap::new(), Some("a=1&apikey=s%2Fcret"))
            .unwrap();
        assert_eq!(found.location, KeyLocation::Query("apikey".into()));
        assert_eq!(found.sha256, <[u8; 32]>::from(Sha256::digest(b"s/cret")));
        assert!(policy.find(&HeaderMap::new(), Some("apikey=")).is_none());
        assert!(policy.find(&HeaderMap::new(), None).is_none());
    }

    #[test]
    fn the_default_header_is_x_api_key() {
        let policy = auth(&[], &[]);
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "k".parse().unwrap());
        assert!(policy.find(&headers, None).is_some());
        assert!(policy.challenge().contains("x-api-key"));
    }

    #[test]
    fn a_hidden_query_key_leaves_the_rest_of_the_query() {
        assert_eq!(
            query_without("a=1&apikey=x&b=2&apikey=y", "apikey").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(query_without("apikey=x", "apikey"), None);
    }
}
