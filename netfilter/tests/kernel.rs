// SPDX-License-Identifier: Apache-2.0
//! What the crate writes, read back from the kernel: a table holding every kind of
//! object and expression the agent writes is created in a network namespace of the
//! test's own, dumped back, and each thing the kernel answers (decoded with
//! `netlink-packet-netfilter`) must carry every attribute written, with its value.
//! An attribute the kernel did not understand would be missing or different.
//!
//! Needs root (CAP_NET_ADMIN, and unshare(2) for the namespace); without it the test
//! says so loudly and passes, unless CI=true, where it fails.

use metadata_guard_netfilter::{
    nftables::*,
    socket::{put_header, Message, NLM_F_REQUEST},
    NlSocket,
};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    nftables::{NfTablesMessage, RuleAttribute},
    NetfilterMessage, NetfilterMessageInner,
};

const TABLE: &str = "codec";

/// Runs `f` on a thread of its own inside a new network namespace (gone with it).
fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare of this thread's network namespace only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                assert!(!ci(), "CI=true: unshare(CLONE_NEWNET) failed: {e}");
                eprintln!(
                    "\n!!!!! SKIPPED: cannot make a network namespace ({e}); the kernel check did NOT run !!!!!\n"
                );
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    })
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn decode(kind: u16, body: &[u8]) -> NfTablesMessage {
    let mut wire = Vec::new();
    put_header(&mut wire, kind, NLM_F_REQUEST, 1, body.len());
    wire.extend_from_slice(body);
    let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&wire).expect("decodes");
    match msg.payload {
        NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::NfTables(m), .. }) => m,
        other => panic!("not an nf_tables message: {other:?}"),
    }
}

/// Each expression of a rule message as (name, its attributes' Debug texts).
fn expressions(m: &NfTablesMessage) -> Vec<(String, Vec<String>)> {
    let NfTablesMessage::NewRule(rule) = m else { panic!("not a rule: {m:?}") };
    let exprs = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Expressions(e) => Some(e),
        _ => None,
    });
    exprs
        .expect("a rule with expressions")
        .iter()
        .map(|e| {
            // `Element([Name("x"), Data(Kind([attr, attr, ...]))])` or `Data(Other { .. attributes: [..] })`.
            let text = format!("{e:?}");
            let name = text.split('"').nth(1).unwrap_or_default().to_string();
            (name, attributes(&text))
        })
        .collect()
}

/// The attributes inside the innermost `[...]` list of an expression's data.
fn attributes(text: &str) -> Vec<String> {
    let data = &text[text.find("Data(").expect("expression data")..];
    let open = data.find('[').expect("an attribute list");
    let mut depth = 0;
    let (mut items, mut current) = (Vec::new(), String::new());
    for c in data[open + 1..].chars() {
        match c {
            '[' | '(' | '{' => depth += 1,
            ']' | ')' | '}' if depth == 0 => break,
            ']' | ')' | '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current.trim().to_string());
    items
}

/// Every expression kind the agent writes, in rules the kernel accepts.
fn rules() -> Vec<(&'static str, Vec<Expr>)> {
    vec![
        (
            "judge",
            vec![
                Expr::Meta { key: NFT_META_NFPROTO, dreg: NFT_REG_1 },
                Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![NFPROTO_IPV4] },
                Expr::Ipv4OptionPresent { option: 131, dreg: NFT_REG_1 },
                Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![1] },
                Expr::jump("refuse"),
            ],
        ),
        (
            "judge",
            vec![
                Expr::Meta { key: NFT_META_IIF, dreg: NFT_REG_1 },
                Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 12, len: 4, dreg: NFT_REG32_01 },
                Expr::Lookup { set: "pairs".into(), sreg: NFT_REG_1, invert: false },
                Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 16, len: 4, dreg: NFT_REG_1 },
                Expr::Lookup { set: "any4".into(), sreg: NFT_REG_1, invert: true },
                Expr::verdict(NFT_RETURN),
            ],
        ),
        (
            "judge",
            vec![
                Expr::Exthdr { header: 44, offset: 2, len: 2, dreg: NFT_REG_1 },
                Expr::Bitwise { sreg: NFT_REG_1, dreg: NFT_REG_1, mask: vec![0xff, 0xf8] },
                Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![0, 0] },
                Expr::Meta { key: NFT_META_SKUID, dreg: NFT_REG_1 },
                Expr::Cmp { op: CmpOp::Gte, sreg: NFT_REG_1, data: vec![0, 0, 0, 0] },
                Expr::goto("refuse"),
            ],
        ),
        (
            "refuse",
            vec![
                Expr::CounterRef { name: "blocked".into() },
                Expr::Limit { rate: 200, burst: 400 },
                Expr::Log { group: 9965, prefix: "metadata-guard blocked".into(), snaplen: 96 },
            ],
        ),
        ("refuse", vec![Expr::Reject { kind: NFT_REJECT_TCP_RST, icmp_code: 0 }]),
        ("refuse", vec![Expr::Reject { kind: NFT_REJECT_ICMPX_UNREACH, icmp_code: NFT_REJECT_ICMPX_ADMIN_PROHIBITED }]),
        ("refuse", vec![Expr::verdict(NF_ACCEPT)]),
        (
            "dnat",
            vec![
                Expr::Data { dreg: NFT_REG_1, data: vec![169, 254, 169, 254] },
                Expr::Data { dreg: NFT_REG_2, data: 80u16.to_be_bytes().to_vec() },
                Expr::Nat {
                    kind: NFT_NAT_DNAT,
                    family: u32::from(NFPROTO_IPV4),
                    addr_reg: NFT_REG_1,
                    port_reg: Some(NFT_REG_2),
                },
            ],
        ),
    ]
}

#[test]
fn the_kernel_reads_back_every_expression_and_object_as_written() {
    let Some(result) = in_new_netns(check_against_the_kernel) else { return };
    result.unwrap();
}

fn check_against_the_kernel() -> Result<(), String> {
    let mut nft = NlSocket::open(libc::NETLINK_NETFILTER).map_err(|e| e.to_string())?;
    let mut b = Batch::new(NFPROTO_INET);
    b.add_table_with_flags(TABLE, NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST);
    b.add_counter(TABLE, "blocked", 3, 4);
    let any4 = SetSpec { name: "any4".into(), key_type: TYPE_IPADDR, key_len: 4, interval: true };
    let pairs = SetSpec {
        name: "pairs".into(),
        key_type: concat_type(&[TYPE_IFINDEX, TYPE_IPADDR]),
        key_len: 8,
        interval: false,
    };
    b.add_set(TABLE, &any4).add_set(TABLE, &pairs);
    let interval = [
        Element { key: vec![169, 254, 0, 0], interval_end: false },
        Element { key: vec![169, 255, 0, 0], interval_end: true },
    ];
    b.add_elements(TABLE, "any4", &interval);
    b.add_elements(TABLE, "pairs", &[Element { key: vec![4, 0, 0, 0, 10, 0, 0, 2], interval_end: false }]);
    b.add_chain(TABLE, "refuse", None).add_chain(TABLE, "judge", None);
    b.add_chain(TABLE, "input", Some(("filter", NF_INET_LOCAL_IN, 101)));
    b.add_chain(TABLE, "dnat", Some(("nat", NF_INET_PRE_ROUTING, -100)));
    b.add_rule(TABLE, "input", &[Expr::jump("judge")]);
    for (chain, exprs) in rules() {
        b.add_rule(TABLE, chain, &exprs);
    }
    let written: Vec<Message> = b.finish();
    nft.request(&written, wants_ack).map_err(|e| format!("the kernel refused the batch: {e}"))?;

    // Rules: in order, per chain, each written attribute in the kernel's answer.
    let ours: Vec<_> = written.iter().filter(|m| m.kind == msg_type(NFT_MSG_NEWRULE)).collect();
    let dumped = nft.dump(msg_type(NFT_MSG_GETRULE), &table_request(NFPROTO_INET, TABLE)).map_err(|e| e.to_string())?;
    let mut kernel: Vec<_> = dumped.iter().map(|r| decode(r.kind, &r.body)).collect();
    let chain_of =
        |m: &NfTablesMessage| format!("{m:?}").split("Chain(\"").nth(1).map(|r| r[..r.find('"').unwrap()].to_string());
    let mut wrote: Vec<_> = ours.iter().map(|m| decode(m.kind, &m.body)).collect();
    // The dump lists chains in creation order; our batch wrote `input` before the rest.
    wrote.sort_by_key(|m| chain_of(m));
    kernel.sort_by_key(|m| chain_of(m));
    if wrote.len() != kernel.len() {
        return Err(format!("wrote {} rules, the kernel has {}", wrote.len(), kernel.len()));
    }
    let mut compared = 0;
    for (w, k) in wrote.iter().zip(&kernel) {
        let (w, k) = (expressions(w), expressions(k));
        if w.len() != k.len() {
            return Err(format!("a rule of {} expressions came back with {}: {w:?} / {k:?}", w.len(), k.len()));
        }
        for ((wn, wa), (kn, ka)) in w.iter().zip(&k) {
            if wn != kn {
                return Err(format!("expression {wn} came back as {kn}"));
            }
            for a in wa {
                if !ka.contains(a) {
                    return Err(format!("{wn}: the kernel's copy lacks {a} (it has {ka:?})"));
                }
                compared += 1;
            }
        }
    }
    // Not vacuous: every attribute of every expression above was compared.
    let attributes: usize = wrote.iter().map(|m| expressions(m).iter().map(|(_, a)| a.len()).sum::<usize>()).sum();
    if compared != attributes || compared < 60 {
        return Err(format!("compared {compared} attributes of {attributes}"));
    }
    eprintln!("kernel check: {} rules, {compared} expression attributes as written", wrote.len());

    // The table's flags, the sets' keys, the counter's carried values.
    let table =
        nft.query(msg_type(NFT_MSG_GETTABLE), &table_request(NFPROTO_INET, TABLE)).map_err(|e| e.to_string())?;
    let table = format!("{:?}", decode(table.kind, &table.body));
    if !table.contains("Flags(TableFlags(Owner | Persisent))") || !table.contains("Owner(") {
        return Err(format!("the table's flags or owner did not come back: {table}"));
    }
    let sets = nft.dump(msg_type(NFT_MSG_GETSET), &table_request(NFPROTO_INET, TABLE)).map_err(|e| e.to_string())?;
    let sets: Vec<String> = sets.iter().map(|r| format!("{:?}", decode(r.kind, &r.body))).collect();
    for want in ["Name(\"any4\")", "Flags(SetFlags(Interval))", "KeyType(7)", "KeyType(1287)", "KeyLen(8)"] {
        if !sets.iter().any(|s| s.contains(want)) {
            return Err(format!("no set came back with {want}: {sets:?}"));
        }
    }
    let elements = nft
        .dump(msg_type(NFT_MSG_GETSETELEM), &set_elements_request(NFPROTO_INET, TABLE, "pairs"))
        .map_err(|e| e.to_string())?;
    let elements = format!("{:?}", elements.iter().map(|r| decode(r.kind, &r.body)).collect::<Vec<_>>());
    if !elements.contains("Key(Value([4, 0, 0, 0, 10, 0, 0, 2]))") {
        return Err(format!("the concatenated key did not come back: {elements}"));
    }
    let objects = nft.dump(msg_type(NFT_MSG_GETOBJ), &table_request(NFPROTO_INET, TABLE)).map_err(|e| e.to_string())?;
    let counter = objects.first().ok_or("no counter object came back")?;
    // NFTA_OBJ_DATA's NFTA_COUNTER_BYTES (4) and _PACKETS (3), as written.
    let data = metadata_guard_netfilter::Attrs::new(&counter.body[4..]).find(NFTA_OBJ_DATA).ok_or("no object data")?;
    let read = |kind| data.nested().find(kind).and_then(|a| a.be64());
    if (read(NFTA_COUNTER_BYTES), read(NFTA_COUNTER_PACKETS)) != (Some(4), Some(3)) {
        return Err(format!("the counter came back as bytes {:?}, packets {:?}", read(1), read(2)));
    }
    Ok(())
}
