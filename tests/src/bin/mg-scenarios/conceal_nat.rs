// SPDX-License-Identifier: Apache-2.0
//! Conceal mode against a node whose NAT would take the proxy's place: a kube-proxy
//! style DNAT of the proxy's address and port (a Service with `externalIPs:
//! [NODE_IP]`, a `hostPort`) to an attacker's pod, written with iptables and with
//! nf_tables. The victim pod's metadata requests still reach the proxy and get the
//! service's answers; the attacker's listener counts every connection it gets, and
//! gets none. A second port on the same address, DNATed the same way, shows that the
//! NAT itself works in this world (the attacker does get those).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use metadata_guard_netfilter::{
    nftables::{self, Batch, CmpOp, Expr},
    NlSocket,
};
use metadata_guard_tests::{forwarded::set_forwarding, netns::NetNs};

use crate::{
    conceal::{conceal_agent, expect, get, metadata, proxy_addr},
    conceal_tokens::pod_token,
    harness::{self, budget, ci, Ctx, Who, METADATA_V4},
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    (
        "conceal NAT: an iptables DNAT of the proxy's address (kube-proxy KUBE-SERVICES, externalIPs) to an attacker's pod takes nothing",
        iptables_dnat,
    ),
    (
        "conceal NAT: an nftables DNAT of the proxy's address (kube-proxy nftables mode) to an attacker's pod takes nothing",
        nftables_dnat,
    ),
];

/// Needs the kernel's IPVS (left out with `--without-ipvs`).
pub(crate) const IPVS_SCENARIOS: [crate::Scenario; 1] = [(
    "conceal NAT: an IPVS virtual service on the proxy's address turns the redirect off: pods refused, never served",
    ipvs_service,
)];

const ATTACKER_POD: usize = 2;
const ATTACKER_PORT: u16 = 8080;
/// A port beside the proxy's on the same node address, DNATed the same way: the control.
const CONTROL_PORT: u16 = 8776;
const NFT_TABLE: &str = "kube-proxy";
const NAT_PRIORITY: i32 = -100;

/// A listener in the attacker's pod that answers every connection with forged
/// credentials and counts it. Stops (and closes its socket) on drop.
struct Attacker {
    accepted: Arc<AtomicU64>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attacker {
    fn start(ctx: &Ctx) -> Result<Attacker> {
        let pod = &ctx.node.pods[ATTACKER_POD];
        let addr = SocketAddr::from((pod.net.ipv4, ATTACKER_PORT));
        let listener = pod.net.ns.run(|| TcpListener::bind(addr)).context("could not listen in the attacker's pod")?;
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = stream.read(&mut [0u8; 4096]);
                let forged = "{\"AccessKeyId\":\"ATTACKER\"}";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{forged}",
                    forged.len()
                );
            }
        });
        Ok(Attacker { accepted, addr, stop, thread: Some(thread) })
    }

    fn seen(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwarding on in the node namespace (the DNAT sends to another pod) while it lives.
struct Forwarding<'a>(&'a NetNs);

impl<'a> Forwarding<'a> {
    fn on(ns: &'a NetNs) -> Result<Forwarding<'a>> {
        set_forwarding(ns, true)?;
        Ok(Forwarding(ns))
    }
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        let _ = set_forwarding(self.0, false);
    }
}

/// The victim's requests reach the proxy, with the service's answers; the attacker
/// sees none of them, though it does get the control port's connection.
fn victim_is_served(ctx: &Ctx, attacker: &Attacker) -> Result<()> {
    let node_ip: Ipv4Addr = ctx.node.pods[0].net.node_side_ipv4;
    // The NAT works: a pod's direct connection to the control port lands at the attacker.
    let before = attacker.seen();
    let control = SocketAddr::from((node_ip, CONTROL_PORT));
    let a = crate::conceal::exchange(ctx, Who::Pod(1), control, &get("/", ""))?;
    ensure!(a.text.contains("ATTACKER") && attacker.seen() == before + 1, "the DNAT does not work here: {a:?}");

    let before = attacker.seen();
    let imds = metadata(METADATA_V4);
    let token = pod_token(ctx, Who::Pod(0), "21600")?;
    let header = format!("X-aws-ec2-metadata-token: {token}\r\n");
    for path in ["/latest/meta-data/placement/availability-zone", "/latest/meta-data/instance-id"] {
        expect(ctx, Who::Pod(0), imds, &get(path, &header), 200, 1)?;
    }
    expect(ctx, Who::Pod(0), imds, &get("/latest/meta-data/iam/security-credentials/", &header), 404, 0)?;
    // A pod dialling the proxy's address itself is not served either (no kernel record).
    let direct: SocketAddr = proxy_addr(ctx).parse()?;
    let a = crate::conceal::exchange(ctx, Who::Pod(1), direct, &get("/latest/meta-data/instance-id", ""))?;
    ensure!(!a.text.contains("ATTACKER") && a.status == 0, "a direct connection was answered: {a:?}");
    ensure!(attacker.seen() == before, "the attacker got {} connection(s)", attacker.seen() - before);
    Ok(())
}

fn iptables_dnat(ctx: &mut Ctx) -> Result<()> {
    let Some(iptables) = find("iptables") else {
        ensure!(!ci(), "CI=true: iptables is missing (cargo xtask test installs it)");
        println!("     SKIPPED: no iptables on this machine");
        return Ok(());
    };
    conceal_agent(ctx, None)?;
    let attacker = Attacker::start(ctx)?;
    let node = ctx.node.sim.node();
    let _forwarding = Forwarding::on(node)?;
    let node_ip = ctx.node.pods[0].net.node_side_ipv4;
    let to = attacker.addr.to_string();
    let rules: Vec<Vec<String>> = [
        "-t nat -N KUBE-SERVICES",
        "-t nat -N KUBE-EXT-MGATTACK",
        "-t nat -A PREROUTING -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-t nat -A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        &format!(
            "-t nat -A KUBE-SERVICES -d {node_ip}/32 -p tcp -m tcp --dport {} -j KUBE-EXT-MGATTACK",
            proxy_port(ctx)?
        ),
        &format!("-t nat -A KUBE-SERVICES -d {node_ip}/32 -p tcp -m tcp --dport {CONTROL_PORT} -j KUBE-EXT-MGATTACK"),
        &format!("-t nat -A KUBE-EXT-MGATTACK -p tcp -j DNAT --to-destination {to}"),
    ]
    .iter()
    .map(|r| r.split(' ').map(str::to_owned).collect())
    .collect();
    let run = |args: &[String]| -> Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg(&iptables)
            .args(["-w", "5"])
            .args(args)
            .output()
            .context("could not run iptables in the node namespace")?;
        ensure!(out.status.success(), "iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let result = rules.iter().try_for_each(|r| run(r)).and_then(|()| victim_is_served(ctx, &attacker));
    // The namespace is ours and goes with the node; the rules go now, for the scenarios after.
    for chain in ["PREROUTING", "OUTPUT", "KUBE-SERVICES", "KUBE-EXT-MGATTACK"] {
        let _ = run(&["-t".into(), "nat".into(), "-F".into(), chain.into()]);
    }
    for chain in ["KUBE-SERVICES", "KUBE-EXT-MGATTACK"] {
        let _ = run(&["-t".into(), "nat".into(), "-X".into(), chain.into()]);
    }
    result
}

fn nftables_dnat(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let attacker = Attacker::start(ctx)?;
    let node = ctx.node.sim.node();
    let _forwarding = Forwarding::on(node)?;
    let node_ip = ctx.node.pods[0].net.node_side_ipv4;
    let (target, port) = match attacker.addr {
        SocketAddr::V4(a) => (*a.ip(), a.port()),
        SocketAddr::V6(_) => bail!("the attacker listens on IPv4"),
    };
    let mut b = Batch::new(nftables::NFPROTO_IPV4);
    b.add_table(NFT_TABLE);
    b.add_chain(NFT_TABLE, "services", None);
    b.add_chain(NFT_TABLE, "nat-prerouting", Some(("nat", nftables::NF_INET_PRE_ROUTING, NAT_PRIORITY)));
    b.add_chain(NFT_TABLE, "nat-output", Some(("nat", nftables::NF_INET_LOCAL_OUT, NAT_PRIORITY)));
    b.add_rule(NFT_TABLE, "nat-prerouting", &[Expr::jump("services")]);
    b.add_rule(NFT_TABLE, "nat-output", &[Expr::jump("services")]);
    for dport in [proxy_port(ctx)?, CONTROL_PORT] {
        b.add_rule(NFT_TABLE, "services", &dnat_rule(node_ip, dport, target, port));
    }
    let path = node.path();
    let mut sock = NlSocket::open_in(Some(&path), libc::NETLINK_NETFILTER)?;
    sock.request(&b.finish(), nftables::wants_ack).context("could not add the kube-proxy-like nftables table")?;
    let result = victim_is_served(ctx, &attacker);
    let mut b = Batch::new(nftables::NFPROTO_IPV4);
    b.del_table(NFT_TABLE);
    sock.request(&b.finish(), nftables::wants_ack).context("could not remove the kube-proxy-like table")?;
    result
}

/// `ip daddr A tcp dport P dnat to T:TP`.
fn dnat_rule(daddr: Ipv4Addr, dport: u16, target: Ipv4Addr, target_port: u16) -> Vec<Expr> {
    let r1 = nftables::NFT_REG_1;
    vec![
        Expr::Payload { base: nftables::NFT_PAYLOAD_NETWORK_HEADER, offset: 16, len: 4, dreg: r1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: r1, data: daddr.octets().to_vec() },
        Expr::Meta { key: nftables::NFT_META_L4PROTO, dreg: r1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: r1, data: vec![libc::IPPROTO_TCP as u8] },
        Expr::Payload { base: nftables::NFT_PAYLOAD_TRANSPORT_HEADER, offset: 2, len: 2, dreg: r1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: r1, data: dport.to_be_bytes().to_vec() },
        Expr::Data { dreg: r1, data: target.octets().to_vec() },
        Expr::Data { dreg: nftables::NFT_REG_2, data: target_port.to_be_bytes().to_vec() },
        Expr::Nat {
            kind: nftables::NFT_NAT_DNAT,
            family: u32::from(nftables::NFPROTO_IPV4),
            addr_reg: r1,
            port_reg: Some(nftables::NFT_REG_2),
        },
    ]
}

fn proxy_port(ctx: &Ctx) -> Result<u16> {
    Ok(proxy_addr(ctx).parse::<SocketAddr>()?.port())
}

fn find(program: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
}

/// IPVS keeps connections of its own, untouched by `notrack`: the agent asks IPVS and,
/// while a virtual service claims the proxy's address, keeps the redirect off.
fn ipvs_service(ctx: &mut Ctx) -> Result<()> {
    use metadata_guard_tests::ipvs::VirtualService;
    conceal_agent(ctx, None)?;
    let attacker = Attacker::start(ctx)?;
    let node = ctx.node.sim.node();
    let _forwarding = Forwarding::on(node)?;
    let node_ip = ctx.node.pods[0].net.node_side_ipv4;
    let SocketAddr::V4(real) = attacker.addr else { bail!("the attacker listens on IPv4") };
    let control = std::net::SocketAddrV4::new(node_ip, CONTROL_PORT);
    let _control = VirtualService::add(node, control, real)?;
    let before = attacker.seen();
    let a = crate::conceal::exchange(ctx, Who::Pod(1), SocketAddr::V4(control), &get("/", ""))?;
    ensure!(a.text.contains("ATTACKER") && attacker.seen() == before + 1, "IPVS does not work here: {a:?}");

    let imds = metadata(METADATA_V4);
    let zone = get("/latest/meta-data/placement/availability-zone", "");
    let claim = VirtualService::add(node, std::net::SocketAddrV4::new(node_ip, proxy_port(ctx)?), real)?;
    let before = attacker.seen();
    let agent = ctx.agent()?;
    harness::wait_until(budget(Duration::from_secs(5)), || {
        Ok(agent.http_get("/readyz").is_ok_and(|(status, text)| status == 503 && text.contains("IPVS")))
    })
    .context("the agent did not report the IPVS service on the proxy's address")?;
    for _ in 0..3 {
        let a = crate::conceal::exchange(ctx, Who::Pod(0), imds, &zone)?;
        ensure!(a.status == 0 && a.error.as_deref().is_some_and(|e| e.contains("not permitted")), "{a:?}");
    }
    ensure!(attacker.seen() == before, "the attacker got {} connection(s)", attacker.seen() - before);
    drop(claim);
    harness::wait_until(budget(Duration::from_secs(5)), || {
        Ok(crate::conceal::exchange(ctx, Who::Pod(0), imds, &zone)?.status == 200)
    })
    .context("the redirect did not come back once the IPVS service went")?;
    ensure!(attacker.seen() == before);
    Ok(())
}
