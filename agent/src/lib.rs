// SPDX-License-Identifier: Apache-2.0
//! metadata-guard: blocks pods from the cloud instance metadata service, in the kernel.
//!
//! Data flow, one module per step: config → policy → loader (maps, links, pins) →
//! kernel verdict (ebpf/) → events → pod identity → audit / metrics and the HTTP
//! endpoint. `main.rs` is a thin command line over this library.
//!
//! Every module is `pub(crate)`. The public surface is the re-exports below, no
//! more: what `main.rs` uses ([`Cli`], `fatal`) and what the test crates read (the
//! JSON `status` prints and the audit trail's lines, the pin layout, the host-side
//! table). `agent/public-api.txt` lists it; a test fails when it grows unnoticed.
//!
//! `cli` is clap's definitions and dispatch; each command is a file of
//! `commands`. The running agent (`commands::run`) is a set of supervised
//! subsystems (`supervise`, which also holds the readiness registry); each owns its
//! task: `enforce` (the kernel guard: the policy in force, its health, counters),
//! `hostside` (the host-side nf_tables table: the policy in force, its health,
//! counters, NFLOG refusals), `config_watch` (reloads; publishes each new policy,
//! which every enforcement point puts in force itself), `allowlist` (pod allowlist
//! sync), `events` (event → audit pipeline), `conceal` (conceal mode's filtering
//! proxy, with pods' own cloud identities from `conceal::identity`), `uplink` (the tc program on
//! the node's uplinks) and `http` (/metrics, /healthz, /readyz).

pub(crate) mod allowlist;
pub(crate) mod attempt;
pub(crate) mod audit;
pub(crate) mod cgroup;
pub(crate) mod cli;
pub(crate) mod commands;
pub(crate) mod conceal;
pub(crate) mod config;
pub(crate) mod config_watch;
pub(crate) mod enforce;
pub(crate) mod events;
pub(crate) mod hostside;
pub(crate) mod http;
pub(crate) mod kubepods_watch;
pub(crate) mod loader;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod pod_identity;
pub(crate) mod policy;
pub(crate) mod preflight;
pub(crate) mod supervise;
pub(crate) mod uplink;

pub use crate::{
    audit::RecordLine,
    cli::Cli,
    hostside::{status as host_table_status, uninstall as remove_host_table, HostStatus, Removal, TABLE as HOST_TABLE},
    loader::{pins::PinLayout, status::Status, status_conceal::ConcealStatus, uplink_state::UplinkStatus, ATTACHMENTS},
    logging::fatal,
};
