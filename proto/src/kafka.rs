//! librdkafka setting names, which a broker resource's `properties` pass through.

/// Names that librdkafka (2.12, its CONFIGURATION.md) takes as one setting: `(alias, name)`.
/// Given both, librdkafka keeps whichever it is handed last, and rdkafka hands settings over in
/// no fixed order; so a broker's `properties` may not name one setting twice (validation), and
/// the data plane keeps an alias of a setting it has a default for under the default's name.
const ALIASES: &[(&str, &str)] = &[
    ("bootstrap.servers", "metadata.broker.list"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanism", "sasl.mechanisms"),
    (
        "sasl.oauthbearer.client.credentials.client.id",
        "sasl.oauthbearer.client.id",
    ),
    (
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.client.secret",
    ),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("linger.ms", "queue.buffering.max.ms"),
    ("retries", "message.send.max.retries"),
    ("compression.type", "compression.codec"),
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("enable.auto.commit", "auto.commit.enable"),
];

/// The other name of `key`'s setting, if it has one.
pub fn alias_of(key: &str) -> Option<&'static str> {
    ALIASES.iter().find_map(|&(alias, name)| {
        if key == alias {
            Some(name)
        } else if key == name {
            Some(alias)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_names_the_other_name_either_way() {
        assert_eq!(alias_of("request.required.acks"), Some("acks"));
        assert_eq!(alias_of("acks"), Some("request.required.acks"));
        assert_eq!(alias_of("compression.codec"), Some("compression.type"));
        assert_eq!(alias_of("sasl.username"), None);
    }
}
