// SPDX-License-Identifier: Apache-2.0
//! NFLOG (`nfnetlink_log`): binding a socket to a log group and decoding the packets
//! the kernel copies to it. Numbers from `include/uapi/linux/netfilter/nfnetlink_log.h`.

use crate::{
    attr::{AttrWriter, Attrs},
    nftables::nfgenmsg,
    socket::{Message, Received},
};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PREFIX: u16 = 10;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_IFINDEX_PHYSINDEV: u16 = 6;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PACKET_HDR: u16 = 1;

/// A packet the kernel logged to the group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedPacket {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`.
    pub family: u8,
    /// The netfilter hook it was logged on (`NF_INET_*`).
    pub hook: u8,
    pub prefix: String,
    /// Input interface index, 0 when none (locally generated).
    pub indev: u32,
    pub outdev: u32,
    /// The bridge port it entered through, when it came through a bridge and
    /// `br_netfilter` is loaded; 0 otherwise.
    pub physindev: u32,
    /// The packet from its network header on, up to the rule's snap length.
    pub payload: Vec<u8>,
}

/// The messages that bind a socket to `group` and ask for `copy_bytes` of each
/// packet, delivered at once. A group has one listener; the kernel frees it when the
/// socket closes.
pub fn bind_messages(group: u16, copy_bytes: u32) -> Vec<Message> {
    let config = |f: &dyn Fn(&mut AttrWriter)| {
        let mut w = AttrWriter::new();
        f(&mut w);
        let mut body = nfgenmsg(0, group);
        body.extend_from_slice(&w.buf);
        Message { kind: (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, flags: 0, body }
    };
    let mut mode = copy_bytes.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    vec![
        config(&|w| {
            w.bytes(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        }),
        config(&|w| {
            w.bytes(NFULA_CFG_MODE, &mode);
            // Hundredths of a second a batch may wait; the queue threshold is 1 anyway.
            w.be32(NFULA_CFG_TIMEOUT, 1);
        }),
    ]
}

/// Decodes one received message, if it is a logged packet.
pub fn parse(r: &Received) -> Option<LoggedPacket> {
    if r.kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET || r.body.len() < 4 {
        return None;
    }
    let mut p = LoggedPacket { family: r.body[0], ..Default::default() };
    for a in Attrs::new(&r.body[4..]) {
        match a.kind {
            NFULA_PACKET_HDR => p.hook = *a.value.get(2)?,
            NFULA_PREFIX => p.prefix = a.str(),
            NFULA_IFINDEX_INDEV => p.indev = a.be32()?,
            NFULA_IFINDEX_OUTDEV => p.outdev = a.be32()?,
            NFULA_IFINDEX_PHYSINDEV => p.physindev = a.be32()?,
            NFULA_PAYLOAD => p.payload = a.value.to_vec(),
            _ => {}
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::socket::Received;

    proptest! {
        /// A logged packet's message of any content is read without a panic.
        #[test]
        fn packets_of_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = Received { kind: (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, flags: 0, seq: 0, body };
            let _ = parse(&r);
        }
    }

    #[test]
    fn a_logged_packet_reads_back() {
        let mut w = AttrWriter::new();
        w.bytes(NFULA_PACKET_HDR, &[0x08, 0x00, 2, 0]).str(NFULA_PREFIX, "metadata-guard blocked");
        w.be32(NFULA_IFINDEX_INDEV, 7).be32(NFULA_IFINDEX_PHYSINDEV, 9).bytes(NFULA_PAYLOAD, &[0x45, 0, 0, 20]);
        let mut body = nfgenmsg(2, 9965);
        body.extend_from_slice(&w.buf);
        let r = Received { kind: (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, flags: 0, seq: 0, body };
        let p = parse(&r).unwrap();
        assert_eq!((p.family, p.hook, p.indev, p.physindev, p.outdev), (2, 2, 7, 9, 0));
        assert_eq!((p.prefix.as_str(), p.payload.as_slice()), ("metadata-guard blocked", &[0x45, 0, 0, 20][..]));
        // A hook field cut short: no packet rather than a wrong one.
        let mut w = AttrWriter::new();
        w.bytes(NFULA_PACKET_HDR, &[0x08]);
        let mut body = nfgenmsg(2, 9965);
        body.extend_from_slice(&w.buf);
        assert_eq!(parse(&Received { body, ..r }), None);
    }
}
