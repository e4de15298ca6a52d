// SPDX-License-Identifier: Apache-2.0
//! The readiness registry: each subsystem registers a named condition (in its
//! constructor, before the supervisor starts anything) and says whether it holds;
//! `/readyz` (see [`crate::http`]) answers 200 only when every one does.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// What `/readyz` reports: named conditions registered by the subsystems, each
/// either met or missing with a reason.
#[derive(Default)]
pub(crate) struct Readiness {
    conditions: Mutex<BTreeMap<&'static str, Option<String>>>,
}

/// One subsystem's readiness condition; starts missing.
#[derive(Clone)]
pub(crate) struct Condition {
    readiness: Arc<Readiness>,
    name: &'static str,
}

impl Readiness {
    /// Registers `name`, missing (with `why`) until [`Condition::ready`] is called.
    pub(crate) fn condition(self: &Arc<Self>, name: &'static str, why: &str) -> Condition {
        self.conditions.lock().unwrap().insert(name, Some(why.to_string()));
        Condition { readiness: self.clone(), name }
    }

    /// Empty when ready; else `name: reason` for each missing condition.
    pub(crate) fn missing(&self) -> Vec<String> {
        let conditions = self.conditions.lock().unwrap();
        conditions.iter().filter_map(|(name, why)| why.as_ref().map(|w| format!("{name}: {w}"))).collect()
    }
}

impl Condition {
    pub(crate) fn ready(&self) {
        self.readiness.conditions.lock().unwrap().insert(self.name, None);
    }

    pub(crate) fn missing(&self, why: impl Into<String>) {
        self.readiness.conditions.lock().unwrap().insert(self.name, Some(why.into()));
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.readiness.conditions.lock().unwrap().get(self.name).is_some_and(Option::is_none)
    }
}
