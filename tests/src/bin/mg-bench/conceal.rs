// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's figures: what it costs a connect it does not redirect (9b), and a
//! request it lets through (9). The same metadata GET,
//! each on a new connection, from the host network (straight to the stand-in) and
//! from the pod (redirected by the kernel to the agent's proxy, judged, and sent on a
//! new upstream connection), interleaved round by round.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    bench::{Bench, METADATA, TCP_PORT},
    figures::{per_op_row, scale_row, targets},
    profile::{self, Profile},
    report::{Figure, Measured, Row},
    worker::Op,
};

const PROXY_PORT: u16 = 8775;
const PASSED: &str = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
const REFUSED: &str =
    "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";

#[derive(Serialize, Deserialize)]
struct Job {
    netns: PathBuf,
    cgroup: PathBuf,
    requests: u32,
}

#[derive(Serialize, Deserialize)]
struct Done {
    /// Mean microseconds per passed request.
    mean_us: f64,
    /// Status of a credentials request made first: 404 through the proxy, 200 direct.
    credentials_status: u16,
}

/// Both figures, and the BPF profile of a connect in conceal mode (the profile's
/// figure holds it).
pub(crate) fn figures(b: &mut Bench) -> Result<(Vec<Figure>, Profile)> {
    let proxy = SocketAddrV4::new(b.node.pods[0].net.node_side_ipv4, PROXY_PORT).to_string();
    b.start_agent(&["--mode", "conceal", "--conceal-addr", &proxy])?;
    let (rounds, requests) = if b.quick { (3, 50) } else { (15, 400) };
    let pod = &b.node.pods[0];
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        if crate::interrupted() {
            break;
        }
        let host = run(&b.node.node_netns(), pod.cgroup.path(), requests)?;
        ensure!(host.credentials_status == 200, "the host network was not served directly");
        direct.push(host.mean_us);
        let through = run(&pod.net.ns.path(), pod.cgroup.path(), requests)?;
        ensure!(through.credentials_status == 404, "the pod was not filtered by the proxy");
        proxied.push(through.mean_us);
    }
    let not_redirected = not_redirected(b)?;
    let per_chunk = profile::operations(b) / profile::CHUNKS;
    let op = Op::TcpConnect { dest: b.node_addr(TCP_PORT), count: per_chunk };
    let measured = profile::measure(b, vec![(profile::TCP_CONNECT_CONCEAL, op)])?;
    b.start_agent(&[])?;
    let figures = vec![
        Figure {
            title: "9. Conceal mode: a metadata request the proxy passes".into(),
            unit: "µs per request".into(),
            rows: vec![Row {
                case: "GET instance-id, new connection each".into(),
                cols: vec![
                    Measured { label: "direct (host network)".into(), samples: direct },
                    Measured { label: "through the conceal proxy (pod)".into(), samples: proxied },
                ],
            }],
            notes: vec![format!(
                "Here the baseline is the host network's direct request, not \"no guard\". {requests} sequential \
             requests per round and variant. Through the proxy a request costs two TCP connections (pod → \
             proxy, proxy → service), the kernel's redirect and peer record, and the path decision; the \
             stand-in answers on the node itself, so the figure is the proxy's own overhead, without the \
             network round trip to a real metadata service (about 0.1–1 ms on clouds)."
            )],
            ..Default::default()
        },
        not_redirected,
    ];
    Ok((figures, measured))
}

/// Conceal mode's allowed path: a pod's TCP connect + close to the node, which the
/// redirect leaves alone, but `mg_conceal_ops` (sock_ops) sees on every TCP event.
fn not_redirected(b: &mut Bench) -> Result<Figure> {
    let (rounds, count) = if b.quick { (3, 300) } else { (301, 200) };
    let dest = b.node_addr(TCP_PORT);
    let row = per_op_row(b, "connect + close, conceal mode", rounds, count, Op::TcpConnect { dest, count })?;
    Ok(Figure {
        title: "9b. Conceal mode: a connect that is not redirected".into(),
        unit: "µs per connect".into(),
        targets: targets("9b. conceal mode, TCP connect+close", &row, 1.01, true),
        rows: vec![scale_row(row, 1e-3)],
        notes: vec![format!(
            "As figure 1 with the agent in conceal mode: {count} connects per sample from the pod to the node, none to \
             a metadata address, so none is redirected; besides figure 1's programs, `mg_conceal_ops` (sock_ops, \
             attached only in this mode) runs on the connection's TCP events. For the floor, its link runs an \
             empty program too."
        )],
        ..Default::default()
    })
}

fn run(netns: &Path, cgroup: &Path, requests: u32) -> Result<Done> {
    let job = serde_json::to_string(&Job { netns: netns.into(), cgroup: cgroup.into(), requests })?;
    let out = std::process::Command::new("/proc/self/exe").args(["conceal-worker", &job]).output()?;
    ensure!(out.status.success(), "conceal worker failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("conceal worker output")
}

/// The child: joins the cgroup and namespace, then times `requests` exchanges.
pub(crate) fn child_main(json: &str) -> Result<()> {
    let job: Job = serde_json::from_str(json)?;
    std::fs::write(job.cgroup.join("cgroup.procs"), "0")?;
    nix::sched::setns(std::fs::File::open(&job.netns)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let to = SocketAddr::from((METADATA, 80));
    let credentials_status = exchange(to, REFUSED)?;
    let started = Instant::now();
    for _ in 0..job.requests {
        let status = exchange(to, PASSED)?;
        if status != 200 {
            bail!("a passed request got {status}");
        }
    }
    let mean_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(job.requests.max(1));
    println!("{}", serde_json::to_string(&Done { mean_us, credentials_status })?);
    Ok(())
}

fn exchange(to: SocketAddr, request: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12).and_then(|c| c.parse().ok()).with_context(|| format!("no HTTP answer: {text:?}"))
}
