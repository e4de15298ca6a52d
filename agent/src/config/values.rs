// SPDX-License-Identifier: Apache-2.0
//! Value syntaxes shared by the config file and the flags, so both accept the same
//! spellings and explain a mistake the same way.

use std::{fmt, marker::PhantomData, net::SocketAddr, str::FromStr};

use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};

use crate::policy::{parse_cidr, PolicyError};

/// A YAML scalar read through `T::from_str`, so that a parse error is reported by
/// serde_norway together with the field's path and position.
pub(super) struct Parsed<T>(pub T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParsedVisitor(PhantomData))
    }
}

/// Parses inside `visit_str`, while serde_norway still knows which field it is reading;
/// an error raised after the string is returned would be blamed on the parent.
struct ParsedVisitor<T>(PhantomData<T>);

impl<T> de::Visitor<'_> for ParsedVisitor<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    type Value = Parsed<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Parsed<T>, E> {
        text.parse().map(Parsed).map_err(E::custom)
    }
}

pub(super) struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Cidr, PolicyError> {
        parse_cidr(text).map(Cidr)
    }
}

pub(super) struct Port(pub u16);

impl FromStr for Port {
    type Err = String;

    fn from_str(text: &str) -> Result<Port, String> {
        match text.trim().parse::<u16>() {
            Ok(0) => Err("port 0 is not a port (1-65535)".to_owned()),
            Ok(port) => Ok(Port(port)),
            Err(_) => Err(format!("`{text}` is not a port (1-65535)")),
        }
    }
}

pub(super) struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        parse_size(text).map(ByteSize)
    }
}

/// Bytes, written as a plain number or with a binary unit: `1048576`, `512KiB`, `100MiB`.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let multiplier = match unit.trim() {
        "" | "B" => Some(1u64),
        "KiB" => Some(1 << 10),
        "MiB" => Some(1 << 20),
        "GiB" => Some(1 << 30),
        _ => None,
    };
    let not_a_size =
        || format!("`{text}` is not a size; write a number of bytes, optionally with KiB, MiB or GiB (e.g. 100MiB)");
    let bytes = number.parse::<u64>().ok().zip(multiplier);
    bytes.and_then(|(n, unit)| n.checked_mul(unit)).ok_or_else(not_a_size)
}

pub(super) struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<ListenAddr, String> {
        parse_listen_addr(text).map(ListenAddr)
    }
}

pub(super) fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address and port; write e.g. 0.0.0.0:9965 or [::]:9965"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_bytes_or_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
    }

    #[test]
    fn ambiguous_or_empty_sizes_are_refused() {
        for text in ["100MB", "100 mb", "MiB", "", "-1", "1.5GiB", "99999999999999999999GiB"] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("is not a size"), "{text:?}: {err}");
        }
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!("65535".parse::<Port>().map(|p| p.0), Ok(65535));
        assert_eq!("0".parse::<Port>().err().unwrap(), "port 0 is not a port (1-65535)");
        assert_eq!("65536".parse::<Port>().err().unwrap(), "`65536` is not a port (1-65535)");
    }

    #[test]
    fn a_listen_address_needs_a_port() {
        assert_eq!(parse_listen_addr("[::]:9965").unwrap().port(), 9965);
        assert!(parse_listen_addr("0.0.0.0").unwrap_err().contains("e.g. 0.0.0.0:9965"));
    }
}
