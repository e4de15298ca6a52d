// SPDX-License-Identifier: Apache-2.0
//! Reading the devices and routes of the calling thread's network namespace and
//! choosing the uplinks among them.

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    devices::{self, Device},
    NlSocket,
};

use super::{blocked_prefixes, choice, Uplink, UplinkSpec};
use crate::policy::CompiledPolicy;

/// The namespace's devices and the uplinks among them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scan {
    pub devices: Vec<Device>,
    pub uplinks: Vec<Uplink>,
}

/// The uplinks `spec` chooses now for `policy`.
pub(crate) fn current(spec: &UplinkSpec, policy: &CompiledPolicy) -> Result<Scan> {
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    scan_with(&mut sock, spec, policy)
}

pub(super) fn scan_with(sock: &mut NlSocket, spec: &UplinkSpec, policy: &CompiledPolicy) -> Result<Scan> {
    let devices = devices::devices(sock).context("could not list the network devices")?;
    let routes = match spec {
        UplinkSpec::Auto => devices::routes(sock).context("could not list the routes")?,
        _ => Vec::new(),
    };
    let uplinks = choice::choose(&devices, &routes, &blocked_prefixes(policy), spec);
    Ok(Scan { devices, uplinks })
}
