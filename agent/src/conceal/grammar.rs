// SPDX-License-Identifier: Apache-2.0
//! The strict grammar every request target must fit before any rule sees it.
//!
//! A filter and a server that read one target two ways is how a concealed path gets
//! out: a lenient server (Tomcat and Jetty's `;` path parameters, IIS and Windows'
//! trailing dots and spaces, a framework that reads `;` as a query separator or
//! `recursive=False` as true) may serve a path the rules never judged. So the proxy
//! does not try to read targets as leniently as any server might; it accepts only
//! targets that every server reads the same way, refuses the rest, and sends upstream
//! a target rebuilt from what it parsed, never the raw one.
//!
//! What the clouds' real paths need (their documented trees and what botocore,
//! google-auth and azure-identity send, see `tests/fixtures/conceal-client-requests.txt`):
//! letters, digits, `-` (`meta-data`, `availability-zone`, `api-version` dates), `.`
//! inside a segment (`0.1`, dotted versions), `_` (`wait_for_change`, Azure's
//! `platformFaultDomain` is letters only), `:` (AWS MAC addresses in
//! `network-interfaces/macs/0e:49:…`), and `~ @ = +`, harmless and reserved by no
//! server, kept for OpenStack-style trees reached through extra paths. Nothing else:
//! no space, `;`, `,`, `'`, `"`, `$`, `!`, `*`, `(`, `)`, `&`, `%` (after decoding).
//! The segment grammar applies to every segment, under literal and wildcard rules
//! alike: a literal rule's segments already fit it, so it only narrows what `*` and
//! `**` let through.
//!
//! Query parameters: only those the cloud's rules name (AWS: none; GCP: `alt`,
//! `recursive`, `wait_for_change`, `timeout_sec`, `last_etag`; Azure: `api-version`,
//! `format`), each at most once, each value in its own small grammar.

use std::fmt;

/// The bytes a path segment may hold, after percent-decoding.
pub(crate) fn segment_byte_allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._~:@=+-".contains(&b)
}

/// Why a segment is refused (after decoding).
pub(crate) fn segment_problem(segment: &str) -> Option<&'static str> {
    if segment == "." || segment == ".." {
        return Some("a `.` or `..` segment (dot segments are refused, not resolved)");
    }
    match segment.as_bytes().last() {
        Some(b'.') => return Some("a segment ending in `.`"),
        Some(b' ') => return Some("a segment ending in a space"),
        Some(b';') => return Some("a segment ending in `;`"),
        _ => {}
    }
    if !segment.bytes().all(segment_byte_allowed) {
        return Some("a character outside [A-Za-z0-9._~:@=+-] in a segment");
    }
    None
}

/// The raw target's own check, before any decoding: no `;` anywhere (path parameters,
/// or a query separator to servers that take one).
pub(crate) fn raw_target_problem(target: &str) -> Option<&'static str> {
    target.contains(';').then_some("a `;` in the request target")
}

/// What one query parameter's value may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    /// Exactly `true` (GCP's `recursive`, `wait_for_change`): anything else is not
    /// read the same way by every server (`True`, `1`, `False`, `no`, empty).
    True,
    /// One of these words, exactly.
    OneOf(&'static [&'static str]),
    /// 1 to 5 decimal digits, not starting with 0 (`timeout_sec`).
    Seconds,
    /// 1 to 64 lower-case hexadecimal digits (GCP's `last_etag`).
    Hex,
    /// An API date, `2021-02-01`, optionally `-preview` (Azure's `api-version`).
    ApiDate,
}

impl Value {
    fn accepts(self, v: &str) -> bool {
        let b = v.as_bytes();
        match self {
            Value::True => v == "true",
            Value::OneOf(words) => words.contains(&v),
            Value::Seconds => (1..=5).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit),
            Value::Hex => (1..=64).contains(&b.len()) && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            Value::ApiDate => {
                let date = v.strip_suffix("-preview").unwrap_or(v);
                crate::conceal::clouds::is_aws_date(date)
            }
        }
    }
}

/// A query parameter a cloud's service takes, and its value's grammar.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Param {
    pub name: &'static str,
    pub value: Value,
}

/// A query, parsed: known parameters with checked values, in the client's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Query {
    pub pairs: Vec<(&'static str, String)>,
}

impl Query {
    /// Parses `raw` (without `?`) against the parameters `known`. Names are matched
    /// exactly; each may come once; values are percent-decoded once, then checked.
    pub(crate) fn parse(raw: Option<&str>, known: &[Param]) -> Result<Query, String> {
        let mut pairs: Vec<(&'static str, String)> = Vec::new();
        let Some(raw) = raw else { return Ok(Query::default()) };
        if raw.is_empty() {
            return Err("an empty query (`?` alone)".into());
        }
        for pair in raw.split('&') {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(format!("query parameter `{pair}` has no `=value`"));
            };
            let name = decode(name).ok_or_else(|| format!("query parameter `{name}`: a malformed escape"))?;
            let Some(param) = known.iter().find(|p| p.name == name) else {
                return Err(format!("query parameter `{name}` is not one this service takes"));
            };
            if pairs.iter().any(|(n, _)| *n == param.name) {
                return Err(format!("query parameter `{name}` given twice"));
            }
            let value = decode(value).ok_or_else(|| format!("query parameter `{name}`: a malformed escape"))?;
            if !param.value.accepts(&value) {
                return Err(format!("query parameter `{name}={value}`: not a value every server reads the same way"));
            }
            pairs.push((param.name, value));
        }
        Ok(Query { pairs })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// `recursive=true` was asked for.
    pub(crate) fn recursive(&self) -> bool {
        self.get("recursive").is_some()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl fmt::Display for Query {
    /// The query as sent upstream: rebuilt from the parsed pairs. Every accepted
    /// value is in a grammar that needs no escape.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.pairs.iter().enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// Percent-decodes once; `None` on a malformed escape or a result that is not ASCII.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    text.is_ascii().then_some(text)
}

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod tests;
