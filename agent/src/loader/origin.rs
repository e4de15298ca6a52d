// SPDX-License-Identifier: Apache-2.0
//! Which command of which version put the enforcement in the kernel, and which last
//! updated it, so that `status` and `check` can say "installed by apply 0.1.0".
//!
//! bpffs holds only directories and pins, and refuses names with a dot, so the record
//! is a directory name with the version's dots as underscores (semver has none):
//! `<version dir>/installed-by/<command>@0_1_0` (written when an install found no
//! link pinned, i.e. started enforcement) and `.../updated-by/<command>@0_1_0`
//! (every install or adoption).

use std::{fs, io, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::pins::PinLayout;

pub(crate) const INSTALLED_BY: &str = "installed-by";
pub(crate) const UPDATED_BY: &str = "updated-by";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `apply` or `run`.
    pub command: String,
    pub version: String,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.command, self.version)
    }
}

impl Origin {
    /// This binary, running `command`.
    pub fn this(command: &str) -> Origin {
        Origin { command: command.to_string(), version: env!("CARGO_PKG_VERSION").to_string() }
    }
}

/// The installer recorded in any version directory under `layout.root`, ours first:
/// read before an install, so that an agent of a new layout keeps the record of the
/// enforcement it took over.
pub(crate) fn installer(layout: &PinLayout) -> Option<Origin> {
    std::iter::once(layout.dir.clone()).chain(layout.other_versions()).find_map(|dir| read_dir(&dir, INSTALLED_BY))
}

/// Records `origin` as the latest updater; as the installer, `previous` (the
/// installer of the enforcement this install took over, see [`installer`]) or, when
/// there was none and this install attached every link itself (`started`), `origin`.
pub(crate) fn record(layout: &PinLayout, origin: &Origin, previous: Option<Origin>, started: bool) -> Result<()> {
    match previous {
        Some(previous) => write(layout, INSTALLED_BY, &previous)?,
        None if started || read(layout, INSTALLED_BY).is_none() => write(layout, INSTALLED_BY, origin)?,
        None => {}
    }
    write(layout, UPDATED_BY, origin)
}

pub(crate) fn read(layout: &PinLayout, which: &str) -> Option<Origin> {
    read_dir(&layout.dir, which)
}

fn read_dir(version_dir: &Path, which: &str) -> Option<Origin> {
    let entry = fs::read_dir(version_dir.join(which)).ok()?.filter_map(std::result::Result::ok).next()?;
    let name = entry.file_name().into_string().ok()?;
    let (command, version) = name.split_once('@')?;
    Some(Origin { command: command.to_string(), version: version.replace('_', ".") })
}

fn write(layout: &PinLayout, which: &str, origin: &Origin) -> Result<()> {
    let dir = layout.dir.join(which);
    clear(&dir).with_context(|| format!("could not clear {}", dir.display()))?;
    let entry = dir.join(format!("{}@{}", origin.command, origin.version.replace('.', "_")));
    fs::create_dir_all(&entry).with_context(|| format!("could not record the installer at {}", entry.display()))
}

/// Removes the record directory `dir` and what is in it (directories only).
pub(crate) fn clear(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        fs::remove_dir(entry?.path())?;
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installer_stays_and_the_updater_follows() {
        let root = tempfile::tempdir().unwrap();
        let layout = PinLayout::new(root.path());
        fs::create_dir_all(&layout.dir).unwrap();
        assert_eq!(read(&layout, INSTALLED_BY), None);
        let apply = Origin { command: "apply".into(), version: "0.1.0".into() };
        record(&layout, &apply, None, true).unwrap();
        let run = Origin { command: "run".into(), version: "0.2.0".into() };
        record(&layout, &run, installer(&layout), false).unwrap();
        assert_eq!(read(&layout, INSTALLED_BY), Some(apply.clone()));
        assert_eq!(read(&layout, UPDATED_BY), Some(run.clone()));

        // An agent of another layout version takes over: the installer carries over.
        let newer = PinLayout { root: layout.root.clone(), dir: layout.root.join("v99") };
        fs::create_dir_all(&newer.dir).unwrap();
        record(&newer, &run, installer(&newer), true).unwrap();
        assert_eq!(read(&newer, INSTALLED_BY), Some(apply));

        // Enforcement started afresh (nothing installed before) names its own starter.
        clear(&layout.dir.join(INSTALLED_BY)).unwrap();
        record(&layout, &run, None, true).unwrap();
        assert_eq!(read(&layout, INSTALLED_BY), Some(run));
        for which in [INSTALLED_BY, UPDATED_BY] {
            clear(&newer.dir.join(which)).unwrap();
        }
        fs::remove_dir(&newer.dir).unwrap();
        clear(&layout.dir.join(INSTALLED_BY)).unwrap();
        clear(&layout.dir.join(UPDATED_BY)).unwrap();
        assert_eq!(fs::read_dir(&layout.dir).unwrap().count(), 0);
    }
}
