// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard status`: what is in the kernel, read from the pins and the
//! host-side table (works without an agent).

use std::path::Path;

use anyhow::Result;

use crate::{enforce, hostside, loader, uplink};

pub(crate) fn status(bpffs: &Path, host_netns: Option<&Path>, json: bool) -> Result<()> {
    let mut status = loader::status::read(bpffs)?;
    if let Some(conceal) = status.conceal.as_mut() {
        loader::status_conceal::check_listening(conceal, host_netns);
    }
    let host_side = hostside::status(host_netns)?;
    let mut problems = std::mem::take(&mut status.problems);
    if status.installed {
        match uplink::read(bpffs, host_netns, status.uplink_choice.as_deref()) {
            Ok(uplinks) => status.uplinks = uplinks,
            Err(e) => problems.push(format!("the uplinks could not be read: {e:#}")),
        }
        problems.extend(uplink::problems(&status.uplinks));
    }
    // Enforcement is the pinned programs, the table and the uplinks together.
    let verdict = enforce::enforcing(status.installed, problems, Some(&host_side));
    (status.enforcing, status.problems) = (verdict.enforcing, verdict.problems);
    if json {
        let mut value = serde_json::to_value(&status)?;
        value["host_side"] = serde_json::to_value(&host_side)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        loader::status::print_human(&status);
        uplink::print_status(&status.uplinks, status.uplink_choice.as_deref());
        hostside::print_status(&host_side);
    }
    Ok(())
}
