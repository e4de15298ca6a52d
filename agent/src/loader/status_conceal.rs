// SPDX-License-Identifier: Apache-2.0
//! `status`'s conceal part, read from the pins: where the kernel redirects pods'
//! metadata HTTP connections (nowhere: they are refused as in enforce mode), which
//! endpoints, whether anything listens at that address in the host's network
//! namespace, and the kernel's conceal counters.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use aya::maps::{Array, HashMap, Map, PerCpuArray};
use metadata_guard_common::{conceal_counters, map_names, ConcealSettings, SockKey, AF_INET};
use serde::{Deserialize, Serialize};

use super::{netns_cookie, sock_addr};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConcealStatus {
    /// The proxy the kernel redirects to; None: the redirect is off.
    pub proxy: Option<String>,
    /// The metadata HTTP endpoints redirected.
    pub endpoints: Vec<String>,
    /// A TCP socket listens at `proxy` in the host's network namespace (None: no
    /// proxy, or it could not be checked).
    pub listening: Option<bool>,
    /// Connections redirected, recorded for the proxy, and refused because the record failed.
    pub redirected: u64,
    pub recorded: u64,
    pub record_failed: u64,
}

/// Reads the conceal maps through `open` (a pinned map by name).
pub(crate) fn read(open: impl Fn(&str) -> Result<Map>) -> Result<ConcealStatus> {
    let settings_map = open(map_names::CONCEAL)?;
    let settings: ConcealSettings = Array::<_, ConcealSettings>::try_from(&settings_map)?.get(&0, 0)?;
    let endpoints_map = open(map_names::CONCEAL_ENDPOINTS)?;
    let endpoints: HashMap<_, SockKey, u8> = HashMap::try_from(&endpoints_map)?;
    let mut endpoints: Vec<String> =
        endpoints.keys().map(|k| k.map(|k| sock_addr(&k).to_string())).collect::<Result<_, _>>()?;
    endpoints.sort();
    let counters_map = open(map_names::CONCEAL_COUNTERS)?;
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(&counters_map)?;
    let count = |slot: u32| -> Result<u64> { Ok(counters.get(&slot, 0)?.iter().sum()) };
    Ok(ConcealStatus {
        proxy: proxy(&settings).map(|a| a.to_string()),
        endpoints,
        listening: None,
        redirected: count(conceal_counters::REDIRECTED)?,
        recorded: count(conceal_counters::RECORDED)?,
        record_failed: count(conceal_counters::RECORD_FAILED)?,
    })
}

/// Fills `listening` from the host namespace's socket tables (/proc's `net/tcp`,
/// `net/tcp6`: read-only, nothing is sent to the proxy).
pub(crate) fn check_listening(status: &mut ConcealStatus, host_netns: Option<&Path>) {
    let Some(proxy) = status.proxy.as_deref().and_then(|p| p.parse::<SocketAddr>().ok()) else { return };
    status.listening = netns_cookie::in_netns(host_netns, || {
        let mut listeners = Vec::new();
        for table in ["tcp", "tcp6"] {
            // The thread's own namespace: it joined the host's.
            let text = fs::read_to_string(format!("/proc/thread-self/net/{table}")).unwrap_or_default();
            listeners.extend(text.lines().skip(1).filter_map(listening_socket));
        }
        Ok(listeners.iter().any(|l| serves(*l, proxy)))
    })
    .ok();
}

/// The redirect's target, None when it is off.
fn proxy(s: &ConcealSettings) -> Option<SocketAddr> {
    if s.enabled == 0 {
        return None;
    }
    let port = u16::from_be(s.port as u16);
    let ip = if s.family == u32::from(AF_INET) {
        IpAddr::from(Ipv4Addr::from(s.addr[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (i, w) in s.addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(Ipv6Addr::from(octets))
    };
    Some(SocketAddr::new(ip, port))
}

/// TCP state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// The local address of a /proc/net/tcp{,6} line in LISTEN state: `0100007F:1F90`
/// (each 32-bit word as the kernel holds it, printed in hex; the port in host order).
fn listening_socket(line: &str) -> Option<SocketAddr> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&TCP_LISTEN) {
        return None;
    }
    let (addr, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<[u8; 4]> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::from(*w),
        [a, b, c, d] => IpAddr::from(<[u8; 16]>::try_from([*a, *b, *c, *d].concat()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A listener at `local` accepts connections to `proxy` (its own address or a
/// wildcard; an IPv6 wildcard takes IPv4 too unless v6only, which /proc does not say).
fn serves(local: SocketAddr, proxy: SocketAddr) -> bool {
    local.port() == proxy.port()
        && (local.ip().is_unspecified() || local.ip().to_canonical() == proxy.ip().to_canonical())
}

pub(crate) fn print_human(c: &ConcealStatus) {
    match &c.proxy {
        Some(proxy) => {
            let listening = match c.listening {
                Some(true) => "listening",
                Some(false) => "NOT listening: pods get connection refused until an agent's proxy is back",
                None => "listening not checked",
            };
            println!("conceal proxy:  {proxy} ({listening})");
            println!("conceal for:    {}", c.endpoints.join(", "));
        }
        None => println!("conceal proxy:  none: pods' metadata HTTP connections are refused (EPERM)"),
    }
    println!("conceal count:  redirected {}, recorded {}, record failed {}", c.redirected, c.recorded, c.record_failed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_from_proc_net_tcp() {
        let v4 = "   1: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1";
        assert_eq!(listening_socket(v4), Some("127.0.0.1:8765".parse().unwrap()));
        let est = "   2: 0100007F:223D 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1 1";
        assert_eq!(listening_socket(est), None);
        let v6 = "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0 0 0 0 0";
        assert_eq!(listening_socket(v6), Some("[::]:8080".parse().unwrap()));
        let proxy: SocketAddr = "10.0.0.5:8775".parse().unwrap();
        assert!(serves("10.0.0.5:8775".parse().unwrap(), proxy));
        assert!(serves("0.0.0.0:8775".parse().unwrap(), proxy));
        assert!(serves("[::]:8775".parse().unwrap(), proxy));
        assert!(!serves("10.0.0.6:8775".parse().unwrap(), proxy));
        assert!(!serves("10.0.0.5:8776".parse().unwrap(), proxy));
    }

    #[test]
    fn decodes_the_redirect_target() {
        let mut s = ConcealSettings {
            enabled: 1,
            family: AF_INET.into(),
            port: u32::from(8775u16.to_be()),
            ..Default::default()
        };
        s.addr[0] = u32::from_ne_bytes([10, 0, 0, 5]);
        assert_eq!(proxy(&s), Some("10.0.0.5:8775".parse().unwrap()));
        s.enabled = 0;
        assert_eq!(proxy(&s), None);
    }
}
