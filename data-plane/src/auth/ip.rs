//! IP allow and deny lists (CIDR), per API, route or consumer.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
use sluice_proto::pb;

/// One `ip_restriction` policy, parsed.
#[derive(Debug, Clone, Default)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpRules {
    pub fn compile(policy: &pb::IpRestrictionPolicy) -> Result<Self, String> {
        let parse = |list: &[String], name: &str| {
            list.iter()
                .enumerate()
                .map(|(i, entry)| {
                    parse_net(entry).ok_or_else(|| {
                        format!("{name}[{i}]: {entry:?} is not an IP address or CIDR")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(IpRules {
            allow: parse(&policy.allow, "allow")?,
            deny: parse(&policy.deny, "deny")?,
        })
    }

    /// Whether `client` may pass: not denied, and allowed when there is an allow list.
    pub fn admits(&self, client: IpAddr) -> bool {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the lists say a.b.c.d.
        let client = client.to_canonical();
        if self.deny.iter().any(|net| net.contains(&client)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&client))
    }
}

/// The address a client's per-address budgets are counted under: an IPv4 client as IPv4 however
/// the listener saw it, and an IPv6 client by its /64 (one host's share of addresses: one
/// machine can take any address of its /64, and would otherwise get a fresh budget with each).
pub fn budget_address(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// An address or CIDR network, an IPv4-mapped one as its IPv4 network.
pub(crate) fn parse_net(entry: &str) -> Option<IpNet> {
    let entry = entry.trim();
    let net = entry
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        .ok()?;
    // An IPv4 network written IPv4-mapped (`::ffff:a.b.c.d`, as a dual-stack listener's logs
    // show IPv4 clients) is that IPv4 network: clients are compared in their IPv4 form.
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32 bits"),
            ),
            None => net,
        },
        _ => net,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> IpRules {
        IpRules::compile(&pb::IpRestrictionPolicy {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn deny_wins_and_allow_lists_close_the_rest() {
        let r = rules(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.2.3"]);
        assert!(r.admits("10.9.9.9".parse().unwrap()));
        assert!(!r.admits("10.1.2.3".parse().unwrap()));
        assert!(!r.admits("192.168.1.1".parse().unwrap()));
        assert!(r.admits("2001:db8::1".parse().unwrap()));
        assert!(
            r.admits("::ffff:10.9.9.9".parse().unwrap()),
            "an IPv4 client seen on a dual-stack listener"
        );
        let deny_only = rules(&[], &["192.168.0.0/16"]);
        assert!(deny_only.admits("10.0.0.1".parse().unwrap()));
        assert!(!deny_only.admits("192.168.4.4".parse().unwrap()));
    }

    #[test]
    fn entries_written_ipv4_mapped_are_their_ipv4_networks() {
        let r = rules(&[], &["::ffff:203.0.113.7", "::ffff:198.51.100.0/120"]);
        for denied in ["203.0.113.7", "::ffff:203.0.113.7", "198.51.100.9"] {
            assert!(!r.admits(denied.parse().unwrap()), "{denied}");
        }
        assert!(r.admits("203.0.113.8".parse().unwrap()));
        let allowed = rules(&["::ffff:203.0.113.7"], &[]);
        assert!(allowed.admits("203.0.113.7".parse().unwrap()));
        assert!(!allowed.admits("203.0.113.8".parse().unwrap()));
    }

    #[test]
    fn budgets_count_ipv4_clients_alike_and_ipv6_clients_by_their_64() {
        let at = |a: &str| budget_address(a.parse().unwrap()).to_string();
        assert_eq!(at("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(at("203.0.113.7"), "203.0.113.7");
        assert_eq!(at("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(at("2001:db8:1:2::9"), at("2001:db8:1:2:ffff::1"));
        assert_ne!(at("2001:db8:1:2::9"), at("2001:db8:1:3::9"));
    }

    #[test]
    fn a_bad_entry_is_named() {
        let error = IpRules::compile(&pb::IpRestrictionPolicy {
            allow: vec!["10.0.0.0/8".into(), "ten".into()],
            deny: vec![],
        })
        .unwrap_err();
        assert_eq!(error, "allow[1]: \"ten\" is not an IP address or CIDR");
    }
}
