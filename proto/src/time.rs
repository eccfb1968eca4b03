//! Times at the edges: RFC 3339 text (documents, REST) ↔ `google.protobuf.Timestamp`.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use prost_types::Timestamp;

/// Any instant chrono knows, as a protobuf timestamp.
pub fn timestamp<Tz: TimeZone>(time: &DateTime<Tz>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Parses RFC 3339 text with any offset ("2027-01-31T00:00:00Z", "…+02:00").
pub fn parse_rfc3339(text: &str) -> Result<Timestamp, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| timestamp(&time))
        .map_err(|e| {
            format!("{text:?} is not an RFC 3339 time ({e}); write e.g. \"2027-01-31T00:00:00Z\"")
        })
}

/// A protobuf timestamp as RFC 3339 text in UTC, or `None` when it is out of range.
pub fn format_rfc3339(ts: &Timestamp) -> Option<String> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    let time = Utc.timestamp_opt(ts.seconds, nanos).single()?;
    Some(time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_keep_the_instant_and_exports_are_utc() {
        let a = parse_rfc3339("2030-01-01T02:00:00+02:00").unwrap();
        let b = parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(format_rfc3339(&a).unwrap(), "2030-01-01T00:00:00Z");
        assert!(parse_rfc3339("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(
            format_rfc3339(&Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }
}
