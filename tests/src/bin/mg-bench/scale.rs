// SPDX-License-Identifier: Apache-2.0
//! Figures 5–7: policy scale, the event storm and the agent's footprint (the BPF
//! profile, where the guard's nanoseconds go, is `profile`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    bench::{Bench, METADATA, TCP_PORT},
    bpf,
    figures::{all_ok, interleave, label},
    report::{Figure, Measured, Row, Target},
    variant::Variant,
    worker::Op,
};

use crate::profile::{guard_programs, prog_stats};

/// `n` blocked /32s in 10.200.128.0/17, inside the pods' 10.200.0.0/16 but not
/// covering the addresses it uses (10.200.N.* for the first few N), and one more, the
/// destination's *twin*: its next 16 bits under the lead 10.201. So the destination
/// shares its first 16 bits with the /32s and its next 16 with the twin: neither
/// prefilter can answer and every connect takes the full policy lookup — the worst
/// case, and the same path at 1 as at 10 000, so the sizes compare the lookup alone.
/// (With one prefix the prefilters always answer for an address it does not cover; a
/// policy whose prefilters answered at one size and not at another would measure the
/// lookup's whole cost, not its growth.)
fn fake_cidrs(n: usize, dest: Ipv4Addr) -> Vec<String> {
    std::iter::once(twin(dest)).chain((0..n).map(|i| format!("10.200.{}.{}/32", 128 + i / 256, i % 256))).collect()
}

/// The /32 with `dest`'s next 16 bits under the following lead.
fn twin(dest: Ipv4Addr) -> String {
    let [a, b, c, d] = dest.octets();
    format!("{a}.{}.{c}.{d}/32", b.wrapping_add(1))
}

/// The same destinations as linear iptables rules, as a node firewall would have them.
fn scale_rules(cidrs: &[String]) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
    for cidr in cidrs {
        s.push_str(&format!("-A INPUT -s 10.200.0.0/16 -d {cidr} -j DROP\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// Figure 5's columns: the scale of rule sets is the question, not the hook floor.
const SCALE: [Variant; 3] = [Variant::None, Variant::Guard, Variant::Firewall];

/// Figure 5: the allowed TCP path with 1, 100 and 10 000 blocked CIDRs (beside as
/// many iptables rules), and with 0, 1 000 and 10 000 allowlisted cgroups.
pub(crate) fn policy_scale(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (2, 200) } else { (151, 200) };
    let dest = b.node_addr(TCP_PORT);
    let config = b.node.config_path();
    let mut fig = Figure {
        title: "5. Policy scale (allowed TCP path)".into(),
        unit: "µs per connect".into(),
        ..Default::default()
    };
    let mut guard_ratios = Vec::new();
    let mut lookups = Vec::new();
    for (i, &n) in [1usize, 100, 10_000].iter().enumerate() {
        let blocked = fake_cidrs(n, *dest.ip());
        let mut yaml = String::from("destinations:\n  presets: []\n  block:\n");
        for c in &blocked {
            yaml.push_str(&format!("    - cidr: {c}\n"));
        }
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &config)?;
        if i == 0 {
            b.start_agent(&["--config", &config.display().to_string()])?;
        } else {
            b.agent()?.signal(libc::SIGHUP);
        }
        wait_for_policy(b, blocked.len())?;
        let rules = scale_rules(&blocked);
        let samples = interleave(b, &SCALE, rounds, &|fw| fw.iptables_restore(&rules), &mut |b, v| {
            let r = b.run(v, Op::TcpConnect { dest, count })?;
            all_ok(&r, count, &format!("TCP connect with {n} + 1 blocked CIDRs ({})", label(v)))?;
            Ok(r.per_op_ns() / 1e3)
        })?;
        let per_run = bpf_ns_per_run(b, Op::TcpConnect { dest, count })?;
        lookups.push(format!("{n}: {:.0} ns", per_run.get("mg_connect4").copied().unwrap_or(f64::NAN)));
        let mut row = row(&format!("{n} + 1 blocked CIDRs"), &SCALE, samples);
        row.cols[2].label = format!("{} iptables rules", n + 1);
        guard_ratios.push(row.paired(1));
        fig.rows.push(row);
    }
    // The allowlist is only read for blocked destinations from pods, never on the
    // allowed path; filling the pinned map directly (the agent stopped, so it does
    // not prune the fake ids) shows that, without making 10 000 kubelet pods.
    b.stop_agent()?;
    let allow = bpf::AllowMap::open(&b.node.bpffs)?;
    let mut allow_ratios = Vec::new();
    let mut filled = 0u64;
    let fake_id = |k: u64| (1u64 << 48) + k;
    for &n in &[0u64, 1000, 10_000] {
        while filled < n {
            allow.insert(fake_id(filled))?;
            filled += 1;
        }
        let variants = [Variant::None, Variant::Guard];
        let samples = interleave(b, &variants, rounds, &|_| Ok(()), &mut |b, v| {
            let r = b.run(v, Op::TcpConnect { dest, count })?;
            all_ok(&r, count, &format!("TCP connect with {n} allowlisted cgroups ({})", label(v)))?;
            Ok(r.per_op_ns() / 1e3)
        })?;
        let row = row(&format!("{n} allowlisted cgroups"), &variants, samples);
        allow_ratios.push(row.paired(1));
        fig.rows.push(row);
    }
    for k in 0..filled {
        allow.remove(fake_id(k))?;
    }
    let flat = |r: &[f64]| r.iter().copied().fold(f64::MIN, f64::max) / r.iter().copied().fold(f64::MAX, f64::min);
    fig.targets = vec![
        Target {
            what: "5. blocked CIDRs 1 → 10 000: largest / smallest guard ratio".into(),
            value: flat(&guard_ratios),
            limit: 1.05,
            at_most: true,
            explain: String::new(),
        },
        Target {
            what: "5. allowlist 0 → 10 000: largest / smallest guard ratio".into(),
            value: flat(&allow_ratios),
            limit: 1.05,
            at_most: true,
            explain: String::new(),
        },
    ];
    let (node, twin) = (dest.ip(), twin(*dest.ip()));
    fig.notes.push(format!(
        "{count} connects per sample. Blocked CIDRs: a config file with `presets: []`, n /32s in 10.200.128.0/17 \
         (inside the pods' 10.200.0.0/16, never covering the addresses the bench uses) and one more whose next 16 \
         bits are the destination's ({twin}), applied by SIGHUP; the iptables column has the same destinations as \
         linear `-A INPUT -s 10.200.0.0/16 -d CIDR -j DROP` rules. The destination (the node, {node}) shares its \
         first 16 bits with the /32s and its next 16 with the extra one, so neither of the guard's prefilters can \
         answer and each connect takes the policy's longest-prefix lookup: the worst case, at every size alike, so \
         the ratio between sizes is the lookup's growth with the policy; in the host-side table, the interval \
         lookup in `judge`, which judges every packet of these connects. A destination whose first 16 or next 16 \
         bits no blocked prefix shares — the usual case — leaves after the prefilters whatever the policy's size. \
         Allowlist: fake cgroup ids \
         written straight into the pinned map while the agent is stopped (the pins keep enforcing, with the \
         10 000-CIDR policy still in force: the worst case again); flatness is the ratio of the largest to the smallest \
         guard/no-guard ratio across the three sizes."
    ));
    fig.notes.push(format!(
        "The kernel's own measure of the policy lookup, free of the connect's noise — `connect4` mean run time \
         (BPF statistics, one extra guarded sample per size) by blocked CIDRs: {}.",
        lookups.join(", ")
    ));
    Ok(fig)
}

/// Mean run time of each guard program while the pod (guarded) runs `op`.
fn bpf_ns_per_run(b: &mut Bench, op: Op) -> Result<BTreeMap<String, f64>> {
    let programs = guard_programs(b)?;
    let _stats = bpf::enable_stats()?;
    let before = prog_stats(&programs)?;
    b.run(Variant::Guard, op)?;
    let after = prog_stats(&programs)?;
    Ok(after
        .iter()
        .filter_map(|(name, (c1, n1))| {
            let (c0, n0) = before.get(name).copied().unwrap_or((0, 0));
            (c1 > &c0).then(|| (name.clone(), (n1 - n0) as f64 / (c1 - c0) as f64))
        })
        .collect())
}

fn row(case: &str, variants: &[Variant], samples: Vec<Vec<f64>>) -> Row {
    Row {
        case: case.into(),
        cols: variants.iter().zip(samples).map(|(v, s)| Measured { label: label(*v).into(), samples: s }).collect(),
    }
}

fn wait_for_policy(b: &Bench, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = b.status()?.destinations.len();
        if have == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the kernel policy has {have} destinations 30 s after loading a config of {n}; agent log:\n{}",
                b.agent()?.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Figure 6: a pod hammering the metadata address.
pub(crate) fn storm(b: &mut Bench) -> Result<Figure> {
    let ms = if b.quick { 2000 } else { 10_000 };
    b.start_agent(&["--audit-dedup-window", "1s"])?;
    let blocked_before = b.kernel_count(None, "blocked")?;
    let pid = b.agent()?.pid();
    let cpu_before = cpu_seconds(pid)?;
    let dest = SocketAddrV4::new(METADATA, 80);
    let r = b.run(Variant::Guard, Op::Storm { dest, ms })?;
    let cpu_storm = cpu_seconds(pid)? - cpu_before;
    let eperm = r.errors.get("EPERM").copied().unwrap_or(0);
    ensure!(
        eperm > 0 && r.ok == 0 && eperm == r.attempts(),
        "storm: expected only EPERM, got {} ok and {:?}",
        r.ok,
        r.errors
    );
    let kernel = b.kernel_count(None, "blocked")? - blocked_before;
    // Let the agent drain the ring buffer and close its 1 s windows, then stop it:
    // SIGTERM writes every open window and any unreported gap.
    let deadline = Instant::now() + Duration::from_secs(if b.quick { 5 } else { 15 });
    while Instant::now() < deadline && accounted(&b.agent()?.audit_records()).0 < kernel {
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu_total = cpu_seconds(pid)? - cpu_before;
    let hwm = b.agent()?.peak_rss_kib().unwrap_or(0);
    let mut agent = b.agent.take().context("no agent")?;
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(15))?;
    let records = agent.audit_records();
    let (sum, counted, suppressed, lost, n_records) = {
        let (sum, parts) = accounted(&records);
        (sum, parts[0], parts[1], parts[2], records.len())
    };
    ensure!(
        kernel == eperm && sum == kernel,
        "storm: attempts unaccounted: worker saw {eperm} EPERM, kernel counted {kernel} blocked, records account for \
         {sum} (counts {counted} + suppressed {suppressed} + lost {lost})"
    );
    let secs = r.ns as f64 / 1e9;
    Ok(Figure {
        title: format!("6. Event storm: one pod connecting to 169.254.169.254:80 as fast as it can for {} s", ms / 1000),
        facts: vec![
            ("attempts refused".into(), format!("{eperm} ({:.0} per second)", eperm as f64 / secs)),
            ("agent CPU during the storm".into(), format!("{cpu_storm:.2} s ({:.0}% of one core)", cpu_storm / secs * 100.0)),
            ("agent CPU including the drain afterwards".into(), format!("{cpu_total:.2} s")),
            ("agent peak RSS (VmHWM)".into(), format!("{:.1} MiB", hwm as f64 / 1024.0)),
            ("audit records written".into(), format!("{n_records}")),
            (
                "accounting".into(),
                format!(
                    "kernel blocked {kernel} = record counts {counted} + suppressed {suppressed} + lost (ring buffer full) \
                     {lost} ✓"
                ),
            ),
        ],
        notes: vec!["Agent flags: `--audit-dedup-window 1s`, default `--audit-rate-limit 100`. Records are read from \
                     the agent's stdout; the kernel count from `status --json`."
            .into()],
        ..Default::default()
    })
}

/// (total, [counts, suppressed, lost]) over audit records.
fn accounted(records: &[crate::agent::RecordLine]) -> (u64, [u64; 3]) {
    let counted: u64 = records.iter().filter(|r| r.kind == "attempts").map(|r| r.count).sum();
    let suppressed: u64 = records.iter().map(|r| r.suppressed_since_last).sum();
    let lost: u64 = records.iter().map(|r| r.lost_since_last).sum();
    (counted + suppressed + lost, [counted, suppressed, lost])
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("could not read /proc/{pid}/stat"))?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("odd /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

pub(crate) fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Figure 7: the agent's own cost.
pub(crate) fn footprint(cold: Duration, warm: Duration, idle_rss_kib: u64) -> Figure {
    // The tag names a manifest list (one image per architecture); `image inspect`
    // resolves it to this machine's architecture's image, whose size is what a node pulls.
    let image = Command::new("podman")
        .args(["image", "inspect", "localhost/metadata-guard:dev", "--format", "{{.Size}} {{.Architecture}}"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let (bytes, arch) = out.trim().split_once(' ')?;
            Some(format!("{:.1} MiB ({arch}, uncompressed)", bytes.parse::<f64>().ok()? / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "not built (no `localhost/metadata-guard:dev` image in podman here)".into());
    Figure {
        title: "7. Footprint".into(),
        facts: vec![
            ("agent RSS, idle".into(), format!("{:.1} MiB", idle_rss_kib as f64 / 1024.0)),
            ("start to /readyz 200, first install".into(), format!("{} ms", cold.as_millis())),
            ("start to /readyz 200, restart adopting the pins".into(), format!("{} ms", warm.as_millis())),
            ("container image".into(), image),
        ],
        ..Default::default()
    }
}
