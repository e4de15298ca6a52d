// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard check`: whether this kernel and these privileges can enforce.

use std::path::Path;

use anyhow::Result;

use crate::{hostside, preflight, uplink};

/// Prints the checks; `Ok(false)` when one failed (the command exits 1).
pub(crate) fn check(inputs: &preflight::Inputs<'_>, host_netns: Option<&Path>, json: bool) -> Result<bool> {
    let mut checks = preflight::run(inputs);
    checks.push(preflight::Check::host_side(hostside::check(host_netns)));
    checks.push(preflight::Check::uplink(uplink::check(host_netns)));
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        preflight::print_human(&checks);
    }
    Ok(!preflight::has_failure(&checks))
}
