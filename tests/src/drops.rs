// SPDX-License-Identifier: Apache-2.0
//! nf_tables tables the uplink scenarios put in their own namespaces, over netlink
//! (no `nft` binary in the VM): a forward chain that drops what one interface brings
//! in (proof that a datapath skips the node's netfilter), an output chain that drops a
//! pod kernel's TCP resets (what a user-space TCP stack needs), and `nft flush ruleset`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    nftables::{self, msg_type, nfgenmsg, Batch, CmpOp, Expr},
    socket::Message,
    NlSocket,
};

use crate::netns::NetNs;

const FORWARD_TABLE: &str = "mg_test_forward_drop";
const RESET_TABLE: &str = "mg_test_reset_drop";
const FILTER_PRIORITY: i32 = 0;
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_RST: u8 = 0x04;

/// A table of the tests' in a namespace; dropping it deletes the table.
pub struct DropTable {
    ns: PathBuf,
    table: &'static str,
}

impl DropTable {
    /// `table inet mg_test_forward_drop`: drops every packet forwarded from link `iif`.
    pub fn forwarded_from(node: &NetNs, iif: u32) -> Result<DropTable> {
        let rule = [
            Expr::Meta { key: nftables::NFT_META_IIF, dreg: nftables::NFT_REG_1 },
            Expr::Cmp { op: CmpOp::Eq, sreg: nftables::NFT_REG_1, data: iif.to_ne_bytes().to_vec() },
            Expr::Verdict { code: nftables::NF_DROP, chain: None },
        ];
        DropTable::add(node, FORWARD_TABLE, nftables::NF_INET_FORWARD, &rule)
    }

    /// `table inet mg_test_reset_drop`: drops the TCP resets the namespace's kernel
    /// sends. A user-space TCP stack on AF_PACKET shares the pod's address with a
    /// kernel that knows none of its connections and would reset each at its SYN-ACK
    /// (gVisor takes the address off the kernel's interface instead).
    pub fn kernel_resets(pod: &NetNs) -> Result<DropTable> {
        let rule = [
            Expr::Meta { key: nftables::NFT_META_L4PROTO, dreg: nftables::NFT_REG_1 },
            Expr::Cmp { op: CmpOp::Eq, sreg: nftables::NFT_REG_1, data: vec![libc::IPPROTO_TCP as u8] },
            Expr::Payload {
                base: nftables::NFT_PAYLOAD_TRANSPORT_HEADER,
                offset: TCP_FLAGS_OFFSET,
                len: 1,
                dreg: nftables::NFT_REG_1,
            },
            Expr::Bitwise { sreg: nftables::NFT_REG_1, dreg: nftables::NFT_REG_1, mask: vec![TCP_RST] },
            Expr::Cmp { op: CmpOp::Neq, sreg: nftables::NFT_REG_1, data: vec![0] },
            Expr::Verdict { code: nftables::NF_DROP, chain: None },
        ];
        DropTable::add(pod, RESET_TABLE, nftables::NF_INET_LOCAL_OUT, &rule)
    }

    fn add(ns: &NetNs, table: &'static str, hook: u32, rule: &[Expr]) -> Result<DropTable> {
        let mut b = Batch::new(nftables::NFPROTO_INET);
        b.add_table(table);
        b.add_chain(table, "drop", Some(("filter", hook, FILTER_PRIORITY)));
        b.add_rule(table, "drop", rule);
        let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_NETFILTER)?;
        sock.request(&b.finish(), nftables::wants_ack)
            .with_context(|| format!("could not add table inet {table} in {}", ns.name()))?;
        Ok(DropTable { ns: ns.path(), table })
    }
}

impl Drop for DropTable {
    fn drop(&mut self) {
        let mut b = Batch::new(nftables::NFPROTO_INET);
        b.del_table(self.table);
        if let Ok(mut sock) = NlSocket::open_in(Some(&self.ns), libc::NETLINK_NETFILTER) {
            let _ = sock.request(&b.finish(), nftables::wants_ack);
        }
    }
}

/// What `nft flush ruleset` sends: one table deletion naming no table and no family,
/// which deletes every table the kernel lets go, in `ns`.
pub fn flush_ruleset(ns: &NetNs) -> Result<()> {
    let mut messages = Batch::new(nftables::NFPROTO_INET).finish();
    let flush =
        Message { kind: msg_type(nftables::NFT_MSG_DELTABLE), flags: 0, body: nfgenmsg(libc::NFPROTO_UNSPEC as u8, 0) };
    messages.insert(1, flush);
    let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_NETFILTER)?;
    sock.request(&messages, nftables::wants_ack).with_context(|| format!("nft flush ruleset in {} failed", ns.name()))
}
