// SPDX-License-Identifier: Apache-2.0
//! The proxy's decision about one request: pass it upstream, or refuse it naming the
//! rule. Plain logic over the rules in `clouds`, the pod's extra paths and the
//! normalised request; no I/O.

use super::{
    clouds::{self, Cloud, Methods, Rule},
    grammar::Query,
    normalise::NormalPath,
    ExtraPaths,
};

/// What the proxy knows about a request when it decides.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    pub path: &'a NormalPath,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Looks a request header up by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Pass {
        cloud: Option<Cloud>,
        /// For metrics: listing, placement, instance, token, extra, ...
        class: &'static str,
        rule: String,
        /// The query to send upstream, rebuilt from the parsed parameters.
        query: Query,
    },
    Refuse {
        status: u16,
        rule: String,
        reason: String,
    },
}

impl Decision {
    pub(crate) fn rule(&self) -> &str {
        match self {
            Decision::Pass { rule, .. } | Decision::Refuse { rule, .. } => rule,
        }
    }
}

/// Status for requests no cloud's rules cover (an unknown tree, a bad path).
pub(crate) const UNKNOWN_STATUS: u16 = 404;

pub(crate) fn decide(req: &Request<'_>, extras: &[&ExtraPaths]) -> Decision {
    if req.path.segments.is_empty() {
        // `GET /` lists the API trees; google-auth pings it to detect GCE.
        return if Methods::Read.covers(req.method) && req.query.is_none() {
            Decision::Pass { cloud: None, class: "listing", rule: "root-listing".into(), query: Query::default() }
        } else {
            refuse(UNKNOWN_STATUS, "root-listing", "only GET / without a query is served at the root")
        };
    }
    let Some(rules) = clouds::route(&req.path.segments[0]) else {
        return refuse(UNKNOWN_STATUS, "default-deny", "no cloud's metadata tree starts here");
    };
    let path = if rules.case_insensitive { req.path.lowercase() } else { req.path.clone() };
    if let Some(required) = rules.required_header {
        let present = (req.header)(required.name).is_some_and(|v| v.trim().eq_ignore_ascii_case(required.value));
        if !present {
            return refuse(
                rules.missing_header_status,
                &format!("{}-header", rules.cloud.name()),
                &format!(
                    "the {} metadata service requires `{}: {}`",
                    rules.cloud.name(),
                    required.name,
                    required.value
                ),
            );
        }
    }
    let query = match Query::parse(req.query, rules.query_params) {
        Ok(query) => query,
        Err(reason) => return refuse(rules.refuse_status, &format!("{}-query", rules.cloud.name()), &reason),
    };
    let recursive = query.recursive();
    let passes = |rule: &Rule| rule.methods.covers(req.method) && (!recursive || is_subtree(rule.pattern));
    if let Some(rule) = rules.allow.iter().find(|r| matches(r.pattern, &path.segments, false) && passes(r)) {
        return Decision::Pass { cloud: Some(rules.cloud), class: rule.class, rule: rule.name.into(), query };
    }
    for extra in extras {
        for pattern in &extra.paths {
            let segments: Vec<&str> = pattern.trim_start_matches('/').split('/').filter(|s| !s.is_empty()).collect();
            let matched = matches_segments(&segments, &path.segments, rules.case_insensitive);
            if matched && Methods::Read.covers(req.method) && (!recursive || segments.last() == Some(&"**")) {
                return Decision::Pass {
                    cloud: Some(rules.cloud),
                    class: "extra",
                    rule: extra.rule_name(),
                    query: query.clone(),
                };
            }
        }
    }
    let named = rules.deny.iter().find(|r| matches(r.pattern, &path.segments, false)).map(|r| r.name);
    let why = if recursive {
        "?recursive=true is only served on a tree that is allowed as a whole".to_owned()
    } else {
        format!("{} {} is not among the {} paths a pod may read", req.method, req.path, rules.cloud.name())
    };
    match named {
        Some(name) => refuse(rules.refuse_status, name, &why),
        None if recursive => refuse(rules.refuse_status, &format!("{}-recursive", rules.cloud.name()), &why),
        None => refuse(rules.refuse_status, "default-deny", &why),
    }
}

fn refuse(status: u16, rule: &str, reason: &str) -> Decision {
    Decision::Refuse { status, rule: rule.to_owned(), reason: reason.to_owned() }
}

fn is_subtree(pattern: &str) -> bool {
    pattern.ends_with("/**")
}

fn matches(pattern: &str, path: &[String], case_insensitive: bool) -> bool {
    let segments: Vec<&str> = pattern.split('/').collect();
    matches_segments(&segments, path, case_insensitive)
}

fn matches_segments(pattern: &[&str], path: &[String], case_insensitive: bool) -> bool {
    match (pattern.first(), path.first()) {
        (Some(&"**"), _) if pattern.len() == 1 => true,
        (None, None) => true,
        (Some(p), Some(s)) => {
            let hit = match *p {
                "*" => true,
                "{aws-version}" => s == "latest" || clouds::is_aws_date(s),
                _ if case_insensitive => p.eq_ignore_ascii_case(s),
                _ => p == s,
            };
            hit && matches_segments(&pattern[1..], &path[1..], case_insensitive)
        }
        _ => false,
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
