// SPDX-License-Identifier: Apache-2.0
//! mg-smoke: the agent's container image, run on a simulated node the way the
//! DaemonSet runs it (exactly its capabilities, its seccomp type, mounts, probes and
//! limits, read from the rendered manifests), then checked from a pod and from the
//! host, through a restart and an upgrade that swaps a pinned link's program.
//!
//! Usage: mg-smoke --image IMAGE --manifests DIR --uninstall DIR [--caps A,B] [--storm N]
//!
//! `--caps` replaces the manifest's added capabilities, to find the smallest set
//! that works. Needs root and podman (with runc).

mod manifest;
mod node;
mod podman;
mod seccomp;
mod upgrade;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use metadata_guard_tests::{gate, reexec, world::IMDS_V4};
use node::{attempt, Node, Outcome};
use podman::{Host, Overrides, Running};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What a pod deletion gives the agent before SIGKILL (terminationGracePeriodSeconds).
const GRACE: Duration = Duration::from_secs(30);

struct Args {
    image: String,
    manifests: PathBuf,
    uninstall: PathBuf,
    caps: Option<Vec<String>>,
    storm: u64,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let usage = "usage: mg-smoke --image IMAGE --manifests DIR --uninstall DIR [--caps A,B] [--storm N]";
    let mut parsed =
        Args { image: String::new(), manifests: PathBuf::new(), uninstall: PathBuf::new(), caps: None, storm: 20_000 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value; {usage}"));
        match a.as_str() {
            "--image" => parsed.image = value()?.clone(),
            "--manifests" => parsed.manifests = value()?.into(),
            "--uninstall" => parsed.uninstall = value()?.into(),
            "--caps" => parsed.caps = Some(value()?.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect()),
            "--storm" => parsed.storm = value()?.parse().context("--storm needs a number")?,
            other => bail!("unknown argument {other}; {usage}"),
        }
    }
    ensure!(!parsed.image.is_empty() && !parsed.manifests.as_os_str().is_empty(), "{usage}");
    ensure!(!parsed.uninstall.as_os_str().is_empty(), "{usage}");
    Ok(parsed)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    reexec::run_role("mg-smoke", &argv, &[("attempt", node::attempt_main)]);
    if let Err(e) = parse_args(&argv[1..]).and_then(|args| smoke(&args)) {
        eprintln!("mg-smoke: error: {e:#}");
        std::process::exit(1);
    }
}

fn smoke(args: &Args) -> Result<()> {
    ensure!(gate::is_root(), "mg-smoke needs root: it makes namespaces and cgroups and runs podman");
    let guard = manifest::daemonset(&args.manifests)?;
    let uninstall = manifest::daemonset(&args.uninstall)?;
    ensure!(guard.host_network, "DaemonSet {} must use hostNetwork: the agent's netns is the host's", guard.name);
    let [agent] = &guard.containers[..] else { bail!("DaemonSet {} should have exactly one container", guard.name) };
    let (probe_path, port) = agent.readiness.clone().context("the agent container has no HTTP readiness probe")?;
    let [remover] = &uninstall.init_containers[..] else {
        bail!("DaemonSet {} should have exactly one init container (the uninstall)", uninstall.name)
    };

    let started = Instant::now();
    let node = Node::build()?;
    let host = Host {
        paths: BTreeMap::from([
            ("/sys/fs/bpf", node.bpffs.clone()),
            ("/sys/fs/cgroup", node.root.path().to_path_buf()),
            ("/var/log/pods", node.work.join("pods")),
            ("/var/log/containers", node.work.join("containers")),
        ]),
        netns: node.netns_path(),
        work: node.work.clone(),
    };
    let over = Overrides { caps_add: args.caps.clone() };
    println!("smoke: simulated node ready in {:?}", started.elapsed());
    let caps = args.caps.as_ref().unwrap_or(&agent.caps_add);
    println!("smoke: capabilities {}", caps.join(","));

    let imds = SocketAddr::new(IMDS_V4, 80);
    let pod_try = |count| attempt(&node.pod.ns.path(), node.pod_cgroup.path(), imds, count);
    let host_try = || attempt(&node.netns_path(), node.host_cgroup.path(), imds, 1);
    let pod_ip = node.pod.ipv4.into();

    // 1. Start as the DaemonSet does; ready means attached.
    let t = Instant::now();
    let name = format!("mg-smoke-{}", std::process::id());
    let first = podman::start(podman::command(&args.image, &name, agent, &host, &over, true, true)?, &name)?;
    wait_ready(&node, &first, port, &probe_path)?;
    println!("smoke: agent container ready ({probe_path} 200) in {:?}", t.elapsed());
    let (status, _) = node.http_get(port, "/healthz")?;
    ensure!(status == 200, "/healthz answered {status}");

    // 2. The block holds for the pod; the host keeps its access.
    expect(pod_try(1)?, Outcome { eperm: 1, ..Default::default() }, "a pod's connect to 169.254.169.254:80")?;
    expect(host_try()?, Outcome { ok: 1, ..Default::default() }, "a host process's GET of 169.254.169.254:80")?;
    ensure!(node.standin.arrivals().tcp(80).from(pod_ip) == 0, "a pod connection reached the stand-in");
    let table = metadata_guard::host_table_status(Some(&node.netns_path()))?;
    ensure!(table.installed, "the agent wrote no host-side table in the node's namespace: {table:?}");
    std::thread::sleep(Duration::from_secs(2));
    let (idle_rss, _) = podman::memory_kib(first.pid()?)?;

    // 3. A storm of refusals at distinct ports: memory under load, and the audit
    //    trail naming the pod through the read-only kubelet log mounts.
    let t = Instant::now();
    let storm = pod_try(args.storm)?;
    let storm_time = t.elapsed();
    expect(storm, Outcome { eperm: args.storm, ..Default::default() }, "the storm of pod connects")?;
    std::thread::sleep(Duration::from_secs(3));
    let (storm_rss, peak_rss) = podman::memory_kib(first.pid()?)?;
    let (charged, charged_peak) = podman::cgroup_memory_kib(first.pid()?)?;
    println!(
        "smoke: {} refused connects in {storm_time:?}; agent RSS idle {idle_rss} KiB, after the storm {storm_rss} KiB, \
         peak {peak_rss} KiB; memory cgroup (BPF maps included) {charged} KiB, peak {charged_peak} KiB",
        args.storm
    );
    check_audit(&first.logs())?;

    // 4. SIGTERM (a pod deletion or rolling update): clean exit, block stays.
    let code = first.stop(GRACE)?;
    ensure!(code == 0, "the agent exited with {code} on SIGTERM; its log:\n{}", first.logs());
    expect(pod_try(1)?, Outcome { eperm: 1, ..Default::default() }, "a pod's connect with no agent running")?;
    drop(first);
    println!("smoke: stopped cleanly; the pinned block held with no agent");

    // 5. A new agent adopts the pins (restart), keeping what runs the same code...
    let pins = metadata_guard::PinLayout::new(&node.bpffs.join(agent_bpffs(agent)?));
    let (link, program) = (pins.link("connect4"), pins.program("connect4"));
    let before = upgrade::linked_program(&link)?;
    let t = Instant::now();
    let second = podman::start(podman::command(&args.image, &name, agent, &host, &over, true, true)?, &name)?;
    wait_ready(&node, &second, port, &probe_path)?;
    expect(pod_try(1)?, Outcome { eperm: 1, ..Default::default() }, "a pod's connect after the restart")?;
    ensure!(upgrade::linked_program(&link)? == before, "the restarted agent replaced a program that was the same");
    ensure!(second.stop(GRACE)? == 0, "the restarted agent did not exit cleanly; its log:\n{}", second.logs());
    drop(second);
    println!("smoke: a restarted agent adopted the pins in {:?}", t.elapsed());

    // ...and swapping in its own where the link runs other code (an upgrade), all with
    // exactly the manifest's capabilities.
    let planted = upgrade::plant_other_program(&link)?;
    let third = podman::start(podman::command(&args.image, &name, agent, &host, &over, true, true)?, &name)?;
    wait_ready(&node, &third, port, &probe_path)?;
    let now = upgrade::linked_program(&link)?;
    ensure!(now != planted, "the agent kept the other program on connect4; its log:\n{}", third.logs());
    ensure!(upgrade::pinned_program(&program)? == now, "the program pinned beside connect4 is not the one it runs");
    expect(pod_try(1)?, Outcome { eperm: 1, ..Default::default() }, "a pod's connect after the upgrade")?;
    ensure!(third.stop(GRACE)? == 0, "the upgrading agent did not exit cleanly; its log:\n{}", third.logs());
    drop(third);
    println!("smoke: an agent swapped its program into a link running other code (BPF_LINK_UPDATE)");

    // 6. The uninstall DaemonSet's init container, with its own capabilities,
    //    removes everything.
    let remover_name = format!("mg-smoke-uninstall-{}", std::process::id());
    let mut run = podman::command(
        &args.image,
        &remover_name,
        remover,
        &host,
        &Overrides { caps_add: None },
        uninstall.host_network,
        false,
    )?;
    let _remove_after = Running { name: remover_name.clone() };
    let out = podman::run(&mut run)?;
    ensure!(
        out.status.success(),
        "the uninstall container failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let left = node.pins_left()?;
    ensure!(left.is_empty(), "pins left after the uninstall: {left:?}");
    let table = metadata_guard::host_table_status(Some(&node.netns_path()))?;
    ensure!(!table.installed, "the host-side table outlived the uninstall container: {table:?}");
    expect(pod_try(1)?, Outcome { ok: 1, ..Default::default() }, "a pod's GET after the uninstall")?;
    println!("smoke: the uninstall container removed every pin and the host-side table; pods reach the stand-in again");
    println!("smoke: passed in {:?}", started.elapsed());
    Ok(())
}

/// The agent's `--bpffs` directory, relative to the host's /sys/fs/bpf.
fn agent_bpffs(agent: &manifest::Container) -> Result<PathBuf> {
    let arg =
        agent.args.iter().find_map(|a| a.strip_prefix("--bpffs=")).context("the agent has no --bpffs= argument")?;
    let relative = Path::new(arg).strip_prefix("/sys/fs/bpf").context("--bpffs is not under /sys/fs/bpf")?;
    Ok(relative.to_path_buf())
}

fn wait_ready(node: &Node, agent: &Running, port: u16, path: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((200, _)) = node.http_get(port, path) {
            return Ok(());
        }
        if !agent.is_running() {
            bail!("the agent container exited before it was ready; its output:\n{}", agent.logs());
        }
        if Instant::now() > deadline {
            bail!("the agent was not ready within {READY_TIMEOUT:?}; its output:\n{}", agent.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expect(got: Outcome, want: Outcome, what: &str) -> Result<()> {
    ensure!(got == want, "{what}: expected {want:?}, got {got:?}");
    Ok(())
}

/// The first refusal's record names the pod, its container and the node (from
/// the downward API).
fn check_audit(output: &str) -> Result<()> {
    // The container log holds the operational log lines too (JSON, without `kind`).
    let records: Vec<metadata_guard::RecordLine> = output
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &metadata_guard::RecordLine| r.kind == "attempts")
        .collect();
    let named = records.iter().find(|r| {
        r.pod.as_deref() == Some(node::POD_NAME)
            && r.namespace.as_deref() == Some(node::POD_NAMESPACE)
            && r.container.as_deref() == Some(node::POD_CONTAINER)
            && r.node == manifest::NODE_NAME
            && r.verdict == "blocked"
    });
    ensure!(
        named.is_some(),
        "no audit record names pod {}/{} on node {} ({} records); the output:\n{output}",
        node::POD_NAMESPACE,
        node::POD_NAME,
        manifest::NODE_NAME,
        records.len()
    );
    Ok(())
}
