//! The `--uplinks` choice in force, recorded beside the pins so that `status` (which
//! reads the kernel's state, not the agent's flags) judges the same devices.
//!
//! bpffs holds only directories and pins and refuses names with a dot, so the record
//! is a directory name: `<version dir>/uplinks/<spec>`, dots as `~`.

use std::{fs, io, path::Path};

use anyhow::{Context, Result};

use super::UplinkSpec;
use crate::loader::pins::PinLayout;

const RECORD_DIR: &str = "uplinks";

fn encode(spec: &UplinkSpec) -> String {
    spec.to_string().replace('.', "~")
}

/// Records `spec` as the choice in force (replacing any other).
pub fn write(layout: &PinLayout, spec: &UplinkSpec) -> Result<()> {
    let dir = layout.dir.join(RECORD_DIR);
    clear(&dir).with_context(|| format!("could not clear {}", dir.display()))?;
    let path = dir.join(encode(spec));
    fs::create_dir_all(&path).with_context(|| format!("could not record the uplink choice at {}", path.display()))
}

/// The recorded choice; `auto` when none was recorded.
pub fn read(layout: &PinLayout) -> UplinkSpec {
    let Ok(mut entries) = fs::read_dir(layout.dir.join(RECORD_DIR)) else { return UplinkSpec::Auto };
    entries
        .find_map(|e| e.ok()?.file_name().to_str().map(|n| n.replace('~', ".")))
        .and_then(|text| UplinkSpec::parse(&text).ok())
        .unwrap_or(UplinkSpec::Auto)
}

/// Removes the record (uninstall).
pub fn clear(dir: &Path) -> io::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        fs::remove_dir(entry?.path())?;
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The record's directory under a version directory (for `remove_pins`).
pub fn dir_of(version_dir: &Path) -> std::path::PathBuf {
    version_dir.join(RECORD_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_choice_reads_back_with_its_dots() {
        let root = tempfile::tempdir().unwrap();
        let layout = PinLayout::new(root.path());
        assert_eq!(read(&layout), UplinkSpec::Auto);
        let spec = UplinkSpec::parse("bond0.100,eth1").unwrap();
        write(&layout, &spec).unwrap();
        assert_eq!(read(&layout), spec);
        write(&layout, &UplinkSpec::None).unwrap();
        assert_eq!(read(&layout), UplinkSpec::None);
        clear(&dir_of(&layout.dir)).unwrap();
        assert_eq!(read(&layout), UplinkSpec::Auto);
    }
}
