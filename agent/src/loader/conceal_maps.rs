// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's maps: where the kernel redirects to, which endpoints it redirects,
//! and the kernel-written records the proxy reads (see ebpf/src/conceal.rs).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use metadata_guard_common::{conceal_counters, map_names, ConcealOrigin, ConcealSettings, SockKey, AF_INET, AF_INET6};

use super::Guard;

/// A read-only handle on the kernel's record of redirected connections.
pub(crate) type ConcealPeers = HashMap<MapData, SockKey, ConcealOrigin>;

impl Guard {
    /// Points the kernel's redirect at `proxy` for `endpoints`, or turns it off (None).
    /// Independent of the mode (`apply`): the kernel redirects only while the mode is
    /// conceal and this is on; otherwise metadata connections are refused as in
    /// enforce mode, so either may be written first.
    pub(crate) fn set_conceal(&mut self, proxy: Option<SocketAddr>, endpoints: &[SocketAddr]) -> Result<()> {
        let map = self.ebpf.map_mut(map_names::CONCEAL_ENDPOINTS).context("no conceal endpoint map")?;
        let mut eps: HashMap<&mut MapData, SockKey, u8> = HashMap::try_from(map)?;
        let present: Vec<SockKey> = eps.keys().collect::<Result<_, _>>()?;
        for key in present {
            eps.remove(&key).context("could not clear the conceal endpoints")?;
        }
        if proxy.is_some() {
            for ep in endpoints {
                eps.insert(sock_key(ep), 1, 0).with_context(|| format!("could not add conceal endpoint {ep}"))?;
            }
        }
        let settings = match proxy {
            None => ConcealSettings::default(),
            Some(addr) => {
                let mut s = ConcealSettings { enabled: 1, port: u32::from(addr.port().to_be()), ..Default::default() };
                match addr.ip() {
                    IpAddr::V4(ip) => {
                        s.family = AF_INET.into();
                        s.addr[0] = u32::from_ne_bytes(ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        s.family = AF_INET6.into();
                        for (i, w) in ip.octets().chunks_exact(4).enumerate() {
                            s.addr[i] = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
                        }
                    }
                }
                s
            }
        };
        let map = self.ebpf.map_mut(map_names::CONCEAL).context("no conceal settings map")?;
        let mut array: Array<&mut MapData, ConcealSettings> = Array::try_from(map)?;
        array.set(0, settings, 0).context("could not write the conceal settings")?;
        Ok(())
    }

    /// An independent handle on the peer records, for the proxy's tasks.
    pub(crate) fn conceal_peers(&self) -> Result<ConcealPeers> {
        let path = self.pins.map(map_names::CONCEAL_PEERS);
        let data = MapData::from_pin(&path).with_context(|| format!("could not open {}", path.display()))?;
        Ok(HashMap::try_from(Map::LruHashMap(data))?)
    }

    /// The conceal counters (redirected, recorded, record failures), summed over CPUs.
    pub(crate) fn conceal_counters(&self) -> Result<[u64; conceal_counters::SLOTS as usize]> {
        let map = self.ebpf.map(map_names::CONCEAL_COUNTERS).context("no conceal counters map")?;
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut out = [0; conceal_counters::SLOTS as usize];
        for (slot, v) in out.iter_mut().enumerate() {
            *v = array.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// The kernel's form of an address and port (IPv4-mapped addresses as IPv4).
pub(crate) fn sock_key(addr: &SocketAddr) -> SockKey {
    let mut key = SockKey { port: addr.port(), ..Default::default() };
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            key.family = AF_INET;
            key.addr[..4].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            key.family = AF_INET6;
            key.addr = ip.octets();
        }
    }
    key
}

/// The address and port a kernel key stands for.
pub(crate) fn sock_addr(key: &SockKey) -> SocketAddr {
    let ip = if key.family == AF_INET {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    };
    SocketAddr::new(ip, key.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_mapped_addresses_become_ipv4() {
        for text in ["169.254.169.254:80", "[fd00:ec2::254]:80", "10.200.1.2:40000"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(sock_addr(&sock_key(&addr)), addr);
        }
        let mapped: SocketAddr = "[::ffff:10.200.1.2]:4000".parse().unwrap();
        assert_eq!(sock_addr(&sock_key(&mapped)).to_string(), "10.200.1.2:4000");
    }
}
