// SPDX-License-Identifier: Apache-2.0
//! Whether IPVS would take the proxy's connections.
//!
//! The host-side table keeps the proxy's connections out of connection tracking, so no
//! NAT rule can take them (`hostside/table/conceal.rs`). IPVS keeps connections of its
//! own: a virtual service on the proxy's address and port (kube-proxy in IPVS mode,
//! a Service with `externalIPs: [NODE_IP]` on that port) takes every redirected
//! connection at `LOCAL_IN` whatever conntrack says. So the agent asks IPVS, over
//! generic netlink in the host's namespace, for its TCP services; while one claims the
//! proxy's address the kernel's redirect stays off and pods' metadata connections are
//! refused (EPERM), never served by whoever the service points at.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use metadata_guard_netfilter::{socket::Received, Attrs, NlSocket};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
/// Bytes before a generic netlink message's attributes: cmd, version, reserved.
const GENL_HEADER: usize = 4;

/// Whether an IPVS virtual service (TCP) has `proxy`'s address and port. A kernel
/// without IPVS (no generic netlink family, no module loaded) has none: the families
/// are listed rather than asked for by name, which would load the module.
pub(crate) fn claims(sock: &mut NlSocket, proxy: SocketAddr) -> Result<bool> {
    let families = sock
        .dump(GENL_ID_CTRL, &[CTRL_CMD_GETFAMILY, 1, 0, 0])
        .context("could not list the generic netlink families")?;
    let Some(family) = ipvs_family(&families) else { return Ok(false) };
    let services = sock
        .dump(family, &[IPVS_CMD_GET_SERVICE, IPVS_GENL_VERSION, 0, 0])
        .context("could not list the IPVS virtual services")?;
    Ok(services.iter().any(|s| service_is(s, proxy)))
}

fn ipvs_family(replies: &[Received]) -> Option<u16> {
    replies.iter().filter(|r| r.body.len() > GENL_HEADER).find_map(|r| {
        let attrs = Attrs::new(&r.body[GENL_HEADER..]);
        if attrs.find(CTRL_ATTR_FAMILY_NAME).map(|a| a.str()).as_deref() != Some(IPVS_GENL_NAME) {
            return None;
        }
        let id = attrs.find(CTRL_ATTR_FAMILY_ID)?.value.get(..2)?;
        Some(u16::from_ne_bytes([id[0], id[1]]))
    })
}

/// One `IPVS_CMD_NEW_SERVICE` reply: is it TCP on `proxy`'s address and port?
fn service_is(reply: &Received, proxy: SocketAddr) -> bool {
    let Some(body) = reply.body.get(GENL_HEADER..) else { return false };
    let Some(svc) = Attrs::new(body).find(IPVS_CMD_ATTR_SERVICE) else { return false };
    let svc = svc.nested();
    let u16_of = |kind| svc.find(kind).and_then(|a| a.value.get(..2).map(|v| u16::from_ne_bytes([v[0], v[1]])));
    let (family, octets): (u16, Vec<u8>) = match proxy {
        SocketAddr::V4(a) => (libc::AF_INET as u16, a.ip().octets().to_vec()),
        SocketAddr::V6(a) => (libc::AF_INET6 as u16, a.ip().octets().to_vec()),
    };
    let addr = svc.find(IPVS_SVC_ATTR_ADDR).and_then(|a| a.value.get(..octets.len()).map(<[u8]>::to_vec));
    u16_of(IPVS_SVC_ATTR_AF) == Some(family)
        && u16_of(IPVS_SVC_ATTR_PROTOCOL) == Some(libc::IPPROTO_TCP as u16)
        && addr.as_deref() == Some(octets.as_slice())
        && svc.find(IPVS_SVC_ATTR_PORT).and_then(|a| a.be16()) == Some(proxy.port())
}

#[cfg(test)]
mod tests {
    use metadata_guard_netfilter::AttrWriter;

    use super::*;

    fn reply(af: u16, protocol: u16, addr: &[u8], port: u16) -> Received {
        let mut w = AttrWriter::new();
        w.nest(IPVS_CMD_ATTR_SERVICE, |w| {
            w.bytes(IPVS_SVC_ATTR_AF, &af.to_ne_bytes());
            w.bytes(IPVS_SVC_ATTR_PROTOCOL, &protocol.to_ne_bytes());
            let mut a = [0u8; 16];
            a[..addr.len()].copy_from_slice(addr);
            w.bytes(IPVS_SVC_ATTR_ADDR, &a);
            w.be16(IPVS_SVC_ATTR_PORT, port);
        });
        let mut body = vec![IPVS_CMD_GET_SERVICE, IPVS_GENL_VERSION, 0, 0];
        body.extend_from_slice(&w.buf);
        Received { kind: 30, flags: 0, seq: 1, body }
    }

    #[test]
    fn only_a_tcp_service_on_the_proxys_address_and_port_claims_it() {
        let proxy: SocketAddr = "10.0.0.5:8775".parse().unwrap();
        let (af, tcp, udp) = (libc::AF_INET as u16, libc::IPPROTO_TCP as u16, libc::IPPROTO_UDP as u16);
        assert!(service_is(&reply(af, tcp, &[10, 0, 0, 5], 8775), proxy));
        assert!(!service_is(&reply(af, udp, &[10, 0, 0, 5], 8775), proxy));
        assert!(!service_is(&reply(af, tcp, &[10, 0, 0, 5], 8776), proxy));
        assert!(!service_is(&reply(af, tcp, &[10, 0, 0, 6], 8775), proxy));
        assert!(!service_is(&reply(libc::AF_INET6 as u16, tcp, &[10, 0, 0, 5], 8775), proxy));
    }
}
