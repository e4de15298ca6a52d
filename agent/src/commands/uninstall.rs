// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard uninstall`: detaches and unpins everything the guard put in the
//! kernel (the uplink program on every device too), and removes the host-side table.
//! Idempotent.

use std::path::Path;

use anyhow::Result;

use crate::{hostside, loader, uplink};

pub(crate) fn uninstall(bpffs: &Path, host_netns: Option<&Path>) -> Result<()> {
    // Refused (before anything is touched) while an agent runs, as below.
    if loader::pins::AgentLock::is_held(bpffs) {
        loader::uninstall(bpffs)?;
    }
    // The uplink program first: our cls_bpf filters hold it without any pin.
    let layout = loader::pins::PinLayout::new(bpffs);
    for dev in uplink::in_netns(host_netns, || uplink::remove_all(&layout))? {
        println!("removed the uplink program from {dev}");
    }
    let removed = loader::uninstall(bpffs)?;
    match hostside::uninstall(host_netns)? {
        hostside::Removal::Removed => println!("removed the host-side table `inet {}`", hostside::TABLE),
        hostside::Removal::NotThere => {}
        hostside::Removal::NotPermitted(why) => eprintln!(
            "metadata-guard: warning: the host-side table `inet {}` was not checked: {why}; run uninstall \
             in the host network namespace with CAP_NET_ADMIN to remove it",
            hostside::TABLE
        ),
    }
    if removed.is_empty() {
        println!("nothing to remove under {}: the guard is not installed", bpffs.display());
    }
    for dir in removed {
        println!("removed {} (links detached, maps unpinned)", dir.display());
    }
    Ok(())
}
