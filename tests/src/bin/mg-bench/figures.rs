// SPDX-License-Identifier: Apache-2.0
//! Figures 1–4: the allowed TCP and UDP paths, bulk throughput and the refused path,
//! each with no guard, the guard, and firewall rules, interleaved.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{bail, ensure, Result};

use crate::{
    bench::{iptables_rules, Bench, Firewall, BULK_PORT, LEAD_NEIGHBOUR, METADATA, TCP_PORT, UDP_PORT},
    interrupted,
    report::{median, Figure, Measured, Row, Target},
    variant::Variant,
    worker::{Op, Reply},
};

/// Columns of every allowed-path figure: the baseline first, the guard second, one
/// iptables rule third, the guard's hooks empty (the kernel's hook cost) fourth.
pub(crate) const ALL: [Variant; 6] =
    [Variant::None, Variant::Guard, Variant::Firewall, Variant::Empty, Variant::Programs, Variant::Table];

pub(crate) fn label(v: Variant) -> &'static str {
    match v {
        Variant::None => "no guard",
        Variant::Guard => "guard",
        Variant::Firewall => "iptables DROP rule",
        Variant::Empty => "the guard's hooks, empty",
        Variant::Programs => "the guard's programs, base chains empty",
        Variant::Table => "the host-side table, programs empty",
        Variant::Uplink => "the uplink's program alone",
        Variant::UplinkEmpty => "the uplink's hook, empty",
    }
}

/// Runs `rounds` rounds (after one unrecorded warm-up round), each variant once per
/// round in a rotating order; the firewall variant gets `rules` loaded just for its
/// sample. Returns the samples per variant, in `variants` order.
pub(crate) fn interleave(
    b: &mut Bench,
    variants: &[Variant],
    rounds: usize,
    rules: &dyn Fn(&Firewall) -> Result<()>,
    sample: &mut dyn FnMut(&mut Bench, Variant) -> Result<f64>,
) -> Result<Vec<Vec<f64>>> {
    if variants.contains(&Variant::Firewall) {
        b.load_firewall(rules)?;
    }
    let out = rotate(b, variants, rounds, sample);
    // The whole guard in force again, whatever happened.
    let restored = if variants.contains(&Variant::Firewall) { b.unload_firewall() } else { b.set(Variant::Guard) };
    let out = out?;
    restored?;
    Ok(out)
}

fn rotate(
    b: &mut Bench,
    variants: &[Variant],
    rounds: usize,
    sample: &mut dyn FnMut(&mut Bench, Variant) -> Result<f64>,
) -> Result<Vec<Vec<f64>>> {
    let mut out = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..=rounds {
        for k in 0..variants.len() {
            if interrupted() {
                bail!("interrupted");
            }
            let i = (k + round) % variants.len();
            b.set(variants[i])?;
            let value = sample(b, variants[i])?;
            if round > 0 {
                out[i].push(value);
            }
        }
    }
    Ok(out)
}

/// Every attempt succeeded, and there were some.
pub(crate) fn all_ok(r: &Reply, expected: u64, what: &str) -> Result<()> {
    ensure!(
        r.ok == expected && r.errors.is_empty(),
        "{what}: expected {expected} successes, got {} and errors {:?}",
        r.ok,
        r.errors
    );
    ensure!(expected > 0 && r.ns > 0, "{what}: zero iterations measured");
    Ok(())
}

pub(crate) fn row(case: &str, variants: &[Variant], samples: Vec<Vec<f64>>) -> Row {
    Row {
        case: case.into(),
        cols: variants.iter().zip(samples).map(|(v, s)| Measured { label: label(*v).into(), samples: s }).collect(),
    }
}

/// Proves that the guard's programs run for the guarded variant: its connect to the
/// metadata address is refused.
pub(crate) fn ensure_guarded(b: &mut Bench) -> Result<()> {
    let dest = SocketAddrV4::new(METADATA, 80);
    let r = b.run(Variant::Guard, Op::Refused { dest, count: 1 })?;
    ensure!(
        r.errors.get("EPERM") == Some(&1),
        "the guarded pod's connect to {dest} was not refused ({r:?}): is the guard attached?"
    );
    Ok(())
}

/// The targets every allowed-path figure has: its own limit, and the one-rule
/// iptables ratio of the same run.
pub(crate) fn targets(what: &str, row: &Row, limit: f64, at_most: bool) -> Vec<Target> {
    let (guard, rule) = (row.paired(1), row.paired(2));
    if at_most {
        vec![
            Target::at_most(&format!("{what}, guard / no guard"), guard, limit),
            Target::at_most(&format!("{what}, guard ratio ≤ one iptables rule's"), guard, rule),
        ]
    } else {
        vec![
            Target::at_least(&format!("{what}, guard / no guard"), guard, limit),
            Target::at_least(&format!("{what}, guard ratio ≥ one iptables rule's"), guard, rule),
        ]
    }
}

/// Figure 1: socket + connect + close from the pod to the node.
pub(crate) fn tcp_allowed(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (3, 300) } else { (301, 200) };
    ensure_guarded(b)?;
    let dest = b.node_addr(TCP_PORT);
    let row = per_op_row(b, "connect + close", rounds, count, Op::TcpConnect { dest, count })?;
    Ok(Figure {
        title: "1. Allowed TCP path".into(),
        unit: "µs per connect".into(),
        targets: targets("1. TCP connect+close", &row, 1.01, true),
        rows: vec![scale_row(row, 1e-3)],
        notes: vec![format!(
            "{count} connects per sample, {} in all. Each is `socket` + `connect` to the node end of the pod's veth + \
             `close` with `SO_LINGER` 0 (a RST, no TIME_WAIT: tens of thousands of connects would otherwise run out of \
             ephemeral ports). The guard runs `connect4` once (and `sock_create`, on kernels where the packet backstop reads socket marks) and `egress` on each of the 3 packets; on the node, the host-side \
             table's `input` chain sees those 3 and its `output` chain the SYN-ACK.",
            count * (rounds as u64 + 1) * ALL.len() as u64
        )],
        ..Default::default()
    })
}

/// `count` operations (`op` carries the same count) per sample, every variant of
/// [`ALL`] once a round, in ns per operation: the row of figures 1, 2, 2b and 9b.
pub(crate) fn per_op_row(b: &mut Bench, case: &str, rounds: usize, count: u64, op: Op) -> Result<Row> {
    let rules = iptables_rules(&[]);
    let samples = interleave(b, &ALL, rounds, &|fw| fw.iptables_restore(&rules), &mut |b, v| {
        let r = b.run(v, op)?;
        all_ok(&r, count, &format!("{case} ({})", label(v)))?;
        Ok(r.per_op_ns())
    })?;
    Ok(row(case, &ALL, samples))
}

/// Figure 2: unconnected sendto, one datagram at a time.
pub(crate) fn udp_allowed(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (3, 2000) } else { (301, 1000) };
    let dest = b.node_addr(UDP_PORT);
    let row = per_op_row(b, "sendto, 32 bytes", rounds, count, Op::UdpSendto { dest, count })?;
    Ok(Figure {
        title: "2. Allowed UDP path".into(),
        unit: "µs per datagram".into(),
        targets: targets("2. UDP sendto", &row, 1.02, true),
        rows: vec![scale_row(row, 1e-3)],
        notes: vec![format!(
            "{count} datagrams per sample from one unconnected socket; the guard runs `sendmsg4` and `egress` on every one, \
             and the host-side table's `input` chain judges each on the node. \
             The node's receiving socket is never read, so after its queue fills every datagram is dropped at the same point."
        )],
        ..Default::default()
    })
}

/// Figure 2c: figure 2's datagrams to an address that shares the metadata address's
/// first 16 bits (NodeLocal DNSCache's 169.254.20.10): the second prefilter's case.
pub(crate) fn udp_lead_neighbour(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (3, 2000) } else { (301, 1000) };
    let dest = SocketAddrV4::new(LEAD_NEIGHBOUR, UDP_PORT);
    let row = per_op_row(b, "sendto to 169.254.20.10, 32 bytes", rounds, count, Op::UdpSendto { dest, count })?;
    Ok(Figure {
        title: "2c. Allowed UDP path beside the metadata address".into(),
        unit: "µs per datagram".into(),
        targets: targets("2c. UDP sendto beside the metadata address", &row, 1.02, true),
        rows: vec![scale_row(row, 1e-3)],
        notes: vec![format!(
            "As figure 2, to {LEAD_NEIGHBOUR} (NodeLocal DNSCache's address, on the node's `lo`), which shares \
             169.254.169.254's first 16 bits: each prefilter's first look (the lead) says \"maybe\", its second \
             (the next 16 bits) says no, so the datagram leaves before the policy's longest-prefix lookup in \
             `sendmsg4` and `egress`, and before `judge` in the host-side table. Every DNS query of every pod \
             on a node with NodeLocal DNSCache takes this path."
        )],
        ..Default::default()
    })
}

/// Figure 2b: socket + connect + send + close, each time (every hook once).
pub(crate) fn udp_connect_send(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (3, 1000) } else { (301, 500) };
    let dest = b.node_addr(UDP_PORT);
    let row = per_op_row(b, "socket + connect + send + close", rounds, count, Op::UdpConnectSend { dest, count })?;
    Ok(Figure {
        title: "2b. Allowed UDP path, connected".into(),
        unit: "µs per operation".into(),
        targets: targets("2b. UDP connect+send", &row, 1.03, true),
        rows: vec![scale_row(row, 1e-3)],
        notes: vec![format!(
            "{count} operations per sample, each a new UDP socket connected to the node and sending one 32-byte \
             datagram (a DNS client's pattern): the guard runs `connect4` and `egress` once each (and `sock_create` where the packet backstop reads socket marks), and the host-side table's `input` chain on \
             the node once."
        )],
        ..Default::default()
    })
}

/// Figure 3: TCP throughput pod → node.
pub(crate) fn bulk(b: &mut Bench) -> Result<Figure> {
    let (rounds, ms) = if b.quick { (3, 100) } else { (151, 100) };
    let dest = b.node_addr(BULK_PORT);
    let rules = iptables_rules(&[]);
    let samples = interleave(b, &ALL, rounds, &|fw| fw.iptables_restore(&rules), &mut |b, v| {
        let r = b.run(v, Op::Bulk { dest, ms })?;
        all_ok(&r, 1, &format!("bulk TCP to {dest} ({})", label(v)))?;
        ensure!(r.bytes > 0, "bulk TCP to {dest} ({}): no bytes sent", label(v));
        Ok(r.gbit_per_s())
    })?;
    let row = row("64 KiB writes", &ALL, samples);
    Ok(Figure {
        title: "3. Bulk TCP throughput".into(),
        unit: "Gbit/s".into(),
        targets: targets("3. bulk TCP throughput", &row, 0.99, false),
        rows: vec![row],
        notes: vec![format!(
            "One connection per sample writing 64 KiB buffers for {ms} ms; the node side reads and discards. The packet \
             backstop (`egress`) runs on every segment the pod sends."
        )],
        ..Default::default()
    })
}

/// Figure 4: how long a refused connect to the metadata address takes to fail.
pub(crate) fn refused(b: &mut Bench) -> Result<Figure> {
    let (rounds, count, drop_wait) = if b.quick { (3, 50, 1000) } else { (9, 300, 3000) };
    let dest = SocketAddrV4::new(METADATA, 80);
    // Without guard or rule the stand-in answers: proves "no guard" really is none. The
    // host-side table judges every pod by destination, so it goes too for this proof.
    b.uninstall()?;
    let open = b.run(Variant::None, Op::Refused { dest, count: 1 })?;
    all_ok(&open, 1, "connect to the metadata stand-in without guard or rule")?;
    b.start_agent(&[])?;
    let reject = nft_input_rule("ip daddr 169.254.169.254 meta l4proto tcp reject with tcp reset");
    let variants = [Variant::Guard, Variant::Firewall];
    let samples = interleave(b, &variants, rounds, &|fw| fw.nft(&reject), &mut |b, v| {
        let r = b.run(v, Op::Refused { dest, count })?;
        let want = if v == Variant::Guard { "EPERM" } else { "ECONNREFUSED" };
        ensure!(
            r.ok == 0 && r.errors.get(want) == Some(&count),
            "connect to {dest} ({}): expected {count} × {want}, got {} successes and {:?}",
            label(v),
            r.ok,
            r.errors
        );
        let us: Vec<f64> = r.samples_ns.iter().map(|&n| n as f64 / 1e3).collect();
        Ok(median(&us))
    })?;
    // DROP: one attempt, bounded; a real client waits far longer (see the note).
    b.load_firewall(&|fw| fw.nft(&nft_input_rule("ip daddr 169.254.169.254 drop")))?;
    let probe =
        b.set(Variant::Firewall).and_then(|()| b.run(Variant::Firewall, Op::Probe { dest, timeout_ms: drop_wait }));
    b.unload_firewall()?;
    let probe = probe?;
    ensure!(
        probe.errors.get("ETIMEDOUT") == Some(&1),
        "connect to {dest} with an nftables DROP rule: expected no answer within {drop_wait} ms, got {:?} / {} ok",
        probe.errors,
        probe.ok
    );
    let retries = probe.syn_retries.unwrap_or(6);
    let kernel_gives_up = (1u64 << (retries + 1)) - 1;
    let waited = Duration::from_nanos(probe.samples_ns[0]);
    let guard_us = median(&samples[0]);
    let reject_us = median(&samples[1]);
    Ok(Figure {
        title: "4. Refused path: time for a pod's connect to the metadata address to fail".into(),
        facts: vec![
            ("guard (EPERM at connect)".into(), format!("{guard_us:.1} µs median")),
            ("nftables REJECT with tcp reset (ECONNREFUSED)".into(), format!("{reject_us:.1} µs median ({:.1}× the guard)", reject_us / guard_us)),
            (
                "nftables DROP".into(),
                format!(
                    "no answer: measured one attempt, gave up after {:.2} s (our bound). A client waits for its own timeout: \
                     the kernel's SYN retries ({retries}) give up after ~{kernel_gives_up} s; curl's default connect timeout is \
                     300 s, so curl waits those {kernel_gives_up} s too",
                    waited.as_secs_f64()
                ),
            ),
        ],
        notes: vec![format!(
            "Medians over {rounds} rounds of {count} attempts each (the median attempt of each round). Each attempt is \
             `socket` + `connect` + `close`; without guard or rule the same connect reaches the metadata stand-in. \
             Both the guard and REJECT answer at once; the guard's refusal also counts the verdict and queues an audit \
             event for the agent (ring buffer reserve + submit, which wakes the agent), so on two busy cores the two \
             land within microseconds of each other, in either order."
        )],
        ..Default::default()
    })
}

/// Rescales every sample (ns → µs).
pub(crate) fn scale_row(mut row: Row, k: f64) -> Row {
    for c in &mut row.cols {
        for s in &mut c.samples {
            *s *= k;
        }
    }
    row
}

/// An nftables table with one rule on the node namespace's input hook.
fn nft_input_rule(rule: &str) -> String {
    format!("table ip mg_bench {{\n  chain input {{\n    type filter hook input priority 0;\n    {rule}\n  }}\n}}\n")
}
