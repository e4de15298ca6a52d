// SPDX-License-Identifier: Apache-2.0
//! The commands, one file each; `cli.rs` parses the command line and calls them.

pub(crate) mod apply;
pub(crate) mod check;
pub(crate) mod presets;
pub(crate) mod run;
pub(crate) mod status;
pub(crate) mod uninstall;
