// SPDX-License-Identifier: Apache-2.0
//! Just enough netlink for the host-side guard: nf_tables transactions (one atomic
//! batch per change), dumps to read a table back, NFLOG to receive the refused
//! packets, and the rtnetlink queries that map a host interface to a pod's network
//! namespace.
//!
//! Messages follow the kernel's uapi headers (`linux/netfilter/nf_tables.h`,
//! `nfnetlink_log.h`, `rtnetlink.h`); every number used is a named constant there.
//!
//! # Why hand-written, and what checks it
//!
//! The agent ships as one static binary in a `FROM scratch` image with no `nft` tool,
//! so it needs a Rust encoder. The alternatives, weighed for what the host side writes
//! (a table with flags, base and regular chains, interval and concatenated sets, named
//! counters, and rules of meta, payload, cmp, bitwise, lookup, immediate, exthdr
//! (IPv6 headers and IPv4 options), objref, log, limit, reject and nat expressions):
//!
//! - `rustables`: GPL-3.0, which the Apache-2.0 agent cannot take in.
//! - `nftnl`/`nftnl-sys`: bindings to the C libnftnl (a C toolchain and library in a
//!   static binary).
//! - `netlink-packet-netfilter` (MIT, rust-netlink): tables, chains, rules, sets, set
//!   elements and NFLOG, but of the expressions only meta, payload, cmp, bitwise,
//!   lookup and immediate, and objects (the counters) only as raw attributes; the
//!   rest of the rules would stay hand-written beside it. It is this crate's
//!   independent decoder in the tests instead (`tests/codec.rs`: every message kind
//!   written decodes as meant and re-encodes to the same bytes).
//! - `nlink` (MIT/Apache-2.0): a whole async netlink framework on tokio (nf_tables,
//!   NFLOG, rtnetlink and more) with frequent breaking 0.x releases; taking it would
//!   replace the socket handling too, for no expression this crate lacks.
//!
//! What no crate covers is checked against the kernel itself: `tests/kernel.rs`
//! creates a table with every object and expression the agent writes in a network
//! namespace of its own and reads each attribute back. The parsers of what the kernel
//! sends (`socket::split`, `attr::Attrs`, the error and NFLOG readers) are property
//! tested with truncated, oversized and malformed input.

pub mod attr;
pub mod devices;
pub mod expr;
pub mod nflog;
pub mod nftables;
pub mod rtnl;
pub mod socket;

pub use attr::{Attr, AttrWriter, Attrs};
pub use socket::{NetlinkError, NlSocket};
