//! Where a guest's outgoing requests may land: the operator's network policy.
//!
//! A manifest lists the origins its guest may call; this policy decides
//! which *addresses* any guest may reach at all. Addresses inside the host's
//! own networks (loopback, private, CGNAT, link-local with the cloud
//! metadata endpoint, unique-local, multicast, reserved) are denied unless
//! the operator admits a range with `--allow-outbound-cidr`. The check runs
//! on addresses, after resolution, for literals and names alike, at deploy
//! (a manifest naming a denied address is refused) and again on every
//! request (a name may resolve elsewhere later; a redirect is a new request).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;

/// Ranges no guest reaches unless the operator admits them.
const DENIED: &[&str] = &[
    // IPv4.
    "0.0.0.0/8",      // "this network", unspecified
    "10.0.0.0/8",     // private
    "100.64.0.0/10",  // carrier-grade NAT (also some clouds' metadata)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local: the cloud metadata endpoint
    "172.16.0.0/12",  // private
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // private
    "198.18.0.0/15",  // benchmarking
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, broadcast
    // IPv6.
    "::/128",    // unspecified
    "::1/128",   // loopback
    "fc00::/7",  // unique-local (AWS metadata is fd00:ec2::254)
    "fe80::/10", // link-local
    "fec0::/10", // site-local (deprecated, still routed by some)
    "ff00::/8",  // multicast
];

static DENIED_NETS: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    DENIED
        .iter()
        .map(|net| net.parse().expect("the denied ranges are valid CIDRs"))
        .collect()
});

/// The operator's outbound network policy, shared by every instance.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    /// Ranges admitted although they are denied by default.
    allowed: Arc<[IpNet]>,
}

/// Why an outgoing destination is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// The address (or one the name resolves to) is inside a denied range.
    #[error(
        "{address} is an internal address (loopback, private, link-local or reserved); the operator may admit it with --allow-outbound-cidr"
    )]
    Internal {
        /// The refused address.
        address: IpAddr,
    },
    /// The name did not resolve.
    #[error("`{host}` does not resolve: {reason}")]
    Unresolved {
        /// The name.
        host: String,
        /// The resolver's words.
        reason: String,
    },
}

impl OutboundPolicy {
    /// A policy admitting `allowed` on top of the public internet.
    pub fn allowing(allowed: impl IntoIterator<Item = IpNet>) -> OutboundPolicy {
        OutboundPolicy {
            allowed: allowed.into_iter().collect(),
        }
    }

    /// Whether a guest may reach `address`.
    pub fn permits(&self, address: IpAddr) -> bool {
        let address = embedded_v4(address).unwrap_or(address);
        !is_denied(address) || self.allowed.iter().any(|net| net.contains(&address))
    }

    /// `host` (a name, an IPv4 literal or a bracketed IPv6 literal) resolved
    /// on `port`, when every address it has is permitted. A name with one
    /// denied address among public ones is refused: the resolver may pick it.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Denied> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| Denied::Unresolved {
                    host: host.to_owned(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        if let Some(denied) = addresses.iter().find(|a| !self.permits(a.ip())) {
            return Err(Denied::Internal { address: denied.ip() });
        }
        if addresses.is_empty() {
            return Err(Denied::Unresolved {
                host: host.to_owned(),
                reason: "no addresses".into(),
            });
        }
        Ok(addresses)
    }
}

/// Whether `address` lies in a range denied by default.
fn is_denied(address: IpAddr) -> bool {
    DENIED_NETS.iter().any(|net| net.contains(&address))
}

/// The IPv4 address an IPv6 one carries to the same host: v4-mapped
/// (`::ffff:a.b.c.d`), v4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`)
/// and 6to4 (`2002:AABB:CCDD::/48`), so none is a way around the v4 ranges.
fn embedded_v4(address: IpAddr) -> Option<IpAddr> {
    let IpAddr::V6(v6) = address else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4.into());
    }
    let s = v6.segments();
    let low = || std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // v4-compatible, but not `::` and `::1` themselves.
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(low().into()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low().into()),
        [0x2002, a, b, ..] => Some(std::net::Ipv4Addr::new((a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8).into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect(text)
    }

    #[test]
    fn internal_ranges_are_denied_by_default() {
        let policy = OutboundPolicy::default();
        for denied in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::7f00:1",
        ] {
            assert!(!policy.permits(ip(denied)), "{denied}");
        }
        for public in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "172.32.0.1",
        ] {
            assert!(policy.permits(ip(public)), "{public}");
        }
    }

    #[test]
    fn the_operator_admits_ranges() {
        let policy = OutboundPolicy::allowing(["127.0.0.2/32".parse().expect("cidr")]);
        assert!(policy.permits(ip("127.0.0.2")));
        assert!(policy.permits(ip("::ffff:127.0.0.2")));
        assert!(!policy.permits(ip("127.0.0.1")));
    }

    #[tokio::test]
    async fn names_are_checked_once_resolved() {
        let policy = OutboundPolicy::default();
        // `127.1` is 127.0.0.1 to the resolver, the classic way around a
        // literal check; `localhost` is loopback by name.
        for host in ["127.1", "localhost", "127.0.0.1", "[::1]"] {
            assert!(
                matches!(policy.resolve(host, 80).await, Err(Denied::Internal { .. })),
                "{host}"
            );
        }
        let admitted = OutboundPolicy::allowing(["127.0.0.0/8".parse().expect("cidr")]);
        let resolved = admitted.resolve("127.1", 8080).await.expect("admitted");
        assert_eq!(resolved, vec!["127.0.0.1:8080".parse().expect("addr")]);
    }
}
