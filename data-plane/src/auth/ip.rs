//! IP allow and deny lists (CIDR), per API, route or consumer.

use std::net::IpAddr;

use ipnet::IpNet;
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

fn parse_net(entry: &str) -> Option<IpNet> {
    let entry = entry.trim();
    entry
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        .ok()
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
    fn a_bad_entry_is_named() {
        let error = IpRules::compile(&pb::IpRestrictionPolicy {
            allow: vec!["10.0.0.0/8".into(), "ten".into()],
            deny: vec![],
        })
        .unwrap_err();
        assert_eq!(error, "allow[1]: \"ten\" is not an IP address or CIDR");
    }
}
