//! The rtnetlink queries that tie a host interface to a pod: the host's links with
//! the namespace id of their peer (`IFLA_LINK_NETNSID`), and the id the host gives a
//! process's network namespace (`RTM_GETNSID`).

use std::io;

use crate::{attr::AttrWriter, attr::Attrs, socket::NlSocket};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_GETNSID: u16 = 90;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const IFINFOMSG_LEN: usize = 16;

/// A link of the namespace the socket lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware (MAC) address.
    pub address: Vec<u8>,
    /// For a veth (or another link with a peer in another namespace): the peer's
    /// index there and that namespace's id as seen from here.
    pub peer: Option<(u32, i32)>,
}

pub fn links(sock: &mut NlSocket) -> io::Result<Vec<Link>> {
    let body = vec![0u8; IFINFOMSG_LEN];
    let mut out = Vec::new();
    for r in sock.dump(RTM_GETLINK, &body)? {
        if r.kind != RTM_NEWLINK || r.body.len() < IFINFOMSG_LEN {
            continue;
        }
        let index = i32::from_ne_bytes(r.body[4..8].try_into().unwrap()) as u32;
        let attrs = Attrs::new(&r.body[IFINFOMSG_LEN..]);
        let name = attrs.find(IFLA_IFNAME).map(|a| a.str()).unwrap_or_default();
        let link = attrs.find(IFLA_LINK).and_then(|a| a.ne32());
        let nsid = attrs.find(IFLA_LINK_NETNSID).and_then(|a| a.ne32()).map(|v| v as i32);
        let peer = match (link, nsid) {
            (Some(l), Some(n)) if n >= 0 => Some((l, n)),
            _ => None,
        };
        let address = attrs.find(IFLA_ADDRESS).map(|a| a.value.to_vec()).unwrap_or_default();
        out.push(Link { index, name, address, peer });
    }
    Ok(out)
}

/// The id the socket's namespace gives the network namespace open at `fd`; `None`
/// when it has none (no link connects the two, so no packet of it can come from a link).
pub fn nsid_of_fd(sock: &mut NlSocket, fd: u32) -> io::Result<Option<i32>> {
    let mut w = AttrWriter::new();
    w.ne32(NETNSA_FD, fd);
    let mut body = vec![0u8; 4]; // struct rtgenmsg, padded
    body.extend_from_slice(&w.buf);
    let reply = sock.query(RTM_GETNSID, &body)?;
    let nsid =
        Attrs::new(reply.body.get(4..).unwrap_or_default()).find(NETNSA_NSID).and_then(|a| a.ne32()).map(|v| v as i32);
    Ok(nsid.filter(|n| *n >= 0))
}
