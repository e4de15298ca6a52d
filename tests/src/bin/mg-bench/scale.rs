//! Figures 5–7 and the BPF profile: policy scale, the event storm, the agent's
//! footprint, and where the guard's nanoseconds go.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    bench::{Bench, Variant, METADATA, TCP_PORT, UDP_PORT},
    bpf,
    figures::{all_ok, interleave, label},
    report::{Figure, Measured, Row, Target},
    worker::Op,
};

/// `n` blocked /32s in 10.200.128.0/17: inside the pods' 10.200.0.0/16 but not
/// covering the addresses it uses (10.200.N.* for the first few N), so the
/// destination shares its first 16 bits with a blocked prefix at every size: the
/// prefilter cannot answer and every connect takes the full policy lookup — the worst
/// case, and the same path at 1 as at 10 000, so the sizes compare the lookup alone.
/// (With the metadata address as the one CIDR of the smallest policy, as an earlier
/// bench had it, the prefilter answered there and nowhere else: the "scale" ratio
/// was the policy lookup's whole cost.)
fn fake_cidrs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.200.{}.{}/32", 128 + i / 256, i % 256)).collect()
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
pub fn policy_scale(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (2, 200) } else { (31, 1000) };
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
        let blocked = fake_cidrs(n);
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
        wait_for_policy(b, n)?;
        let rules = scale_rules(&blocked);
        let samples = interleave(b, &SCALE, rounds, &|fw| fw.iptables_restore(&rules), &mut |b, v| {
            let r = b.run(v, Op::TcpConnect { dest, count })?;
            all_ok(&r, count, &format!("TCP connect with {n} blocked CIDRs ({})", label(v)))?;
            Ok(r.ns as f64 / count as f64 / 1e3)
        })?;
        let per_run = bpf_ns_per_run(b, Op::TcpConnect { dest, count })?;
        lookups.push(format!("{n}: {:.0} ns", per_run.get("mg_connect4").copied().unwrap_or(f64::NAN)));
        let mut row = row(&format!("{n} blocked CIDRs"), &SCALE, samples);
        row.cols[2].label = format!("{n} iptables rules");
        guard_ratios.push(row.ratio(1));
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
            Ok(r.ns as f64 / count as f64 / 1e3)
        })?;
        let row = row(&format!("{n} allowlisted cgroups"), &variants, samples);
        allow_ratios.push(row.ratio(1));
        fig.rows.push(row);
    }
    for k in 0..filled {
        allow.remove(fake_id(k))?;
    }
    let flat = |r: &[f64]| r.iter().cloned().fold(f64::MIN, f64::max) / r.iter().cloned().fold(f64::MAX, f64::min);
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
    fig.notes.push(format!(
        "{count} connects per sample. Blocked CIDRs: a config file with `presets: []` and n /32s in 10.200.128.0/17, \
         inside the pods' 10.200.0.0/16 (never covering the addresses the bench uses), applied by SIGHUP; the \
         iptables column has the same n destinations as linear `-A INPUT -s 10.200.0.0/16 -d CIDR -j DROP` rules. \
         The destination (the node, 10.200.0.x) shares its first 16 bits with every size's prefixes, so the guard's \
         prefilter cannot answer and each connect takes the policy's longest-prefix lookup: the worst case, at every \
         size alike, so the ratio between sizes is the lookup's growth with the policy. A destination whose first 16 \
         bits no blocked prefix shares — the usual case: metadata addresses are link-local — leaves after the \
         prefilter whatever the policy's size. Allowlist: fake cgroup ids written straight into the pinned map while \
         the agent is stopped (the pins keep enforcing); flatness is the ratio of the largest to the smallest \
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

fn guard_programs(b: &Bench) -> Result<Vec<(String, u64)>> {
    Ok(b.status()?.programs.into_iter().map(|p| (p.program_name, u64::from(p.program_id))).collect())
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
pub fn storm(b: &mut Bench) -> Result<Figure> {
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

pub fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Figure 7: the agent's own cost.
pub fn footprint(cold: Duration, warm: Duration, idle_rss_kib: u64) -> Figure {
    let image = Command::new("podman")
        .args(["images", "localhost/metadata-guard", "--format", "{{.Tag}} {{.Size}}"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not built (no `localhost/metadata-guard` image in podman here)".into());
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

/// Chunks per operation and variant, alternating guard and empty programs.
const CHUNKS: u64 = 20;

/// A program that ran less than this per operation ran for something else.
const MIN_RUNS_PER_OP: f64 = 0.5;

/// One operation's BPF profile: program name → (runs per operation, mean ns per run).
pub type Programs = BTreeMap<String, (f64, f64)>;

/// The profile of each operation, for the guard's and for the empty programs.
pub struct Profile {
    pub ops: Vec<(&'static str, Programs, Programs)>,
}

/// Which empty program sits on the same hook as a guard program.
pub fn empty_twin(guard_program: &str) -> &'static str {
    match guard_program {
        "mg_sock_create" => "mg_empty_sock",
        "mg_connect4" => "mg_empty_conn4",
        "mg_connect6" => "mg_empty_conn6",
        "mg_sendmsg4" => "mg_empty_send4",
        "mg_sendmsg6" => "mg_empty_send6",
        "mg_egress" => "mg_empty_egress",
        _ => "?",
    }
}

/// Run counts and run time of each guard program per operation, beside the empty
/// programs on the same hooks, from the kernel's BPF statistics (switched on only for
/// this pass: they cost a clock read per run).
pub fn profile(b: &mut Bench) -> Result<(Figure, Profile)> {
    let count = if b.quick { 2000 } else { 20_000 };
    let per_chunk = count / CHUNKS;
    let guard = guard_programs(b)?;
    let empty = b.empty_programs.ids.clone();
    let stats = bpf::enable_stats()?;
    let ops = [
        ("TCP connect + close", Op::TcpConnect { dest: b.node_addr(TCP_PORT), count: per_chunk }),
        ("UDP sendto", Op::UdpSendto { dest: b.node_addr(UDP_PORT), count: per_chunk }),
        ("UDP connect + send", Op::UdpConnectSend { dest: b.node_addr(UDP_PORT), count: per_chunk }),
        ("forwarded TCP connect + close", Op::TcpConnect { dest: b.beyond.addr(TCP_PORT), count: per_chunk }),
    ];
    let mut profile = Profile { ops: Vec::new() };
    let mut facts = Vec::new();
    let (mut worst, mut worst_own) = (0.0f64, 0.0f64);
    for (what, op) in ops {
        let (mut gc, mut ec) = (Chunks::new(), Chunks::new());
        for _ in 0..CHUNKS {
            chunk(b, Variant::Guard, &op, &guard, &mut gc, what)?;
            chunk(b, Variant::Empty, &op, &empty, &mut ec, what)?;
        }
        let (g, e) = (summarize(&gc, per_chunk * CHUNKS), summarize(&ec, per_chunk * CHUNKS));
        // Programs of the operation itself: not a socket some other call created.
        for (name, (_, ns)) in g.iter().filter(|(_, (runs, _))| *runs >= MIN_RUNS_PER_OP) {
            let empty_ns = e.get(empty_twin(name)).map(|(_, ns)| *ns).unwrap_or(0.0);
            worst = worst.max(*ns);
            worst_own = worst_own.max(ns - empty_ns);
        }
        facts.push((format!("{what}: guard"), describe(&g)));
        facts.push((format!("{what}: empty programs"), describe(&e)));
        profile.ops.push((what, g, e));
    }
    drop(stats);
    let fig = Figure {
        title: "Profile: the guard's programs per operation (kernel BPF statistics)".into(),
        facts,
        targets: vec![
            Target::at_most(
                "profile: slowest guard program, mean ns per run, destination outside the policy",
                worst,
                40.0,
            ),
            Target::at_most(
                "profile: the same, less the empty program's mean on its hook (the guard's own work)",
                worst_own,
                40.0,
            ),
        ],
        notes: vec![format!(
            "{count} operations per line with `BPF_ENABLE_STATS` on, in {CHUNKS} chunks alternating guard and empty \
             programs; \"name runs×ns\" is runs per operation × the median over chunks of the mean run \
             time. The empty programs (`r0 = 1; exit`) run on the same hooks from a cgroup of their own: their time is \
             what the kernel's statistics and hook dispatch cost by themselves, so the guard's own work is the \
             difference. The statistics add clock reads to each run, so all of these are upper bounds."
        )],
        ..Default::default()
    };
    Ok((fig, profile))
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
    let before = prog_stats(programs)?;
    let r = b.run(v, op.clone())?;
    ensure!(r.ok > 0 && r.errors.is_empty(), "{what} ({}): {} ok, errors {:?}", label(v), r.ok, r.errors);
    let after = prog_stats(programs)?;
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

pub fn describe(p: &Programs) -> String {
    let total: f64 = p.values().map(|(runs, ns)| runs * ns).sum();
    let parts: Vec<String> = p.iter().map(|(name, (runs, ns))| format!("{name} {runs:.1}×{ns:.0} ns")).collect();
    format!("{total:.0} ns per operation = {}", parts.join(" + "))
}

/// name → (run_cnt, run_time_ns), from `bpftool -j prog show id N`.
fn prog_stats(programs: &[(String, u64)]) -> Result<BTreeMap<String, (u64, u64)>> {
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
