// SPDX-License-Identifier: Apache-2.0
//! The commands, one file each; `cli.rs` parses the command line and calls them.

pub mod apply;
pub mod check;
pub mod presets;
pub mod run;
pub mod status;
pub mod uninstall;
