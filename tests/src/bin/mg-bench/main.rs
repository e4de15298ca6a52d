// SPDX-License-Identifier: Apache-2.0
//! mg-bench: what metadata-guard costs, side by side with no guard and with
//! iptables/nftables rules, on the scenarios' simulated node (real kernel, real
//! agent, namespaces and cgroups of its own).
//!
//! Usage: mg-bench --agent PATH [--quick] [--profile-only] [--only LIST] [--out DIR]   (root; `cargo xtask bench`)
//! `--quick` runs every figure briefly and fails only on broken measurements (a guard
//! that does not block, zero iterations, unaccounted attempts), never on timings.
//! `--profile-only` measures only the BPF profile (full size unless `--quick`): the
//! kernel's per-program nanoseconds, in seconds, for work on the programs themselves.
//! `--only 1,2b,8` runs just those figures (by the number in their title), for work on
//! one measurement; the published results come from a run of every figure.

mod bench;
mod bpf;
mod conceal;
mod explain;
mod figures;
mod floor;
mod forwarded;
mod profile;
mod report;
mod scale;
mod uplink;
mod variant;
mod worker;

use metadata_guard_tests::{agent, gate, node, reexec};

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
    /// Figure numbers to run (`--only`); empty: all.
    only: Vec<String>,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: mg-bench --agent PATH [--quick] [--profile-only] [--only 1,2b,...] [--out DIR]";
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        agent: PathBuf::new(),
        quick: false,
        profile_only: false,
        only: Vec::new(),
        out: PathBuf::from("docs/benchmarks"),
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agent" => args.agent = it.next().context("--agent needs a path")?.into(),
            "--quick" => args.quick = true,
            "--profile-only" => args.profile_only = true,
            "--only" => {
                let list = it.next().context("--only needs figure numbers, e.g. --only 1,2b")?;
                args.only = list.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect();
            }
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
    reexec::run_role(
        "mg-bench",
        &argv,
        &[
            ("conceal-worker", |args| conceal::child_main(reexec::first(args))),
            ("worker", |args| worker::child_main(reexec::first(args))),
        ],
    );
    if let Err(e) = real_main() {
        eprintln!("mg-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    // The bench switches the agent's host-side table off and on (flags dormant) to
    // measure it; an owned table (6.9+) refuses that from any other process.
    std::env::set_var("METADATA_GUARD_HOST_TABLE_OWNER", "never");
    if !gate::is_root() {
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
    let figures = if args.profile_only { profile_only(&mut b)? } else { run_all(&mut b, &args.only)? };
    drop(b);
    let machine = machine(args.quick, started.elapsed(), (load_before, load_average()))?;
    let md = report::markdown(&machine, &figures);
    report::write(&args.out, &md, &report::svg(&explain::chart_bars(&figures)))?;
    println!("{md}");
    eprintln!("mg-bench: wrote {}/results.md and chart.svg in {:.0?}", args.out.display(), started.elapsed());
    Ok(())
}

fn profile_only(b: &mut Bench) -> Result<Vec<Figure>> {
    b.start_agent(&[])?;
    let ops = profile::enforce_ops(b, profile::operations(b) / profile::CHUNKS);
    let measured = profile::measure(b, ops)?;
    Ok(vec![profile::figure(&measured, profile::operations(b))])
}

fn run_all(b: &mut Bench, only: &[String]) -> Result<Vec<Figure>> {
    let step = |name: &str| eprintln!("mg-bench: {name}");
    let wanted = |n: &str| only.is_empty() || only.iter().any(|o| o == n);
    step("starting the agent (first install)");
    let cold = b.start_agent(&[])?;
    std::thread::sleep(Duration::from_secs(if b.quick { 1 } else { 3 }));
    let idle_rss = scale::rss_kib(b.agent()?.pid(), "VmRSS:").unwrap_or(0);
    let warm = b.start_agent(&[])?;
    // Run in this order (the profile, which every explanation reads, always runs), then
    // published in `PUBLISHED` order.
    type Run = fn(&mut Bench) -> Result<Figure>;
    let steps: [(&str, &str, Run); 10] = [
        ("1", "1. allowed TCP path", figures::tcp_allowed),
        ("2", "2. allowed UDP path", figures::udp_allowed),
        ("2c", "2c. allowed UDP path beside the metadata address", figures::udp_lead_neighbour),
        ("2b", "2b. allowed UDP path, connected", figures::udp_connect_send),
        ("8", "8. forwarded pod traffic", forwarded::forwarded),
        ("10", "10. leaving through an uplink", uplink::uplink),
        ("3", "3. bulk throughput", figures::bulk),
        ("4", "4. refused path", figures::refused),
        ("6", "6. event storm", scale::storm),
        ("5", "5. policy scale", scale::policy_scale),
    ];
    const PUBLISHED: [&str; 12] = ["1", "2", "2c", "2b", "3", "8", "10", "4", "5", "6", "7", "9"];
    let mut done: Vec<(&str, Vec<Figure>)> = Vec::new();
    let mut measured = None;
    for (n, name, run) in steps {
        if n == "3" {
            step("profile");
            let ops = profile::enforce_ops(b, profile::operations(b) / profile::CHUNKS);
            measured = Some(profile::measure(b, ops)?);
        }
        if wanted(n) {
            step(name);
            done.push((n, vec![run(b)?]));
        }
    }
    let mut measured = measured.context("the profile did not run")?;
    if wanted("7") {
        done.push(("7", vec![scale::footprint(cold, warm, idle_rss)]));
    }
    if wanted("9") {
        step("9. conceal proxy");
        let (figures, conceal_profile) = conceal::figures(b)?;
        measured.ops.extend(conceal_profile.ops);
        done.push(("9", figures));
    }
    let mut figures: Vec<Figure> = Vec::new();
    for n in PUBLISHED {
        if let Some(i) = done.iter().position(|(d, _)| *d == n) {
            figures.append(&mut done.swap_remove(i).1);
        }
    }
    figures.push(profile::figure(&measured, profile::operations(b)));
    explain::explain(&mut figures, &measured);
    Ok(figures)
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
