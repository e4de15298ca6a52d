// SPDX-License-Identifier: Apache-2.0
//! The second enforcement point: an nf_tables table of the agent's own in the host's
//! network namespace, judging every packet that enters the host from anything but
//! its loopback — a pod's veth, another interface, the wire — by the destination it
//! will finally be delivered or forwarded to (after DNAT). It catches what no socket
//! hook sees: frames a pod writes with `AF_PACKET`, and Service addresses the node
//! rewrites to a metadata address.
//!
//! Like the pinned programs it is kernel-resident: it stays while no agent runs, and
//! every change (policy, mode, allowlist) replaces it in one transaction.

mod commands;
mod error;
mod ownership;
mod pods;
mod refusals;
mod ruleset;
mod subsystem;
mod table;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    attr::Attrs,
    nftables::{self, msg_type, table_request, wants_ack, NFPROTO_INET},
    NetlinkError, NlSocket,
};

pub(crate) use commands::{check, dormant_problem, print_status};
pub use commands::{status, uninstall, HostStatus, Removal};
pub(crate) use error::TableError;
pub(crate) use pods::{Allowed, EntryPods, PodNets, PODS_RESCAN};
pub(crate) use refusals::RefusalReader;
pub(crate) use ruleset::shapes;
pub(crate) use subsystem::HostSide;
pub(crate) use table::COUNTERS;
pub use table::TABLE;

use crate::{
    config::Config,
    policy::{compile, CompiledPolicy},
};

/// What the host side blocks: the configured rules, plus those that presets leave to
/// the host side alone (see [`Preset::host_side_rules`](crate::policy::Preset::host_side_rules)).
pub(crate) fn policy(config: &Config) -> Result<CompiledPolicy> {
    let mut rules = config.block.clone();
    rules.extend(config.presets.iter().flat_map(|p| p.host_side_rules()));
    compile(&rules).map_err(anyhow::Error::from)
}

/// Where conceal mode's proxy listens, when pods are redirected to it: the table keeps
/// its connections out of connection tracking (and so out of NAT).
pub(crate) fn conceal_target(config: &Config) -> Option<std::net::SocketAddr> {
    config.conceal.addr.filter(|_| config.mode == crate::config::Mode::Conceal)
}

/// Packets the table counted, by verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HostCounters {
    pub blocked: u64,
    pub audited: u64,
    pub exempt: u64,
}

/// What the health check reads every round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    pub counters: HostCounters,
    /// `flags dormant`: nf_tables has taken the table's base chains off their hooks,
    /// so it judges no packet.
    pub dormant: bool,
}

/// The table as read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableStatus {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub counters: HostCounters,
    /// Allowlisted pods' host interfaces in force.
    pub allowed_interfaces: usize,
    /// Allowlisted pods' (bridge, source address) pairs in force.
    pub allowed_addresses: usize,
    pub audit: bool,
    /// `flags dormant`: the table is there but judges nothing.
    pub dormant: bool,
    /// The netlink port id of the socket (a running agent's) that owns the table:
    /// no other process can change or delete it, `nft flush ruleset` included.
    pub owner: Option<u32>,
}

/// The table's flags and owner, as GETTABLE answers.
#[derive(Clone, Copy, Debug)]
struct Head {
    flags: u32,
    owner: Option<u32>,
}

/// A handle on the host namespace's nf_tables (and rtnetlink, to find pods' interfaces).
pub(crate) struct HostTable {
    nft: NlSocket,
    route: NlSocket,
    cgroup_root: PathBuf,
    applied: Option<table::Content>,
    wanted: Option<(CompiledPolicy, bool)>,
    allowed: BTreeSet<u64>,
    /// Conceal mode's proxy ([`conceal_target`]), put in force with the next policy.
    conceal: Option<std::net::SocketAddr>,
    /// The flags the table is written with (`ownership`), once probed.
    flags: Option<u32>,
}

impl HostTable {
    /// Opens netlink sockets in `host_netns` (the agent's own when `None`).
    pub(crate) fn open(host_netns: Option<&Path>, cgroup_root: &Path) -> Result<HostTable, TableError> {
        let nft = NlSocket::open_in(host_netns, libc::NETLINK_NETFILTER).map_err(|e| {
            let ns = ns_name(host_netns);
            TableError::netlink(
                format!("could not open an nf_tables netlink socket in the host network namespace {ns}"),
                e,
            )
        })?;
        nft.set_recv_buffer(1 << 20);
        let route = NlSocket::open_in(host_netns, libc::NETLINK_ROUTE).map_err(|e| {
            let ns = ns_name(host_netns);
            TableError::netlink(format!("could not open an rtnetlink socket in the host network namespace {ns}"), e)
        })?;
        Ok(HostTable {
            nft,
            route,
            cgroup_root: cgroup_root.to_path_buf(),
            applied: None,
            wanted: None,
            allowed: BTreeSet::new(),
            conceal: None,
            flags: None,
        })
    }

    /// The conceal proxy's address the next [`set_policy`](Self::set_policy) writes.
    pub(crate) fn set_conceal(&mut self, proxy: Option<std::net::SocketAddr>) {
        self.conceal = proxy;
    }

    /// Puts a new policy and mode in force (with the allowlist last given).
    pub(crate) fn set_policy(&mut self, policy: &CompiledPolicy, audit: bool) -> Result<()> {
        self.wanted = Some((policy.clone(), audit));
        let allowed = self.allowed.clone();
        self.apply(policy, audit, &allowed)
    }

    /// The allowlisted pods' entries into the node as the table has them now (the
    /// uplink program lets the same through).
    pub(crate) fn allowed_entries(&self) -> Allowed {
        self.applied.as_ref().map(|c| c.allowed.clone()).unwrap_or_default()
    }

    /// Lets the packets of these allowlisted containers' pods through (by the host
    /// end of their interfaces). Pods come and go: call again on every change.
    pub(crate) fn set_allowed(&mut self, allowed: &BTreeSet<u64>) -> Result<()> {
        self.allowed = allowed.clone();
        match self.wanted.clone() {
            Some((policy, audit)) => self.apply(&policy, audit, allowed),
            None => Ok(()),
        }
    }

    /// Puts the policy, mode and allowlisted pods (their container cgroups) in force,
    /// replacing the table in one transaction unless nothing changed.
    fn apply(&mut self, policy: &CompiledPolicy, audit: bool, allowed_cgroups: &BTreeSet<u64>) -> Result<()> {
        let allowed = if allowed_cgroups.is_empty() {
            Allowed::default()
        } else {
            PodNets::scan(&self.cgroup_root, &mut self.route, Some(allowed_cgroups))?.allowed(allowed_cgroups)
        };
        let mut content = table::Content {
            shapes: shapes(policy),
            audit,
            allowed,
            counters: Default::default(),
            conceal: self.conceal,
        };
        if let Some(applied) = &self.applied {
            let same = applied.shapes == content.shapes && applied.audit == audit && applied.allowed == content.allowed;
            if same && applied.conceal == content.conceal {
                return Ok(());
            }
        }
        content.counters = self.raw_counters()?.map(|(c, _)| c).unwrap_or_default();
        let flags = self.protection()?;
        self.nft.request(&table::replace(&content, flags).finish(), wants_ack).with_context(|| {
            format!("could not write the host-side table `inet {TABLE}` (is nf_tables available? see `metadata-guard check`)")
        })?;
        self.applied = Some(content);
        Ok(())
    }

    /// The flags this kernel lets the table keep through a flush while this socket
    /// lives and after it ([`ownership::PROTECTED`]), or none: probed once.
    fn protection(&mut self) -> Result<u32> {
        if let Some(flags) = self.flags {
            return Ok(flags);
        }
        if std::env::var(ownership::OWNER_ENV).is_ok_and(|v| v == "never") {
            self.flags = Some(0);
            return Ok(0);
        }
        let flags = match self.nft.request(&ownership::probe().finish(), wants_ack) {
            Ok(()) => ownership::PROTECTED,
            // 5.12+ answer unknown table flags with EOPNOTSUPP, older kernels with EINVAL
            // (the probe holds nothing else they could refuse).
            Err(e) if matches!(NetlinkError::errno_of(&e), Some(libc::EOPNOTSUPP | libc::EINVAL)) => 0,
            Err(e) => return Err(e).context("could not probe nf_tables for table ownership"),
        };
        self.flags = Some(flags);
        Ok(flags)
    }

    /// Writes the table again when it is gone from the kernel (with the policy, mode
    /// and allowlist last given); `false` when it was there.
    pub(crate) fn restore(&mut self) -> Result<bool> {
        if self.exists()? {
            return Ok(false);
        }
        let Some((policy, audit)) = self.wanted.clone() else { return Ok(false) };
        self.applied = None;
        let allowed = self.allowed.clone();
        self.apply(&policy, audit, &allowed)?;
        Ok(true)
    }

    /// The counters, and whether the table is dormant; `None` without the table.
    pub(crate) fn read(&mut self) -> Result<Option<Reading>, TableError> {
        Ok(self.raw_counters()?.map(|(c, flags)| Reading {
            counters: HostCounters { blocked: c[0].0, audited: c[1].0, exempt: c[2].0 },
            dormant: flags & nftables::NFT_TABLE_F_DORMANT != 0,
        }))
    }

    /// The counters and the table's flags; `None` without the table.
    fn raw_counters(&mut self) -> Result<Option<(table::RawCounters, u32)>, TableError> {
        let replies = match self
            .nft
            .dump(msg_type(nftables::NFT_MSG_GETOBJ), &table_request(NFPROTO_INET, TABLE))
            .map_err(|e| TableError::netlink("could not read the host-side table's counters", e))
        {
            Ok(r) => r,
            Err(TableError::Absent { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The dump of a table's objects is empty, not an error, when there is no table.
        let Some(Head { flags, .. }) = self.head()? else { return Ok(None) };
        let mut out = [(0, 0); 3];
        for r in replies {
            let attrs = Attrs::new(r.body.get(4..).unwrap_or_default());
            if attrs.find(1).map(|a| a.str()).as_deref() != Some(TABLE) {
                continue;
            }
            let Some(name) = attrs.find(nftables::NFTA_OBJ_NAME).map(|a| a.str()) else { continue };
            let Some(slot) = COUNTERS.iter().position(|c| *c == name) else { continue };
            let Some(data) = attrs.find(nftables::NFTA_OBJ_DATA) else { continue };
            let packets = data.nested().find(nftables::NFTA_COUNTER_PACKETS).and_then(|a| a.be64()).unwrap_or(0);
            let bytes = data.nested().find(nftables::NFTA_COUNTER_BYTES).and_then(|a| a.be64()).unwrap_or(0);
            out[slot] = (packets, bytes);
        }
        Ok(Some((out, flags)))
    }

    pub(crate) fn exists(&mut self) -> Result<bool, TableError> {
        Ok(self.head()?.is_some())
    }

    /// The table's flags and owner; `None` without the table.
    fn head(&mut self) -> Result<Option<Head>, TableError> {
        match self
            .nft
            .query(msg_type(nftables::NFT_MSG_GETTABLE), &table_request(NFPROTO_INET, TABLE))
            .map_err(|e| TableError::netlink("could not look for the host-side table", e))
        {
            Ok(r) => {
                let attrs = Attrs::new(r.body.get(4..).unwrap_or_default());
                let flags = attrs.find(nftables::NFTA_TABLE_FLAGS).and_then(|a| a.be32()).unwrap_or(0);
                let owner = attrs.find(nftables::NFTA_TABLE_OWNER).and_then(|a| a.be32());
                Ok(Some(Head { flags, owner: owner.filter(|_| ownership::owned(flags)) }))
            }
            Err(TableError::Absent { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table's chains, sets and counters; `None` when there is no table (also
    /// when it is deleted while being read).
    pub(crate) fn status(&mut self) -> Result<Option<TableStatus>, TableError> {
        match self.read_status() {
            Err(TableError::Absent { .. }) => Ok(None),
            read => read,
        }
    }

    fn read_status(&mut self) -> Result<Option<TableStatus>, TableError> {
        let Some(Reading { counters, dormant }) = self.read()? else { return Ok(None) };
        let owner = self.head()?.and_then(|h| h.owner);
        let names = |sock: &mut NlSocket, msg: u16, attr: u16, what: &str| -> Result<Vec<String>, TableError> {
            let replies = sock
                .dump(msg_type(msg), &table_request(NFPROTO_INET, TABLE))
                .map_err(|e| TableError::netlink(format!("could not list the host-side table's {what}"), e))?;
            Ok(replies
                .iter()
                .filter_map(|r| {
                    let attrs = Attrs::new(r.body.get(4..).unwrap_or_default());
                    (attrs.find(1)?.str() == TABLE).then(|| attrs.find(attr).map(|a| a.str()))?
                })
                .collect())
        };
        let chains = names(&mut self.nft, nftables::NFT_MSG_GETCHAIN, nftables::NFTA_CHAIN_NAME, "chains")?;
        let sets = names(&mut self.nft, nftables::NFT_MSG_GETSET, nftables::NFTA_SET_NAME, "sets")?;
        let allowed_interfaces = self.set_size("allow_if")?;
        let mut allowed_addresses = 0;
        for set in table::ALLOW_SRC_SETS {
            // A table an older agent wrote has no such set.
            if sets.iter().any(|s| s == set) {
                allowed_addresses += self.set_size(set)?;
            }
        }
        let audit = self.refuse_chain_accepts()?;
        Ok(Some(TableStatus { chains, sets, counters, allowed_interfaces, allowed_addresses, audit, dormant, owner }))
    }

    /// The number of elements in one of the table's sets.
    fn set_size(&mut self, set: &str) -> Result<usize, TableError> {
        Ok(self
            .nft
            .dump(msg_type(nftables::NFT_MSG_GETSETELEM), &nftables::set_elements_request(NFPROTO_INET, TABLE, set))
            .map_err(|e| TableError::netlink(format!("could not read the host-side table's set `{set}`"), e))?
            .iter()
            .map(|r| {
                Attrs::new(r.body.get(4..).unwrap_or_default())
                    .find(nftables::NFTA_SET_ELEM_LIST_ELEMENTS)
                    .map_or(0, |e| e.nested().count())
            })
            .sum())
    }

    /// Audit mode's refusal chain ends in accept; enforce mode's in reject.
    fn refuse_chain_accepts(&mut self) -> Result<bool, TableError> {
        let replies = self
            .nft
            .dump(msg_type(nftables::NFT_MSG_GETRULE), &table_request(NFPROTO_INET, TABLE))
            .map_err(|e| TableError::netlink("could not read the host-side table's rules", e))?;
        let mut rejects = false;
        for r in &replies {
            let attrs = Attrs::new(r.body.get(4..).unwrap_or_default());
            if attrs.find(nftables::NFTA_RULE_CHAIN).map(|a| a.str()).as_deref() != Some("refuse") {
                continue;
            }
            let Some(exprs) = attrs.find(nftables::NFTA_RULE_EXPRESSIONS) else { continue };
            rejects |=
                exprs.nested().any(|e| e.nested().find(nftables::NFTA_EXPR_NAME).is_some_and(|n| n.str() == "reject"));
        }
        Ok(!rejects)
    }

    /// Deletes the table; `false` when there was none.
    pub(crate) fn remove(&mut self) -> Result<bool, TableError> {
        let Some(head) = self.head()? else { return Ok(false) };
        let deleted = self
            .nft
            .request(&table::delete().finish(), wants_ack)
            .map_err(|e| TableError::netlink(format!("could not delete the host-side table `inet {TABLE}`"), e));
        match (deleted, head.owner) {
            (Ok(()), _) => {}
            // Deleted by someone else since it was looked up.
            (Err(TableError::Absent { .. }), _) => return Ok(false),
            // Not a missing capability: reading it took CAP_NET_ADMIN too.
            (Err(TableError::NotPermitted { .. }), Some(port)) => return Err(TableError::Owned { port }),
            (Err(e), _) => return Err(e),
        }
        self.applied = None;
        Ok(true)
    }

    /// Whether this kernel can hold the table: the same layout, created and deleted
    /// again in one transaction under another name (nothing stays, nothing changes
    /// for packets). Loads the modules the table needs on the way.
    pub(crate) fn probe(&mut self) -> Result<()> {
        let policy = compile(&crate::policy::Preset::Default.rules()).map_err(anyhow::Error::from)?;
        let content = table::Content {
            shapes: shapes(&policy),
            audit: false,
            allowed: Allowed {
                interfaces: vec![1],
                v4: vec![(1, std::net::Ipv4Addr::new(192, 0, 2, 1))],
                v6: vec![(1, std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))],
            },
            counters: Default::default(),
            conceal: Some(std::net::SocketAddr::from(([192, 0, 2, 1], 8775))),
        };
        self.nft.request(&table::probe(&content).finish(), wants_ack)?;
        Ok(())
    }
}

fn ns_name(netns: Option<&Path>) -> String {
    netns.map_or_else(|| "(the agent's own)".into(), |p| p.display().to_string())
}
