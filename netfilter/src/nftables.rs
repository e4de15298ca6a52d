// SPDX-License-Identifier: Apache-2.0
//! nf_tables messages: a transaction (batch) builder and the expressions a rule is
//! made of. Numbers from `include/uapi/linux/netfilter/nf_tables.h`; nf_tables
//! integers are big-endian on the wire.

use crate::{
    attr::AttrWriter,
    socket::{Message, NLM_F_APPEND, NLM_F_CREATE},
};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_NEWOBJ: u16 = 18;
pub const NFT_MSG_GETOBJ: u16 = 19;

/// `nfgen_family` values (`NFPROTO_*`).
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// Hooks of the inet/ip/ip6 families (`NF_INET_*`).
pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_IN: u32 = 1;
pub const NF_INET_FORWARD: u32 = 2;
pub const NF_INET_LOCAL_OUT: u32 = 3;

pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
/// A dormant table's base chains are unregistered from their hooks: it judges nothing.
pub const NFT_TABLE_F_DORMANT: u32 = 1;
/// Only the netlink socket that created the table may change or delete it, and a
/// `flush ruleset` from any other socket leaves it (kernel 5.12+). Alone, the table
/// goes with its owner's socket.
pub const NFT_TABLE_F_OWNER: u32 = 2;
/// With [`NFT_TABLE_F_OWNER`]: when the owner's socket closes the table stays,
/// without an owner, until a socket takes it over (kernel 6.9+).
pub const NFT_TABLE_F_PERSIST: u32 = 4;
/// The owner's netlink port id, in a table read back (`NFTA_TABLE_OWNER`).
pub const NFTA_TABLE_OWNER: u16 = 7;
/// `nfgen_family` of a request for every family (`flush ruleset`).
pub const NFPROTO_UNSPEC: u8 = 0;
const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
pub const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
pub const NFTA_VERDICT_CODE: u16 = 1;
pub const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
pub const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
pub const NFTA_OBJ_DATA: u16 = 4;
pub const NFTA_COUNTER_BYTES: u16 = 1;
pub const NFTA_COUNTER_PACKETS: u16 = 2;

pub const NFT_SET_INTERVAL: u32 = 0x4;
pub const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
pub const NFT_OBJECT_COUNTER: u32 = 1;

/// Verdict codes (`NF_DROP`, `NF_ACCEPT`, `NFT_*`).
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
pub const NFT_JUMP: i32 = -3;
pub const NFT_GOTO: i32 = -4;
pub const NFT_RETURN: i32 = -5;

/// Registers: the verdict register and the four 16-byte data registers every kernel has.
pub const NFT_REG_VERDICT: u32 = 0;
pub const NFT_REG_1: u32 = 1;
pub const NFT_REG_2: u32 = 2;
/// The 4-byte registers: a concatenated key is loaded field by field, each from a
/// 4-byte boundary, `NFT_REG_1` being the same bytes as `NFT_REG32_00`.
pub const NFT_REG32_01: u32 = 9;

pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

pub const NFT_META_IIF: u32 = 4;
pub const NFT_META_SKUID: u32 = 10;
pub const NFT_META_NFPROTO: u32 = 15;
pub const NFT_META_L4PROTO: u32 = 16;

pub const NFT_REJECT_TCP_RST: u32 = 1;
pub const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
pub const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;

pub const NFT_NAT_DNAT: u32 = 1;
pub const NFT_LIMIT_PKTS: u32 = 0;
pub const NFT_LOOKUP_F_INV: u32 = 1;

/// Key types nft(8) uses to print set elements (its `datatypes.h`); the kernel
/// stores them without looking.
pub const TYPE_INTEGER: u32 = 4;
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_INET_SERVICE: u32 = 13;
pub const TYPE_IFINDEX: u32 = 20;
/// nft(8)'s `TYPE_BITS`: a concatenation's key type is its fields' types, shifted in.
const TYPE_BITS: u32 = 6;

/// The key type nft(8) prints a concatenation of `fields` with (`ifindex . ipv4_addr`).
pub fn concat_type(fields: &[u32]) -> u32 {
    fields.iter().fold(0, |acc, t| (acc << TYPE_BITS) | t)
}

pub use crate::expr::{CmpOp, Expr};

/// An element of a set: a key, or the end of an interval whose start is the
/// previous element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    pub interval_end: bool,
}

/// A named set declared in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub key_type: u32,
    pub key_len: u32,
    pub interval: bool,
}

/// One nf_tables transaction: everything in it takes effect at once, or nothing does.
pub struct Batch {
    family: u8,
    messages: Vec<Message>,
}

impl Batch {
    pub fn new(family: u8) -> Batch {
        let mut body = nfgenmsg(0, NFNL_SUBSYS_NFTABLES);
        body.truncate(4);
        Batch { family, messages: vec![Message { kind: NFNL_MSG_BATCH_BEGIN, flags: 0, body }] }
    }

    fn push(&mut self, msg: u16, flags: u16, attrs: &AttrWriter) {
        let mut body = nfgenmsg(self.family, 0);
        body.extend_from_slice(&attrs.buf);
        self.messages.push(Message { kind: (NFNL_SUBSYS_NFTABLES << 8) | msg, flags, body });
    }

    /// Creates the table, or leaves an existing one as it is.
    pub fn add_table(&mut self, table: &str) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_TABLE_NAME, table);
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, &w);
        self
    }

    /// Creates the table with `flags` (e.g. [`NFT_TABLE_F_OWNER`]); an existing one
    /// with that name must have been deleted earlier in the batch.
    pub fn add_table_with_flags(&mut self, table: &str, flags: u32) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_TABLE_NAME, table).be32(NFTA_TABLE_FLAGS, flags);
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, &w);
        self
    }

    /// Deletes every table of the batch's family ([`NFPROTO_UNSPEC`]: all of them),
    /// as `nft flush ruleset` does; tables another socket owns stay.
    pub fn del_all_tables(&mut self) -> &mut Self {
        self.push(NFT_MSG_DELTABLE, 0, &AttrWriter::new());
        self
    }

    /// Sets the flags of an existing table, e.g. [`NFT_TABLE_F_DORMANT`] (0 wakes it).
    pub fn set_table_flags(&mut self, table: &str, flags: u32) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_TABLE_NAME, table).be32(NFTA_TABLE_FLAGS, flags);
        self.push(NFT_MSG_NEWTABLE, 0, &w);
        self
    }

    /// Deletes the table and everything in it (it must exist).
    pub fn del_table(&mut self, table: &str) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_TABLE_NAME, table);
        self.push(NFT_MSG_DELTABLE, 0, &w);
        self
    }

    /// A base chain on `hook` at `priority` when given (type `kind`, policy accept),
    /// otherwise a regular chain to jump to.
    pub fn add_chain(&mut self, table: &str, chain: &str, base: Option<(&str, u32, i32)>) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, chain);
        if let Some((kind, hook, priority)) = base {
            w.nest(NFTA_CHAIN_HOOK, |w| {
                w.be32(NFTA_HOOK_HOOKNUM, hook).be32(NFTA_HOOK_PRIORITY, priority as u32);
            });
            w.be32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32).str(NFTA_CHAIN_TYPE, kind);
        }
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &w);
        self
    }

    pub fn add_set(&mut self, table: &str, set: &SetSpec) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_SET_TABLE, table).str(NFTA_SET_NAME, &set.name);
        w.be32(NFTA_SET_FLAGS, if set.interval { NFT_SET_INTERVAL } else { 0 });
        w.be32(NFTA_SET_KEY_TYPE, set.key_type).be32(NFTA_SET_KEY_LEN, set.key_len);
        // A set needs an id unique in the transaction (`NFTA_SET_ID`, 10).
        w.be32(10, self.messages.len() as u32);
        self.push(NFT_MSG_NEWSET, NLM_F_CREATE, &w);
        self
    }

    pub fn add_elements(&mut self, table: &str, set: &str, elements: &[Element]) -> &mut Self {
        // Kernels cap one message's size; chunks of a few hundred keep well below it.
        for chunk in elements.chunks(256) {
            let mut w = AttrWriter::new();
            w.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set);
            w.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
                for e in chunk {
                    w.nest(NFTA_LIST_ELEM, |w| {
                        w.nest(NFTA_SET_ELEM_KEY, |w| {
                            w.bytes(NFTA_DATA_VALUE, &e.key);
                        });
                        if e.interval_end {
                            w.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                        }
                    });
                }
            });
            self.push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &w);
        }
        self
    }

    pub fn add_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain);
        w.nest(NFTA_RULE_EXPRESSIONS, |w| {
            for e in exprs {
                w.nest(NFTA_LIST_ELEM, |w| {
                    w.str(NFTA_EXPR_NAME, e.name());
                    w.nest(NFTA_EXPR_DATA, |w| e.write(w));
                });
            }
        });
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &w);
        self
    }

    /// A named counter starting at the given values (carried over from a previous table).
    pub fn add_counter(&mut self, table: &str, name: &str, packets: u64, bytes: u64) -> &mut Self {
        let mut w = AttrWriter::new();
        w.str(NFTA_OBJ_TABLE, table).str(NFTA_OBJ_NAME, name).be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
        w.nest(NFTA_OBJ_DATA, |w| {
            w.be64(NFTA_COUNTER_BYTES, bytes).be64(NFTA_COUNTER_PACKETS, packets);
        });
        self.push(NFT_MSG_NEWOBJ, NLM_F_CREATE, &w);
        self
    }

    /// The messages, closed by the batch end; send them with
    /// [`NlSocket::request`](crate::NlSocket::request) and [`wants_ack`].
    pub fn finish(mut self) -> Vec<Message> {
        let mut body = nfgenmsg(0, NFNL_SUBSYS_NFTABLES);
        body.truncate(4);
        self.messages.push(Message { kind: NFNL_MSG_BATCH_END, flags: 0, body });
        self.messages
    }
}

/// Batch markers are not acknowledged; every other message is.
pub fn wants_ack(m: &Message) -> bool {
    m.kind != NFNL_MSG_BATCH_BEGIN && m.kind != NFNL_MSG_BATCH_END
}

/// `struct nfgenmsg`: family, version 0, resource id (big-endian).
pub fn nfgenmsg(family: u8, res_id: u16) -> Vec<u8> {
    let mut b = vec![family, 0];
    b.extend_from_slice(&res_id.to_be_bytes());
    b
}

/// The message type of an nf_tables request.
pub const fn msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Body of a GET request naming a table (`NFTA_*_TABLE` is 1 for chains, sets,
/// rules and objects alike; the table's own name attribute is 1 too).
pub fn table_request(family: u8, table: &str) -> Vec<u8> {
    let mut w = AttrWriter::new();
    w.str(1, table);
    let mut body = nfgenmsg(family, 0);
    body.extend_from_slice(&w.buf);
    body
}

/// Body of a GETSETELEM dump.
pub fn set_elements_request(family: u8, table: &str, set: &str) -> Vec<u8> {
    let mut w = AttrWriter::new();
    w.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set);
    let mut body = nfgenmsg(family, 0);
    body.extend_from_slice(&w.buf);
    body
}
