// SPDX-License-Identifier: Apache-2.0
//! Each pod's credentials, kept until shortly before they expire.
//!
//! Keyed by the pod's UID (from the kernel's record, never from the request), so no
//! two pods ever share an entry, and a pod that reuses a deleted pod's address is a
//! different key. One exchange at a time per pod: concurrent requests of a pod wait
//! for the one exchange in flight and take its answer, so a storm of requests makes
//! one STS call per pod per refresh. A failed exchange is remembered for a moment, so
//! a storm against a failing STS does not become a storm of STS calls either.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::sts::{Issued, StsFailure};

/// How long a failed exchange answers for the pod before STS is asked again.
pub(crate) const FAILURE_HOLD: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct CredentialCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

#[derive(Default)]
struct Slot {
    /// The role the entry is for: a reload that gives the pod another role starts afresh.
    role: String,
    issued: Option<Issued>,
    failed: Option<(StsFailure, SystemTime)>,
}

impl CredentialCache {
    /// `pod_uid`'s credentials for `role`: the kept ones while more than
    /// `refresh_before` is left on them, else `fetch`'s. When a refresh fails, the
    /// kept ones are served while they are still valid.
    pub(crate) async fn get<F, Fut>(
        &self,
        pod_uid: &str,
        role: &str,
        now: impl Fn() -> SystemTime,
        refresh_before: Duration,
        fetch: F,
    ) -> Result<Issued, StsFailure>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, StsFailure>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slots.entry(pod_uid.to_owned()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if slot.role != role {
            *slot = Slot { role: role.to_owned(), ..Slot::default() };
        }
        let t = now();
        let still_valid = |slot: &Slot| slot.issued.clone().filter(|i| t < i.expiration);
        if let Some(issued) = slot.issued.as_ref().filter(|i| t + refresh_before < i.expiration) {
            return Ok(issued.clone());
        }
        if let Some((failure, until)) = &slot.failed {
            if t < *until {
                return still_valid(&slot).ok_or_else(|| failure.clone());
            }
        }
        match fetch().await {
            Ok(issued) => {
                slot.failed = None;
                slot.issued = Some(issued.clone());
                Ok(issued)
            }
            Err(failure) => {
                slot.failed = Some((failure.clone(), now() + FAILURE_HOLD));
                still_valid(&slot).ok_or(failure)
            }
        }
    }

    /// The kept credentials of `pod_uid` for `role`, if any and still valid at `now`.
    #[cfg(test)]
    pub(crate) fn peek(&self, pod_uid: &str, role: &str, now: SystemTime) -> Option<Issued> {
        let slot = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(pod_uid)?.clone();
        let slot = slot.try_lock().ok()?;
        slot.issued.clone().filter(|i| slot.role == role && now < i.expiration)
    }

    /// Drops `pod_uid`'s entry (it has no role any more).
    pub(crate) fn remove(&self, pod_uid: &str) {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(pod_uid);
    }

    /// Keeps the entries of pods `alive` says are still there.
    pub(crate) fn retain(&self, alive: &dyn Fn(&str) -> bool) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = slots.len();
        slots.retain(|uid, _| alive(uid));
        before - slots.len()
    }

    /// Pods with an entry.
    pub(crate) fn pods(&self) -> usize {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::UNIX_EPOCH,
    };

    use super::*;

    fn issued(key: &str, expires_at: u64) -> Issued {
        Issued {
            access_key_id: key.into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration: UNIX_EPOCH + Duration::from_secs(expires_at),
            role_id: None,
            assumed_arn: None,
            issued_at: UNIX_EPOCH,
        }
    }

    const MARGIN: Duration = Duration::from_secs(900);

    fn at(secs: u64) -> impl Fn() -> SystemTime {
        move || UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn credentials_are_kept_until_the_margin_before_expiry_then_refreshed() {
        let cache = CredentialCache::default();
        let calls = AtomicU32::new(0);
        let fetch = |key: &'static str| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(issued(key, 3600)) }
        };
        assert_eq!(cache.get("pod-a", "r", at(0), MARGIN, || fetch("K1")).await.unwrap().access_key_id, "K1");
        assert_eq!(cache.get("pod-a", "r", at(2699), MARGIN, || fetch("K2")).await.unwrap().access_key_id, "K1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get("pod-a", "r", at(2700), MARGIN, || fetch("K2")).await.unwrap().access_key_id, "K2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn pods_never_share_credentials_and_a_new_role_starts_afresh() {
        let cache = CredentialCache::default();
        cache.get("pod-a", "r", at(0), MARGIN, || async { Ok(issued("A", 3600)) }).await.unwrap();
        let b = cache.get("pod-b", "r", at(0), MARGIN, || async { Ok(issued("B", 3600)) }).await.unwrap();
        assert_eq!(b.access_key_id, "B");
        let other_role = cache.get("pod-a", "r2", at(1), MARGIN, || async { Ok(issued("A2", 3600)) }).await.unwrap();
        assert_eq!(other_role.access_key_id, "A2");
        assert!(cache.peek("pod-a", "r", UNIX_EPOCH).is_none());
    }

    #[tokio::test]
    async fn a_storm_of_requests_of_one_pod_makes_one_exchange() {
        let cache = Arc::new(CredentialCache::default());
        let calls = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get("pod-a", "r", at(0), MARGIN, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(issued("K", 3600))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().access_key_id, "K");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_is_held_briefly_and_valid_credentials_outlive_a_failed_refresh() {
        let cache = CredentialCache::default();
        let fail = || async { Err(StsFailure::new("STSUnreachable", "down")) };
        assert_eq!(cache.get("p", "r", at(0), MARGIN, fail).await.unwrap_err().code, "STSUnreachable");
        let ok = cache.get("p", "r", at(1), MARGIN, || async { Ok(issued("never", 3600)) }).await;
        assert_eq!(ok.unwrap_err().code, "STSUnreachable", "within the hold, STS is not asked again");
        assert_eq!(
            cache.get("p", "r", at(10), MARGIN, || async { Ok(issued("K", 1000)) }).await.unwrap().access_key_id,
            "K"
        );
        // 1000 - 900 = 100: from then on a refresh is due; it fails, the old ones still serve.
        assert_eq!(cache.get("p", "r", at(500), MARGIN, fail).await.unwrap().access_key_id, "K");
        assert_eq!(cache.get("p", "r", at(1000), MARGIN, fail).await.unwrap_err().code, "STSUnreachable");
    }

    #[tokio::test]
    async fn gone_pods_are_forgotten() {
        let cache = CredentialCache::default();
        for pod in ["a", "b"] {
            cache.get(pod, "r", at(0), MARGIN, || async { Ok(issued(pod, 3600)) }).await.unwrap();
        }
        assert_eq!(cache.retain(&|uid| uid == "b"), 1);
        assert_eq!(cache.pods(), 1);
        assert!(cache.peek("a", "r", UNIX_EPOCH).is_none());
    }
}
