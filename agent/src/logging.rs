// SPDX-License-Identifier: Apache-2.0
//! Operational logs: stderr, text or JSON lines, colours only for a terminal (a
//! container's stderr is a pipe into the node's log files).

use std::io::IsTerminal;

/// The operational log's format (`--log-format`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

pub(crate) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METADATA_GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The error that ends the process, in the same format as every other message.
pub fn fatal(error: &anyhow::Error) {
    tracing::error!(target: "metadata_guard", "{error:#}");
}
