// SPDX-License-Identifier: Apache-2.0
//! Keeping the table through `nft flush ruleset` (what nftables.service runs at start
//! and reload, CIS hardening scripts, an admin): nf_tables table flags, where the
//! kernel has them.
//!
//! - `owner` (5.12+): only the netlink socket that created the table may change or
//!   delete it; `flush ruleset` from any other socket skips it, `nft delete table` and
//!   `flags dormant` get EPERM. Alone, the table is deleted when that socket closes:
//!   an agent that stops or crashes would take the node's host side with it.
//! - `persist` (6.9+, with `owner`): when the owner's socket closes, the table stays,
//!   without an owner. Any socket may then change or delete it (a `flush ruleset` does),
//!   and the next agent's write, which deletes and recreates the table in one
//!   transaction, makes that agent's socket the owner again.
//!
//! So the agent writes the table with `owner` and `persist` where the kernel accepts
//! both (6.9+), and with neither before: 5.12–6.8 would lose the table with the agent,
//! which fail-closed forbids. There the running agent finds a flushed table within a
//! second and restores it, and `status` and `/readyz` say it is missing meanwhile.
//! What remains, on every kernel: a flush while no agent runs (after `apply` at boot,
//! before the DaemonSet's pod starts, or while it crash-loops) deletes the table until
//! an agent or `apply` writes it again. The boot unit runs after nftables.service and
//! firewalld.service so that their start does not.

use metadata_guard_netfilter::nftables::{Batch, NFPROTO_INET, NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST};

/// Set to `never`, the agent writes the table without [`PROTECTED`] on every kernel:
/// for a node whose firewall manager must be able to flush or switch off every table,
/// and for the benchmark, which switches the table off and on to measure it. The
/// table is then the kernel's plain kind: a flush deletes it until the agent restores
/// it (within a second).
pub(crate) const OWNER_ENV: &str = "METADATA_GUARD_HOST_TABLE_OWNER";

/// The flags that keep the table while an agent runs, and after it.
pub(super) const PROTECTED: u32 = NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST;

/// A throwaway table created with [`PROTECTED`] and deleted in one transaction: a
/// kernel without both flags refuses it (EOPNOTSUPP; EINVAL before 5.12), and nothing
/// stays either way.
pub(super) fn probe() -> Batch {
    const PROBE_TABLE: &str = "metadata_guard_owner_probe";
    let mut b = Batch::new(NFPROTO_INET);
    b.add_table_with_flags(PROBE_TABLE, PROTECTED).del_table(PROBE_TABLE);
    b
}

/// Whether a table with these flags is owned by a socket now (an orphaned persistent
/// table has lost `owner`).
pub(crate) fn owned(flags: u32) -> bool {
    flags & NFT_TABLE_F_OWNER != 0
}
