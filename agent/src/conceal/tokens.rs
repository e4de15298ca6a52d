// SPDX-License-Identifier: Apache-2.0
//! The proxy's own IMDSv2 session tokens.
//!
//! IMDSv2 rests on two things: the token PUT's answer does not leave the instance's
//! own stack (hop limit 1), and a GET alone never suffices. A proxy that relayed the
//! PUT would hand a pod a live token of the node's, usable from anywhere a GET of the
//! pod's choosing is made. So the proxy answers `PUT /latest/api/token` itself, with a
//! token it mints (256 random bits from the kernel), bound to the pod that asked — the
//! network namespace the kernel recorded for the connection, shared by the pod's
//! containers and by nothing else — for the TTL asked, capped as IMDS caps it. It checks
//! the token on every later request as IMDS does: a token that is unknown, expired or
//! minted for another pod is answered 401. Upstream, the agent uses a token of its own
//! ([`UpstreamToken`]); a pod's token never leaves the proxy and the agent's never
//! reaches a pod.
//!
//! Memory is bounded: at most [`TOKENS_PER_POD`] live tokens per pod (minting more
//! retires the pod's oldest) and [`MAX_HOLDERS`] pods; expired tokens are swept as
//! new ones are minted.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

/// The request header that carries a token, and the one that asks for a TTL.
pub(crate) const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub(crate) const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// IMDS's longest token life (6 hours); 1 second is its shortest.
pub(crate) const MAX_TTL_SECONDS: u64 = 21_600;
/// Live tokens one pod holds; SDKs hold one, refreshed before it expires.
pub(crate) const TOKENS_PER_POD: usize = 32;
/// Pods holding tokens at once (a node runs a few hundred at most).
pub(crate) const MAX_HOLDERS: usize = 4096;
/// Random bytes in a token: 256 bits.
const TOKEN_BYTES: usize = 32;
/// How often a mint sweeps every pod's expired tokens.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Who a token is bound to: the kernel's record of the connection that asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    /// The pod's network namespace (its cookie): every container of the pod, only it.
    Netns(u64),
    /// A kernel that recorded no namespace cookie: the container's cgroup.
    Cgroup(u64),
}

impl Holder {
    pub(crate) fn of(netns_cookie: u64, cgroup_id: u64) -> Holder {
        if netns_cookie != 0 {
            Holder::Netns(netns_cookie)
        } else {
            Holder::Cgroup(cgroup_id)
        }
    }
}

/// Why a token PUT is refused (each answered 400, as IMDS does).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TtlError {
    #[error("the token PUT has no `X-aws-ec2-metadata-token-ttl-seconds` header")]
    Missing,
    #[error("`X-aws-ec2-metadata-token-ttl-seconds` must be a whole number of seconds from 1 to {MAX_TTL_SECONDS}")]
    Invalid,
}

/// The TTL a token PUT asks for, as IMDS reads it.
pub(crate) fn requested_ttl(header: Option<&str>) -> Result<Duration, TtlError> {
    let text = header.ok_or(TtlError::Missing)?.trim();
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TtlError::Invalid);
    }
    let seconds: u64 = text.parse().map_err(|_| TtlError::Invalid)?;
    if !(1..=MAX_TTL_SECONDS).contains(&seconds) {
        return Err(TtlError::Invalid);
    }
    Ok(Duration::from_secs(seconds))
}

type Secret = [u8; TOKEN_BYTES];

struct Minted {
    holder: Holder,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    by_token: HashMap<Secret, Minted>,
    /// Each holder's live tokens, oldest first.
    by_holder: HashMap<Holder, VecDeque<Secret>>,
    last_sweep: Option<Instant>,
}

/// The tokens the proxy has minted for pods.
#[derive(Default)]
pub(crate) struct PodTokens(Mutex<Inner>);

impl PodTokens {
    /// A new token for `holder`, valid for `ttl` from `now`, as the text a client sends back.
    pub(crate) fn mint(&self, holder: Holder, ttl: Duration, now: Instant) -> std::io::Result<String> {
        let mut secret = [0u8; TOKEN_BYTES];
        fill_random(&mut secret)?;
        let mut inner = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.last_sweep.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            inner.sweep(now);
        }
        inner.forget_expired(holder, now);
        if !inner.by_holder.contains_key(&holder) && inner.by_holder.len() >= MAX_HOLDERS {
            inner.sweep(now);
            if inner.by_holder.len() >= MAX_HOLDERS {
                inner.evict_soonest_holder();
            }
        }
        let queue = inner.by_holder.entry(holder).or_default();
        queue.push_back(secret);
        let retired = (queue.len() > TOKENS_PER_POD).then(|| queue.pop_front()).flatten();
        if let Some(old) = retired {
            inner.by_token.remove(&old);
        }
        inner.by_token.insert(secret, Minted { holder, expires: now + ttl });
        Ok(hex(&secret))
    }

    /// Whether `token` is a live token minted for `holder`.
    pub(crate) fn valid(&self, holder: Holder, token: &str, now: Instant) -> bool {
        let Some(secret) = unhex(token.trim()) else { return false };
        let inner = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.by_token.get(&secret).is_some_and(|m| m.holder == holder && now < m.expires)
    }

    /// Tokens held (live or not yet swept).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).by_token.len()
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant) {
        self.by_token.retain(|_, m| now < m.expires);
        let by_token = &self.by_token;
        self.by_holder.retain(|_, q| {
            q.retain(|s| by_token.contains_key(s));
            !q.is_empty()
        });
        self.last_sweep = Some(now);
    }

    fn forget_expired(&mut self, holder: Holder, now: Instant) {
        let Some(queue) = self.by_holder.get_mut(&holder) else { return };
        let by_token = &mut self.by_token;
        queue.retain(|s| {
            let live = by_token.get(s).is_some_and(|m| now < m.expires);
            if !live {
                by_token.remove(s);
            }
            live
        });
    }

    /// Makes room for a new pod: the holder whose tokens all expire first goes.
    fn evict_soonest_holder(&mut self) {
        let latest = |q: &VecDeque<Secret>| q.iter().filter_map(|s| self.by_token.get(s)).map(|m| m.expires).max();
        let victim = self.by_holder.iter().min_by_key(|(_, q)| latest(q)).map(|(h, _)| *h);
        if let Some(queue) = victim.and_then(|h| self.by_holder.remove(&h)) {
            for s in queue {
                self.by_token.remove(&s);
            }
        }
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the rest of `buf`; flags 0 blocks only until the
        // kernel's pool is initialised (long before any pod runs).
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Secret> {
    let b = text.as_bytes();
    if b.len() != TOKEN_BYTES * 2 {
        return None;
    }
    let mut out = [0u8; TOKEN_BYTES];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The agent's own token for one metadata endpoint, fetched from the host's network
/// namespace and refreshed before it expires.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpstreamToken {
    pub token: Option<String>,
    pub refresh_at: Option<Instant>,
    /// After a failed fetch: no new attempt before this (requests go without a token).
    pub retry_at: Option<Instant>,
}

/// The TTL the agent asks for its own tokens, and how long before expiry it renews.
pub(crate) const UPSTREAM_TTL: Duration = Duration::from_secs(MAX_TTL_SECONDS);
pub(crate) const UPSTREAM_RENEW_BEFORE: Duration = Duration::from_secs(600);
/// After the service refused or failed a token PUT.
pub(crate) const UPSTREAM_RETRY: Duration = Duration::from_secs(10);

impl UpstreamToken {
    /// The token to use at `now`, if it is live.
    pub(crate) fn current(&self, now: Instant) -> Option<&str> {
        self.token.as_deref().filter(|_| self.refresh_at.is_some_and(|t| now < t))
    }

    /// Whether a fetch may be tried at `now`.
    pub(crate) fn may_fetch(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    pub(crate) fn fetched(&mut self, token: String, now: Instant) {
        self.token = Some(token);
        self.refresh_at = Some(now + UPSTREAM_TTL - UPSTREAM_RENEW_BEFORE);
        self.retry_at = None;
    }

    pub(crate) fn failed(&mut self, now: Instant) {
        self.token = None;
        self.retry_at = Some(now + UPSTREAM_RETRY);
    }

    /// The service said the token is no longer good (401): fetch a new one next time.
    pub(crate) fn forget(&mut self) {
        self.token = None;
        self.refresh_at = None;
        self.retry_at = None;
    }
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
