// SPDX-License-Identifier: Apache-2.0
//! A simulated Kubernetes node for real-kernel tests of metadata-guard.
//!
//! Network namespaces stand in for the node and its pods, a stand-in server
//! answers on the metadata addresses inside the node namespace, and throwaway
//! cgroup v2 trees play kubelet's. Everything is made through syscalls and raw
//! rtnetlink (no `ip`, no `nsenter`), so the same binary runs in a bare VM, and
//! everything is held by file descriptors or removed on drop, so nothing outlives
//! the test process.

pub mod agent;
pub mod bpf;
pub mod cgroups;
pub mod drops;
pub mod forwarded;
pub mod frames;
pub mod gate;
pub mod ipvs;
pub mod leftovers;
pub mod nat;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod placed;
pub mod reexec;
pub mod sandbox;
pub mod scratch;
pub mod standin;
pub mod tc;
pub mod uplink;
pub mod world;
