// SPDX-License-Identifier: Apache-2.0
//! Why a target was missed: each allowed-path figure's time split at the floor (the
//! guard's hooks with nothing in them) into the kernel's hook overhead below it and
//! the guard's own work above it, the latter split again into the programs' share
//! (also from the kernel's BPF statistics) and the host-side table's.

use std::fmt::Write;

use crate::{
    figures::ALL,
    profile::{self, Profile},
    report::{median, Figure, Row, Target},
    variant::Variant,
};

/// Column of each variant in the rows of figures measured with [`ALL`].
fn col(v: Variant) -> usize {
    ALL.iter().position(|a| *a == v).unwrap_or(usize::MAX)
}

/// The profile's operation behind each figure (by the number in its title).
fn operation(figure: &str) -> Option<&'static str> {
    match figure {
        "1" | "3" | "5" => Some(profile::TCP_CONNECT),
        "2" => Some("UDP sendto"),
        "2c" => Some(profile::UDP_SENDTO_NEIGHBOUR),
        "2b" => Some("UDP connect + send"),
        "8" => Some("forwarded TCP connect + close"),
        "9b" => Some(profile::TCP_CONNECT_CONCEAL),
        _ => None,
    }
}

/// The guard's programs per operation beyond the empty programs on the same hooks, in
/// ns, and how they run ("1.0× mg_connect4, 3.0× mg_egress_netns").
fn programs_own(profile: &Profile, op: &str) -> Option<(f64, String)> {
    let (_, guard, empty) = profile.ops.iter().find(|(w, _, _)| *w == op)?;
    let mut own = 0.0;
    let mut runs = Vec::new();
    for (name, (n, ns)) in guard {
        let empty_ns = empty.get(profile::empty_twin(name)).map_or(0.0, |(_, ns)| *ns);
        own += n * (ns - empty_ns);
        runs.push(format!("{n:.1}× {name}"));
    }
    Some((own, runs.join(", ")))
}

/// How many times one operation's packets pass a host-side base chain's prefilter
/// (by figure and row): a TCP connect + close to the node is SYN, ACK and RST in
/// `input` and the SYN-ACK in `output`; forwarded, all four pass `forward`; a UDP
/// datagram passes `input` once.
fn table_passes(figure: &str, row: &Row) -> Option<f64> {
    if row.case.contains("Gbit") {
        return None;
    }
    match figure {
        "1" | "8" | "9b" => Some(4.0),
        "2" | "2c" | "2b" => Some(1.0),
        _ => None,
    }
}

/// The host-side table's own ns per packet, from figure 2 (one pass per datagram, the
/// least noisy figure): the table at work over the floor.
fn table_ns_per_pass(figures: &[Figure]) -> Option<f64> {
    let row = figures.iter().find(|f| f.title.starts_with("2. "))?.rows.first()?;
    (row.cols.len() == ALL.len()).then(|| {
        (row.paired(col(Variant::Table)) - row.paired(col(Variant::Empty))) * median(&row.cols[0].samples) * 1e3
    })
}

/// Sets every missed target's explanation.
pub(crate) fn explain(figures: &mut [Figure], profile: &Profile) {
    let per_pass = table_ns_per_pass(figures);
    for f in figures.iter_mut() {
        let number = f.title.split_once(". ").map_or("", |(n, _)| n).to_string();
        if number == "5" {
            explain_flatness(f);
            continue;
        }
        if number == "10" {
            crate::uplink::explain(f, profile);
            continue;
        }
        let throughput = f.unit.starts_with("Gbit");
        for (t, row) in f.targets.iter_mut().zip(target_rows(&f.rows, &number)) {
            let Some(row) = row else { continue };
            if row.cols.len() != ALL.len() {
                continue;
            }
            let precise = Precise {
                programs: operation(&number).and_then(|op| programs_own(profile, op)),
                table: per_pass.zip(table_passes(&number, row)),
            };
            t.explain = split(t, row, &precise, throughput || row.case.contains("Gbit"));
        }
    }
}

/// The row each target of a figure judges: figure 8's first two targets its connect
/// row, the other two its bulk row; every other figure has one row.
fn target_rows<'a>(rows: &'a [Row], number: &str) -> Vec<Option<&'a Row>> {
    if number == "8" {
        vec![rows.first(), rows.first(), rows.get(1), rows.get(1)]
    } else {
        vec![rows.first(); 4]
    }
}

/// The guard's own work per operation from the measures free of end-to-end noise.
struct Precise {
    /// The BPF profile: ns per operation over empty programs, and the runs.
    programs: Option<(f64, String)>,
    /// Figure 2's ns per pass through the host-side table, and passes per operation.
    table: Option<(f64, f64)>,
}

/// One target's explanation from its row's columns.
fn split(t: &Target, row: &Row, precise: &Precise, throughput: bool) -> String {
    // Costs as the ratio of time per operation (for throughput, of time per byte).
    let cost = |v: Variant| {
        let r = row.paired(col(v));
        if throughput {
            1.0 / r
        } else {
            r
        }
    };
    let pct = |x: f64| format!("{:+.1} %", x * 100.0);
    // ns per operation at no guard's median, where the figure is per operation.
    let base_ns = (!throughput).then(|| median(&row.cols[0].samples) * 1e3);
    let ns = |x: f64| base_ns.map_or(String::new(), |b| format!(" ({:+.0} ns)", x * b));
    let (floor, guard) = (cost(Variant::Empty) - 1.0, cost(Variant::Guard) - cost(Variant::Empty));
    let programs_share = cost(Variant::Programs) - cost(Variant::Empty);
    let table_share = cost(Variant::Table) - cost(Variant::Empty);
    let rule = cost(Variant::Firewall) - 1.0;
    let (lo, _, hi) = row.paired_spread(col(Variant::Guard));
    let mut s = String::new();
    let _ = write!(
        s,
        "Where the time goes (medians of {} round ratios{}): the floor — the guard's hooks with nothing in them — \
         costs {}{}, the kernel's own charge for running anything on those hooks; the guard's own work adds {}{}: \
         its programs {}{}",
        row.cols[0].samples.len(),
        if throughput { ", as time per byte" } else { "" },
        pct(floor),
        ns(floor),
        pct(guard),
        ns(guard),
        pct(programs_share),
        ns(programs_share),
    );
    let _ = write!(s, ", its host-side table {}{}.", pct(table_share), ns(table_share));
    if let (Some((programs_ns, runs)), Some((per_pass, passes))) = (&precise.programs, precise.table) {
        let total = programs_ns + per_pass * passes;
        let _ = write!(
            s,
            " The same own work from the measures free of this noise: {programs_ns:.0} ns in the programs (the BPF \
             profile, over empty programs on the same hooks: {runs}) + {passes:.0} × {per_pass:.0} ns in the table \
             (figure 2's one pass of a packet) = {total:.0} ns per operation{}.",
            base_ns.map_or(String::new(), |b| format!(", {:+.2} %", total / b * 100.0))
        );
    }
    let _ = write!(
        s,
        " One iptables rule — one base chain with one rule, on one hook — costs {}. The guard's round ratios spread \
         {lo:.3}–{hi:.3} (p25–p75). ",
        pct(rule),
    );
    let floor_ratio = row.paired(col(Variant::Empty));
    let beyond = |limit: f64| if t.at_most { floor_ratio > limit } else { floor_ratio < limit };
    if beyond(t.limit) {
        let _ = write!(
            s,
            "**The floor alone ({floor_ratio:.3}) is beyond the limit ({:.3}): the miss is the kernel's hook \
             overhead, which no work inside the hooks can remove — only fewer hooks could.**",
            t.limit
        );
    } else {
        let room = (t.limit - floor_ratio).abs();
        let _ = write!(
            s,
            "The floor ({floor_ratio:.3}) is within the limit ({:.3}) by {:.1} %{}: the guard's own work is what \
             misses it.",
            t.limit,
            room * 100.0,
            base_ns.map_or(String::new(), |b| format!(", {:.0} ns", room * b)),
        );
    }
    s
}

/// Figure 5: the sizes' ratios move within their own noise.
fn explain_flatness(f: &mut Figure) {
    let spreads: Vec<String> = f
        .rows
        .iter()
        .map(|r| {
            let (lo, mid, hi) = r.paired_spread(1);
            format!("{}: {mid:.3} ({lo:.3}–{hi:.3})", r.case)
        })
        .collect();
    let text = format!(
        "The guard's ratio per size, with its round ratios' p25–p75: {}. Where those ranges overlap, the sizes differ \
         by less than this machine's noise; the kernel's own measure of the lookup (the `connect4` run times in the \
         note) shows how much the policy's size itself costs.",
        spreads.join("; ")
    );
    for t in &mut f.targets {
        t.explain.clone_from(&text);
    }
}

/// A bar per headline ratio (the median round ratio), with the target marked.
pub(crate) fn chart_bars(figs: &[Figure]) -> Vec<(String, f64, Option<f64>)> {
    let mut bars = Vec::new();
    for f in figs.iter().filter(|f| !f.rows.is_empty() && !f.title.starts_with('5')) {
        let short = f.title.split_once(". ").map_or(f.title.as_str(), |x| x.1).to_lowercase();
        let limit = f.targets.first().map(|t| t.limit);
        for row in &f.rows {
            let name = if f.rows.len() > 1 { row.case.clone() } else { short.clone() };
            for i in 1..row.cols.len() {
                bars.push((
                    format!("{name}: {}", row.cols[i].label),
                    row.paired(i),
                    (i == 1).then_some(limit).flatten(),
                ));
            }
        }
    }
    if let Some(f5) = figs.iter().find(|f| f.title.starts_with('5')) {
        for row in &f5.rows {
            bars.push((format!("{}: guard", row.case), row.paired(1), None));
            if row.cols.len() > 2 {
                bars.push((format!("{}: iptables", row.cols[2].label), row.paired(2), None));
            }
        }
    }
    bars
}
