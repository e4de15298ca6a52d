// SPDX-License-Identifier: Apache-2.0
//! The simulated node the image runs on: the node's network namespace with the
//! metadata stand-in, one pod wired to it, a cgroup subtree standing in for the
//! host's cgroup root, the kubelet's log directories and a private bpffs.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    netns::NetNs,
    scratch::Scratch,
    standin::{ask_metadata, Standin},
    world::{PodNet, SimNode},
};

pub(crate) const POD_NAMESPACE: &str = "default";
pub(crate) const POD_NAME: &str = "web-smoke";
pub(crate) const POD_CONTAINER: &str = "app";
const POD_UID: &str = "5a0e0000-1111-2222-3333-000000000001";
const CONTAINER_ID: &str = "00000000000000000000000000000000000000000000000000000000005a0e01";

pub(crate) struct Node {
    /// First, so that it goes first: the pins (and the links they hold) before the
    /// namespaces and cgroups.
    _scratch: Scratch,
    pub sim: SimNode,
    pub standin: Standin,
    pub pod: PodNet,
    /// Stands in for the host's cgroup2 root: the guard attaches here.
    pub root: TestCgroup,
    pub pod_cgroup: TestCgroup,
    /// A host process's unit: host network namespace, under the same root.
    pub host_cgroup: TestCgroup,
    pub work: PathBuf,
    pub bpffs: PathBuf,
}

impl Node {
    pub(crate) fn build() -> Result<Node> {
        let scratch = Scratch::new("mg-smoke")?;
        let (work, bpffs) = (scratch.dir.clone(), scratch.bpffs.clone());

        let root = TestCgroup::create(&find_cgroup2_mount()?, &format!("mg-smoke-{}", std::process::id()))?;
        let host_cgroup = root.child("system.slice")?.child("host-client.service")?;
        let uid_ = POD_UID.replace('-', "_");
        let pod_cgroup = root
            .child("kubepods.slice")?
            .child("kubepods-besteffort.slice")?
            .child(&format!("kubepods-besteffort-pod{uid_}.slice"))?
            .child(&format!("cri-containerd-{CONTAINER_ID}.scope"))?;

        // The kubelet's layout. Its links point at /var/log/pods by absolute path,
        // which is where the DaemonSet mounts the pod logs in the container.
        let pod_dir = format!("{POD_NAMESPACE}_{POD_NAME}_{POD_UID}");
        fs::create_dir_all(work.join("pods").join(&pod_dir).join(POD_CONTAINER))?;
        fs::write(work.join("pods").join(&pod_dir).join(POD_CONTAINER).join("0.log"), "")?;
        fs::create_dir_all(work.join("containers"))?;
        symlink(
            format!("/var/log/pods/{pod_dir}/{POD_CONTAINER}/0.log"),
            work.join("containers").join(format!("{POD_NAME}_{POD_NAMESPACE}_{POD_CONTAINER}-{CONTAINER_ID}.log")),
        )?;

        let mut sim = SimNode::new("mg-smoke-node")?;
        let standin = Standin::start(sim.node())?;
        let pod = sim.add_pod("mg-smoke-pod")?;
        Ok(Node { _scratch: scratch, sim, standin, pod, root, pod_cgroup, host_cgroup, work, bpffs })
    }

    pub(crate) fn netns_path(&self) -> PathBuf {
        self.sim.node().path()
    }

    pub(crate) fn pins_left(&self) -> Result<Vec<PathBuf>> {
        let mut left = Vec::new();
        // Only the guard's own directory: the bpffs root also holds the kernel's
        // preloaded iterators (maps.debug, progs.debug).
        let root = self.bpffs.join("metadata-guard");
        // Uninstall removes the directory itself once nothing is pinned in it.
        if !root.exists() {
            return Ok(left);
        }
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).with_context(|| format!("could not list {}", dir.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    left.push(path);
                }
            }
        }
        Ok(left)
    }

    /// GET `path` from the agent's HTTP port, from inside the node's namespace.
    pub(crate) fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        self.sim.node().run(|| -> Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            let status = answer.get(9..12).and_then(|c| c.parse().ok()).context("the agent sent no HTTP status")?;
            Ok((status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
        })
    }
}

/// What `count` HTTP attempts at `to` from a process in `netns` and `cgroup` got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub ok: u64,
    pub eperm: u64,
    pub other: u64,
}

/// Runs the attempts in a child process of this program: a socket is judged by
/// the cgroup and namespace of the task that made it, and only a process can
/// move into a cgroup.
pub(crate) fn attempt(netns: &Path, cgroup: &Path, to: SocketAddr, count: u64) -> Result<Outcome> {
    let out = Command::new("/proc/self/exe")
        .arg("attempt")
        .arg(netns)
        .arg(cgroup)
        .arg(to.to_string())
        .arg(count.to_string())
        .output()
        .context("could not start an attempt process")?;
    if !out.status.success() {
        bail!("the attempt process failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match n[..] {
        [ok, eperm, other] => Ok(Outcome { ok, eperm, other }),
        _ => bail!("the attempt process printed {text:?}"),
    }
}

/// The child's side of [`attempt`]: `attempt NETNS CGROUP ADDR COUNT`. Distinct
/// ports after the first make each refusal a distinct audit key (a storm that the
/// dedup window cannot fold).
pub(crate) fn attempt_main(args: &[String]) -> Result<()> {
    let [netns, cgroup, to, count] = args else { bail!("usage: mg-smoke attempt NETNS CGROUP ADDR COUNT") };
    let to: SocketAddr = to.parse().context("bad address")?;
    let count: u64 = count.parse().context("bad count")?;
    fs::write(Path::new(cgroup).join("cgroup.procs"), "0").with_context(|| format!("could not join {cgroup}"))?;
    NetNs::from_path(Path::new(netns))?.enter_current_thread()?;
    let mut out = Outcome::default();
    for i in 0..count {
        let port = if i == 0 { to.port() } else { 1024 + (i % 60000) as u16 };
        match http_get(SocketAddr::new(to.ip(), port)) {
            Ok(()) => out.ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => out.eperm += 1,
            Err(_) => out.other += 1,
        }
    }
    println!("{} {} {}", out.ok, out.eperm, out.other);
    Ok(())
}

fn http_get(to: SocketAddr) -> std::io::Result<()> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    ask_metadata(s, Duration::from_secs(2))
}
