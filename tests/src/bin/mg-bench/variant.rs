// SPDX-License-Identifier: Apache-2.0
//! The ways a node can be set up for one sample, and the switch between them.
//!
//! Every switch is a few syscalls from this process — one nf_tables transaction that
//! wakes or puts to sleep whole tables (`NFT_TABLE_F_DORMANT` unregisters a table's
//! base chains from their hooks) and `BPF_LINK_UPDATE` on the guard's links — never
//! a process started. So samples can be short and rounds many: this machine's speed
//! drifts in steps tens of milliseconds long (other tenants), and a round of every
//! variant must fit between two steps for its ratios to be fair.
//!
//! Every table a variant needs is loaded before the rounds and only switched during
//! them: the agent's host-side table, the floor's table (base chains on the same hooks
//! and priorities as the agent's, each with one rule that only accepts: what the
//! kernel charges for a base chain running the least a rule can do) and the firewall
//! variant's rules.

use std::path::Path;

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    nftables::{Batch, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6, NFT_TABLE_F_DORMANT},
    NlSocket,
};

use crate::{
    bench::Firewall,
    floor::{self, EmptyPrograms, Swapped},
    uplink::{OnUplink, UplinkHook},
};

/// The agent's host-side table (`table inet metadata_guard`).
pub(crate) const HOST_TABLE: &str = "metadata_guard";
/// The floor's twin of the host-side table: the same base chains, empty.
pub(crate) const FLOOR_TABLE: &str = "mg_bench_floor";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// No guard: the pod's cgroup is outside the attach point and the host-side table
    /// is dormant.
    None,
    /// The whole guard: its programs run for the pod (its cgroup is under the attach
    /// point) and the host-side table judges the node's packets.
    Guard,
    /// No guard (as `None`); a firewall rule set is in force in the node namespace.
    Firewall,
    /// The guard's hooks with nothing to do: its links running programs that only
    /// `return 1`, and base chains on the host-side table's hooks whose one rule only
    /// accepts. The kernel's own cost of running a program or a rule there: the floor
    /// under the guard's.
    Empty,
    /// The guard's programs at work, the host side as in the floor: with
    /// [`Variant::Empty`], the programs' own share of the guard's work.
    Programs,
    /// The guard's links running empty programs, the host-side table at work: with
    /// [`Variant::Empty`], the table's own share.
    Table,
    /// No guard, but the agent's `mg_uplink` on the measured uplink's egress: the
    /// uplink's own cost.
    Uplink,
    /// As [`Variant::Uplink`] with a program that only hands the packet on in its
    /// place: the uplink hook's floor.
    UplinkEmpty,
}

/// What the node runs while a variant's sample is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setup {
    host_table: bool,
    floor_table: bool,
    firewall: bool,
    empty_programs: bool,
    uplink: OnUplink,
}

impl Variant {
    fn setup(self) -> Setup {
        let s = |host_table, floor_table, firewall, empty_programs, uplink| Setup {
            host_table,
            floor_table,
            firewall,
            empty_programs,
            uplink,
        };
        use OnUplink::{Empty, Guard, Nothing};
        match self {
            Variant::None => s(false, false, false, false, Nothing),
            Variant::Guard => s(true, false, false, false, Guard),
            Variant::Firewall => s(false, false, true, false, Nothing),
            Variant::Empty => s(false, true, false, true, Empty),
            Variant::Programs => s(false, true, false, false, Guard),
            Variant::Table => s(true, false, false, true, Empty),
            Variant::Uplink => s(false, false, false, false, Guard),
            Variant::UplinkEmpty => s(false, false, false, false, Empty),
        }
    }

    /// Whether the sample runs from the pod's cgroup (under the guard's attach point);
    /// the others run from a cgroup of the same depth outside it.
    pub(crate) fn guarded_cgroup(self) -> bool {
        !matches!(self, Variant::None | Variant::Firewall | Variant::Uplink | Variant::UplinkEmpty)
    }
}

/// Moves the node between variants.
pub(crate) struct Switch {
    netlink: NlSocket,
    now: Setup,
    /// The firewall variant's tables, (family, name), loaded for the current figure.
    firewall: Vec<(u8, String)>,
    swapped: Option<Swapped>,
    /// The measured uplink's egress hook.
    pub uplink: UplinkHook,
}

impl Switch {
    /// Creates the floor's table (dormant) in `netns`; the node is as `Guard` wants it.
    pub(crate) fn new(netns: &Path, bpffs: &Path, fw: &Firewall) -> Result<Switch> {
        floor::create_floor_table(fw, HOST_TABLE, FLOOR_TABLE)?;
        let netlink = NlSocket::open_in(Some(netns), libc::NETLINK_NETFILTER)
            .with_context(|| format!("could not open a netfilter socket in {}", netns.display()))?;
        let mut uplink = UplinkHook::new(netns)?;
        let now = Variant::Guard.setup();
        uplink.set(now.uplink, bpffs)?;
        Ok(Switch { netlink, now, firewall: Vec::new(), swapped: None, uplink })
    }

    /// Takes the tables that are neither the agent's nor the floor's as the firewall
    /// variant's (just loaded), and puts them to sleep until that variant's samples.
    pub(crate) fn adopt_firewall(&mut self, fw: &Firewall) -> Result<()> {
        self.firewall = fw
            .tables()?
            .into_iter()
            .filter(|(family, name)| !(*family == NFPROTO_INET && (name == HOST_TABLE || name == FLOOR_TABLE)))
            .collect();
        let tables = self.firewall.clone();
        self.set_tables(&tables, false).context("could not put the firewall rules to sleep")?;
        self.now.firewall = false;
        Ok(())
    }

    /// Forgets the firewall tables (the caller removes them).
    pub(crate) fn forget_firewall(&mut self) {
        self.firewall.clear();
        self.now.firewall = false;
    }

    /// Sets the node up for a sample of `v`.
    pub(crate) fn set(&mut self, v: Variant, bpffs: &Path, empty: &EmptyPrograms) -> Result<()> {
        let want = v.setup();
        self.uplink.set(want.uplink, bpffs)?;
        if want.empty_programs != self.now.empty_programs {
            match self.swapped.take() {
                Some(swapped) => swapped.restore()?,
                None => self.swapped = Some(floor::swap_in(bpffs, empty)?),
            }
        }
        let mut wake = Vec::new();
        let mut sleep = Vec::new();
        let inet = |name: &str| vec![(NFPROTO_INET, name.to_string())];
        for (now, wanted, tables) in [
            (self.now.host_table, want.host_table, inet(HOST_TABLE)),
            (self.now.floor_table, want.floor_table, inet(FLOOR_TABLE)),
            (self.now.firewall, want.firewall, self.firewall.clone()),
        ] {
            if now != wanted {
                if wanted { &mut wake } else { &mut sleep }.extend(tables);
            }
        }
        // Asleep first: for an instant neither runs, never both.
        self.set_tables(&sleep, false)?;
        self.set_tables(&wake, true)?;
        self.now = want;
        Ok(())
    }

    /// Wakes (or puts to sleep) `tables`, one transaction per family.
    fn set_tables(&mut self, tables: &[(u8, String)], awake: bool) -> Result<()> {
        for family in [NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6] {
            let mut batch = Batch::new(family);
            let mut any = false;
            for (_, name) in tables.iter().filter(|(f, _)| *f == family) {
                batch.set_table_flags(name, if awake { 0 } else { NFT_TABLE_F_DORMANT });
                any = true;
            }
            if any {
                let messages = batch.finish();
                self.netlink
                    .request(&messages, metadata_guard_netfilter::nftables::wants_ack)
                    .with_context(|| format!("could not switch the tables {tables:?} (awake: {awake})"))?;
            }
        }
        Ok(())
    }
}
