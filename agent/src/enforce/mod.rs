// SPDX-License-Identifier: Apache-2.0
//! Enforcement: the guard put in the kernel ([`install`], shared by `run` and
//! `apply`), the running agent's subsystem that keeps the kernel guard whole and in
//! force ([`Enforcement`]), and the one answer to "is the guard enforcing?"
//! ([`enforcing`]), which `status`, `apply` and `/readyz` all use.

mod health;
mod install;

pub(crate) use self::{
    health::Enforcement,
    install::{install, InstallError, Installed, Request},
};
use crate::hostside::{self, HostStatus};

/// Whether the guard is enforcing, and what keeps it from enforcing fully.
#[derive(Debug, Default)]
pub(crate) struct Enforcing {
    pub enforcing: bool,
    /// Empty when `enforcing` (and when nothing is installed).
    pub problems: Vec<String>,
}

/// The guard enforces when both its enforcement points are in force: the kernel
/// guard is installed with nothing wrong (`kernel_problems` empty: every link pinned
/// and attached to a live cgroup, every map pinned) and the host-side table is in the
/// host network namespace, awake. `host`: the table as read (None where it is judged
/// elsewhere, e.g. by the `host side` subsystem's own readiness condition; a table
/// that could not be read is not counted against it).
pub(crate) fn enforcing(kernel_installed: bool, kernel_problems: Vec<String>, host: Option<&HostStatus>) -> Enforcing {
    let mut problems = kernel_problems;
    if kernel_installed {
        if let Some(host) = host.filter(|h| h.unreadable.is_none()) {
            if !host.installed {
                problems.push(format!(
                    "the host-side table `{}` is missing from the host network namespace: packets entering the \
                     node (AF_PACKET frames, Service addresses DNATed to a metadata address) are not judged there; \
                     a running agent restores it within seconds, without one run `metadata-guard apply`",
                    host.table
                ));
            } else if host.dormant {
                problems.push(hostside::dormant_problem());
            }
        }
    }
    Enforcing { enforcing: kernel_installed && problems.is_empty(), problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(installed: bool, dormant: bool) -> HostStatus {
        HostStatus { table: "inet metadata_guard".into(), installed, dormant, ..HostStatus::default() }
    }

    #[test]
    fn enforcing_needs_the_kernel_guard_whole_and_the_table_awake() {
        assert!(enforcing(true, vec![], Some(&table(true, false))).enforcing);
        assert!(enforcing(true, vec![], None).enforcing);
        assert!(!enforcing(false, vec![], Some(&table(true, false))).enforcing);
        let broken = enforcing(true, vec!["map X is not pinned".into()], Some(&table(true, false)));
        assert!(!broken.enforcing && broken.problems == ["map X is not pinned"]);
        let missing = enforcing(true, vec![], Some(&table(false, false)));
        assert!(!missing.enforcing && missing.problems[0].contains("is missing"), "{missing:?}");
        let dormant = enforcing(true, vec![], Some(&table(true, true)));
        assert!(!dormant.enforcing && dormant.problems[0].contains("dormant"), "{dormant:?}");
        let unreadable = HostStatus { unreadable: Some("EPERM".into()), ..table(false, false) };
        assert!(enforcing(true, vec![], Some(&unreadable)).enforcing);
        // Nothing installed: not enforcing, and nothing to report about the table.
        assert!(enforcing(false, vec![], Some(&table(false, false))).problems.is_empty());
    }
}
