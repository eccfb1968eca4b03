//! librdkafka setting names, which a broker resource's `properties` pass through.

/// Names that librdkafka (2.12, its CONFIGURATION.md) takes as one setting: `(alias, name)`.
/// Given both, librdkafka keeps whichever it is handed last, and rdkafka hands settings over in
/// no fixed order; so a broker's `properties` may not name one setting twice (validation), and
/// the data plane reads each under the name it sets its own defaults with ([`sluice_name`]).
pub const ALIASES: &[(&str, &str)] = &[
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

/// The settings Sluice gives its own producer defaults under (`acks`, `linger.ms`,
/// `message.timeout.ms`), one name of each alias pair.
const SLUICE_NAMES: &[&str] = &["acks", "linger.ms", "message.timeout.ms"];

/// The name the data plane keeps `key` under: for the settings it has defaults for, the name
/// it gives them, so that a user's alias replaces the default instead of racing it.
pub fn sluice_name(key: &str) -> &str {
    ALIASES
        .iter()
        .find_map(|&(alias, name)| {
            let other = if key == alias {
                name
            } else if key == name {
                alias
            } else {
                return None;
            };
            SLUICE_NAMES.contains(&other).then_some(other)
        })
        .unwrap_or(key)
}

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
    fn aliases_of_sluices_defaults_take_the_defaults_names() {
        assert_eq!(sluice_name("request.required.acks"), "acks");
        assert_eq!(sluice_name("acks"), "acks");
        assert_eq!(sluice_name("delivery.timeout.ms"), "message.timeout.ms");
        assert_eq!(sluice_name("queue.buffering.max.ms"), "linger.ms");
        assert_eq!(sluice_name("compression.codec"), "compression.codec");
        assert_eq!(sluice_name("sasl.username"), "sasl.username");
        assert_eq!(alias_of("compression.codec"), Some("compression.type"));
        assert_eq!(alias_of("sasl.username"), None);
    }
}
