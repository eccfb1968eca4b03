//! CORS: preflights answered by the gateway, and the headers that let a browser read the
//! answers to cross-origin requests.

use std::collections::HashSet;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use sluice_proto::pb;

/// A `cors` policy, with its header values built once.
#[derive(Debug, Clone)]
pub struct Cors {
    any_origin: bool,
    origins: HashSet<String>,
    /// `None`: echo what the preflight asks for.
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    allow_credentials: bool,
    max_age: Option<HeaderValue>,
}

/// Why a preflight is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsRefusal(pub String);

impl Cors {
    pub fn compile(policy: &pb::CorsPolicy) -> Result<Self, String> {
        let list = |values: &[String], what: &str| -> Result<Option<HeaderValue>, String> {
            if values.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(&values.join(", "))
                .map(Some)
                .map_err(|_| format!("{what}: not valid in a header"))
        };
        Ok(Cors {
            any_origin: policy.allow_origins.iter().any(|o| o == "*"),
            origins: policy
                .allow_origins
                .iter()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            allow_methods: list(&policy.allow_methods, "allow_methods")?,
            allow_headers: list(&policy.allow_headers, "allow_headers")?,
            expose_headers: list(&policy.expose_headers, "expose_headers")?,
            allow_credentials: policy.allow_credentials,
            max_age: (policy.max_age_s > 0).then(|| HeaderValue::from(policy.max_age_s)),
        })
    }

    /// A browser's preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || origin
                .to_str()
                .is_ok_and(|o| self.origins.contains(&o.to_ascii_lowercase()))
    }

    /// The answer to a preflight: 204 and its headers, or why it is refused.
    pub fn preflight(&self, request: &HeaderMap) -> Result<(StatusCode, HeaderMap), CorsRefusal> {
        let origin = request
            .get(header::ORIGIN)
            .ok_or_else(|| CorsRefusal("the preflight has no Origin".into()))?;
        if !self.allows_origin(origin) {
            return Err(CorsRefusal(format!(
                "origin {} is not allowed",
                String::from_utf8_lossy(origin.as_bytes())
            )));
        }
        let requested = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("GET"));
        if let Some(allowed) = &self.allow_methods {
            let listed = allowed
                .to_str()
                .unwrap_or_default()
                .split(", ")
                .any(|m| m.as_bytes() == requested.as_bytes());
            if !listed {
                return Err(CorsRefusal(format!(
                    "method {} is not allowed",
                    String::from_utf8_lossy(requested.as_bytes())
                )));
            }
        }
        let mut headers = HeaderMap::new();
        self.origin_headers(origin, &mut headers);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone().unwrap_or(requested),
        );
        let asked_headers = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        if let Some(allowed) = self.allow_headers.clone().or(asked_headers) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
        }
        if let Some(max_age) = &self.max_age {
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        Ok((StatusCode::NO_CONTENT, headers))
    }

    /// Adds the CORS headers to the answer to an actual (not preflight) request from an
    /// allowed origin; other answers are left as they are, and the browser keeps them from
    /// the page.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        let Some(origin) = origin.filter(|o| self.allows_origin(o)) else {
            return;
        };
        self.origin_headers(origin, response);
        if let Some(expose) = &self.expose_headers {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }

    fn origin_headers(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        if self.any_origin && !self.allow_credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            // The answer depends on the origin: caches must keep one per origin.
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if self.allow_credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], methods: &[&str]) -> Cors {
        Cors::compile(&pb::CorsPolicy {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_methods: methods.iter().map(|s| s.to_string()).collect(),
            allow_headers: vec![],
            expose_headers: vec!["x-request-id".into()],
            allow_credentials: false,
            max_age_s: 600,
        })
        .unwrap()
    }

    fn preflight(origin: &str, method: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            method.parse().unwrap(),
        );
        h.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "content-type".parse().unwrap(),
        );
        h
    }

    #[test]
    fn an_allowed_preflight_gets_every_header() {
        let policy = cors(&["https://app.example.com"], &["GET", "POST"]);
        assert!(Cors::is_preflight(
            &Method::OPTIONS,
            &preflight("https://app.example.com", "POST")
        ));
        let (status, h) = policy
            .preflight(&preflight("https://app.example.com", "POST"))
            .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_HEADERS], "content-type");
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(h[header::VARY], "Origin");
    }

    #[test]
    fn foreign_origins_and_methods_are_refused() {
        let policy = cors(&["https://app.example.com"], &["GET"]);
        let refused = policy
            .preflight(&preflight("https://evil.example.com", "GET"))
            .unwrap_err();
        assert!(refused.0.contains("evil.example.com"), "{refused:?}");
        let refused = policy
            .preflight(&preflight("https://app.example.com", "DELETE"))
            .unwrap_err();
        assert!(refused.0.contains("DELETE"), "{refused:?}");
    }

    #[test]
    fn actual_requests_are_decorated_only_for_allowed_origins() {
        let policy = cors(&["*"], &[]);
        let mut h = HeaderMap::new();
        policy.decorate(Some(&"https://x.example".parse().unwrap()), &mut h);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(h[header::ACCESS_CONTROL_EXPOSE_HEADERS], "x-request-id");
        let strict = cors(&["https://app.example.com"], &[]);
        let mut h = HeaderMap::new();
        strict.decorate(Some(&"https://x.example".parse().unwrap()), &mut h);
        assert!(h.is_empty());
    }
}
