// SPDX-License-Identifier: Apache-2.0
//! Why the kernel object could not be loaded, typed where aya says it: `check` and a
//! starting agent branch on the kernel's errno (EPERM under a seccomp filter or an LSM
//! calls for another fix than a verifier's refusal), so it is read from aya's own
//! error here, not dug out of a context chain later.

use std::{error::Error, fmt::Display};

/// The kernel refused the object (or a part of it), or the object lacks a program.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub(crate) struct ObjectRefused {
    /// What the kernel answered, when it answered an errno.
    pub errno: Option<i32>,
    error: anyhow::Error,
}

impl ObjectRefused {
    /// aya's `error` while `doing` something with the kernel.
    pub(crate) fn kernel<E: Error + Send + Sync + 'static>(doing: impl Display, error: E) -> Self {
        let errno = errno_of(&error);
        Self { errno, error: anyhow::Error::new(error).context(doing.to_string()) }
    }

    /// The kernel's verifier (or the load syscall) refused program `name`.
    pub(crate) fn program<E: Error + Send + Sync + 'static>(name: &str, error: E) -> Self {
        Self::kernel(format_args!("the kernel's verifier refused program {name}"), error)
    }

    /// Not the kernel's answer: the object lacks `name` (a build that does not match
    /// this agent).
    pub(crate) fn missing(name: &str) -> Self {
        Self { errno: None, error: anyhow::anyhow!("the kernel object has no program {name}") }
    }

    /// Not the kernel's answer (the pin directory, say): no errno to go by.
    pub(crate) fn other(error: anyhow::Error) -> Self {
        Self { errno: None, error }
    }
}

/// The first OS error among `error` and its sources.
fn errno_of(error: &(dyn Error + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(errno) = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) {
            return Some(errno);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the BPF_PROG_LOAD syscall failed")]
    struct LoadFailed(#[source] std::io::Error);

    #[test]
    fn the_kernels_errno_is_read_from_the_source_chain() {
        let e = ObjectRefused::program("mg_connect4", LoadFailed(std::io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(e.errno, Some(libc::EPERM));
        let text = e.to_string();
        assert!(text.starts_with("the kernel's verifier refused program mg_connect4: "), "{text}");
    }

    #[test]
    fn a_missing_program_has_no_errno() {
        assert_eq!(ObjectRefused::missing("mg_x").errno, None);
        assert_eq!(ObjectRefused::kernel("loading", std::fmt::Error).errno, None);
    }
}
