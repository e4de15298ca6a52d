// SPDX-License-Identifier: Apache-2.0
//! One canonical form of a request's path, so that rules see what the metadata service
//! will serve and not what the client spelled.
//!
//! Percent-escapes are decoded once; an escape that decodes to a separator, a `%`,
//! a control character or a backslash is refused outright (no metadata client needs
//! one, and each is a classic way of making a filter and a server disagree). Every
//! decoded segment must then fit the strict grammar (`grammar`): `.` and `..` are
//! refused, not resolved (no client sends them; resolving them is where servers
//! differ), as are segments ending in `.`, `;` or a space and any character outside
//! the grammar's set. Empty segments (`//`) are dropped, and a trailing slash is kept
//! only as a flag: it means "list this directory" to the metadata services but never
//! changes which rule applies.

use std::fmt;

use super::grammar::segment_problem;

/// A path reduced to its segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NormalPath {
    pub segments: Vec<String>,
    /// The client asked with a trailing slash (a directory listing).
    pub trailing_slash: bool,
}

/// Why a path has no canonical form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    #[error("the request target is not a path starting with `/` (absolute-form and authority-form are refused)")]
    NotOriginForm,
    #[error("a malformed percent-escape")]
    BadEscape,
    #[error("an escaped `/`, `\\`, `%`, `?`, `#` or control character")]
    EscapedSeparator,
    #[error("a `\\` or control character")]
    ForbiddenCharacter,
    #[error("{0}")]
    Segment(&'static str),
    #[error("more than {MAX_SEGMENTS} segments")]
    TooDeep,
}

/// Metadata paths are a handful of segments deep; anything far deeper is an attack.
pub(crate) const MAX_SEGMENTS: usize = 32;

impl NormalPath {
    /// `raw` is the path part of an origin-form request target (no query).
    pub(crate) fn parse(raw: &str) -> Result<NormalPath, PathError> {
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(PathError::NotOriginForm);
        };
        let mut segments: Vec<String> = Vec::new();
        let mut trailing_slash = false;
        for piece in rest.split('/') {
            trailing_slash = piece.is_empty();
            let segment = decode(piece)?;
            if let Some(problem) = (!segment.is_empty()).then(|| segment_problem(&segment)).flatten() {
                return Err(PathError::Segment(problem));
            }
            match segment.as_str() {
                "" => trailing_slash = true,
                _ => {
                    segments.push(segment);
                    if segments.len() > MAX_SEGMENTS {
                        return Err(PathError::TooDeep);
                    }
                }
            }
        }
        // `/` alone is the root listing.
        Ok(NormalPath { trailing_slash: trailing_slash && !segments.is_empty(), segments })
    }

    /// The path as sent upstream: segments re-joined (escaping what needs it), with
    /// the trailing slash when the client asked for a listing.
    pub(crate) fn to_upstream(&self) -> String {
        let mut out = String::from("/");
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            for b in segment.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
        if self.trailing_slash {
            out.push('/');
        }
        out
    }

    /// The segments lower-cased, for clouds whose paths are case-insensitive.
    pub(crate) fn lowercase(&self) -> NormalPath {
        NormalPath {
            segments: self.segments.iter().map(|s| s.to_ascii_lowercase()).collect(),
            trailing_slash: self.trailing_slash,
        }
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_upstream())
    }
}

fn decode(piece: &str) -> Result<String, PathError> {
    let bytes = piece.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
            if matches!(v, b'/' | b'\\' | b'%' | b'?' | b'#') || v.is_ascii_control() || v >= 0x80 {
                return Err(PathError::EscapedSeparator);
            }
            out.push(v);
            i += 3;
        } else {
            if b == b'\\' || b.is_ascii_control() || b >= 0x80 {
                return Err(PathError::ForbiddenCharacter);
            }
            out.push(b);
            i += 1;
        }
    }
    // Only ASCII was let through above.
    Ok(String::from_utf8(out).expect("ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> String {
        NormalPath::parse(raw).unwrap().to_upstream()
    }

    #[test]
    fn doubled_slashes_and_harmless_escapes_collapse() {
        assert_eq!(norm("/latest/meta-data/placement/region"), "/latest/meta-data/placement/region");
        assert_eq!(norm("/latest//meta-data///iam/"), "/latest/meta-data/iam/");
        assert_eq!(norm("/latest/meta-data/%69am/info"), "/latest/meta-data/iam/info");
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("//"), "/");
    }

    #[test]
    fn dot_segments_are_refused_not_resolved() {
        for raw in [
            "/latest/meta-data/placement/../iam/info",
            "/latest/meta-data/./iam",
            "/latest/meta-data/placement/%2e%2e/iam",
            "/latest/meta-data/placement/%2E./iam/x",
            "/latest/meta-data/.",
            "/../latest",
        ] {
            assert!(matches!(NormalPath::parse(raw), Err(PathError::Segment(_))), "{raw}");
        }
    }

    #[test]
    fn trailing_slash_is_a_flag_not_a_segment() {
        let p = NormalPath::parse("/latest/meta-data/placement/availability-zone/").unwrap();
        assert_eq!(p.segments, ["latest", "meta-data", "placement", "availability-zone"]);
        assert!(p.trailing_slash);
        assert!(!NormalPath::parse("/latest/meta-data").unwrap().trailing_slash);
    }

    #[test]
    fn escaped_separators_and_odd_bytes_are_refused() {
        for raw in ["/latest%2fmeta-data/iam", "/latest/meta-data%5ciam", "/a/%252e%252e/iam", "/a/%00", "/a/%zz"] {
            assert!(NormalPath::parse(raw).is_err(), "{raw}");
        }
        assert_eq!(NormalPath::parse("/a\\b"), Err(PathError::ForbiddenCharacter));
        assert_eq!(NormalPath::parse("/a/%2"), Err(PathError::BadEscape));
        assert_eq!(NormalPath::parse("http://x/latest"), Err(PathError::NotOriginForm));
        assert_eq!(NormalPath::parse("*"), Err(PathError::NotOriginForm));
        let deep = "/a".repeat(MAX_SEGMENTS + 1);
        assert_eq!(NormalPath::parse(&deep), Err(PathError::TooDeep));
        assert!(matches!(NormalPath::parse("/a%20b/c"), Err(PathError::Segment(_))), "a space is not in the grammar");
    }
}
