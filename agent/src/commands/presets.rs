// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard presets`: the destination presets, what each blocks and what it
//! leaves open.

use crate::policy;

pub(crate) fn presets() {
    for preset in policy::Preset::ALL {
        println!("{}\n  {}", preset.name(), preset.describe());
        for rule in preset.rules() {
            println!("    block {rule}");
        }
    }
}
