// SPDX-License-Identifier: Apache-2.0
//! Loading the kernel object: its maps created (or reused from their pins) and every
//! program verified, before anything is attached. What `check` proves possible and
//! what `run` and `apply` continue from (`Guard::install`).

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};

use super::{pins::PinLayout, programs, remove_pins, Backstop, ObjectRefused, Plan, OBJECT, PINNED_MAPS};

/// The kernel object in the kernel: its maps created (or reused from their pins) and
/// every program the backstop's plans attach verified; nothing attached yet.
pub(crate) struct Loaded {
    pub(super) ebpf: Ebpf,
    pub(super) backstop: Backstop,
}

/// Loads the embedded object: the maps, pinned under `pins` (reusing pinned ones)
/// when given, and every program the guard attaches with `backstop` (in any mode),
/// verified by the kernel. An error
/// here is the kernel refusing the object or its maps: `check` and a starting agent
/// explain it alike (`preflight`). A failed first load leaves nothing pinned.
pub(crate) fn load(pins: Option<&PinLayout>, backstop: Backstop) -> Result<Loaded, ObjectRefused> {
    let Some(pins) = pins else { return load_programs(EbpfLoader::new().load(OBJECT), backstop) };
    let first = !pins.dir.exists();
    let maps = pins.maps_dir();
    fs::create_dir_all(&maps)
        .with_context(|| format!("could not create pin directory {}", maps.display()))
        .map_err(ObjectRefused::other)?;
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|&name| (name, pins.map(name))).collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let loaded = load_programs(loader.load(OBJECT), backstop);
    if loaded.is_err() && first {
        // The maps pinned so far would make `check` report an installed guard.
        if let Err(e) = remove_pins(&pins.dir) {
            tracing::warn!("could not remove the maps pinned by the failed load: {e:#}");
        }
    }
    loaded
}

fn load_programs(ebpf: Result<Ebpf, aya::EbpfError>, backstop: Backstop) -> Result<Loaded, ObjectRefused> {
    let mut ebpf = ebpf.map_err(|e| ObjectRefused::kernel("could not create the guard's maps", e))?;
    // The mode does not matter here: every mode's programs are loaded.
    let plan = Plan { mode: metadata_guard_common::MODE_ENFORCE, backstop };
    for attachment in plan.loaded() {
        programs::load(&mut ebpf, attachment, plan)?;
    }
    // The uplink's tc program, of the same backstop: verified with the rest, so that
    // `check` proves it too.
    let name = super::uplink::program_name(backstop);
    let uplink: &mut aya::programs::SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| ObjectRefused::missing(name))?
        .try_into()
        .map_err(|e| ObjectRefused::program(name, e))?;
    uplink.load().map_err(|e| ObjectRefused::program(name, e))?;
    Ok(Loaded { ebpf, backstop })
}

/// Loads the embedded object as `run` does (maps created, every program verified, the
/// netns probe's too) without pinning or attaching anything; all of it is freed on
/// return. `check` uses it to prove this process's privileges are enough.
pub(crate) fn verify_object() -> Result<(), ObjectRefused> {
    let Loaded { mut ebpf, .. } = load(None, Backstop::detect())?;
    let name = metadata_guard_common::program_names::NETNS_PROBE;
    let probe: &mut aya::programs::CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| ObjectRefused::missing(name))?
        .try_into()
        .map_err(|e| ObjectRefused::program(name, e))?;
    probe.load().map_err(|e| ObjectRefused::program(name, e))
}
