//! The simulated node every scenario runs on: node and pod namespaces, a metadata
//! stand-in, a kubelet-like cgroup tree and log directories, and a private bpffs.
//!
//! Pods live in kubelet-named cgroups so the audit trail can name them; host
//! processes live in `system.slice` units. Everything is removed on drop.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    netns::NetNs,
    standin::Standin,
    world::{PodNet, SimNode},
};

/// How kubelet named a pod's cgroups: driver and container runtime.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    SystemdContainerd,
    SystemdCrio,
    CgroupfsContainerd,
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container: String,
    pub container_id: String,
    pub net: PodNet,
    pub cgroup: TestCgroup,
}

pub struct Node {
    pub sim: SimNode,
    pub standin: Standin,
    pub pods: Vec<Pod>,
    /// Where the guard attaches: the test's stand-in for the cgroup root.
    pub root: TestCgroup,
    /// The agent's own cgroup, like a DaemonSet pod's (a host-network process).
    pub agent_cgroup: TestCgroup,
    /// A host unit that runs in a namespace of its own (PrivateNetwork=yes style).
    pub sandboxed_unit: TestCgroup,
    pub sandboxed_net: NetNs,
    pub work: PathBuf,
    pub bpffs: PathBuf,
    kubepods: TestCgroup,
}

impl Node {
    pub fn build() -> Result<Node> {
        let work = std::env::temp_dir().join(format!("metadata-guard-test-{}", std::process::id()));
        fs::create_dir_all(work.join("pods"))?;
        fs::create_dir_all(work.join("containers"))?;
        let bpffs = work.join("bpffs");
        fs::create_dir_all(&bpffs)?;
        nix::mount::mount(Some("bpf"), &bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("could not mount a private bpffs for the test")?;

        let mount = find_cgroup2_mount()?;
        let root = TestCgroup::create(&mount, &format!("metadata-guard-test-{}", std::process::id()))?;
        let system = root.child("system.slice")?;
        let agent_cgroup = system.child("metadata-guard.service")?;
        let sandboxed_unit = system.child("sandboxed.service")?;
        let kubepods = root.child("kubepods.slice")?;

        let sim = SimNode::new("mg-node")?;
        let standin = Standin::start(sim.node())?;
        let sandboxed_net = NetNs::new("mg-sandboxed")?;
        let mut node = Node {
            sim,
            standin,
            pods: Vec::new(),
            root,
            agent_cgroup,
            sandboxed_unit,
            sandboxed_net,
            work,
            bpffs: bpffs.join("metadata-guard"),
            kubepods,
        };
        node.add_pod("default", "web-7d4b9", "app", Layout::SystemdContainerd)?;
        node.add_pod("payments", "api-5f6c8", "server", Layout::SystemdCrio)?;
        node.add_pod("batch", "job-x2k9p", "worker", Layout::CgroupfsContainerd)?;
        Ok(node)
    }

    pub fn node_netns(&self) -> PathBuf {
        self.sim.node().path()
    }

    fn add_pod(&mut self, namespace: &str, name: &str, container: &str, layout: Layout) -> Result<()> {
        let n = self.pods.len() + 1;
        let uid = format!("{n:08x}-1111-2222-3333-{n:012x}");
        let container_id = format!("{:064x}", 0xc0ffee_u64 + n as u64);
        let uid_ = uid.replace('-', "_");
        let cgroup = match layout {
            Layout::SystemdContainerd => self
                .kubepods
                .child("kubepods-burstable.slice")?
                .child(&format!("kubepods-burstable-pod{uid_}.slice"))?
                .child(&format!("cri-containerd-{container_id}.scope"))?,
            Layout::SystemdCrio => self
                .kubepods
                .child(&format!("kubepods-pod{uid_}.slice"))?
                .child(&format!("crio-{container_id}.scope"))?,
            // The cgroupfs driver's tree sits beside the systemd one; real nodes use one.
            Layout::CgroupfsContainerd => self
                .root
                .child("kubepods")?
                .child("besteffort")?
                .child(&format!("pod{uid}"))?
                .child(&container_id)?,
        };
        let log_dir = self.work.join("pods").join(format!("{namespace}_{name}_{uid}")).join(container);
        fs::create_dir_all(&log_dir)?;
        fs::write(log_dir.join("0.log"), "")?;
        std::os::unix::fs::symlink(
            log_dir.join("0.log"),
            self.work.join("containers").join(format!("{name}_{namespace}_{container}-{container_id}.log")),
        )?;
        let net = self.sim.add_pod(name)?;
        self.pods.push(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            container: container.into(),
            container_id,
            net,
            cgroup,
        });
        Ok(())
    }

    pub fn pod_logs_dir(&self) -> PathBuf {
        self.work.join("pods")
    }

    pub fn container_logs_dir(&self) -> PathBuf {
        self.work.join("containers")
    }

    pub fn config_path(&self) -> PathBuf {
        self.work.join("config.yaml")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Unmounting the private bpffs drops every pin in it; links then detach.
        let _ = nix::mount::umount2(&self.work.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.work);
    }
}

