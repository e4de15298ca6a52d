// SPDX-License-Identifier: Apache-2.0
//! The stand-in's IMDS behaviour on the AWS tree (`/latest/…`, `/<date>/…`), so a
//! scenario can tell a token the service issued from one it did not:
//! `PUT /latest/api/token` issues a token (TTL 1 to 21600 s, else 400); a request
//! with a token the stand-in did not issue, or one expired, is answered 401; a request
//! without one is served unless IMDSv2 is required ([`Standin::require_imdsv2`]),
//! as on an instance with `HttpTokens: required`. Other trees are always served.
//!
//! [`Standin::require_imdsv2`]: super::Standin::require_imdsv2

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

const MAX_TTL: u64 = 21_600;
/// Tokens held at once; the oldest go first (a scenario needs a handful).
const MAX_TOKENS: usize = 1024;

/// A request head, as far as the stand-in reads it.
pub(super) struct Head {
    pub method: String,
    pub target: String,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub(super) fn parse(raw: &[u8]) -> Option<Head> {
        let text = String::from_utf8_lossy(raw);
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let (method, target) = (first.next()?.to_owned(), first.next()?.to_owned());
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(Head { method, target, headers })
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub(super) struct Imds {
    tokens: HashMap<String, Instant>,
    issued: u64,
}

/// What the stand-in answers: a status and a body.
pub(super) struct Answer {
    pub status: u16,
    pub body: String,
}

impl Imds {
    pub(super) fn answer(&mut self, head: &Head, require_v2: bool) -> Answer {
        let served = Answer { status: 200, body: super::server::STANDIN_BODY.into() };
        let path = head.target.split('?').next().unwrap_or("");
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let aws = first == "latest" || is_date(first);
        if !aws {
            return served;
        }
        let now = Instant::now();
        if head.method == "PUT" && path == "/latest/api/token" {
            let ttl = head.header("x-aws-ec2-metadata-token-ttl-seconds").and_then(|t| t.parse::<u64>().ok());
            let Some(ttl) = ttl.filter(|t| (1..=MAX_TTL).contains(t)) else {
                return Answer { status: 400, body: String::new() };
            };
            self.tokens.retain(|_, expires| now < *expires);
            if self.tokens.len() >= MAX_TOKENS {
                let oldest = self.tokens.iter().min_by_key(|(_, e)| **e).map(|(t, _)| t.clone());
                oldest.map(|t| self.tokens.remove(&t));
            }
            self.issued += 1;
            let token = format!("standin-{}-{:x}", self.issued, random());
            self.tokens.insert(token.clone(), now + Duration::from_secs(ttl));
            return Answer { status: 200, body: token };
        }
        match head.header("x-aws-ec2-metadata-token") {
            Some(token) if self.tokens.get(token).is_some_and(|e| now < *e) => served,
            Some(_) => Answer { status: 401, body: String::new() },
            None if require_v2 => Answer { status: 401, body: String::new() },
            None => served,
        }
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        Instant::now().elapsed().as_nanos() as u64
    }
}
