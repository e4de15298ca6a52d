// SPDX-License-Identifier: Apache-2.0
//! What every scenario shares: the node, the agent under test, and the ways to try
//! a destination from a pod or from the host and to judge the outcome.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use metadata_guard_tests::{
    leftovers::{Footprint, Kept},
    standin::{Arrivals, BARRIER_PORT},
};

use crate::{
    agent::{self, Agent, AgentSpec},
    attempt::{self, Kind, Outcome, Prober, Request},
    node::Node,
};

pub(crate) const METADATA_V4: &str = "169.254.169.254";
pub(crate) const METADATA_V6: &str = "fd00:ec2::254";

/// A refusal must be immediate: EPERM from the hook, not a timeout.
pub(crate) const REFUSAL_BUDGET: Duration = Duration::from_millis(50);

/// Factor for every timing budget: 1 on real hardware; larger under software
/// emulation (a VM without KVM), where everything is uniformly slower.
static TIME_SCALE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

pub(crate) fn set_time_scale(factor: u32) {
    TIME_SCALE.store(factor, std::sync::atomic::Ordering::Relaxed);
}

/// A timing budget, scaled for the machine the scenarios run on.
pub(crate) fn budget(d: Duration) -> Duration {
    d * TIME_SCALE.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) use metadata_guard_tests::gate::ci;

/// Polls `ok` until it holds, failing after `within` (pass a [`budget`]); returns how
/// long it took. The readiness signal that replaces a fixed sleep.
pub(crate) fn wait_until(within: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if ok()? {
            return Ok(start.elapsed());
        }
        ensure!(start.elapsed() < within, "still not so after {within:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) struct Ctx {
    pub node: Node,
    pub agent_bin: PathBuf,
    pub variant_bin: Option<PathBuf>,
    pub agent: Option<Agent>,
    pub running_args: Vec<String>,
    /// Check /metrics in-process instead of with promtool.
    pub without_promtool: bool,
    /// What existed when the running scenario began: anything beyond it afterwards,
    /// other than the agent and its pins, the scenario leaked.
    baseline: Option<Footprint>,
}

/// Who makes an attempt.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Who {
    /// Pod number `n`: its network namespace and its container cgroup.
    Pod(usize),
    /// A host-network process in pod `n`'s very cgroup: only the namespace differs.
    HostInPodCgroup(usize),
    /// A host unit with a network namespace of its own (not a pod).
    SandboxedUnit,
}

impl Ctx {
    pub(crate) fn new(agent_bin: PathBuf, variant_bin: Option<PathBuf>) -> Result<Ctx> {
        let node = Node::build()?;
        // Every `metadata-guard` command run from here (status, uninstall, check) acts
        // on the simulated node's host-side table, never on this machine's namespace.
        std::env::set_var("METADATA_GUARD_HOST_NETNS", node.node_netns());
        Ok(Ctx {
            node,
            agent_bin,
            variant_bin,
            agent: None,
            running_args: Vec::new(),
            without_promtool: false,
            baseline: None,
        })
    }

    pub(crate) fn spec(&self, binary: &std::path::Path, extra: &[&str]) -> AgentSpec {
        self.node.agent_spec(binary, "test-node", extra)
    }

    /// Makes sure an agent with exactly these extra arguments runs (restarting one
    /// started with others; the pins keep the block in force meanwhile).
    pub(crate) fn ensure_agent(&mut self, extra: &[&str]) -> Result<&Agent> {
        let wanted: Vec<String> = extra.iter().map(std::string::ToString::to_string).collect();
        if self.agent.is_none() || self.running_args != wanted {
            if let Some(old) = self.agent.take() {
                old.stop()?;
            }
            let spec = self.spec(&self.agent_bin.clone(), extra);
            self.agent = Some(Agent::start(&spec)?);
            self.running_args = wanted;
        }
        Ok(self.agent.as_ref().unwrap())
    }

    pub(crate) fn default_agent(&mut self) -> Result<&Agent> {
        self.ensure_agent(&[])
    }

    pub(crate) fn agent(&self) -> Result<&Agent> {
        self.agent.as_ref().context("no agent is running")
    }

    /// Stops the agent (SIGTERM, pins stay) and forgets it.
    pub(crate) fn stop_agent(&mut self) -> Result<()> {
        if let Some(a) = self.agent.take() {
            a.stop()?;
        }
        self.running_args.clear();
        Ok(())
    }

    /// `metadata-guard <args> --bpffs <ours>`.
    pub(crate) fn oneshot(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let bpffs = self.node.bpffs.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--bpffs", &bpffs]);
        agent::oneshot(&self.agent_bin, &all)
    }

    pub(crate) fn status(&self) -> Result<agent::Status> {
        agent::status(&self.agent_bin, &self.node.bpffs)
    }

    /// Sum of a kernel verdict counter over all hooks.
    pub(crate) fn kernel_count(&self, verdict: &str) -> Result<u64> {
        self.kernel_count_at(None, verdict)
    }

    /// A kernel verdict counter of one hook (or of all, with None).
    pub(crate) fn kernel_count_at(&self, hook: Option<&str>, verdict: &str) -> Result<u64> {
        Ok(agent::verdict_count(&self.status()?, hook, verdict))
    }

    pub(crate) fn request(&self, from: Who, kind: Kind, dest: &str, port: u16, mapped: bool) -> Result<Request> {
        let (netns, cgroup) = match from {
            Who::Pod(n) => {
                let pod = self.node.pods.get(n).context("no such pod")?;
                (pod.net.ns.path(), pod.cgroup.path().to_path_buf())
            }
            Who::HostInPodCgroup(n) => {
                let pod = self.node.pods.get(n).context("no such pod")?;
                (self.node.node_netns(), pod.cgroup.path().to_path_buf())
            }
            Who::SandboxedUnit => (self.node.sandboxed_net.path(), self.node.sandboxed_unit.path().to_path_buf()),
        };
        Ok(Request {
            netns,
            cgroup,
            kind,
            dest: dest.parse::<IpAddr>().with_context(|| format!("bad address {dest}"))?,
            port,
            mapped,
            count: 1,
            interval_us: 0,
            duration_ms: 0,
            stop_file: None,
            go_file: None,
            ready_file: None,
            socket_netns: None,
            via: None,
            final_hop: None,
        })
    }

    /// Pod 2 asking the metadata service over HTTP once a millisecond until the
    /// prober is finished; `stop_name` names its stop file in the node's directory.
    pub(crate) fn pod_prober(&self, stop_name: &str) -> Result<Prober> {
        let request = self.request(Who::Pod(2), Kind::Http, METADATA_V4, 80, false)?;
        Prober::start(request, 1000, self.node.work.join(stop_name))
    }

    pub(crate) fn try_once(&self, from: Who, kind: Kind, dest: &str, port: u16, mapped: bool) -> Result<Outcome> {
        attempt::run(&self.request(from, kind, dest, port, mapped)?)
    }

    /// The attempt fails with EPERM, at once, and nothing reaches the stand-in.
    pub(crate) fn expect_refused(&self, from: Who, kind: Kind, dest: &str, port: u16, mapped: bool) -> Result<()> {
        let before = self.arrivals();
        let out = self.try_once(from, kind, dest, port, mapped)?;
        let what = describe(from, kind, dest, port, mapped);
        ensure!(out.eperm == 1, "{what}: expected EPERM, got {out:?}");
        ensure!(out.max_us < budget(REFUSAL_BUDGET).as_micros() as u64, "{what}: refusal took {} µs", out.max_us);
        // A packet that slipped through would arrive before the barrier that follows it.
        let Who::Pod(pod) = from else { bail!("{what}: expect_refused judges attempts from pods only") };
        let after = self.barrier(pod)?;
        ensure!(after == before, "{what}: refused, yet the stand-in saw traffic: {before:?} → {after:?}");
        Ok(())
    }

    /// What the stand-in saw, barriers left out.
    pub(crate) fn arrivals(&self) -> Arrivals {
        let mut arrivals = self.node.standin.arrivals();
        arrivals.udp_received.remove(&BARRIER_PORT);
        arrivals
    }

    /// Sends a datagram from pod `n` to the stand-in's barrier port on the node's side
    /// of the pod's link (never blocked) and waits until it arrives: whatever the pod
    /// sent before has by then had its chance to arrive along the same path. Returns
    /// what the stand-in saw, barriers left out.
    pub(crate) fn barrier(&self, n: usize) -> Result<Arrivals> {
        let pod = self.node.pods.get(n).context("no such pod")?;
        let (source, target) = (IpAddr::from(pod.net.ipv4), IpAddr::from(pod.net.node_side_ipv4));
        let seen = || self.node.standin.arrivals().udp(BARRIER_PORT).from(source);
        let before = seen();
        let out = self.try_once(Who::Pod(n), Kind::UdpSendto, &target.to_string(), BARRIER_PORT, false)?;
        ensure!(out.ok == 1, "the barrier datagram from pod {n} to {target}:{BARRIER_PORT} was not sent: {out:?}");
        wait_until(budget(Duration::from_secs(2)), || Ok(seen() > before))
            .with_context(|| format!("the barrier datagram from pod {n} never reached the stand-in"))?;
        Ok(self.arrivals())
    }

    /// The attempt succeeds (HTTP 200 for TCP; for UDP, the datagram arrives).
    pub(crate) fn expect_served(&self, from: Who, kind: Kind, dest: &str, port: u16, mapped: bool) -> Result<()> {
        let before = self.node.standin.arrivals();
        let out = self.try_once(from, kind, dest, port, mapped)?;
        let what = describe(from, kind, dest, port, mapped);
        ensure!(out.ok == 1, "{what}: expected to be served, got {out:?}");
        if kind != Kind::Http {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.node.standin.arrivals() == before {
                if Instant::now() > deadline {
                    bail!("{what}: sent, but nothing arrived at the stand-in");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// What the harness keeps across scenarios on purpose: the agent under test and
    /// the guard's pins (fail-closed: they stay while no agent runs).
    fn kept(&self) -> Kept {
        Kept { processes: self.agent.iter().map(Agent::pid).collect(), pin_dirs: vec![self.node.bpffs.clone()] }
    }

    /// Called before each scenario: notes what exists, for [`Ctx::after_scenario`].
    pub(crate) fn before_scenario(&mut self) -> Result<()> {
        self.baseline = Some(Footprint::take(&self.kept())?);
        Ok(())
    }

    /// Called after each passing scenario: fails when it left processes, network
    /// namespaces, cgroups, bpffs mounts or pins behind (beyond the agent it may leave
    /// running and the guard's pins), and kills the processes it left.
    pub(crate) fn after_scenario(&mut self) -> Result<()> {
        // The conceal scenarios make the stand-in require IMDSv2; the others expect
        // token-less requests served.
        self.node.standin.require_imdsv2(false);
        let Some(before) = self.baseline.take() else { return Ok(()) };
        // Drops kill and reap at once, but the kernel may list a process, a thread's
        // namespace or a cgroup for a moment longer.
        let mut left = Footprint::take(&self.kept())?.since(&before);
        let deadline = Instant::now() + budget(Duration::from_secs(2));
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left = Footprint::take(&self.kept())?.since(&before);
        }
        left.kill_processes();
        ensure!(left.is_empty(), "the scenario left behind {left}; drop or remove what it made before it returns");
        Ok(())
    }

    /// After a failure: a clean slate (no agent, nothing pinned) for the next scenario.
    pub(crate) fn recover(&mut self) {
        self.node.standin.require_imdsv2(false);
        if let Some(a) = self.agent.take() {
            let _ = a.kill();
        }
        // Processes the failed scenario started and left (by pid: its descendants only).
        if let Some(before) = self.baseline.take() {
            if let Ok(now) = Footprint::take(&self.kept()) {
                now.since(&before).kill_processes();
            }
        }
        self.running_args.clear();
        let _ = self.oneshot(&["uninstall"]);
    }

    /// Stops any agent and removes the guard from the kernel.
    pub(crate) fn uninstall(&mut self) -> Result<()> {
        self.stop_agent()?;
        let (ok, out, err) = self.oneshot(&["uninstall"])?;
        ensure!(ok, "uninstall failed: {out}{err}");
        Ok(())
    }

    /// Writes a configuration that allowlists the payments namespace's `api-*` pods
    /// (pod 1, `payments/api-5f6c8`) to `file` in the node's directory; returns its path.
    pub(crate) fn allow_api_pods_config(&self, file: &str) -> Result<String> {
        let path = self.node.work.join(file);
        std::fs::write(
            &path,
            "destinations:\n  presets: [default]\nallow_pods:\n  - namespace: payments\n    pod: \"api-*\"\n",
        )
        .with_context(|| format!("could not write {}", path.display()))?;
        Ok(path.display().to_string())
    }

    pub(crate) fn variant_bin(&self) -> Result<PathBuf> {
        self.variant_bin.clone().context("this scenario needs --variant-agent (a build with the test-variant programs)")
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.recover();
    }
}

pub(crate) fn describe(from: Who, kind: Kind, dest: &str, port: u16, mapped: bool) -> String {
    let shown = if mapped { format!("::ffff:{dest}") } else { dest.to_string() };
    format!("{from:?} {kind:?} to [{shown}]:{port}")
}
