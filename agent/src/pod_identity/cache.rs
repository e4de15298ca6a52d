// SPDX-License-Identifier: Apache-2.0
//! A map keyed by cgroup id that forgets its oldest entries past a capacity.

use std::collections::{BTreeMap, HashMap};

pub(super) struct BoundedCache<V> {
    capacity: usize,
    /// Value and insertion sequence number by key.
    entries: HashMap<u64, (u64, V)>,
    /// Keys by insertion sequence number, oldest first.
    order: BTreeMap<u64, u64>,
    next_seq: u64,
}

impl<V> BoundedCache<V> {
    pub(super) fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a cache that holds nothing would evict what it just inserted");
        BoundedCache { capacity, entries: HashMap::new(), order: BTreeMap::new(), next_seq: 0 }
    }

    pub(super) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.entries.get_mut(&key).map(|(_, value)| value)
    }

    /// Inserts or replaces `key`, which then counts as the newest entry.
    pub(super) fn insert(&mut self, key: u64, value: V) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((old_seq, _)) = self.entries.insert(key, (seq, value)) {
            self.order.remove(&old_seq);
        }
        self.order.insert(seq, key);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    /// Keeps the entries `keep` accepts; returns how many it dropped.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u64, &V) -> bool) -> usize {
        let before = self.entries.len();
        let order = &mut self.order;
        self.entries.retain(|&key, (seq, value)| {
            let kept = keep(key, value);
            if !kept {
                order.remove(seq);
            }
            kept
        });
        before - self.entries.len()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, key: u64) -> bool {
        self.entries.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_capacity_the_oldest_insertion_goes() {
        let mut cache = BoundedCache::new(2);
        cache.insert(10, "a");
        cache.insert(20, "b");
        cache.insert(30, "c");
        assert_eq!(cache.len(), 2);
        assert!(!cache.contains(10));
        assert!(cache.contains(20) && cache.contains(30));
    }

    #[test]
    fn replacing_an_entry_makes_it_the_newest_without_counting_twice() {
        let mut cache = BoundedCache::new(2);
        cache.insert(10, "a");
        cache.insert(20, "b");
        cache.insert(10, "a2");
        assert_eq!(cache.len(), 2);
        cache.insert(30, "c");
        assert!(!cache.contains(20), "20 was the oldest once 10 was replaced");
        assert_eq!(cache.get_mut(10), Some(&mut "a2"));
    }

    #[test]
    fn an_entry_dropped_and_inserted_again_counts_as_new() {
        let mut cache = BoundedCache::new(2);
        cache.insert(10, "a");
        cache.insert(20, "b");
        assert_eq!(cache.retain(|key, _| key != 10), 1);
        cache.insert(10, "a2");
        cache.insert(30, "c");
        assert!(!cache.contains(20), "20 is the oldest entry left");
        assert!(cache.contains(10) && cache.contains(30));
    }
}
