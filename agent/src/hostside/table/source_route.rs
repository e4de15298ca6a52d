// SPDX-License-Identifier: Apache-2.0
//! IPv4 source routes (LSRR, SSRR): a packet addressed to the node whose options name
//! further hops is judged by `forward` on the node's own address, and the kernel
//! rewrites its destination to the next hop only after that hook (`ip_forward_options`
//! in `ip_forward_finish`), where `accept_source_route` is on. No destination test can
//! see where it goes, so `judge` refuses every IPv4 packet that carries either option,
//! whatever its destination in the node: a pod has no use for source routing (RFC
//! 7126 advises dropping both), and no other option is refused.
//!
//! The prefilter passes only headers whose first byte is 0x45 (no options), so every
//! packet with options reaches `judge`; this rule comes right after its loopback
//! accept, before the destination tests that would return such a packet unjudged.
//! (`ip option lsrr exists`: nf_tables' `exthdr` on IPv4 options, kernel 5.3+.)

use metadata_guard_netfilter::nftables::*;

/// Option types (RFC 791): loose and strict source and record route.
pub(crate) const IPOPT_LSRR: u8 = 131;
pub(crate) const IPOPT_SSRR: u8 = 137;
const PRESENT: u8 = 1;

/// One rule per option into `refuse`, which counts, logs and rejects (or, in audit
/// mode, lets it pass) as for any blocked destination; allowlisted pods are exempt.
pub(super) fn refuse_rules(b: &mut Batch, t: &str) {
    for option in [IPOPT_LSRR, IPOPT_SSRR] {
        b.add_rule(t, "judge", &rule(option));
    }
}

fn rule(option: u8) -> Vec<Expr> {
    vec![
        Expr::Meta { key: NFT_META_NFPROTO, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![NFPROTO_IPV4] },
        Expr::Ipv4OptionPresent { option, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![PRESENT] },
        Expr::jump("refuse"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_source_routes_go_to_refuse_for_ipv4_only() {
        for option in [IPOPT_LSRR, IPOPT_SSRR] {
            let r = rule(option);
            assert_eq!(r[1], Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![NFPROTO_IPV4] });
            assert_eq!(r[2], Expr::Ipv4OptionPresent { option, dreg: NFT_REG_1 });
            assert_eq!(r.last(), Some(&Expr::jump("refuse")));
        }
    }
}
