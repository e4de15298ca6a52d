// SPDX-License-Identifier: Apache-2.0
//! Pods that may reach blocked destinations without running on the host network,
//! such as a metadata proxy that filters what other pods get to see.

use std::{fmt, str::FromStr};

use serde::{de, Deserialize, Deserializer};

/// Pods whose namespace and name both match may reach blocked destinations.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AllowRule {
    pub namespace: Pattern,
    pub pod: Pattern,
}

impl AllowRule {
    pub(crate) fn matches(&self, namespace: &str, pod: &str) -> bool {
        self.namespace.matches(namespace) && self.pod.matches(pod)
    }
}

/// A glob over a whole name: `*` matches any run of characters (also none), `?`
/// exactly one; every other character matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pattern(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an empty pattern matches no pod or namespace; write \"*\" to match any")]
pub(crate) struct PatternError;

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError);
        }
        Ok(Pattern(text.to_owned()))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pattern, D::Error> {
        deserializer.deserialize_str(PatternVisitor)
    }
}

/// Checks inside `visit_str`, while the deserializer still knows which field it is
/// reading, so that the error names it.
struct PatternVisitor;

impl de::Visitor<'_> for PatternVisitor {
    type Value = Pattern;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name or a glob with * and ?")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Pattern, E> {
        text.parse().map_err(E::custom)
    }
}

impl Pattern {
    pub(crate) fn matches(&self, name: &str) -> bool {
        let pattern: Vec<char> = self.0.chars().collect();
        let name: Vec<char> = name.chars().collect();
        let (mut p, mut n) = (0, 0);
        // Where the last `*` was and how much of `name` it has swallowed so far. Only the
        // last star ever needs to grow: what an earlier star took can be given back to the
        // later one, so this single backtrack point keeps matching linear per star.
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, n));
                    p += 1;
                }
                Some(&c) if c == '?' || c == name[n] => {
                    p += 1;
                    n += 1;
                }
                _ => match star {
                    Some((star_p, star_n)) => {
                        star = Some((star_p, star_n + 1));
                        p = star_p + 1;
                        n = star_n + 1;
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Pattern {
        text.parse().unwrap()
    }

    #[test]
    fn a_literal_matches_only_itself() {
        assert!(glob("kube-system").matches("kube-system"));
        assert!(!glob("kube-system").matches("kube-system2"));
        assert!(!glob("kube-system").matches("kube-syste"));
        assert!(!glob("kube-system").matches(""));
    }

    #[test]
    fn star_matches_any_run_including_none() {
        let proxy = glob("metadata-proxy-*");
        assert!(proxy.matches("metadata-proxy-"));
        assert!(proxy.matches("metadata-proxy-7d9f8-x2x4k"));
        assert!(!proxy.matches("metadata-prox"));
        assert!(!proxy.matches("evil-metadata-proxy-1"));
        assert!(glob("*").matches(""));
        assert!(glob("*-proxy-*").matches("gke-metadata-proxy-abcde"));
        assert!(glob("a*b*c").matches("aXbYbZc"));
        assert!(!glob("a*b*c").matches("aXbYbZ"));
        assert!(glob("**x").matches("x"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        assert!(glob("node-?").matches("node-a"));
        assert!(!glob("node-?").matches("node-"));
        assert!(!glob("node-?").matches("node-ab"));
        assert!(glob("n?de-*").matches("nöde-1"), "one character, not one byte");
    }

    #[test]
    fn the_star_backtracks_past_a_false_start() {
        assert!(glob("*ab").matches("aab"));
        assert!(glob("*aab").matches("aaab"));
        assert!(glob("*a?c").matches("abacabc"));
    }

    #[test]
    fn both_namespace_and_pod_must_match() {
        let rule = AllowRule { namespace: glob("kube-system"), pod: glob("metadata-proxy-*") };
        assert!(rule.matches("kube-system", "metadata-proxy-x1"));
        assert!(!rule.matches("default", "metadata-proxy-x1"));
        assert!(!rule.matches("kube-system", "coredns-x1"));
    }

    #[test]
    fn rules_read_from_yaml_name_a_bad_field() {
        let rule: AllowRule = serde_norway::from_str("{namespace: kube-system, pod: 'proxy-*'}").unwrap();
        assert!(rule.matches("kube-system", "proxy-1"));
        let err = serde_norway::from_str::<AllowRule>("{namespace: kube-system, pod: ''}").unwrap_err();
        assert!(err.to_string().starts_with("pod: an empty pattern"), "{err}");
        let err = serde_norway::from_str::<AllowRule>("{namespace: a, pod: b, node: c}").unwrap_err();
        assert!(err.to_string().contains("unknown field `node`"), "{err}");
    }

    #[test]
    fn an_empty_pattern_is_refused() {
        assert_eq!("".parse::<Pattern>(), Err(PatternError));
    }
}
