//! CloudEvents 1.0 on the publish path: what an HTTP request must carry in each mode, and
//! how it maps onto a Kafka record (the CloudEvents Kafka protocol binding).
//!
//! - **structured**: the body is the whole event as `application/cloudevents+json`; it goes
//!   to the topic as it is, with a `content-type` record header saying so.
//! - **binary**: the event's attributes arrive as `ce-*` HTTP headers and its data as the
//!   body; each `ce-name` header becomes a `ce_name` record header, and `Content-Type`
//!   becomes `content-type`.
//! - **none**: the body is the event's data; the gateway gives it an id.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

/// The attributes every CloudEvent must have (besides `specversion`).
const REQUIRED: [&str; 3] = ["id", "source", "type"];

pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How a route reads events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Structured,
    Binary,
}

/// Why a request is not a valid event in its route's mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// 415: the wrong kind of body for the mode.
    #[error("{0}")]
    MediaType(String),
    /// 400: a missing or malformed attribute.
    #[error("{0}")]
    Invalid(String),
}

/// What a request contributes to its record, once checked.
#[derive(Debug, PartialEq)]
pub struct Event {
    /// The event's id: the CloudEvent's own, or one the gateway made (mode `none`).
    pub id: String,
    /// Record headers from the event's attributes and content type.
    pub headers: Vec<(String, Bytes)>,
    /// The parsed JSON the route's schema applies to, when the body had to be parsed
    /// anyway (structured mode: the event's `data`).
    pub data: Option<Value>,
    /// A structured event whose data is binary (`data_base64`): no JSON Schema applies to it.
    pub binary_data: bool,
}

/// Reads an event from a request's headers and body in `mode`.
pub fn read(mode: Mode, headers: &HeaderMap, body: &Bytes) -> Result<Event, EventError> {
    match mode {
        Mode::None => {
            let mut record_headers = Vec::new();
            if let Some(content_type) = headers.get(http::header::CONTENT_TYPE) {
                record_headers.push(("content-type".to_owned(), bytes_of(content_type)));
            }
            Ok(Event {
                // The thread-local generator: `Uuid::new_v4` costs a syscall per event.
                id: uuid::Builder::from_random_bytes(rand::random())
                    .into_uuid()
                    .to_string(),
                headers: record_headers,
                data: None,
                binary_data: false,
            })
        }
        Mode::Structured => structured(headers, body),
        Mode::Binary => binary(headers),
    }
}

fn structured(headers: &HeaderMap, body: &Bytes) -> Result<Event, EventError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE) {
        return Err(EventError::MediaType(format!(
            "this route takes structured CloudEvents: Content-Type must be \
             {STRUCTURED_CONTENT_TYPE}, not {content_type:?}"
        )));
    }
    let mut event: serde_json::Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| EventError::Invalid(format!("the body is not a JSON object: {e}")))?;
    match event.get("specversion") {
        Some(Value::String(version)) if version == "1.0" => {}
        Some(other) => {
            return Err(EventError::Invalid(format!(
                "specversion must be \"1.0\", not {other}"
            )));
        }
        None => return Err(EventError::Invalid("specversion is required".into())),
    }
    for attribute in REQUIRED {
        match event.get(attribute) {
            Some(Value::String(value)) if !value.is_empty() => {}
            Some(_) => {
                return Err(EventError::Invalid(format!(
                    "{attribute} must be a non-empty string"
                )));
            }
            None => return Err(EventError::Invalid(format!("{attribute} is required"))),
        }
    }
    if event.contains_key("data") && event.contains_key("data_base64") {
        return Err(EventError::Invalid(
            "an event has data or data_base64, not both".into(),
        ));
    }
    let Some(Value::String(id)) = event.get("id").cloned() else {
        return Err(EventError::Invalid("id is required".into()));
    };
    Ok(Event {
        id,
        headers: vec![(
            "content-type".to_owned(),
            Bytes::from_static(STRUCTURED_CONTENT_TYPE.as_bytes()),
        )],
        binary_data: event.contains_key("data_base64"),
        data: Some(event.remove("data").unwrap_or(Value::Null)),
    })
}

fn binary(headers: &HeaderMap) -> Result<Event, EventError> {
    // Every `ce-` header, once each, its value percent-decoded (the HTTP binding encodes what
    // is not printable ASCII) and UTF-8 (what the Kafka binding's headers carry).
    let mut attributes: Vec<(&str, String)> = Vec::new();
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        // CloudEvents attribute names: lower-case letters and digits, at most 20.
        if attribute.is_empty()
            || attribute.len() > 20
            || !attribute
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(EventError::Invalid(format!(
                "header {name}: CloudEvents attribute names are 1 to 20 lower-case letters \
                 and digits"
            )));
        }
        let mut values = headers.get_all(name).iter();
        let value = values
            .next()
            .map(http::HeaderValue::as_bytes)
            .unwrap_or_default();
        if attribute == "datacontenttype" {
            // Content-Type carries it in binary mode; a copy that agrees is let pass.
            if headers
                .get(http::header::CONTENT_TYPE)
                .map(http::HeaderValue::as_bytes)
                == Some(value)
            {
                continue;
            }
            return Err(EventError::Invalid(
                "datacontenttype is the Content-Type header in binary mode, not ce-datacontenttype"
                    .into(),
            ));
        }
        if values.next().is_some() {
            return Err(EventError::Invalid(format!(
                "header {name} appears more than once: an attribute has one value"
            )));
        }
        let value = percent_encoding::percent_decode(value)
            .decode_utf8()
            .map_err(|_| {
                EventError::Invalid(format!("header {name} is not UTF-8 once percent-decoded"))
            })?;
        if value.chars().any(char::is_control) {
            return Err(EventError::Invalid(format!(
                "header {name} holds a control character once percent-decoded"
            )));
        }
        attributes.push((attribute, value.into_owned()));
    }
    let attribute = |name: &str| -> Result<&str, EventError> {
        match attributes.iter().find(|(found, _)| *found == name) {
            None => Err(EventError::Invalid(format!("header ce-{name} is required"))),
            Some((_, value)) if value.is_empty() => {
                Err(EventError::Invalid(format!("header ce-{name} is empty")))
            }
            Some((_, value)) => Ok(value),
        }
    };
    let version = attribute("specversion")?;
    if version != "1.0" {
        return Err(EventError::Invalid(format!(
            "ce-specversion must be 1.0, not {version:?}"
        )));
    }
    for name in REQUIRED {
        attribute(name)?;
    }
    let id = attribute("id")?.to_owned();
    let mut record_headers: Vec<(String, Bytes)> = attributes
        .iter()
        .map(|(attribute, value)| (format!("ce_{attribute}"), Bytes::from(value.clone())))
        .collect();
    if let Some(content_type) = headers.get(http::header::CONTENT_TYPE) {
        record_headers.push(("content-type".to_owned(), bytes_of(content_type)));
    }
    Ok(Event {
        id,
        headers: record_headers,
        data: None,
        binary_data: false,
    })
}

fn bytes_of(value: &http::HeaderValue) -> Bytes {
    Bytes::copy_from_slice(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn structured_events_keep_their_id_and_expose_their_data() {
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"e-1","source":"/shop","type":"order.created","data":{"total":3}}"#,
        );
        let event = read(
            Mode::Structured,
            &headers(&[(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )]),
            &body,
        )
        .unwrap();
        assert_eq!(event.id, "e-1");
        assert_eq!(event.data, Some(serde_json::json!({"total": 3})));
        assert_eq!(event.headers[0].0, "content-type");
        assert!(!event.binary_data);
        let binary = Bytes::from_static(
            br#"{"specversion":"1.0","id":"e-2","source":"/shop","type":"blob","data_base64":"AAE="}"#,
        );
        let ce = headers(&[("content-type", "application/cloudevents+json")]);
        let event = read(Mode::Structured, &ce, &binary).unwrap();
        assert!(event.binary_data, "no schema can check it");
    }

    #[test]
    fn structured_mode_names_what_is_wrong() {
        let ce = headers(&[("content-type", "application/cloudevents+json")]);
        let cases: [(&[u8], &str); 5] = [
            (b"[1]", "not a JSON object"),
            (
                br#"{"id":"1","source":"s","type":"t"}"#,
                "specversion is required",
            ),
            (
                br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
                "must be \"1.0\"",
            ),
            (
                br#"{"specversion":"1.0","source":"s","type":"t"}"#,
                "id is required",
            ),
            (
                br#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
                "id must be a non-empty",
            ),
        ];
        for (body, expected) in cases {
            let error = read(Mode::Structured, &ce, &Bytes::copy_from_slice(body)).unwrap_err();
            assert!(
                matches!(&error, EventError::Invalid(m) if m.contains(expected)),
                "{error:?} should say {expected:?}"
            );
        }
        let json = headers(&[("content-type", "application/json")]);
        assert!(matches!(
            read(Mode::Structured, &json, &Bytes::from_static(b"{}")),
            Err(EventError::MediaType(_))
        ));
    }

    #[test]
    fn binary_mode_maps_ce_headers_to_record_headers() {
        let event = read(
            Mode::Binary,
            &headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "b-7"),
                ("ce-source", "/shop"),
                ("ce-type", "order.paid"),
                ("ce-subject", "order-9"),
                ("content-type", "application/json"),
                ("x-other", "not copied"),
            ]),
            &Bytes::from_static(b"{}"),
        )
        .unwrap();
        assert_eq!(event.id, "b-7");
        let names: Vec<&str> = event.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_subject",
                "content-type"
            ]
        );
        let missing = read(
            Mode::Binary,
            &headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "s"),
            ]),
            &Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(
            missing,
            EventError::Invalid("header ce-type is required".into())
        );
    }

    #[test]
    fn binary_mode_takes_one_percent_decoded_utf8_value_per_attribute() {
        let base = [
            ("ce-specversion", "1.0"),
            ("ce-source", "/shop"),
            ("ce-type", "order.paid"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut map = headers(&base);
            for (name, value) in extra {
                map.append(
                    http::HeaderName::from_static(name),
                    http::HeaderValue::from_static(value),
                );
            }
            read(Mode::Binary, &map, &Bytes::new())
        };
        let event = with(&[
            ("ce-id", "e%201"),
            ("ce-subject", "caf%C3%A9 100%"),
            ("content-type", "application/json"),
            ("ce-datacontenttype", "application/json"),
        ])
        .unwrap();
        assert_eq!(event.id, "e 1");
        let subject = event
            .headers
            .iter()
            .find(|(k, _)| k == "ce_subject")
            .unwrap();
        assert_eq!(subject.1, Bytes::from("café 100%"), "a lone % stays");
        assert!(
            !event.headers.iter().any(|(k, _)| k == "ce_datacontenttype"),
            "Content-Type carries it"
        );
        for (extra, error) in [
            (
                &[("ce-id", "a"), ("ce-id", "b")][..],
                "header ce-id appears more than once: an attribute has one value",
            ),
            (
                &[("ce-id", "a"), ("ce-subject", "%FF")][..],
                "header ce-subject is not UTF-8 once percent-decoded",
            ),
            (
                &[("ce-id", "a"), ("ce-datacontenttype", "text/plain")][..],
                "datacontenttype is the Content-Type header in binary mode, not \
                 ce-datacontenttype",
            ),
            (
                &[("ce-id", "a"), ("ce-subject", "a%0D%0Ab")][..],
                "header ce-subject holds a control character once percent-decoded",
            ),
        ] {
            assert_eq!(with(extra).unwrap_err(), EventError::Invalid(error.into()));
        }
    }

    #[test]
    fn plain_events_get_a_fresh_id() {
        let a = read(Mode::None, &HeaderMap::new(), &Bytes::new()).unwrap();
        let b = read(Mode::None, &HeaderMap::new(), &Bytes::new()).unwrap();
        assert_ne!(a.id, b.id);
        assert!(uuid::Uuid::parse_str(&a.id).is_ok());
    }
}
