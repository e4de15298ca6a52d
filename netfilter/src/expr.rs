// SPDX-License-Identifier: Apache-2.0
//! The expressions an nf_tables rule is made of, and their attributes
//! (`NFTA_<EXPR>_*` in `include/uapi/linux/netfilter/nf_tables.h`).

use crate::{attr::AttrWriter, nftables::*};

const NFTA_EXTHDR_DREG: u16 = 1;
const NFTA_EXTHDR_TYPE: u16 = 2;
const NFTA_EXTHDR_OFFSET: u16 = 3;
const NFTA_EXTHDR_LEN: u16 = 4;
const NFTA_EXTHDR_FLAGS: u16 = 5;
const NFTA_EXTHDR_OP: u16 = 6;
/// The destination register gets whether the header (option) is there, not its bytes.
const NFT_EXTHDR_F_PRESENT: u32 = 1;
/// IPv4 options (kernel 5.3+); the default op, 0, is IPv6 extension headers.
const NFT_EXTHDR_OP_IPV4: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq = 0,
    Neq = 1,
    Gte = 5,
}

/// One expression of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        op: CmpOp,
        sreg: u32,
        data: Vec<u8>,
    },
    /// `value & mask` (xor 0) into `dreg`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
    },
    Lookup {
        set: String,
        sreg: u32,
        invert: bool,
    },
    /// An IPv6 extension header's field (`exthdr`), e.g. the fragment offset.
    Exthdr {
        header: u8,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// Whether the IPv4 header carries option `option` (`ip option lsrr exists`): one
    /// byte into `dreg`, 1 when it does. A header whose options do not parse (as the
    /// kernel's own `ip_options_compile` reads them) does not match.
    Ipv4OptionPresent {
        option: u8,
        dreg: u32,
    },
    Verdict {
        code: i32,
        chain: Option<String>,
    },
    /// Loads a constant into a data register.
    Data {
        dreg: u32,
        data: Vec<u8>,
    },
    /// Adds to a named counter object of the table.
    CounterRef {
        name: String,
    },
    Log {
        group: u16,
        prefix: String,
        snaplen: u32,
    },
    /// Matches while under `rate` packets per second with `burst`; over it, the rule stops.
    Limit {
        rate: u64,
        burst: u32,
    },
    Reject {
        kind: u32,
        icmp_code: u8,
    },
    Nat {
        kind: u32,
        family: u32,
        addr_reg: u32,
        port_reg: Option<u32>,
    },
    /// Exempts the packet from connection tracking (`notrack`, of `nft_ct`): it gets
    /// no conntrack entry, so no NAT rule can apply to it.
    Notrack,
}

impl Expr {
    pub fn verdict(code: i32) -> Expr {
        Expr::Verdict { code, chain: None }
    }

    pub fn jump(chain: &str) -> Expr {
        Expr::Verdict { code: NFT_JUMP, chain: Some(chain.into()) }
    }

    pub fn goto(chain: &str) -> Expr {
        Expr::Verdict { code: NFT_GOTO, chain: Some(chain.into()) }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Meta { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Lookup { .. } => "lookup",
            Expr::Exthdr { .. } | Expr::Ipv4OptionPresent { .. } => "exthdr",
            Expr::Verdict { .. } | Expr::Data { .. } => "immediate",
            Expr::CounterRef { .. } => "objref",
            Expr::Log { .. } => "log",
            Expr::Limit { .. } => "limit",
            Expr::Reject { .. } => "reject",
            Expr::Nat { .. } => "nat",
            Expr::Notrack => "notrack",
        }
    }

    pub(crate) fn write(&self, w: &mut AttrWriter) {
        match self {
            Expr::Payload { base, offset, len, dreg } => {
                w.be32(1, *dreg).be32(2, *base).be32(3, *offset).be32(4, *len);
            }
            Expr::Meta { key, dreg } => {
                w.be32(1, *dreg).be32(2, *key);
            }
            Expr::Cmp { op, sreg, data } => {
                w.be32(1, *sreg).be32(2, *op as u32).nest(3, |w| {
                    w.bytes(NFTA_DATA_VALUE, data);
                });
            }
            Expr::Bitwise { sreg, dreg, mask } => {
                let xor = vec![0u8; mask.len()];
                w.be32(1, *sreg).be32(2, *dreg).be32(3, mask.len() as u32);
                w.nest(4, |w| {
                    w.bytes(NFTA_DATA_VALUE, mask);
                });
                w.nest(5, |w| {
                    w.bytes(NFTA_DATA_VALUE, &xor);
                });
            }
            Expr::Lookup { set, sreg, invert } => {
                w.str(1, set).be32(2, *sreg);
                if *invert {
                    w.be32(5, NFT_LOOKUP_F_INV);
                }
            }
            Expr::Exthdr { header, offset, len, dreg } => {
                w.be32(NFTA_EXTHDR_DREG, *dreg).u8(NFTA_EXTHDR_TYPE, *header);
                w.be32(NFTA_EXTHDR_OFFSET, *offset).be32(NFTA_EXTHDR_LEN, *len);
            }
            Expr::Ipv4OptionPresent { option, dreg } => {
                w.be32(NFTA_EXTHDR_DREG, *dreg).u8(NFTA_EXTHDR_TYPE, *option);
                w.be32(NFTA_EXTHDR_OFFSET, 0).be32(NFTA_EXTHDR_LEN, 1);
                w.be32(NFTA_EXTHDR_FLAGS, NFT_EXTHDR_F_PRESENT).be32(NFTA_EXTHDR_OP, NFT_EXTHDR_OP_IPV4);
            }
            Expr::Verdict { code, chain } => {
                w.be32(1, NFT_REG_VERDICT).nest(2, |w| {
                    w.nest(NFTA_DATA_VERDICT, |w| {
                        w.be32(NFTA_VERDICT_CODE, *code as u32);
                        if let Some(c) = chain {
                            w.str(NFTA_VERDICT_CHAIN, c);
                        }
                    });
                });
            }
            Expr::Data { dreg, data } => {
                w.be32(1, *dreg).nest(2, |w| {
                    w.bytes(NFTA_DATA_VALUE, data);
                });
            }
            Expr::CounterRef { name } => {
                w.be32(1, NFT_OBJECT_COUNTER).str(2, name);
            }
            Expr::Log { group, prefix, snaplen } => {
                w.be16(1, *group).str(2, prefix).be32(3, *snaplen);
            }
            Expr::Limit { rate, burst } => {
                w.be64(1, *rate).be64(2, 1).be32(3, *burst).be32(4, NFT_LIMIT_PKTS);
            }
            Expr::Reject { kind, icmp_code } => {
                w.be32(1, *kind);
                if *kind != NFT_REJECT_TCP_RST {
                    w.u8(2, *icmp_code);
                }
            }
            Expr::Nat { kind, family, addr_reg, port_reg } => {
                w.be32(1, *kind).be32(2, *family).be32(3, *addr_reg).be32(4, *addr_reg);
                if let Some(p) = port_reg {
                    w.be32(5, *p).be32(6, *p);
                }
            }
            Expr::Notrack => {}
        }
    }
}
