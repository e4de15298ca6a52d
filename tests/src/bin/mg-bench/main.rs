//! mg-bench: what metadata-guard costs, side by side with no guard and with
//! iptables/nftables rules, on the scenarios' simulated node (real kernel, real
//! agent, namespaces and cgroups of its own).
//!
//! Usage: mg-bench --agent PATH [--quick] [--profile-only] [--out DIR]   (root; `cargo xtask bench`)
//! `--quick` runs every figure briefly and fails only on broken measurements (a guard
//! that does not block, zero iterations, unaccounted attempts), never on timings.
//! `--profile-only` measures only the BPF profile (full size unless `--quick`): the
//! kernel's per-program nanoseconds, in seconds, for work on the programs themselves.

mod bench;
mod bpf;
mod conceal;
mod figures;
mod floor;
mod forwarded;
mod profile;
mod report;
mod scale;
mod worker;

use metadata_guard_tests::{agent, node};

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bench::Bench;
use report::Figure;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set by SIGINT/SIGTERM; loops stop at the next sample so every drop runs.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

struct Args {
    agent: PathBuf,
    quick: bool,
    profile_only: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: mg-bench --agent PATH [--quick] [--profile-only] [--out DIR]";
    let mut it = std::env::args().skip(1);
    let mut args =
        Args { agent: PathBuf::new(), quick: false, profile_only: false, out: PathBuf::from("docs/benchmarks") };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agent" => args.agent = it.next().context("--agent needs a path")?.into(),
            "--quick" => args.quick = true,
            "--profile-only" => args.profile_only = true,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            other => bail!("unknown argument {other}; {usage}"),
        }
    }
    if args.agent.as_os_str().is_empty() {
        bail!("--agent is required; {usage} (cargo xtask bench builds and passes it)");
    }
    Ok(args)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // The simulated node's pods hold their namespace with a sandbox process: this one.
    if argv.get(1).map(String::as_str) == Some(metadata_guard_tests::sandbox::SANDBOX_ARG) {
        if let Err(e) = metadata_guard_tests::sandbox::child_main(&argv[2..]) {
            eprintln!("sandbox: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if argv.get(1).map(String::as_str) == Some("conceal-worker") {
        if let Err(e) = conceal::child_main(argv.get(2).map_or("", String::as_str)) {
            eprintln!("mg-bench conceal worker: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if argv.get(1).map(String::as_str) == Some("worker") {
        if let Err(e) = worker::child_main(argv.get(2).map_or("", String::as_str)) {
            eprintln!("mg-bench worker: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if let Err(e) = real_main() {
        eprintln!("mg-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench needs root (it loads BPF programs and makes namespaces and cgroups); run it with sudo");
    }
    if !args.agent.exists() {
        bail!("no agent binary at {}; build it with `cargo xtask build --release`", args.agent.display());
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let load_before = load_average();
    let mut b = Bench::new(args.agent.canonicalize()?, args.quick)?;
    let figures = if args.profile_only { profile_only(&mut b)? } else { run_all(&mut b)? };
    drop(b);
    let machine = machine(args.quick, started.elapsed(), (load_before, load_average()))?;
    let md = report::markdown(&machine, &figures);
    report::write(&args.out, &md, &report::svg(&chart_bars(&figures)))?;
    println!("{md}");
    eprintln!("mg-bench: wrote {}/results.md and chart.svg in {:.0?}", args.out.display(), started.elapsed());
    Ok(())
}

fn profile_only(b: &mut Bench) -> Result<Vec<Figure>> {
    b.start_agent(&[])?;
    Ok(vec![scale::profile(b)?.0])
}

fn run_all(b: &mut Bench) -> Result<Vec<Figure>> {
    let step = |name: &str| eprintln!("mg-bench: {name}");
    step("starting the agent (first install)");
    let cold = b.start_agent(&[])?;
    std::thread::sleep(Duration::from_secs(if b.quick { 1 } else { 3 }));
    let idle_rss = scale::rss_kib(b.agent()?.pid(), "VmRSS:").unwrap_or(0);
    let warm = b.start_agent(&[])?;
    step("1. allowed TCP path");
    let f1 = figures::tcp_allowed(b)?;
    step("2. allowed UDP path");
    let f2 = figures::udp_allowed(b)?;
    step("2b. allowed UDP path, connected");
    let f2b = figures::udp_connect_send(b)?;
    step("8. forwarded pod traffic");
    let f8 = forwarded::forwarded(b)?;
    step("profile");
    let (profile_fig, profile) = scale::profile(b)?;
    step("3. bulk throughput");
    let f3 = figures::bulk(b)?;
    step("4. refused path");
    let f4 = figures::refused(b)?;
    step("6. event storm");
    let f6 = scale::storm(b)?;
    step("5. policy scale");
    let f5 = scale::policy_scale(b)?;
    let f7 = scale::footprint(cold, warm, idle_rss);
    step("9. conceal proxy");
    let mut figures = vec![f1, f2, f2b, f3, f8, f4, f5, f6, f7];
    figures.extend(conceal::figures(b)?);
    figures.push(profile_fig);
    explain(&mut figures, &profile);
    Ok(figures)
}

/// Why a target was missed, from the profile: the guard's time per hook beside the
/// empty program's on the same hook.
fn explain(figures: &mut [Figure], profile: &scale::Profile) {
    // The profile's sentence for an operation, and the programs' own ns in it.
    let hooks = |what: &str| -> (String, f64) {
        let Some((_, g, e)) = profile.ops.iter().find(|(w, _, _)| *w == what) else { return (String::new(), 0.0) };
        let mut parts = Vec::new();
        let mut own = 0.0;
        for (name, (runs, ns)) in g {
            match e.get(scale::empty_twin(name)) {
                Some((_, empty_ns)) => {
                    own += runs * (ns - empty_ns);
                    parts.push(format!("{name} {runs:.1}×{ns:.0} ns (empty program on that hook: {empty_ns:.0} ns)"));
                }
                // The sockops hook has no empty twin among the bench's programs: all of
                // its time is counted as the guard's (an upper bound).
                None => {
                    own += runs * ns;
                    parts.push(format!("{name} {runs:.1}×{ns:.0} ns (no empty program on that hook: all counted)"));
                }
            }
        }
        let text = format!(
            "The BPF profile of this operation: {}; the guard's programs' own work beyond the empty programs in \
             the same links is {own:.0} ns per operation, the rest is the kernel's cost of running any program on \
             these hooks.",
            parts.join(", ")
        );
        (text, own)
    };
    for f in figures.iter_mut() {
        let op = match f.title.split('.').next().unwrap_or("") {
            "1" | "5" => "TCP connect + close",
            "2" => "UDP sendto",
            "2b" => "UDP connect + send",
            "8" => "forwarded TCP connect + close",
            "3" => "TCP connect + close",
            _ => "",
        };
        let noise = "Compare the guard's ratio with the floor's, \"the guard's hooks, empty\" (same run, same links \
                     and base chains, nothing done in them), and with the round ratios' p25–p75: what the floor \
                     costs too is the kernel's hook overhead, not the guard's work; where the spread covers the \
                     limit, it is this shared machine's noise.";
        let (profile_text, own) = hooks(op);
        // Per-operation figures (µs): the medians' distances in ns, split at the floor —
        // below it the kernel's hooks, above it the guard's own work, of which the
        // profile accounts for the programs' share.
        let observed = match f.rows.first() {
            Some(row) if f.unit.starts_with("µs") && row.cols.len() > 3 => {
                let m = |i: usize| report::median(&row.cols[i].samples) * 1e3;
                format!(
                    " Where the time goes in this run (medians per operation): the floor — the guard's hooks with \
                     nothing in them — is {:+.0} ns from no guard: the kernel's own overhead for the cgroup BPF \
                     hooks and the host-side table's base chains, paid by anything on those hooks (one iptables \
                     rule, on one netfilter hook: {:+.0} ns). The guard is {:+.0} ns from the floor: its own \
                     work{}.",
                    m(3) - m(0),
                    m(2) - m(0),
                    m(1) - m(3),
                    if op.is_empty() {
                        " (the profile does not cover this mode's programs) and this machine's noise".to_string()
                    } else {
                        format!(
                            " — {own:.0} ns of it in its programs per the profile, the rest the host-side table's \
                             prefilter and this machine's noise"
                        )
                    }
                )
            }
            _ => String::new(),
        };
        for t in &mut f.targets {
            t.explain = format!("{profile_text}{observed} {noise}");
        }
    }
    if let Some(p) = figures.last_mut() {
        for t in &mut p.targets {
            t.explain = "See the per-hook lines above: each guard program beside the empty program swapped into the \
                         same link. The difference is the guard's own work; the empty program's time is the \
                         statistics' clock reads and the dispatch, which no program can avoid."
                .into();
        }
    }
}

fn chart_bars(figs: &[Figure]) -> Vec<(String, f64, Option<f64>)> {
    let mut bars = Vec::new();
    for f in figs.iter().filter(|f| !f.rows.is_empty() && !f.title.starts_with('5')) {
        let short = f.title.split_once(". ").map_or(f.title.as_str(), |x| x.1).to_lowercase();
        let limit = f.targets.first().map(|t| t.limit);
        for row in &f.rows {
            let name = if f.rows.len() > 1 { row.case.clone() } else { short.clone() };
            for i in 1..row.cols.len() {
                bars.push((
                    format!("{name}: {}", row.cols[i].label),
                    row.ratio(i),
                    (i == 1).then_some(limit).flatten(),
                ));
            }
        }
    }
    if let Some(f5) = figs.iter().find(|f| f.title.starts_with('5')) {
        for row in &f5.rows {
            bars.push((format!("{}: guard", row.case), row.ratio(1), None));
            if row.cols.len() > 2 {
                bars.push((format!("{}: iptables", row.cols[2].label), row.ratio(2), None));
            }
        }
    }
    bars
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_default()
}

fn machine(quick: bool, took: Duration, load: (String, String)) -> Result<report::Machine> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("could not read /proc/meminfo")?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(report::Machine {
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        memory: format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0),
        kernel,
        date,
        mode: if quick { "--quick" } else { "full run" },
        took: format!("{:.0} s", took.as_secs_f64()),
        load,
    })
}
