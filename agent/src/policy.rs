// SPDX-License-Identifier: Apache-2.0
//! Which destinations pods may not reach, as plain data, and its compilation into
//! the kernel's lookup tables.
//!
//! A policy is a list of [`BlockRule`]s, usually expanded from named [`Preset`]s.
//! [`compile`] turns it into one [`DestRules`](metadata_guard_common::DestRules) per
//! prefix for the kernel's longest-prefix-match tries. [`AllowRule`]s name the pods
//! that may reach blocked destinations anyway (a metadata proxy, for instance).

mod allow;
mod compile;
mod presets;

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use metadata_guard_common::{MAX_PORTS, MAX_RULES, POLICY_MAX_ENTRIES, PROTO_ALL, PROTO_OTHER, PROTO_TCP, PROTO_UDP};

pub(crate) use allow::{AllowRule, Pattern};
pub(crate) use compile::{compile, CompiledPolicy};
pub(crate) use presets::Preset;

/// One way a destination range is blocked: for these protocols (a mask of
/// `PROTO_*` bits), on these ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockRule {
    pub cidr: IpNet,
    pub protocols: u8,
    pub ports: PortMatch,
}

/// Which destination ports a [`BlockRule`] covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PortMatch {
    Any,
    Only(Vec<u16>),
    Except(Vec<u16>),
}

impl BlockRule {
    /// Blocks every protocol and port of `cidr`.
    pub(crate) fn all(cidr: IpNet) -> BlockRule {
        BlockRule { cidr, protocols: PROTO_ALL, ports: PortMatch::Any }
    }

    /// Blocks every protocol on every port of `cidr` but `ports`.
    pub(crate) fn except(cidr: IpNet, ports: &[u16]) -> BlockRule {
        BlockRule { cidr, protocols: PROTO_ALL, ports: PortMatch::Except(ports.to_vec()) }
    }

    /// Blocks every protocol on `ports` of `cidr` only.
    pub(crate) fn only(cidr: IpNet, ports: &[u16]) -> BlockRule {
        BlockRule { cidr, protocols: PROTO_ALL, ports: PortMatch::Only(ports.to_vec()) }
    }

    /// Checks what the kernel layout can hold and what would silently match nothing.
    pub(crate) fn validate(&self) -> Result<(), PolicyError> {
        let cidr = self.cidr;
        if cidr != cidr.trunc() {
            return Err(PolicyError::HostBits { cidr });
        }
        if self.protocols == 0 {
            return Err(PolicyError::NoProtocol { cidr });
        }
        if self.protocols & !PROTO_ALL != 0 {
            return Err(PolicyError::UnknownProtocols { cidr, bits: self.protocols & !PROTO_ALL });
        }
        if let PortMatch::Only(ports) | PortMatch::Except(ports) = &self.ports {
            if ports.is_empty() {
                return Err(PolicyError::EmptyPorts { cidr });
            }
            let distinct = distinct_ports(ports).len();
            if distinct > MAX_PORTS {
                return Err(PolicyError::TooManyPorts { cidr, count: distinct });
            }
        }
        Ok(())
    }
}

impl fmt::Display for BlockRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if self.protocols != PROTO_ALL {
            write!(f, " {}", protocol_names(self.protocols))?;
        }
        match &self.ports {
            PortMatch::Any => Ok(()),
            PortMatch::Only(ports) => write!(f, " ports {}", join(ports)),
            PortMatch::Except(ports) => write!(f, " except ports {}", join(ports)),
        }
    }
}

fn protocol_names(mask: u8) -> String {
    let names = [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp"), (PROTO_OTHER, "other")];
    let listed: Vec<&str> = names.iter().filter(|(bit, _)| mask & bit != 0).map(|(_, name)| *name).collect();
    listed.join("+")
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// Sorted and deduplicated, so that rules listing the same ports compare equal.
pub(crate) fn distinct_ports(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Parses `10.0.0.0/8`, `fd00:ec2::254/128`, or a bare address as a single-host prefix.
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, PolicyError> {
    let text = text.trim();
    let cidr = match text.parse::<IpNet>() {
        Ok(cidr) => cidr,
        Err(_) => {
            text.parse::<IpAddr>().map(IpNet::from).map_err(|_| PolicyError::NotACidr { text: text.to_owned() })?
        }
    };
    if cidr != cidr.trunc() {
        return Err(PolicyError::HostBits { cidr });
    }
    Ok(cidr)
}

/// Why a policy cannot be put into the kernel. Each message names the destination and
/// how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("`{text}` is not an IP address or CIDR; write e.g. 169.254.169.254, 10.0.0.0/8 or fd00:ec2::254/128")]
    NotACidr { text: String },
    #[error("{cidr} has host bits set; write {}", cidr.trunc())]
    HostBits { cidr: IpNet },
    #[error("the rule for {cidr} blocks no protocol; list at least one of tcp, udp, other, or leave protocols out to block all")]
    NoProtocol { cidr: IpNet },
    #[error("the rule for {cidr} has unknown protocol bits {bits:#04x}; only tcp, udp and other exist")]
    UnknownProtocols { cidr: IpNet, bits: u8 },
    #[error("the rule for {cidr} has an empty port list, which would match nothing; list ports, or leave the list out to cover every port")]
    EmptyPorts { cidr: IpNet },
    #[error("the rule for {cidr} lists {count} ports but the kernel holds at most {MAX_PORTS} per rule; split a ports list into several rules, or block every port")]
    TooManyPorts { cidr: IpNet, count: usize },
    #[error("{prefix} is covered by {count} different rules (its own and those of wider prefixes containing it) but the kernel holds at most {MAX_RULES}; merge the rules that overlap {prefix}")]
    TooManyRules { prefix: IpNet, count: usize },
    #[error("the policy has {count} {family} prefixes but the kernel holds at most {POLICY_MAX_ENTRIES}; block wider prefixes")]
    TooManyPrefixes { family: &'static str, count: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_bare_address_is_a_single_host() {
        assert_eq!(parse_cidr("169.254.170.2").unwrap(), net("169.254.170.2/32"));
        assert_eq!(parse_cidr("fd00:ec2::254").unwrap(), net("fd00:ec2::254/128"));
        assert_eq!(parse_cidr(" 10.0.0.0/8 ").unwrap(), net("10.0.0.0/8"));
    }

    #[test]
    fn host_bits_are_refused_with_the_intended_prefix() {
        let err = parse_cidr("169.254.169.254/16").unwrap_err();
        assert_eq!(err.to_string(), "169.254.169.254/16 has host bits set; write 169.254.0.0/16");
        let rule = BlockRule::all(net("fd00:ec2::254/64"));
        assert_eq!(rule.validate().unwrap_err().to_string(), "fd00:ec2::254/64 has host bits set; write fd00:ec2::/64");
    }

    #[test]
    fn garbage_is_not_a_cidr() {
        for text in ["", "metadata.google.internal", "10.0.0.0/33", "1.2.3"] {
            assert!(matches!(parse_cidr(text), Err(PolicyError::NotACidr { .. })), "{text:?}");
        }
    }

    #[test]
    fn rules_that_would_match_nothing_or_not_fit_are_refused() {
        let cidr = net("10.0.0.0/8");
        let no_protocol = BlockRule { protocols: 0, ..BlockRule::all(cidr) };
        assert_eq!(no_protocol.validate(), Err(PolicyError::NoProtocol { cidr }));
        let stray_bit = BlockRule { protocols: PROTO_TCP | 0x80, ..BlockRule::all(cidr) };
        assert_eq!(stray_bit.validate(), Err(PolicyError::UnknownProtocols { cidr, bits: 0x80 }));
        assert_eq!(BlockRule::only(cidr, &[]).validate(), Err(PolicyError::EmptyPorts { cidr }));
        assert_eq!(BlockRule::except(cidr, &[]).validate(), Err(PolicyError::EmptyPorts { cidr }));
        let nine: Vec<u16> = (1..=9).collect();
        assert_eq!(BlockRule::only(cidr, &nine).validate(), Err(PolicyError::TooManyPorts { cidr, count: 9 }));
    }

    #[test]
    fn repeated_ports_count_once() {
        let rule = BlockRule::only(net("10.0.0.0/8"), &[80, 80, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(rule.validate(), Ok(()));
    }

    #[test]
    fn rules_print_as_an_operator_would_write_them() {
        assert_eq!(BlockRule::all(net("100.100.100.200/32")).to_string(), "100.100.100.200/32");
        assert_eq!(
            BlockRule::except(net("169.254.169.254/32"), &[53]).to_string(),
            "169.254.169.254/32 except ports 53"
        );
        let tcp_udp =
            BlockRule { protocols: PROTO_TCP | PROTO_UDP, ..BlockRule::only(net("168.63.129.16/32"), &[80, 32526]) };
        assert_eq!(tcp_udp.to_string(), "168.63.129.16/32 tcp+udp ports 80,32526");
    }
}
