// SPDX-License-Identifier: Apache-2.0
//! What `status`, `uninstall` and `check` do for the host-side table.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{HostTable, TableError, TableStatus, TABLE};

/// The host-side part of `status` (its JSON key `host_side`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostStatus {
    pub table: String,
    pub installed: bool,
    pub mode: Option<String>,
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub allowed_interfaces: usize,
    /// Allowlisted pods behind a bridge: their (bridge, source address) pairs.
    #[serde(default)]
    pub allowed_addresses: usize,
    pub blocked_packets: u64,
    pub audited_packets: u64,
    pub exempt_packets: u64,
    /// The table is there with `flags dormant`: off its hooks, judging nothing.
    #[serde(default)]
    pub dormant: bool,
    /// The netlink port id of the running agent's socket that owns the
    /// table: `nft flush ruleset` and every other process leave it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    /// Why the table could not be read (it may still be there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

pub fn status(host_netns: Option<&Path>) -> Result<HostStatus> {
    host_status(HostTable::open(host_netns, Path::new("/")).and_then(|mut h| h.status()))
}

/// A table this process may not read is reported (it may still be there), not fatal.
fn host_status(read: Result<Option<TableStatus>, TableError>) -> Result<HostStatus> {
    let (s, unreadable) = match read {
        Ok(s) => (s, None),
        Err(e @ TableError::NotPermitted { .. }) => (None, Some(e.explained())),
        Err(e) => return Err(e.into()),
    };
    Ok(HostStatus {
        unreadable,
        table: format!("inet {TABLE}"),
        installed: s.is_some(),
        mode: s.as_ref().map(|s| if s.audit { "audit" } else { "enforce" }.to_string()),
        allowed_interfaces: s.as_ref().map_or(0, |s| s.allowed_interfaces),
        allowed_addresses: s.as_ref().map_or(0, |s| s.allowed_addresses),
        blocked_packets: s.as_ref().map_or(0, |s| s.counters.blocked),
        audited_packets: s.as_ref().map_or(0, |s| s.counters.audited),
        exempt_packets: s.as_ref().map_or(0, |s| s.counters.exempt),
        dormant: s.as_ref().is_some_and(|s| s.dormant),
        owner: s.as_ref().and_then(|s| s.owner),
        chains: s.as_ref().map(|s| s.chains.clone()).unwrap_or_default(),
        sets: s.map(|s| s.sets).unwrap_or_default(),
    })
}

pub(crate) fn print_status(s: &HostStatus) {
    if let Some(why) = &s.unreadable {
        println!("host side: could not read table `{}` (needs CAP_NET_ADMIN): {why}", s.table);
        return;
    }
    if !s.installed {
        println!("host side: no table `{}` in the host network namespace (not enforcing there)", s.table);
        return;
    }
    println!(
        "host side: table `{}` ({}), chains {}; {} sets; {} allowlisted pod interfaces, {} allowlisted pod addresses \
         behind bridges",
        s.table,
        s.mode.as_deref().unwrap_or("?"),
        s.chains.join(", "),
        s.sets.len(),
        s.allowed_interfaces,
        s.allowed_addresses
    );
    println!("  packets: {} blocked, {} audited, {} exempt", s.blocked_packets, s.audited_packets, s.exempt_packets);
    match s.owner {
        Some(port) => println!(
            "  owned by the running agent (netlink port {port}): `nft flush ruleset` and other processes cannot \
             delete or change it"
        ),
        None => println!(
            "  not owned by a running agent: `nft flush ruleset` deletes it (a running agent restores it; kernels \
             before 6.9 cannot keep an owned table when its owner stops)"
        ),
    }
    if s.dormant {
        println!("  DORMANT: {}", dormant_problem());
    }
}

/// What a dormant table means and how it ends, for `status` and the agent's health.
pub(crate) fn dormant_problem() -> String {
    // Nothing the agent writes is dormant (every write replaces the table), and no
    // firewall manager sets the flag: someone put it to sleep by hand, perhaps on
    // purpose, so the agent reports it rather than overriding them at once.
    format!(
        "the host-side table `inet {TABLE}` is dormant (`flags dormant`): its chains are off their hooks and judge \
         no packet entering the node (AF_PACKET frames, Service addresses DNATed to a metadata address); the \
         agent's next write (a policy or allowlist change) replaces it awake, or wake it now with \
         `nft add table inet {TABLE}` in the host network namespace"
    )
}

/// What `uninstall` did about the table.
pub enum Removal {
    Removed,
    NotThere,
    /// Without `CAP_NET_ADMIN` the kernel answers no nf_tables request at all.
    NotPermitted(String),
}

pub fn uninstall(host_netns: Option<&Path>) -> Result<Removal> {
    removal(HostTable::open(host_netns, Path::new("/")).and_then(|mut h| h.remove()))
}

/// Without the capability to see the table, uninstall warns and goes on; a table a
/// running agent owns stops it.
fn removal(removed: Result<bool, TableError>) -> Result<Removal> {
    match removed {
        Ok(true) => Ok(Removal::Removed),
        Ok(false) => Ok(Removal::NotThere),
        Err(e @ TableError::NotPermitted { .. }) => Ok(Removal::NotPermitted(e.explained())),
        Err(e) => Err(e.into()),
    }
}

/// `check`: can this kernel hold the table? (name, passed, detail, fix)
pub(crate) fn check(host_netns: Option<&Path>) -> (bool, String) {
    let result = HostTable::open(host_netns, Path::new("/")).map_err(anyhow::Error::from).and_then(|mut h| h.probe());
    match result {
        Ok(()) => (true, format!("nf_tables accepts the host-side table `inet {TABLE}` (probed under another name)")),
        Err(e) => (false, format!("nf_tables refused the host-side table: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use metadata_guard_netfilter::NetlinkError;

    use super::*;

    fn refused(errno: i32) -> TableError {
        TableError::netlink(
            "could not look for the host-side table",
            io::Error::other(NetlinkError { index: 0, errno, kernel_message: None }),
        )
    }

    #[test]
    fn status_reports_a_table_it_may_not_read_and_fails_on_anything_else() {
        let s = host_status(Err(refused(libc::EPERM))).unwrap();
        assert!(!s.installed);
        assert!(s.unreadable.unwrap().starts_with("could not look for the host-side table: "));
        assert!(host_status(Err(refused(libc::EINVAL))).is_err());
        let none = host_status(Ok(None)).unwrap();
        assert!(!none.installed && none.unreadable.is_none());
    }

    #[test]
    fn uninstall_warns_without_the_capability_and_stops_at_an_owned_table() {
        assert!(matches!(removal(Err(refused(libc::EPERM))), Ok(Removal::NotPermitted(_))));
        let owned = removal(Err(TableError::Owned { port: 7 })).err().unwrap();
        assert!(format!("{owned:#}").contains("a running agent owns it (its netlink socket, port 7)"));
        assert!(removal(Err(refused(libc::EBUSY))).is_err());
        assert!(matches!(removal(Ok(false)), Ok(Removal::NotThere)));
        assert!(matches!(removal(Ok(true)), Ok(Removal::Removed)));
    }
}
