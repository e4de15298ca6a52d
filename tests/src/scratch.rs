// SPDX-License-Identifier: Apache-2.0
//! A test's own directory, with a bpffs of its own mounted in it so that the test's
//! pins never meet a real guard's.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

/// `<temp>/<name>-<pid>` with a private bpffs at `bpffs/`. Dropping it unmounts the
/// bpffs (every pin in it goes, and the links they held detach) and removes the
/// directory.
#[derive(Debug)]
pub struct Scratch {
    pub dir: PathBuf,
    pub bpffs: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs).with_context(|| format!("could not create {}", bpffs.display()))?;
        // Owned from here on: a failed mount still removes the directory.
        let scratch = Scratch { dir, bpffs };
        nix::mount::mount(Some("bpf"), &scratch.bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("could not mount a private bpffs on {}", scratch.bpffs.display()))?;
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
