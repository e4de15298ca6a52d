//! metadata-guard: blocks pods from the cloud instance metadata service, in the kernel.
//!
//! Data flow, one module per step: config → policy → loader (maps, links, pins) →
//! kernel verdict (ebpf/) → events → pod identity → audit / metrics and the HTTP
//! endpoint. `main.rs` is a thin command line over this library; the scenarios and
//! the benchmark use its typed [`loader::status::Status`], [`audit::AuditRecord`] and
//! [`config::Config`] too.
//!
//! [`cli`] is clap's definitions and dispatch; each command is a file of
//! [`commands`]. The running agent (`commands::run`) is a set of supervised
//! subsystems ([`supervise`], which also holds the readiness registry); each owns its
//! task: [`enforce`] (the kernel guard: the policy in force, its health, counters),
//! [`hostside`] (the host-side nf_tables table: the policy in force, its health,
//! counters, NFLOG refusals), [`config_watch`] (reloads; publishes each new policy,
//! which every enforcement point puts in force itself), [`allowlist`] (pod allowlist
//! sync), [`events`] (event → audit pipeline), [`conceal`] (conceal mode's filtering
//! proxy) and [`http`] (/metrics, /healthz, /readyz).

pub mod allowlist;
pub mod attempt;
pub mod audit;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod conceal;
pub mod config;
pub mod config_watch;
pub mod enforce;
pub mod events;
pub mod hostside;
pub mod http;
pub mod kubepods_watch;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod pod_identity;
pub mod policy;
pub mod preflight;
pub mod supervise;
