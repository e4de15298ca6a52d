// SPDX-License-Identifier: Apache-2.0
//! Figure 10: traffic leaving the node through an uplink, which the guard's
//! `mg_uplink` judges on the device's tc egress hook: every packet that leaves the
//! node passes it, so it must leave at the prefilter for everything else.
//!
//! The measured path is figure 8's (a pod's packets forwarded by the node out of
//! `vb0` to a network beyond). The agent guards an idle uplink of its own (`--uplinks
//! vbidle`), so that nothing runs on `vb0` by itself: for each sample the bench puts
//! on `vb0`'s egress, with a tcx link of its own, the agent's pinned `mg_uplink` (the
//! very program, its maps, its policy), or a program that only hands the packet on
//! (`r0 = -1; exit`: the hook's floor), or nothing. Switching is a link create,
//! update or close: a syscall, as for the other variants.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    bpf,
    netlink::Netlink,
    netns::NetNs,
    tc::{self, Direction},
};

use crate::{
    bench::{Bench, BULK_PORT, TCP_PORT},
    figures::{all_ok, interleave, label, row, scale_row},
    forwarded::{FORWARD_RULE, NODE_LINK},
    profile::Profile,
    report::{Figure, Target},
    variant::Variant,
    worker::Op,
};

/// The uplink the agent guards instead of `vb0`: a veth pair in the node namespace
/// that carries nothing.
pub(crate) const IDLE_UPLINK: &str = "vbidle";
const IDLE_PEER: &str = "vbidle1";
/// The agent's program pin under its layout directory.
const PROGRAM_PIN: &str = "programs/uplink";
/// `TC_ACT_UNSPEC` (tcx's `TCX_NEXT`): hand the packet on, as `mg_uplink` does.
const NEXT: i32 = -1;

/// The figure's columns: no guard, the whole guard (the uplink's program on `vb0`
/// among them), one FORWARD rule, the uplink's program alone, the hook's floor.
const COLUMNS: [Variant; 5] = [Variant::None, Variant::Guard, Variant::Firewall, Variant::Uplink, Variant::UplinkEmpty];

/// Creates the idle uplink the agent is told to guard (`--uplinks vbidle`).
pub(crate) fn add_idle_uplink(node: &NetNs) -> Result<()> {
    let mut nl = Netlink::open_in(node)?;
    let here = std::fs::File::open(node.path())?;
    nl.add_veth(IDLE_UPLINK, IDLE_PEER, here.as_fd())?;
    let index = nl.link_index(IDLE_UPLINK)?;
    nl.set_link_up(index)
}

/// What runs on `vb0`'s egress for a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnUplink {
    Nothing,
    Guard,
    Empty,
}

/// The bench's own tcx link on `vb0`'s egress.
pub(crate) struct UplinkHook {
    node: NetNs,
    ifindex: u32,
    empty: OwnedFd,
    link: Option<OwnedFd>,
    now: OnUplink,
}

impl UplinkHook {
    pub(crate) fn new(netns: &Path) -> Result<UplinkHook> {
        let node = NetNs::from_path(netns)?;
        let ifindex = Netlink::open_in(&node)?.link_index(NODE_LINK)?;
        let empty = tc::load(&tc::verdict_program(NEXT), "mg_empty_uplink")?;
        Ok(UplinkHook { node, ifindex, empty, link: None, now: OnUplink::Nothing })
    }

    /// The empty program's id, for the profile.
    pub(crate) fn empty_id(&self) -> Result<u64> {
        Ok(u64::from(bpf::prog_id(self.empty.as_fd())?))
    }

    pub(crate) fn set(&mut self, want: OnUplink, bpffs: &Path) -> Result<()> {
        if want == self.now {
            return Ok(());
        }
        let prog = match want {
            OnUplink::Nothing => {
                self.link = None;
                self.now = want;
                return Ok(());
            }
            OnUplink::Guard => guard_program(bpffs)?,
            OnUplink::Empty => self.empty.try_clone()?,
        };
        match &self.link {
            Some(link) => bpf::link_update(link.as_fd(), prog.as_fd()).context("could not swap the program on vb0")?,
            None => {
                let link = tc::tcx_attach(&self.node, self.ifindex, Direction::Egress, &prog, 0)
                    .context("could not attach a tcx program to vb0's egress (tcx needs Linux 6.6+)")?;
                self.link = Some(link);
            }
        }
        self.now = want;
        Ok(())
    }
}

/// The agent's pinned uplink program.
pub(crate) fn guard_program(bpffs: &Path) -> Result<OwnedFd> {
    let pin: PathBuf = crate::floor::pin_dir(bpffs)?.join(PROGRAM_PIN);
    bpf::obj_get(&pin).with_context(|| format!("could not open the agent's uplink program at {}", pin.display()))
}

/// Figure 10: forwarded connects and throughput leaving through `vb0`.
pub(crate) fn uplink(b: &mut Bench) -> Result<Figure> {
    let (rounds, count, ms) = if b.quick { (3, 300, 100) } else { (301, 200, 50) };
    let tcp = b.beyond.addr(TCP_PORT);
    let bulk = b.beyond.addr(BULK_PORT);
    ensure_judged(b)?;
    let rules = |fw: &crate::bench::Firewall| fw.iptables_restore(FORWARD_RULE);
    let connects = interleave(b, &COLUMNS, rounds, &rules, &mut |b, v| {
        let r = b.run(v, Op::TcpConnect { dest: tcp, count })?;
        all_ok(&r, count, &format!("TCP connect through the uplink to {tcp} ({})", label(v)))?;
        Ok(r.per_op_ns())
    })?;
    let throughput = interleave(b, &COLUMNS, rounds.min(151), &rules, &mut |b, v| {
        let r = b.run(v, Op::Bulk { dest: bulk, ms })?;
        all_ok(&r, 1, &format!("bulk TCP through the uplink to {bulk} ({})", label(v)))?;
        ensure!(r.bytes > 0, "bulk TCP through the uplink to {bulk} ({}): no bytes sent", label(v));
        Ok(r.gbit_per_s())
    })?;
    let connect_row = scale_row(row("connect + close, out through the uplink", &COLUMNS, connects), 1e-3);
    let bulk_row = row("64 KiB writes, out through the uplink (Gbit/s)", &COLUMNS, throughput);
    let (c_uplink, c_floor, c_fw) = (connect_row.paired(3), connect_row.paired(4), connect_row.paired(2));
    let (t_uplink, t_floor, t_fw) = (bulk_row.paired(3), bulk_row.paired(4), bulk_row.paired(2));
    Ok(Figure {
        title: "10. Leaving the node through an uplink (tc egress)".into(),
        unit: "µs per connect; Gbit/s".into(),
        rows: vec![connect_row, bulk_row],
        targets: vec![
            Target::at_most("10. connect+close through the uplink, its program alone / no guard", c_uplink, 1.01),
            Target::at_most(
                "10. connect+close, the uplink's program ≤ one FORWARD rule's ratio",
                c_uplink,
                c_fw.max(c_floor),
            ),
            Target::at_least("10. bulk through the uplink, its program alone / no guard", t_uplink, 0.99),
            Target::at_least("10. bulk, the uplink's program ≥ one FORWARD rule's ratio", t_uplink, t_fw.min(t_floor)),
        ],
        notes: vec![format!(
            "The pod connects to {tcp} (and writes to {bulk}) one veth beyond the node; the node forwards and the \
             packets leave through `vb0`, whose egress hook runs, per column: nothing; the whole guard (its cgroup \
             programs for the pod, the host-side table's `forward` chain, and `mg_uplink` on `vb0`); one FORWARD rule \
             (`-s 10.200.0.0/16 -d 169.254.169.254/32 -j DROP`); `mg_uplink` alone (the pod outside the guard's \
             cgroup, the table asleep); and `r0 = -1; exit` in its place, what any program on the hook costs. \
             `mg_uplink` is the agent's own program, attached by the bench with a tcx link of its own for its \
             samples (the agent guards an idle uplink, so that the no-guard column has nothing on `vb0`). \
             Forwarded packets carry no socket: `mg_uplink` hands each on after the Ethernet type and its \
             prefilters, as it does every packet to an address outside the policy. {count} connects per sample; \
             bulk samples write for {ms} ms. The \"≤ one rule\" targets allow the hook's floor where it costs more."
        )],
        ..Default::default()
    })
}

/// Sets figure 10's missed targets' explanations: the hook's floor and the program
/// alone from the figure, `mg_uplink`'s own work from the kernel's statistics (the
/// profile's forwarded connect).
pub(crate) fn explain(f: &mut Figure, profile: &Profile) {
    let own = profile.ops.iter().find(|(what, ..)| *what == FORWARDED_CONNECT).and_then(|(_, guard, empty)| {
        let (runs, ns) = guard.get("mg_uplink").or_else(|| guard.get("mg_uplink_marks")).copied()?;
        let (_, empty_ns) = empty.get("mg_empty_uplink").copied()?;
        Some((runs, ns, empty_ns))
    });
    let rows: Vec<(f64, f64)> = f.rows.iter().map(|r| (r.paired(3), r.paired(4))).collect();
    for (i, t) in f.targets.iter_mut().enumerate().filter(|(_, t)| !t.met()) {
        let Some((alone, floor)) = rows.get(i / 2).copied() else { continue };
        let mut text = format!(
            "On this hook a program that only hands the packet on measures {floor:.3} of no guard and `mg_uplink` \
             alone {alone:.3}: what lies between the two is its own work, what lies below the first the kernel's \
             cost of running any program there (each within the row's spread of round ratios)."
        );
        if let Some((runs, ns, empty_ns)) = own {
            text.push_str(&format!(
                " By the kernel's statistics `mg_uplink` runs {runs:.1} times a forwarded connect at {ns:.0} ns against \
                 the empty program's {empty_ns:.0} ns: {:.0} ns of its own per connect.",
                runs * (ns - empty_ns)
            ));
        }
        t.explain = text;
    }
}

/// The profile's operation whose packets leave through the measured uplink.
const FORWARDED_CONNECT: &str = "forwarded TCP connect + close";

/// The uplink column really judges: a metadata-bound SYN forwarded out of `vb0`
/// would be counted; here the program's presence on the hook is checked instead,
/// with the pin it came from.
fn ensure_judged(b: &mut Bench) -> Result<()> {
    b.set(Variant::Uplink)?;
    let node = NetNs::from_path(&b.node.node_netns())?;
    let vb0 = Netlink::open_in(&node)?.link_index(NODE_LINK)?;
    let on = tc::attached(&node, vb0, Direction::Egress)?;
    let guard = bpf::prog_id(guard_program(&b.node.bpffs)?.as_fd())?;
    b.set(Variant::Guard)?;
    ensure!(on.tcx == [guard], "vb0's egress runs {on:?}, not the agent's uplink program {guard}");
    Ok(())
}
