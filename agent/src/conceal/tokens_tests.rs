// SPDX-License-Identifier: Apache-2.0
use super::*;

const POD_A: Holder = Holder::Netns(11);
const POD_B: Holder = Holder::Netns(12);

#[test]
fn a_token_works_for_its_pod_only_and_until_it_expires() {
    let tokens = PodTokens::default();
    let now = Instant::now();
    let t = tokens.mint(POD_A, Duration::from_secs(2), now).unwrap();
    assert_eq!(t.len(), 64, "256 bits, hex");
    assert!(tokens.valid(POD_A, &t, now));
    assert!(tokens.valid(POD_A, &t, now + Duration::from_millis(1999)));
    assert!(!tokens.valid(POD_A, &t, now + Duration::from_secs(2)), "expired");
    assert!(!tokens.valid(POD_B, &t, now), "minted for another pod");
    assert!(!tokens.valid(POD_A, &t.to_uppercase().replace('A', "b"), now));
    assert!(!tokens.valid(POD_A, "", now));
    assert!(!tokens.valid(POD_A, &"0".repeat(64), now));
    let u = tokens.mint(POD_A, Duration::from_secs(2), now).unwrap();
    assert_ne!(t, u, "tokens are random");
}

#[test]
fn the_ttl_is_read_as_imds_reads_it() {
    assert_eq!(requested_ttl(Some("21600")), Ok(Duration::from_secs(21_600)));
    assert_eq!(requested_ttl(Some("1")), Ok(Duration::from_secs(1)));
    assert_eq!(requested_ttl(None), Err(TtlError::Missing));
    for bad in ["0", "21601", "-1", "", "1e3", "60s", " ", "999999999999", "+60"] {
        assert_eq!(requested_ttl(Some(bad)), Err(TtlError::Invalid), "{bad:?}");
    }
}

#[test]
fn memory_is_bounded_per_pod_and_expired_tokens_are_swept() {
    let tokens = PodTokens::default();
    let now = Instant::now();
    let first = tokens.mint(POD_A, Duration::from_secs(100), now).unwrap();
    for _ in 0..TOKENS_PER_POD {
        tokens.mint(POD_A, Duration::from_secs(100), now).unwrap();
    }
    assert_eq!(tokens.held(), TOKENS_PER_POD);
    assert!(!tokens.valid(POD_A, &first, now), "the oldest was retired");
    let later = now + Duration::from_secs(101);
    tokens.mint(POD_B, Duration::from_secs(5), later).unwrap();
    assert_eq!(tokens.held(), 1, "the expired tokens of every pod were swept");
}

#[test]
fn a_full_table_of_pods_makes_room_by_the_soonest_to_expire() {
    let tokens = PodTokens::default();
    let now = Instant::now();
    for n in 0..MAX_HOLDERS as u64 {
        tokens.mint(Holder::Netns(1000 + n), Duration::from_secs(1000 + n), now).unwrap();
    }
    let fresh = tokens.mint(POD_A, Duration::from_secs(10), now).unwrap();
    assert!(tokens.valid(POD_A, &fresh, now));
    assert_eq!(tokens.held(), MAX_HOLDERS);
}

#[test]
fn the_upstream_token_is_renewed_before_it_expires_and_retried_after_a_failure() {
    let now = Instant::now();
    let mut up = UpstreamToken::default();
    assert!(up.current(now).is_none() && up.may_fetch(now));
    up.fetched("agent".into(), now);
    assert_eq!(up.current(now), Some("agent"));
    assert!(up.current(now + UPSTREAM_TTL - UPSTREAM_RENEW_BEFORE).is_none(), "renewed before expiry");
    up.failed(now);
    assert!(!up.may_fetch(now) && up.may_fetch(now + UPSTREAM_RETRY));
    up.fetched("again".into(), now);
    up.forget();
    assert!(up.current(now).is_none() && up.may_fetch(now));
}

#[test]
fn holders_are_the_pods_namespace_or_else_its_cgroup() {
    assert_eq!(Holder::of(5, 9), Holder::Netns(5));
    assert_eq!(Holder::of(0, 9), Holder::Cgroup(9));
}
