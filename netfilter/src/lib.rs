// SPDX-License-Identifier: Apache-2.0
//! Just enough netlink for the host-side guard: nf_tables transactions (one atomic
//! batch per change), dumps to read a table back, NFLOG to receive the refused
//! packets, and the rtnetlink queries that map a host interface to a pod's network
//! namespace.
//!
//! Hand-written rather than a binding: the maintained pure-Rust nf_tables crates are
//! GPL (`rustables`) or wrap the C libnftnl (`nftnl`), and the agent ships as one
//! static binary in a `FROM scratch` image with no `nft` tool. Messages follow the
//! kernel's uapi headers (`linux/netfilter/nf_tables.h`, `nfnetlink_log.h`,
//! `rtnetlink.h`); every number used is a named constant there.

pub mod attr;
pub mod devices;
pub mod expr;
pub mod nflog;
pub mod nftables;
pub mod rtnl;
pub mod socket;

pub use attr::{Attr, AttrWriter, Attrs};
pub use socket::{NetlinkError, NlSocket};
