// SPDX-License-Identifier: Apache-2.0
//! A kube-proxy-like IPVS virtual service in the node namespace, over generic netlink
//! (what `ipvsadm -A -t VIP:PORT -s rr; ipvsadm -a -t VIP:PORT -r REAL:PORT -m` does),
//! with no `ipvsadm` binary in the VM guests.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use metadata_guard_netfilter::{
    socket::{Message, NLMSG_ERROR},
    AttrWriter, Attrs, NlSocket,
};

use crate::netns::NetNs;

/// Where the kernel's IPVS lists its services; absent when it has none.
pub const PROC_IPVS: &str = "/proc/net/ip_vs";

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_DEL_SERVICE: u8 = 3;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;

const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;

const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;

/// `IP_VS_CONN_F_MASQ`: NAT, kube-proxy's forwarding method.
const FWD_MASQ: u32 = 0;
/// Round robin: kube-proxy's default scheduler.
const SCHEDULER: &str = "rr";
const HOST_NETMASK_V4: u32 = 0xffff_ffff;

/// A TCP virtual service `vip` → `real` (NAT), deleted on drop.
pub struct VirtualService {
    ns: PathBuf,
    family: u16,
    vip: SocketAddrV4,
}

impl VirtualService {
    /// The virtual address must be local in `ns` (kube-proxy puts it on `kube-ipvs0`).
    pub fn add(ns: &NetNs, vip: SocketAddrV4, real: SocketAddrV4) -> Result<VirtualService> {
        let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_GENERIC)
            .context("could not open a generic netlink socket in the node namespace")?;
        let family = ipvs_family(&mut sock)?;
        let svc = VirtualService { ns: ns.path(), family, vip };
        let mut add = AttrWriter::new();
        add.nest(IPVS_CMD_ATTR_SERVICE, |w| {
            service_key(w, vip);
            w.bytes(IPVS_SVC_ATTR_SCHED_NAME, format!("{SCHEDULER}\0").as_bytes());
            // struct ip_vs_flags { flags, mask }: none set.
            w.bytes(IPVS_SVC_ATTR_FLAGS, &[0u8; 8]);
            w.ne32(IPVS_SVC_ATTR_TIMEOUT, 0);
            w.ne32(IPVS_SVC_ATTR_NETMASK, HOST_NETMASK_V4);
        });
        let mut dest = AttrWriter::new();
        dest.nest(IPVS_CMD_ATTR_SERVICE, |w| service_key(w, vip));
        dest.nest(IPVS_CMD_ATTR_DEST, |w| {
            w.bytes(IPVS_DEST_ATTR_ADDR, &inet_addr(*real.ip()));
            w.be16(IPVS_DEST_ATTR_PORT, real.port());
            w.ne32(IPVS_DEST_ATTR_FWD_METHOD, FWD_MASQ);
            w.ne32(IPVS_DEST_ATTR_WEIGHT, 1);
            w.ne32(IPVS_DEST_ATTR_U_THRESH, 0);
            w.ne32(IPVS_DEST_ATTR_L_THRESH, 0);
        });
        sock.request(&[genl(family, IPVS_CMD_NEW_SERVICE, &add), genl(family, IPVS_CMD_NEW_DEST, &dest)], |_| true)
            .with_context(|| format!("could not add the IPVS service {vip} → {real}"))?;
        Ok(svc)
    }
}

impl Drop for VirtualService {
    fn drop(&mut self) {
        let mut del = AttrWriter::new();
        del.nest(IPVS_CMD_ATTR_SERVICE, |w| service_key(w, self.vip));
        if let Ok(mut sock) = NlSocket::open_in(Some(Path::new(&self.ns)), libc::NETLINK_GENERIC) {
            let _ = sock.request(&[genl(self.family, IPVS_CMD_DEL_SERVICE, &del)], |_| true);
        }
    }
}

/// What identifies a service: family, protocol, address, port.
fn service_key(w: &mut AttrWriter, vip: SocketAddrV4) {
    w.bytes(IPVS_SVC_ATTR_AF, &(libc::AF_INET as u16).to_ne_bytes());
    w.bytes(IPVS_SVC_ATTR_PROTOCOL, &(libc::IPPROTO_TCP as u16).to_ne_bytes());
    w.bytes(IPVS_SVC_ATTR_ADDR, &inet_addr(*vip.ip()));
    w.be16(IPVS_SVC_ATTR_PORT, vip.port());
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first four.
fn inet_addr(ip: Ipv4Addr) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&ip.octets());
    a
}

fn genl(family: u16, cmd: u8, attrs: &AttrWriter) -> Message {
    let mut body = vec![cmd, IPVS_GENL_VERSION, 0, 0];
    body.extend_from_slice(&attrs.buf);
    Message { kind: family, flags: 0, body }
}

/// The generic netlink family id of IPVS (dynamic: asked of the controller).
fn ipvs_family(sock: &mut NlSocket) -> Result<u16> {
    let mut name = AttrWriter::new();
    name.bytes(CTRL_ATTR_FAMILY_NAME, format!("{IPVS_GENL_NAME}\0").as_bytes());
    let mut body = vec![CTRL_CMD_GETFAMILY, 1, 0, 0];
    body.extend_from_slice(&name.buf);
    let replies = sock.dump(GENL_ID_CTRL, &body).context("could not list the generic netlink families")?;
    for r in replies.iter().filter(|r| r.kind != NLMSG_ERROR && r.body.len() > 4) {
        let attrs = Attrs::new(&r.body[4..]);
        if attrs.find(CTRL_ATTR_FAMILY_NAME).map(|a| a.str()).as_deref() == Some(IPVS_GENL_NAME) {
            if let Some(id) = attrs.find(CTRL_ATTR_FAMILY_ID).and_then(|a| a.value.get(..2)) {
                return Ok(u16::from_ne_bytes([id[0], id[1]]));
            }
        }
    }
    bail!("the kernel has no IPVS (no generic netlink family {IPVS_GENL_NAME}); load the ip_vs module")
}

/// Whether this kernel can run IPVS scenarios (the module loaded or built in).
pub fn available() -> bool {
    Path::new(PROC_IPVS).exists()
}
