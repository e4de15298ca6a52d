// SPDX-License-Identifier: Apache-2.0
//! Where audit records go: stdout (the default) or a rotating file.

use std::{
    fmt,
    io::{self, Write},
};

use anyhow::{Context, Result};

use super::{rotate::RotatingFile, AuditSettings};

#[derive(Debug)]
pub(super) enum Sink {
    /// One line per record on stdout; operational logs go to stderr.
    Stdout,
    File(RotatingFile),
    /// Lines kept in memory (without their newline), for tests.
    #[cfg(test)]
    Memory(Vec<String>),
}

impl Sink {
    pub(super) fn open(settings: &AuditSettings) -> Result<Sink> {
        let Some(path) = &settings.log_file else {
            return Ok(Sink::Stdout);
        };
        let file = RotatingFile::open(path, settings.max_size, settings.max_files).with_context(|| {
            format!(
                "could not open the audit log {}: make its directory writable, or unset log_file to write records to stdout",
                path.display()
            )
        })?;
        Ok(Sink::File(file))
    }

    /// Writes `line`, which ends in a newline, whole.
    pub(super) fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Sink::File(file) => file.write_line(line),
            #[cfg(test)]
            Sink::Memory(lines) => {
                let text = std::str::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                lines.push(text.strip_suffix('\n').expect("a record line ends in a newline").to_owned());
                Ok(())
            }
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Stdout => f.write_str("stdout"),
            Sink::File(file) => write!(f, "{}", file.path().display()),
            #[cfg(test)]
            Sink::Memory(_) => f.write_str("memory"),
        }
    }
}
