// SPDX-License-Identifier: Apache-2.0
//! The bench's world: the simulated node of the scenarios (its first pod is the one
//! that measures), a second cgroup of the same depth outside the guard's attach
//! point (the "no guard" case, with the host-side table dormant), sink servers in the node namespace, the agent, and
//! firewall rules confined to the node namespace. Each variant's sample runs between
//! [`Bench::enter`] and [`Bench::leave`], which leave the guard whole in between.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    netns::NetNs,
};

use crate::{
    agent::{self, Agent, AgentSpec},
    floor::EmptyPrograms,
    forwarded::Beyond,
    node::Node,
    variant::{Switch, Variant, FLOOR_TABLE, HOST_TABLE},
    worker::{Op, Reply, Worker},
};

pub(crate) const TCP_PORT: u16 = 9100;
pub(crate) const UDP_PORT: u16 = 9101;
pub(crate) const BULK_PORT: u16 = 9102;
pub(crate) const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// NodeLocal DNSCache's address: the metadata address's first 16 bits, not its next.
pub(crate) const LEAD_NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);

pub(crate) struct Bench {
    pub agent: Option<Agent>,
    pub worker: Worker,
    servers: Servers,
    /// Outside the guard's attach point, as deep as the pod's cgroup.
    pub plain: TestCgroup,
    /// Swapped into the guard's links for the floor's samples.
    pub empty_programs: EmptyPrograms,
    /// Moves the node between variants; made once the agent's table exists.
    switch: Option<Switch>,
    /// A network one hop beyond the node, for forwarded traffic.
    pub beyond: Beyond,
    pub node: Node,
    pub agent_bin: PathBuf,
    pub quick: bool,
}

impl Bench {
    pub(crate) fn new(agent_bin: PathBuf, quick: bool) -> Result<Bench> {
        let node = Node::build().context("could not build the simulated node")?;
        let pod = &node.pods[0];
        // Same nesting depth as the pod's cgroup, so only the guard tells them apart.
        let depth = pod.cgroup.path().components().count() - find_cgroup2_mount()?.components().count();
        let nested = |name: &str| -> Result<TestCgroup> {
            let mut cg =
                TestCgroup::create(&find_cgroup2_mount()?, &format!("mg-bench-{name}-{}", std::process::id()))?;
            for level in 1..depth {
                cg = cg.child(&format!("level{level}"))?;
            }
            Ok(cg)
        };
        let plain = nested("plain")?;
        let empty_programs = EmptyPrograms::load()?;
        let servers = Servers::start(node.sim.node())?;
        let beyond = Beyond::build(&node)?;
        crate::uplink::add_idle_uplink(node.sim.node())?;
        // Inside the node namespace only, as the stand-in's addresses are.
        let mut nl = metadata_guard_tests::netlink::Netlink::open_in(node.sim.node())?;
        let lo = nl.link_index("lo")?;
        nl.add_address(lo, LEAD_NEIGHBOUR.into(), 32).context("could not add the lead neighbour's address")?;
        drop(nl);
        let worker = Worker::start(&pod.net.ns.path())?;
        Ok(Bench { agent: None, worker, servers, plain, empty_programs, switch: None, beyond, node, agent_bin, quick })
    }

    /// Where the pod sends allowed traffic: its gateway, the node end of its veth.
    pub(crate) fn node_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.node.pods[0].net.node_side_ipv4, port)
    }

    pub(crate) fn cgroup(&self, v: Variant) -> &Path {
        if v.guarded_cgroup() {
            self.node.pods[0].cgroup.path()
        } else {
            self.plain.path()
        }
    }

    /// Sets the node up for samples of `v` (the firewall's rules are loaded by
    /// [`Bench::load_firewall`]); `Variant::Guard` is the whole guard in force.
    pub(crate) fn set(&mut self, v: Variant) -> Result<()> {
        self.switch()?;
        let switch = self.switch.as_mut().context("no switch")?;
        switch.set(v, &self.node.bpffs, &self.empty_programs)
    }

    /// Loads the firewall variant's rules (asleep until its samples).
    pub(crate) fn load_firewall(&mut self, rules: &dyn Fn(&Firewall) -> Result<()>) -> Result<()> {
        self.switch()?;
        let fw = self.firewall()?;
        fw.clear()?;
        rules(&fw)?;
        self.switch.as_mut().context("no switch")?.adopt_firewall(&fw)
    }

    /// Removes the firewall variant's rules; the whole guard in force.
    pub(crate) fn unload_firewall(&mut self) -> Result<()> {
        self.set(Variant::Guard)?;
        if let Some(s) = self.switch.as_mut() {
            s.forget_firewall();
        }
        self.firewall()?.clear()
    }

    /// Creates the switch (and the floor's table) on first use.
    fn switch(&mut self) -> Result<()> {
        if self.switch.is_none() {
            let fw = self.firewall()?;
            self.switch = Some(Switch::new(&self.node.node_netns(), &self.node.bpffs, &fw)?);
        }
        Ok(())
    }

    pub(crate) fn run(&mut self, v: Variant, op: Op) -> Result<Reply> {
        let cgroup = self.cgroup(v).to_path_buf();
        self.worker.run(&cgroup, op)
    }

    pub(crate) fn firewall(&self) -> Result<Firewall> {
        Firewall::new(self.node.node_netns())
    }

    /// The agent guards an idle uplink: the bench puts its program on the measured one
    /// for the samples that want it (figure 10).
    pub(crate) fn spec(&self, extra: &[&str]) -> AgentSpec {
        let mut args = vec!["--uplinks", crate::uplink::IDLE_UPLINK];
        args.extend_from_slice(extra);
        self.node.agent_spec(&self.agent_bin, "bench-node", &args)
    }

    /// (The agent's uplink program, the empty one beside it), by program id, for the profile.
    pub(crate) fn uplink_ids(&mut self) -> Result<(u64, u64)> {
        self.switch()?;
        let switch = self.switch.as_ref().context("no switch")?;
        let guard = metadata_guard_tests::bpf::prog_id(std::os::fd::AsFd::as_fd(&crate::uplink::guard_program(
            &self.node.bpffs,
        )?))?;
        Ok((u64::from(guard), switch.uplink.empty_id()?))
    }

    /// (Re)starts the agent; returns the time from spawn to `/readyz` 200.
    pub(crate) fn start_agent(&mut self, extra: &[&str]) -> Result<Duration> {
        self.stop_agent()?;
        let t = Instant::now();
        let agent = Agent::spawn(&self.spec(extra))?;
        // Polled every 5 ms (the scenarios' 50 ms would blur the figure).
        let deadline = t + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = agent.http_get("/readyz") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready within 30 s; its log:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready = t.elapsed();
        self.agent = Some(agent);
        Ok(ready)
    }

    /// SIGTERM (pins stay, enforcement goes on).
    pub(crate) fn stop_agent(&mut self) -> Result<()> {
        if let Some(a) = self.agent.take() {
            a.stop()?;
        }
        Ok(())
    }

    /// Stops the agent and removes everything it installed, the host-side table included
    /// (which refuses every pod by destination, whatever its cgroup).
    pub(crate) fn uninstall(&mut self) -> Result<()> {
        self.stop_agent()?;
        let (bpffs, netns) = (self.node.bpffs.display().to_string(), self.node.node_netns().display().to_string());
        let (ok, out, err) =
            agent::oneshot(&self.agent_bin, &["uninstall", "--bpffs", &bpffs, "--host-netns", &netns])?;
        ensure!(ok, "metadata-guard uninstall failed:\n{out}{err}");
        Ok(())
    }

    pub(crate) fn agent(&self) -> Result<&Agent> {
        self.agent.as_ref().context("no agent is running")
    }

    pub(crate) fn status(&self) -> Result<agent::Status> {
        agent::status(&self.agent_bin, &self.node.bpffs)
    }

    /// A kernel verdict counter of one hook (`None`: all hooks).
    pub(crate) fn kernel_count(&self, hook: Option<&str>, verdict: &str) -> Result<u64> {
        Ok(agent::verdict_count(&self.status()?, hook, verdict))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            let _ = a.kill();
        }
        let (bpffs, netns) = (self.node.bpffs.display().to_string(), self.node.node_netns().display().to_string());
        let _ = agent::oneshot(&self.agent_bin, &["uninstall", "--bpffs", &bpffs, "--host-netns", &netns]);
        if let Ok(fw) = self.firewall() {
            let _ = fw.clear();
        }
        self.servers.stop();
        self.beyond.servers.stop();
    }
}

/// Firewall rules in the node namespace only, applied with `nsenter --net=`.
pub(crate) struct Firewall {
    netns: PathBuf,
}

impl Firewall {
    /// Refuses a path that is this process's own (the machine's) network namespace.
    pub(crate) fn new(netns: PathBuf) -> Result<Firewall> {
        let target = std::fs::metadata(&netns).with_context(|| format!("could not stat {}", netns.display()))?;
        // Our own namespace must be readable; init's is checked when we may see it.
        let own_meta = std::fs::metadata("/proc/self/ns/net").context("could not stat /proc/self/ns/net")?;
        for (own, own_meta) in
            [("/proc/self/ns/net", Some(own_meta)), ("/proc/1/ns/net", std::fs::metadata("/proc/1/ns/net").ok())]
        {
            let Some(own_meta) = own_meta else { continue };
            ensure!(
                (target.dev(), target.ino()) != (own_meta.dev(), own_meta.ino()),
                "refusing to touch firewall rules: {} is the machine's own network namespace ({own})",
                netns.display()
            );
        }
        Ok(Firewall { netns })
    }

    /// Runs `program` in the node namespace with `stdin`; returns its output.
    fn exec(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display())).arg(program).args(args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not run nsenter {program}; is util-linux installed?"))?;
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), stdin.as_bytes())?;
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "`nsenter --net={} {program} {}` failed ({}): {}",
            self.netns.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads an nft script (`nft -f -`).
    pub(crate) fn nft(&self, script: &str) -> Result<()> {
        self.exec("nft", &["-f", "-"], script).map(drop)
    }

    /// `nft -j ARGS`, parsed.
    pub(crate) fn nft_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.exec("nft", &[&["-j"], args].concat(), "")?;
        serde_json::from_str(&out).with_context(|| format!("`nft -j {}` printed no JSON: {out}", args.join(" ")))
    }

    /// Every table in the node namespace, as (nfproto family, name).
    pub(crate) fn tables(&self) -> Result<Vec<(u8, String)>> {
        use metadata_guard_netfilter::nftables::{NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
        let listed = self.exec("nft", &["list", "tables"], "")?;
        listed
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table "))
            .map(|t| {
                let (family, name) = t.split_once(' ').with_context(|| format!("`nft list tables` printed {t:?}"))?;
                let family = match family {
                    "inet" => NFPROTO_INET,
                    "ip" => NFPROTO_IPV4,
                    "ip6" => NFPROTO_IPV6,
                    other => {
                        bail!("a firewall table of family {other} ({name}): the bench switches only ip, ip6 and inet")
                    }
                };
                Ok((family, name.to_string()))
            })
            .collect()
    }

    /// Loads iptables rules for the filter table (iptables-nft backend).
    pub(crate) fn iptables_restore(&self, rules: &str) -> Result<()> {
        self.exec("iptables-nft-restore", &[], rules).map(drop)
    }

    /// Removes every table in the node namespace but the agent's host-side table and
    /// the floor's: iptables-nft's too, hooks and all.
    pub(crate) fn clear(&self) -> Result<()> {
        let tables = self.exec("nft", &["list", "tables"], "")?;
        let script: String = tables
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table "))
            .filter(|t| *t != format!("inet {HOST_TABLE}") && *t != format!("inet {FLOOR_TABLE}"))
            .map(|t| format!("delete table {t}\n"))
            .collect();
        if script.is_empty() {
            return Ok(());
        }
        self.nft(&script)
    }
}

/// iptables rules dropping pod traffic to the metadata address, then `extra` more
/// destinations: what a node would add instead of the guard.
pub(crate) fn iptables_rules(extra: &[String]) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.200.0.0/16 -d 169.254.169.254/32 -j DROP\n");
    for cidr in extra {
        s.push_str(&format!("-A INPUT -s 10.200.0.0/16 -d {cidr} -j DROP\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// Sinks in the node namespace: TCP accept-and-close, bulk TCP read-and-discard, and
/// a UDP socket nobody reads (datagrams are dropped once its small queue is full,
/// which keeps the receive side's cost constant).
pub(crate) struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _udp: UdpSocket,
}

impl Servers {
    pub(crate) fn start(ns: &NetNs) -> Result<Servers> {
        let (tcp, bulk, udp) = ns
            .run(|| -> Result<_> {
                let any = |p| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p);
                Ok((
                    TcpListener::bind(any(TCP_PORT))?,
                    TcpListener::bind(any(BULK_PORT))?,
                    UdpSocket::bind(any(UDP_PORT))?,
                ))
            })
            .with_context(|| format!("could not open the sink servers in namespace {}", ns.name()))?;
        // A deep accept queue: when this thread waits for a busy CPU, a full queue
        // would drop handshakes and cost a connect a whole second of SYN retry.
        for l in [&tcp, &bulk] {
            // SAFETY: listen(2) again on a listening socket only resizes its queue.
            unsafe { libc::listen(l.as_raw_fd(), 4096) };
        }
        tcp.set_nonblocking(true)?;
        bulk.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, drain) in [(tcp, false), (bulk, true)] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve(&listener, drain, &stop)));
        }
        Ok(Servers { stop, threads, _udp: udp })
    }

    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts until told to stop (polling, so it notices within 100 ms); with `drain`,
/// reads each connection to its end.
fn serve(listener: &TcpListener, drain: bool, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        while let Ok((mut conn, _)) = listener.accept() {
            if drain {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                loop {
                    match std::io::Read::read(&mut conn, &mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !stop.load(Ordering::Relaxed) => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
