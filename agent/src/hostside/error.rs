// SPDX-License-Identifier: Apache-2.0
//! Why a request about the host-side table failed, sorted where the errno is known
//! (at the netlink socket) into the cases callers act on: `status` reports a table it
//! may not read, `uninstall` warns instead of failing, a table deleted while being
//! read is no table. Nothing downstream digs an errno out of an error chain.

use std::io;

use metadata_guard_netfilter::NetlinkError;

use super::TABLE;

/// A failed nf_tables (or rtnetlink) request about the host-side table. Each says
/// what failed; the kernel's answer is its source. What to do is the caller's to
/// say, as only it knows what was being attempted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TableError {
    /// `ENOENT`: the table is not there, or went while it was being read.
    #[error("{doing}")]
    Absent {
        doing: String,
        #[source]
        source: io::Error,
    },
    /// `EPERM`: the kernel answers no nf_tables request without `CAP_NET_ADMIN` in
    /// the host network namespace (nor lets a process enter it without
    /// `CAP_SYS_ADMIN`).
    #[error("{doing}")]
    NotPermitted {
        doing: String,
        #[source]
        source: io::Error,
    },
    /// A running agent's socket owns the table: no other process can change it,
    /// whatever its capabilities.
    #[error(
        "could not delete the host-side table `inet {TABLE}`: a running agent owns it (its netlink socket, port \
         {port}) and the kernel lets no other process change it; stop the agent first (delete the DaemonSet, or \
         stop `metadata-guard run`), then run uninstall again"
    )]
    Owned { port: u32 },
    /// Anything else the kernel (or the socket) answered.
    #[error("{doing}")]
    Failed {
        doing: String,
        #[source]
        source: io::Error,
    },
}

impl TableError {
    /// Sorts a failed netlink exchange by its errno; `doing` says what failed, on what.
    pub(crate) fn netlink(doing: impl Into<String>, source: io::Error) -> TableError {
        let doing = doing.into();
        match NetlinkError::errno_of(&source) {
            Some(libc::ENOENT) => TableError::Absent { doing, source },
            Some(libc::EPERM) => TableError::NotPermitted { doing, source },
            _ => TableError::Failed { doing, source },
        }
    }

    /// The error with its causes, `doing: kernel's answer`, for a report line.
    pub(crate) fn explained(self) -> String {
        format!("{:#}", anyhow::Error::from(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(errno: i32) -> io::Error {
        io::Error::other(NetlinkError { index: 0, errno, kernel_message: None })
    }

    #[test]
    fn the_errno_decides_the_case_whether_the_kernel_refused_or_the_call_failed() {
        assert!(matches!(TableError::netlink("reading", refused(libc::ENOENT)), TableError::Absent { .. }));
        assert!(matches!(TableError::netlink("reading", refused(libc::EPERM)), TableError::NotPermitted { .. }));
        assert!(matches!(TableError::netlink("reading", refused(libc::EINVAL)), TableError::Failed { .. }));
        // setns(2) into the host namespace, refused before any netlink.
        let setns = io::Error::from_raw_os_error(libc::EPERM);
        assert!(matches!(TableError::netlink("entering", setns), TableError::NotPermitted { .. }));
        let other = io::Error::other("the thread panicked");
        assert!(matches!(TableError::netlink("opening", other), TableError::Failed { .. }));
    }

    #[test]
    fn it_says_what_failed_then_the_kernels_answer() {
        let e = TableError::netlink("could not read the host-side table's counters", refused(libc::EPERM));
        assert_eq!(
            e.explained(),
            "could not read the host-side table's counters: message 0 was refused: Operation not permitted (os error 1)"
        );
    }
}
