// SPDX-License-Identifier: Apache-2.0
//! The BPF profile: where the guard's nanoseconds go, per operation, beside empty
//! programs on the same hooks (kernel BPF statistics).

use std::{collections::BTreeMap, net::SocketAddrV4, process::Command};

use anyhow::{ensure, Context, Result};

use crate::{
    bench::{Bench, LEAD_NEIGHBOUR, TCP_PORT, UDP_PORT},
    bpf,
    figures::label,
    report::{Figure, Target},
    variant::Variant,
    worker::Op,
};

/// Chunks per operation and variant, alternating guard and empty programs.
pub(crate) const CHUNKS: u64 = 20;

/// A program that ran less than this per operation ran for something else.
const MIN_RUNS_PER_OP: f64 = 0.5;

/// One operation's BPF profile: program name → (runs per operation, mean ns per run).
pub(crate) type Programs = BTreeMap<String, (f64, f64)>;

/// The profile of each operation, for the guard's and for the empty programs.
pub(crate) struct Profile {
    pub ops: Vec<(&'static str, Programs, Programs)>,
}

/// Which empty program sits on the same hook as a guard program.
pub(crate) fn empty_twin(guard_program: &str) -> &'static str {
    match guard_program {
        "mg_sock_create" => "mg_empty_sock",
        "mg_connect4" => "mg_empty_conn4",
        "mg_connect6" => "mg_empty_conn6",
        "mg_sendmsg4" => "mg_empty_send4",
        "mg_sendmsg6" => "mg_empty_send6",
        "mg_egress" | "mg_egress_netns" => "mg_empty_egress",
        "mg_conceal_ops" => "mg_empty_ops",
        "mg_uplink" | "mg_uplink_marks" => "mg_empty_uplink",
        _ => "?",
    }
}

/// The operations the profile measures in enforce mode.
pub(crate) fn enforce_ops(b: &Bench, per_chunk: u64) -> Vec<(&'static str, Op)> {
    vec![
        (TCP_CONNECT, Op::TcpConnect { dest: b.node_addr(TCP_PORT), count: per_chunk }),
        ("UDP sendto", Op::UdpSendto { dest: b.node_addr(UDP_PORT), count: per_chunk }),
        (UDP_SENDTO_NEIGHBOUR, Op::UdpSendto { dest: SocketAddrV4::new(LEAD_NEIGHBOUR, UDP_PORT), count: per_chunk }),
        ("UDP connect + send", Op::UdpConnectSend { dest: b.node_addr(UDP_PORT), count: per_chunk }),
        ("forwarded TCP connect + close", Op::TcpConnect { dest: b.beyond.addr(TCP_PORT), count: per_chunk }),
    ]
}

pub(crate) const TCP_CONNECT: &str = "TCP connect + close";
/// Figure 2c's operation.
pub(crate) const UDP_SENDTO_NEIGHBOUR: &str = "UDP sendto beside the metadata address";
/// Figure 9b's operation: as [`TCP_CONNECT`], the agent in conceal mode.
pub(crate) const TCP_CONNECT_CONCEAL: &str = "TCP connect + close, conceal mode";

/// Operations per profile line (and per chunk, this over [`CHUNKS`]).
pub(crate) fn operations(b: &Bench) -> u64 {
    if b.quick {
        2000
    } else {
        20_000
    }
}

/// Run counts and run time of each guard program per operation, beside the empty
/// programs on the same hooks, from the kernel's BPF statistics (switched on only for
/// this pass: they cost a clock read per run). `ops` carry [`operations`] / [`CHUNKS`].
pub(crate) fn measure(b: &mut Bench, ops: Vec<(&'static str, Op)>) -> Result<Profile> {
    let per_chunk = operations(b) / CHUNKS;
    let mut guard = guard_programs(b)?;
    let mut empty = b.empty_programs.ids.clone();
    // The uplink's program runs on the measured uplink for the guard's chunks, the
    // empty one in its place for the empty programs' (figure 10).
    let (uplink, empty_uplink) = b.uplink_ids()?;
    if !guard.iter().any(|(_, id)| *id == uplink) {
        guard.push(("mg_uplink".into(), uplink));
    }
    empty.push(("mg_empty_uplink".into(), empty_uplink));
    let stats = bpf::enable_stats()?;
    let mut profile = Profile { ops: Vec::new() };
    for (what, op) in ops {
        let (mut gc, mut ec) = (Chunks::new(), Chunks::new());
        for _ in 0..CHUNKS {
            chunk(b, Variant::Guard, &op, &guard, &mut gc, what)?;
            chunk(b, Variant::Empty, &op, &empty, &mut ec, what)?;
        }
        let (g, e) = (summarize(&gc, per_chunk * CHUNKS), summarize(&ec, per_chunk * CHUNKS));
        profile.ops.push((what, g, e));
    }
    drop(stats);
    Ok(profile)
}

/// The profile's figure, with its two targets.
pub(crate) fn figure(profile: &Profile, count: u64) -> Figure {
    let mut facts = Vec::new();
    let (mut worst, mut worst_own, mut worst_empty) = (0.0f64, 0.0f64, 0.0f64);
    for (what, g, e) in &profile.ops {
        // Programs of the operation itself: not a socket some other call created.
        for (name, (_, ns)) in g.iter().filter(|(_, (runs, _))| *runs >= MIN_RUNS_PER_OP) {
            let empty_ns = e.get(empty_twin(name)).map_or(0.0, |(_, ns)| *ns);
            if *ns > worst {
                (worst, worst_empty) = (*ns, empty_ns);
            }
            worst_own = worst_own.max(ns - empty_ns);
        }
        facts.push((format!("{what}: guard"), describe(g)));
        facts.push((format!("{what}: empty programs"), describe(e)));
    }
    let measured = format!(
        "{count} operations per line with `BPF_ENABLE_STATS` on, in {CHUNKS} chunks alternating guard and empty \
         programs; \"name runs×ns\" is runs per operation × the median over chunks of the mean run \
         time. The empty programs (`r0 = 1; exit`) run in the guard's own links (swapped in with \
         `BPF_LINK_UPDATE` for their chunks), for the same pod: their time is what the kernel's statistics and \
         hook dispatch cost by themselves, so the guard's own work is the difference. The statistics add clock \
         reads to each run, so all of these are upper bounds. The conceal-mode line is measured with the agent \
         in conceal mode, where `mg_conceal_ops` (sock_ops) runs on the connection's TCP events."
    );
    let mut slowest =
        Target::at_most("profile: slowest guard program, mean ns per run, destination outside the policy", worst, 40.0);
    slowest.explain = format!(
        "The empty program on the same hook, `r0 = 1; exit`, measures {worst_empty:.0} ns per run on this machine: \
         the statistics' own clock reads and the kernel's dispatch, which no program on that hook can go below. \
         The guard's own work in it is {:.0} ns (the next target).",
        worst - worst_empty
    );
    Figure {
        title: "Profile: the guard's programs per operation (kernel BPF statistics)".into(),
        facts,
        targets: vec![
            slowest,
            Target::at_most(
                "profile: the same, less the empty program's mean on its hook (the guard's own work)",
                worst_own,
                40.0,
            ),
        ],
        notes: vec![measured],
        ..Default::default()
    }
}

/// Per program, each chunk's (runs, run time in ns).
type Chunks = BTreeMap<String, Vec<(u64, u64)>>;

/// Runs `op` once from `v`'s cgroup and adds each program's share to `chunks`.
fn chunk(
    b: &mut Bench,
    v: Variant,
    op: &Op,
    programs: &[(String, u64)],
    chunks: &mut Chunks,
    what: &str,
) -> Result<()> {
    b.set(v)?;
    let before = prog_stats(programs);
    let r = b.run(v, *op);
    let after = prog_stats(programs);
    b.set(Variant::Guard)?;
    let (before, r, after) = (before?, r?, after?);
    ensure!(r.ok > 0 && r.errors.is_empty(), "{what} ({}): {} ok, errors {:?}", label(v), r.ok, r.errors);
    for (name, (cnt1, ns1)) in &after {
        let (cnt0, ns0) = before.get(name).copied().unwrap_or((0, 0));
        chunks.entry(name.clone()).or_default().push((cnt1 - cnt0, ns1 - ns0));
    }
    Ok(())
}

/// Runs per operation, and the median over chunks of the mean run time: one chunk
/// whose program was preempted (the statistics count that time too) moves a mean a
/// lot on a busy machine, the median not.
fn summarize(chunks: &Chunks, ops: u64) -> Programs {
    let mut out = Programs::new();
    for (name, list) in chunks {
        let runs: u64 = list.iter().map(|(r, _)| r).sum();
        let means: Vec<f64> = list.iter().filter(|(r, _)| *r > 0).map(|(r, ns)| *ns as f64 / *r as f64).collect();
        if runs > 0 {
            out.insert(name.clone(), (runs as f64 / ops as f64, crate::report::median(&means)));
        }
    }
    out
}

pub(crate) fn describe(p: &Programs) -> String {
    let total: f64 = p.values().map(|(runs, ns)| runs * ns).sum();
    let parts: Vec<String> = p.iter().map(|(name, (runs, ns))| format!("{name} {runs:.1}×{ns:.0} ns")).collect();
    format!("{total:.0} ns per operation = {}", parts.join(" + "))
}

/// name → (run_cnt, run_time_ns), from `bpftool -j prog show id N`.
pub(crate) fn prog_stats(programs: &[(String, u64)]) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for (name, id) in programs {
        let o = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .context("could not run bpftool; install Debian's bpftool (cargo xtask bench does)")?;
        ensure!(o.status.success(), "bpftool prog show id {id} failed: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let get = |k: &str| v[k].as_u64().unwrap_or(0);
        out.insert(name.clone(), (get("run_cnt"), get("run_time_ns")));
    }
    Ok(out)
}

pub(crate) fn guard_programs(b: &Bench) -> Result<Vec<(String, u64)>> {
    Ok(b.status()?.programs.into_iter().map(|p| (p.program_name, u64::from(p.program_id))).collect())
}
