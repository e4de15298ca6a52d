// SPDX-License-Identifier: Apache-2.0
//! Another datapath's tc programs, as the tests build them: raw-instruction redirect
//! programs (what Cilium's `bpf_lxc` does with a pod's frames under BPF host
//! routing), attached with a clsact qdisc and a direct-action `cls_bpf` filter over
//! rtnetlink, or with a tcx link where the kernel has one. No `tc` binary: the
//! scenarios run in bare VM guests.
//!
//! Not the agent's attach code on purpose: a test must not share the code it checks.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    socket::{Message, NetlinkError, NLM_F_CREATE, NLM_F_EXCL},
    AttrWriter, Attrs, NlSocket,
};

use crate::{
    bpf::{self, bpf_attach_type, bpf_prog_type},
    netns::NetNs,
};

// From the kernel's uapi headers (pkt_sched.h, pkt_cls.h); not in the libc crate.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCMSG_LEN: usize = 20;
/// The filter handle the tests' cls_bpf filters use.
const FILTER_HANDLE: u32 = 1;

/// Verdicts of a direct-action program (`TC_ACT_*`; tcx's `TCX_*` share the values).
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// Helper ids (`enum bpf_func_id`).
const BPF_FUNC_SKB_STORE_BYTES: i32 = 9;
const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_FUNC_REDIRECT_NEIGH: i32 = 152;

/// One eBPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | u64::from(dst | (src << 4)) << 8 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32
}
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const ST_W: u8 = 0x62;
const JEQ_IMM: u8 = 0x15;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `__sk_buff.protocol`: the frame's ethertype, in network order.
const SKB_PROTOCOL: i16 = 16;

/// How a redirect program hands a pod's IP packets to the uplink.
#[derive(Clone, Copy, Debug)]
pub enum Handoff {
    /// `bpf_redirect_neigh`: the kernel routes and fills in the MACs (Cilium's BPF host routing).
    Neigh,
    /// `bpf_redirect` after rewriting the MACs to `(destination, source)` itself.
    Plain { dst_mac: [u8; 6], src_mac: [u8; 6] },
}

/// A program that lets everything but IPv4 and IPv6 pass (ARP stays with the
/// device) and hands IP packets to `ifindex`'s egress as `how` says.
pub fn redirect_program(ifindex: u32, how: Handoff) -> Vec<u64> {
    let be = |p: u16| i32::from(p.to_be());
    let mut p = vec![
        insn(LDX_W, 2, 1, SKB_PROTOCOL, 0),
        insn(JEQ_IMM, 2, 0, 3, be(ETH_P_IP)),
        insn(JEQ_IMM, 2, 0, 2, be(ETH_P_IPV6)),
        insn(MOV64_IMM, 0, 0, 0, TC_ACT_OK),
        insn(EXIT, 0, 0, 0, 0),
    ];
    match how {
        Handoff::Neigh => p.extend([
            insn(MOV64_IMM, 1, 0, 0, ifindex as i32),
            insn(MOV64_IMM, 2, 0, 0, 0),
            insn(MOV64_IMM, 3, 0, 0, 0),
            insn(MOV64_IMM, 4, 0, 0, 0),
            insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT_NEIGH),
        ]),
        Handoff::Plain { dst_mac, src_mac } => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&dst_mac);
            macs[6..].copy_from_slice(&src_mac);
            let word = |i: usize| i32::from_ne_bytes(macs[i * 4..i * 4 + 4].try_into().unwrap());
            p.extend([
                insn(MOV64_REG, 6, 1, 0, 0),
                insn(ST_W, 10, 0, -16, word(0)),
                insn(ST_W, 10, 0, -12, word(1)),
                insn(ST_W, 10, 0, -8, word(2)),
                insn(MOV64_REG, 1, 6, 0, 0),
                insn(MOV64_IMM, 2, 0, 0, 0),
                insn(MOV64_REG, 3, 10, 0, 0),
                insn(ADD64_IMM, 3, 0, 0, -16),
                insn(MOV64_IMM, 4, 0, 0, 12),
                insn(MOV64_IMM, 5, 0, 0, 0),
                insn(CALL, 0, 0, 0, BPF_FUNC_SKB_STORE_BYTES),
                insn(MOV64_IMM, 1, 0, 0, ifindex as i32),
                insn(MOV64_IMM, 2, 0, 0, 0),
                insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),
            ]);
        }
    }
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// A program that returns `verdict` for every packet.
pub fn verdict_program(verdict: i32) -> Vec<u64> {
    vec![insn(MOV64_IMM, 0, 0, 0, verdict), insn(EXIT, 0, 0, 0, 0)]
}

/// Loads `insns` as a tc (`sched_cls`) program.
pub fn load(insns: &[u64], name: &str) -> Result<OwnedFd> {
    // Kernels before 5.11 charge BPF programs to RLIMIT_MEMLOCK, whose default is tiny.
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain setrlimit with a valid struct; failure just leaves the limit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    bpf::prog_load(bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS, bpf_attach_type::BPF_CGROUP_INET_INGRESS, insns, name)
        .with_context(|| format!("the kernel refused the tc program {name}"))
}

/// Which side of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// A direct-action `cls_bpf` filter at `prio` on a device's clsact hook. Dropping it
/// deletes the filter, and the clsact qdisc too when this filter made it.
pub struct ClsBpf {
    ns: std::path::PathBuf,
    ifindex: u32,
    direction: Direction,
    prio: u16,
    made_qdisc: bool,
    prog: OwnedFd,
}

impl ClsBpf {
    /// Attaches `prog` on device `ifindex` of `ns`, adding a clsact qdisc if none is there.
    pub fn attach(ns: &NetNs, ifindex: u32, direction: Direction, prio: u16, prog: OwnedFd) -> Result<ClsBpf> {
        let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_ROUTE)?;
        let made_qdisc = match request(&mut sock, libc::RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, clsact(ifindex)) {
            Ok(()) => true,
            Err(e) if errno(&e) == Some(libc::EEXIST) => false,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("could not add a clsact qdisc on link {ifindex} (is sch_ingress there?)"))
            }
        };
        let mut filter = ClsBpf { ns: ns.path(), ifindex, direction, prio, made_qdisc, prog };
        let mut body = filter.tcmsg(FILTER_HANDLE);
        let mut w = AttrWriter::new();
        w.str(TCA_KIND, "bpf").nest(TCA_OPTIONS, |w| {
            w.ne32(TCA_BPF_FD, filter.prog.as_raw_fd() as u32)
                .str(TCA_BPF_NAME, "mg-test")
                .ne32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT);
        });
        body.extend_from_slice(&w.buf);
        let added = request(&mut sock, libc::RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, body);
        if let Err(e) = added {
            filter.prio = 0;
            return Err(e).with_context(|| {
                format!("could not add a cls_bpf filter at prio {prio} on {direction:?} of link {ifindex} (is cls_bpf there?)")
            });
        }
        Ok(filter)
    }

    /// A tcmsg for this filter: `info` carries its priority and protocol (all).
    fn tcmsg(&self, handle: u32) -> Vec<u8> {
        let minor = if self.direction == Direction::Ingress { TC_H_MIN_INGRESS } else { TC_H_MIN_EGRESS };
        let parent = (TC_H_CLSACT & 0xffff_0000) | minor;
        let info = (u32::from(self.prio) << 16) | u32::from(ETH_P_ALL.to_be());
        tcmsg(self.ifindex, handle, parent, info)
    }
}

impl Drop for ClsBpf {
    fn drop(&mut self) {
        let Ok(mut sock) = NlSocket::open_in(Some(&self.ns), libc::NETLINK_ROUTE) else { return };
        if self.prio != 0 {
            // This filter alone, by handle and kind: the priority's others (another
            // datapath's, the guard's) stay.
            let mut body = self.tcmsg(FILTER_HANDLE);
            body.extend_from_slice(&AttrWriter::new().str(TCA_KIND, "bpf").buf);
            let _ = request(&mut sock, libc::RTM_DELTFILTER, 0, body);
        }
        if self.made_qdisc {
            let _ = request(&mut sock, libc::RTM_DELQDISC, 0, clsact(self.ifindex));
        }
    }
}

/// Attaches `prog` to device `ifindex`'s tcx hook (6.6+) with a link, `flags` saying
/// where among the others (`BPF_F_BEFORE`: first). Held by the returned link's fd.
pub fn tcx_attach(ns: &NetNs, ifindex: u32, direction: Direction, prog: &OwnedFd, flags: u32) -> io::Result<OwnedFd> {
    let attach_type = match direction {
        Direction::Ingress => bpf_attach_type::BPF_TCX_INGRESS,
        Direction::Egress => bpf_attach_type::BPF_TCX_EGRESS,
    };
    // The ifindex is the namespace's own: the link is made from inside it.
    ns.run(|| bpf::tcx_link_create(prog.as_fd(), ifindex, attach_type, flags))
}

/// What sits on one side of a device: tcx programs (ids, in run order), cls_bpf
/// filters on a clsact qdisc (priority, program name), and whether that qdisc is there.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Attached {
    pub tcx: Vec<u32>,
    pub cls_bpf: Vec<(u16, String)>,
    pub clsact: bool,
}

impl Attached {
    pub fn is_empty(&self) -> bool {
        self.tcx.is_empty() && self.cls_bpf.is_empty()
    }
}

/// Reads what is attached to `direction` of device `ifindex` in `ns`.
pub fn attached(ns: &NetNs, ifindex: u32, direction: Direction) -> Result<Attached> {
    let attach_type = match direction {
        Direction::Ingress => bpf_attach_type::BPF_TCX_INGRESS,
        Direction::Egress => bpf_attach_type::BPF_TCX_EGRESS,
    };
    // Kernels before 6.6 have no tcx and refuse the query.
    let tcx = ns.run(|| bpf::tcx_prog_ids(ifindex, attach_type)).unwrap_or_default();
    let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_ROUTE)?;
    let qdiscs = sock.dump(libc::RTM_GETQDISC, &tcmsg(0, 0, 0, 0)).context("could not list qdiscs")?;
    let clsact = qdiscs.iter().any(|q| {
        q.body.len() >= TCMSG_LEN
            && u32::from_ne_bytes(q.body[4..8].try_into().unwrap()) == ifindex
            && Attrs::new(&q.body[TCMSG_LEN..]).find(TCA_KIND).is_some_and(|k| k.str() == "clsact")
    });
    let mut cls_bpf = Vec::new();
    if clsact {
        let minor = if direction == Direction::Ingress { TC_H_MIN_INGRESS } else { TC_H_MIN_EGRESS };
        let parent = (TC_H_CLSACT & 0xffff_0000) | minor;
        let filters =
            sock.dump(libc::RTM_GETTFILTER, &tcmsg(ifindex, 0, parent, 0)).context("could not list filters")?;
        for f in filters.iter().filter(|f| f.kind == libc::RTM_NEWTFILTER && f.body.len() >= TCMSG_LEN) {
            let handle = u32::from_ne_bytes(f.body[8..12].try_into().unwrap());
            let info = u32::from_ne_bytes(f.body[16..20].try_into().unwrap());
            let attrs = Attrs::new(&f.body[TCMSG_LEN..]);
            // A filter's priority comes once bare, then once for each handle in it.
            if handle == 0 || attrs.find(TCA_KIND).is_none_or(|k| k.str() != "bpf") {
                continue;
            }
            let name = attrs
                .find(TCA_OPTIONS)
                .and_then(|o| o.nested().find(TCA_BPF_NAME))
                .map(|n| n.str())
                .unwrap_or_default();
            cls_bpf.push(((info >> 16) as u16, name));
        }
    }
    Ok(Attached { tcx, cls_bpf, clsact })
}

fn clsact(ifindex: u32) -> Vec<u8> {
    let mut body = tcmsg(ifindex, TC_H_CLSACT & 0xffff_0000, TC_H_CLSACT, 0);
    body.extend_from_slice(&AttrWriter::new().str(TCA_KIND, "clsact").buf);
    body
}

/// tcmsg: family, pads, ifindex, handle, parent, info.
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut m = vec![0u8; 4];
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&handle.to_ne_bytes());
    m.extend_from_slice(&parent.to_ne_bytes());
    m.extend_from_slice(&info.to_ne_bytes());
    m
}

/// The errno of a refused netlink request.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
        .or_else(|| e.get_ref().and_then(|inner| inner.downcast_ref::<NetlinkError>()).map(|n| n.errno.abs()))
}

fn request(sock: &mut NlSocket, kind: u16, flags: u16, body: Vec<u8>) -> io::Result<()> {
    sock.request(&[Message { kind, flags, body }], |_| true)
}
