// SPDX-License-Identifier: Apache-2.0
//! Every message kind the crate writes, read back by an independent decoder
//! (`netlink-packet-netfilter`, the rust-netlink project's): each must decode
//! without error into the attributes meant (not the decoder's `Other` fallback where
//! it knows the attribute), and the decoder must write the very same bytes back.
//! Expressions that decoder does not know (exthdr, objref, log, limit, reject, nat)
//! are checked against the kernel instead: created in a network namespace of the
//! test's own and read back (`kernel.rs`).

use metadata_guard_netfilter::{
    nflog,
    nftables::*,
    socket::{put_header, Message, NLM_F_REQUEST},
};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::NetfilterMessage;

/// The message on the wire, decoded; panics (naming the message) where it does not
/// decode or does not re-encode to the same bytes.
fn decode(m: &Message) -> String {
    let mut wire = Vec::new();
    put_header(&mut wire, m.kind, NLM_F_REQUEST | m.flags, 1, m.body.len());
    wire.extend_from_slice(&m.body);
    let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&wire)
        .unwrap_or_else(|e| panic!("message {:#06x} does not decode: {e:?}\n{wire:02x?}", m.kind));
    let mut again = vec![0; msg.buffer_len()];
    msg.serialize(&mut again);
    assert_eq!(again, wire, "message {:#06x} re-encodes differently: {msg:?}", m.kind);
    match msg.payload {
        NetlinkPayload::InnerMessage(inner) => format!("{inner:?}"),
        other => panic!("message {:#06x} is not a netfilter message: {other:?}", m.kind),
    }
}

fn decoded(messages: &[Message]) -> Vec<String> {
    messages.iter().filter(|m| wants_ack(m)).map(decode).collect()
}

const INET: &str = "NetfilterHeader { family: Inet, version: 0, res_id: 0 }";

fn nft(inner: &str) -> String {
    format!("NetfilterMessage {{ header: {INET}, inner: NfTables({inner}) }}")
}

#[test]
fn table_requests_decode_as_meant() {
    let mut b = Batch::new(NFPROTO_INET);
    b.add_table("metadata_guard").add_table_with_flags("metadata_guard", NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST);
    b.set_table_flags("metadata_guard", NFT_TABLE_F_DORMANT).del_table("metadata_guard");
    assert_eq!(
        decoded(&b.finish()),
        [
            nft(r#"NewTable(TableMessage { attributes: [Name("metadata_guard")] })"#),
            nft(
                r#"NewTable(TableMessage { attributes: [Name("metadata_guard"), Flags(TableFlags(Owner | Persisent))] })"#
            ),
            nft(r#"NewTable(TableMessage { attributes: [Name("metadata_guard"), Flags(TableFlags(Dormant))] })"#),
            nft(r#"DeleteTable(TableMessage { attributes: [Name("metadata_guard")] })"#),
        ]
    );
    // `flush ruleset`: a deletion naming no table, for every family.
    let mut flush = Batch::new(NFPROTO_UNSPEC);
    flush.del_all_tables();
    assert_eq!(
        decoded(&flush.finish()),
        ["NetfilterMessage { header: NetfilterHeader { family: Unspec, version: 0, res_id: 0 }, inner: \
          NfTables(DeleteTable(TableMessage { attributes: [] })) }"]
    );
}

#[test]
fn chains_sets_elements_and_counters_decode_as_meant() {
    let mut b = Batch::new(NFPROTO_INET);
    b.add_chain("t", "input", Some(("filter", NF_INET_LOCAL_IN, 101))).add_chain("t", "judge", None);
    b.add_set("t", &SetSpec { name: "any4".into(), key_type: TYPE_IPADDR, key_len: 4, interval: true });
    let interval = [
        Element { key: vec![169, 254, 0, 0], interval_end: false },
        Element { key: vec![169, 255, 0, 0], interval_end: true },
    ];
    b.add_elements("t", "any4", &interval);
    b.add_counter("t", "blocked", 3, 4);
    let got = decoded(&b.finish());
    assert_eq!(
        got[0],
        nft(
            r#"NewChain(ChainMessage { attributes: [Table("t"), Name("input"), Hook([Number(Inet(LocalIn)), Priority(101)]), Policy(1), Type("filter")] })"#
        )
    );
    assert_eq!(got[1], nft(r#"NewChain(ChainMessage { attributes: [Table("t"), Name("judge")] })"#));
    // The set's id is unique in the transaction: the message's place in it.
    assert_eq!(
        got[2],
        nft(
            r#"NewSet(SetMessage { attributes: [Table("t"), Name("any4"), Flags(SetFlags(Interval)), KeyType(7), KeyLen(4), Id(3)] })"#
        )
    );
    assert_eq!(
        got[3],
        nft(
            r#"NewSetElement(SetElementMessage { attributes: [Table("t"), Set("any4"), Elements([Element([Key(Value([169, 254, 0, 0]))]), Element([Key(Value([169, 255, 0, 0])), Flags(SetElementFlags(IntervalEnd))])])] })"#
        )
    );
    // Objects are opaque to the decoder: NFTA_OBJ_TABLE, _NAME, _TYPE (counter), and
    // the nested data: bytes (4) then packets (3), both big-endian 64-bit.
    assert_eq!(got[4], nft("NewObject([DefaultNla { kind: 1, value: [116, 0] }, DefaultNla { kind: 2, value: [98, 108, 111, 99, 107, 101, 100, 0] }, DefaultNla { kind: 3, value: [0, 0, 0, 1] }, DefaultNla { kind: 32772, value: [12, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 4, 12, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 3] }])"));
}

#[test]
fn large_element_lists_are_split_across_messages_that_each_decode() {
    let keys: Vec<Element> =
        (0..600u32).map(|i| Element { key: i.to_be_bytes().to_vec(), interval_end: false }).collect();
    let mut b = Batch::new(NFPROTO_INET);
    b.add_elements("t", "s", &keys);
    let got = decoded(&b.finish());
    assert_eq!(got.len(), 3, "600 keys in chunks of 256");
    assert_eq!(got.iter().map(|m| m.matches("Element([Key(").count()).sum::<usize>(), 600);
}

#[test]
fn the_expressions_the_decoder_knows_decode_as_meant() {
    let mut b = Batch::new(NFPROTO_INET);
    b.add_rule(
        "t",
        "judge",
        &[
            Expr::Meta { key: NFT_META_NFPROTO, dreg: NFT_REG_1 },
            Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![2] },
            Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![169, 254] },
            Expr::Cmp { op: CmpOp::Gte, sreg: NFT_REG_1, data: vec![0, 0, 0, 0] },
            Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 16, len: 4, dreg: NFT_REG_1 },
            Expr::Payload { base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: 2, len: 2, dreg: NFT_REG32_01 },
            Expr::Bitwise { sreg: NFT_REG_1, dreg: NFT_REG_1, mask: vec![0xf0, 0, 0, 0] },
            Expr::Lookup { set: "any4".into(), sreg: NFT_REG_1, invert: true },
            Expr::Lookup { set: "allow_if".into(), sreg: NFT_REG_1, invert: false },
            Expr::Data { dreg: NFT_REG_1, data: vec![1, 2, 3, 4] },
            Expr::jump("refuse"),
            Expr::goto("judge"),
            Expr::verdict(NFT_RETURN),
            Expr::verdict(NF_ACCEPT),
        ],
    );
    let got = decoded(&b.finish());
    let expected = [
        r#"Element([Name("meta"), Data(Meta([DestinationRegister(Reg1), Key(Nfproto)]))])"#,
        r#"Element([Name("cmp"), Data(Cmp([SourceRegister(Reg1), Op(Equal), Data(Value([2]))]))])"#,
        r#"Element([Name("cmp"), Data(Cmp([SourceRegister(Reg1), Op(NotEqual), Data(Value([169, 254]))]))])"#,
        r#"Element([Name("cmp"), Data(Cmp([SourceRegister(Reg1), Op(GreatherThanEqual), Data(Value([0, 0, 0, 0]))]))])"#,
        r#"Element([Name("payload"), Data(Payload([DestinationRegister(Reg1), Base(1), Offset(16), Len(4)]))])"#,
        r#"Element([Name("payload"), Data(Payload([DestinationRegister(Reg32_01), Base(2), Offset(2), Len(2)]))])"#,
        r#"Element([Name("bitwise"), Data(Bitwise([SourceRegister(Reg1), DestinationRegister(Reg1), Length(4), Mask(Value([240, 0, 0, 0])), Xor(Value([0, 0, 0, 0]))]))])"#,
        r#"Element([Name("lookup"), Data(Lookup([Set("any4"), SourceRegister(Reg1), Flags(1)]))])"#,
        r#"Element([Name("lookup"), Data(Lookup([Set("allow_if"), SourceRegister(Reg1)]))])"#,
        r#"Element([Name("immediate"), Data(Immediate([DestinationRegister(Reg1), Data(Value([1, 2, 3, 4]))]))])"#,
        r#"Element([Name("immediate"), Data(Immediate([DestinationRegister(Verdict), Data(Verdict([Code(Jump), Chain("refuse")]))]))])"#,
        r#"Element([Name("immediate"), Data(Immediate([DestinationRegister(Verdict), Data(Verdict([Code(Goto), Chain("judge")]))]))])"#,
        r#"Element([Name("immediate"), Data(Immediate([DestinationRegister(Verdict), Data(Verdict([Code(Return)]))]))])"#,
        // NF_ACCEPT (1): the decoder names only the NFT_* codes. (`Greather` is its spelling.)
        r#"Element([Name("immediate"), Data(Immediate([DestinationRegister(Verdict), Data(Verdict([Code(Other(1))]))]))])"#,
    ];
    let rule = nft(&format!(
        r#"NewRule(RuleMessage {{ attributes: [Table("t"), Chain("judge"), Expressions([{}])] }})"#,
        expected.join(", ")
    ));
    assert_eq!(got, [rule]);
}

#[test]
fn the_other_expressions_decode_by_name_and_re_encode() {
    let mut b = Batch::new(NFPROTO_INET);
    b.add_rule(
        "t",
        "refuse",
        &[
            Expr::Exthdr { header: 44, offset: 2, len: 2, dreg: NFT_REG_1 },
            Expr::Ipv4OptionPresent { option: 131, dreg: NFT_REG_1 },
            Expr::CounterRef { name: "blocked".into() },
            Expr::Log { group: 9965, prefix: "metadata-guard blocked".into(), snaplen: 96 },
            Expr::Limit { rate: 200, burst: 400 },
            Expr::Reject { kind: NFT_REJECT_TCP_RST, icmp_code: 0 },
            Expr::Reject { kind: NFT_REJECT_ICMPX_UNREACH, icmp_code: NFT_REJECT_ICMPX_ADMIN_PROHIBITED },
            Expr::Nat { kind: NFT_NAT_DNAT, family: 2, addr_reg: NFT_REG_1, port_reg: Some(NFT_REG_2) },
        ],
    );
    let got = decoded(&b.finish());
    let names: Vec<&str> = got[0]
        .match_indices("expression_type: \"")
        .map(|(i, _)| &got[0][i + 18..])
        .map(|r| &r[..r.find('"').unwrap()])
        .collect();
    assert_eq!(names, ["exthdr", "exthdr", "objref", "log", "limit", "reject", "reject", "nat"]);
}

#[test]
fn nflog_binding_decodes_as_meant() {
    let header = "NetfilterHeader { family: Unspec, version: 0, res_id: 9965 }";
    assert_eq!(
        decoded(&nflog::bind_messages(9965, 96)),
        [
            format!("NetfilterMessage {{ header: {header}, inner: ULog(Config([Cmd(Bind)])) }}"),
            format!(
                "NetfilterMessage {{ header: {header}, inner: ULog(Config([Mode(ConfigMode {{ copy_range: 96, \
                 copy_mode: Packet }}), Timeout(Timeout {{ hundredth: 1 }})])) }}"
            ),
        ]
    );
}
