// SPDX-License-Identifier: Apache-2.0
//! Deduplication windows: identical attempts within a window share one record.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    attempt::{Attempt, Protocol},
    pod_identity::Workload,
};

/// What makes two attempts the same for the audit trail. Fields not in the key
/// (pid, comm, hook, mapped) are reported from the latest attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    source: Source,
    destination: IpAddr,
    port: u16,
    protocol: Protocol,
    // `Verdict` is not `Hash`; its discriminant is.
    verdict: u8,
    /// Refused proxy requests: one record per method, path and rule.
    request: Option<crate::attempt::ConcealedRequest>,
    /// Host-side attempts carry their packet's source address: they are kept apart
    /// from the socket hooks' (an audited connect is judged by both), and unnamed
    /// sources apart from each other.
    packet_source: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Source {
    // The container name rides along for runtimes whose id is not known yet, so
    // two containers of one pod never share a record.
    Pod { pod_uid: String, container_id: Option<String>, container: Option<String> },
    Host { cgroup_path: String },
    // Without a name, the cgroup is the only identity there is.
    Unknown { cgroup_id: u64 },
}

impl Key {
    pub(super) fn of(attempt: &Attempt, workload: &Workload) -> Key {
        let source = match workload {
            Workload::Pod(pod) => Source::Pod {
                pod_uid: pod.pod_uid.clone(),
                container_id: pod.container_id.clone(),
                container: pod.container.clone(),
            },
            Workload::Host { cgroup_path } => Source::Host { cgroup_path: cgroup_path.clone() },
            Workload::Unknown => Source::Unknown { cgroup_id: attempt.cgroup_id },
        };
        Key {
            source,
            destination: attempt.destination,
            port: attempt.port,
            protocol: attempt.protocol,
            verdict: attempt.verdict as u8,
            request: attempt.request.clone(),
            packet_source: attempt.source,
        }
    }
}

/// One key's open window.
#[derive(Debug)]
pub(super) struct Window {
    opened: Instant,
    pub workload: Workload,
    /// The most recent attempt, which speaks for the others in the record.
    pub latest: Attempt,
    /// Attempts of this key that no record counts yet.
    pub unreported: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

impl Window {
    fn new(opened: Instant, workload: &Workload, attempt: &Attempt) -> Window {
        Window {
            opened,
            workload: workload.clone(),
            latest: attempt.clone(),
            unreported: 1,
            first_seen: attempt.time,
            last_seen: attempt.time,
        }
    }

    pub(super) fn absorb(&mut self, attempt: &Attempt) {
        // Ring-buffer events from different CPUs can arrive slightly out of order.
        if self.unreported == 0 {
            self.first_seen = attempt.time;
            self.last_seen = attempt.time;
        } else {
            self.first_seen = self.first_seen.min(attempt.time);
            self.last_seen = self.last_seen.max(attempt.time);
        }
        self.unreported += 1;
        self.latest.clone_from(attempt);
    }

    /// A record now counts every attempt absorbed so far.
    pub(super) fn reported(&mut self) {
        self.unreported = 0;
    }
}

/// The open windows, at most `capacity` of them, closed oldest first.
#[derive(Debug)]
pub(super) struct Windows {
    open: HashMap<Key, Window>,
    /// Keys in the order their windows opened. All windows are equally long, so
    /// this is also the order in which they end.
    order: VecDeque<Key>,
    length: Duration,
    capacity: usize,
}

impl Windows {
    pub(super) fn new(length: Duration, capacity: usize) -> Windows {
        Windows { open: HashMap::new(), order: VecDeque::new(), length, capacity }
    }

    pub(super) fn get_mut(&mut self, key: &Key) -> Option<&mut Window> {
        self.open.get_mut(key)
    }

    pub(super) fn is_full(&self) -> bool {
        self.open.len() >= self.capacity
    }

    /// Opens `key`'s window with `attempt` in it. The caller checks that `key` has
    /// no window and that there is room.
    pub(super) fn open(&mut self, key: Key, now: Instant, workload: &Workload, attempt: &Attempt) -> &mut Window {
        debug_assert!(!self.is_full() && !self.open.contains_key(&key));
        self.order.push_back(key.clone());
        self.open.entry(key).insert_entry(Window::new(now, workload, attempt)).into_mut()
    }

    /// Removes the oldest window if it has ended by `now`.
    pub(super) fn pop_ended(&mut self, now: Instant) -> Option<Window> {
        let front = self.order.front()?;
        if self.open[front].opened + self.length > now {
            return None;
        }
        self.pop_oldest()
    }

    /// Removes the oldest window, ended or not.
    pub(super) fn pop_oldest(&mut self) -> Option<Window> {
        let key = self.order.pop_front()?;
        self.open.remove(&key)
    }

    pub(super) fn len(&self) -> usize {
        self.open.len()
    }
}
