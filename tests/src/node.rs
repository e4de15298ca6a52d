// SPDX-License-Identifier: Apache-2.0
//! The simulated node every scenario runs on: node and pod namespaces, a metadata
//! stand-in, a kubelet-like cgroup tree and log directories, and a private bpffs.
//!
//! Pods live in kubelet-named cgroups so the audit trail can name them; host
//! processes live in `system.slice` units. Everything is removed on drop.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

use crate::{
    agent::AgentSpec,
    cgroups::{find_cgroup2_mount, TestCgroup},
    netns::NetNs,
    sandbox::PodSandbox,
    scratch::Scratch,
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
    /// Holds the pod's namespace from inside its cgroup, as a pause container does;
    /// first, so that it is gone before the cgroup is removed.
    pub _sandbox: PodSandbox,
    pub net: PodNet,
    pub cgroup: TestCgroup,
}

pub struct Node {
    /// First, so that it goes first: the pins (and the links they hold) before the
    /// namespaces and cgroups.
    _scratch: Scratch,
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
    /// The kubelet's QoS-level cgroups, shared by the pods below them.
    kubepods: TestCgroup,
    burstable: TestCgroup,
    cgroupfs_besteffort: TestCgroup,
}

impl Node {
    pub fn build() -> Result<Node> {
        let scratch = Scratch::new("metadata-guard-test")?;
        let work = scratch.dir.clone();
        fs::create_dir_all(work.join("pods"))?;
        fs::create_dir_all(work.join("containers"))?;
        let bpffs = scratch.bpffs.join("metadata-guard");

        let mount = find_cgroup2_mount()?;
        let root = TestCgroup::create(&mount, &format!("metadata-guard-test-{}", std::process::id()))?;
        let system = root.child("system.slice")?;
        let agent_cgroup = system.child("metadata-guard.service")?;
        let sandboxed_unit = system.child("sandboxed.service")?;
        let kubepods = root.child("kubepods.slice")?;
        let burstable = kubepods.child("kubepods-burstable.slice")?;
        // The cgroupfs driver's tree sits beside the systemd one; real nodes use one.
        let cgroupfs_besteffort = root.child("kubepods")?.child("besteffort")?;

        let sim = SimNode::new("mg-node")?;
        let standin = Standin::start(sim.node())?;
        let sandboxed_net = NetNs::new("mg-sandboxed")?;
        let mut node = Node {
            _scratch: scratch,
            sim,
            standin,
            pods: Vec::new(),
            root,
            agent_cgroup,
            sandboxed_unit,
            sandboxed_net,
            work,
            bpffs,
            kubepods,
            burstable,
            cgroupfs_besteffort,
        };
        node.add_pod("default", "web-7d4b9", "app", Layout::SystemdContainerd)?;
        node.add_pod("payments", "api-5f6c8", "server", Layout::SystemdCrio)?;
        node.add_pod("batch", "job-x2k9p", "worker", Layout::CgroupfsContainerd)?;
        node.add_pod("payments", "ledger-9k2x1", "ledger", Layout::SystemdContainerd)?;
        Ok(node)
    }

    pub fn node_netns(&self) -> PathBuf {
        self.sim.node().path()
    }

    fn add_pod(&mut self, namespace: &str, name: &str, container: &str, layout: Layout) -> Result<()> {
        let n = self.pods.len() as u32 + 1;
        let kubelet = self.kubelet_pod_with(namespace, name, container, layout, n)?;
        let net = self.sim.add_pod(name)?;
        let sandbox = PodSandbox::start(&net.ns.path(), kubelet.cgroup.path())?;
        self.pods.push(Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: kubelet.uid.clone(),
            container: container.into(),
            container_id: kubelet.container_id.clone(),
            net,
            cgroup: kubelet.cgroup.clone(),
            _sandbox: sandbox,
        });
        // The pod lives as long as the node: its directories go with `work`.
        std::mem::forget(kubelet.logs);
        Ok(())
    }

    /// A pod as the kubelet lays it out (cgroup and log directories), without a
    /// network of its own: for allowlist and churn scenarios. Gone when dropped.
    pub fn kubelet_pod(&self, namespace: &str, name: &str, layout: Layout, n: u32) -> Result<KubeletPod> {
        self.kubelet_pod_with(namespace, name, "main", layout, n)
    }

    fn kubelet_pod_with(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        layout: Layout,
        n: u32,
    ) -> Result<KubeletPod> {
        let uid = format!("{n:08x}-1111-2222-3333-{n:012x}");
        let container_id = format!("{:064x}", 0xc0ffee_u64 + u64::from(n));
        // Names first, as the kubelet does, so the cgroup is resolvable when it appears.
        let pod_dir = self.work.join("pods").join(format!("{namespace}_{name}_{uid}"));
        fs::create_dir_all(pod_dir.join(container))?;
        fs::write(pod_dir.join(container).join("0.log"), "")?;
        let link = self.work.join("containers").join(format!("{name}_{namespace}_{container}-{container_id}.log"));
        std::os::unix::fs::symlink(pod_dir.join(container).join("0.log"), &link)?;
        let logs = LogDirs { pod_dir, link };
        let uid_ = uid.replace('-', "_");
        let cgroup = match layout {
            Layout::SystemdContainerd => self
                .burstable
                .child(&format!("kubepods-burstable-pod{uid_}.slice"))?
                .child(&format!("cri-containerd-{container_id}.scope"))?,
            Layout::SystemdCrio => self
                .kubepods
                .child(&format!("kubepods-pod{uid_}.slice"))?
                .child(&format!("crio-{container_id}.scope"))?,
            Layout::CgroupfsContainerd => self.cgroupfs_besteffort.child(&format!("pod{uid}"))?.child(&container_id)?,
        };
        Ok(KubeletPod { uid, container_id, cgroup, logs })
    }

    pub fn pod_index(&self, namespace: &str, name: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("no pod {namespace}/{name}"))
    }

    /// How to start the agent on this node, as a DaemonSet would: attached to the
    /// node's cgroup root, living in its own unit, the node's netns as the host's.
    pub fn agent_spec(&self, binary: &std::path::Path, node_name: &str, extra: &[&str]) -> AgentSpec {
        let mut args: Vec<String> = vec![
            "--pod-logs-dir".into(),
            self.pod_logs_dir().display().to_string(),
            "--container-logs-dir".into(),
            self.container_logs_dir().display().to_string(),
            "--node-name".into(),
            node_name.into(),
        ];
        args.extend(extra.iter().map(std::string::ToString::to_string));
        AgentSpec {
            binary: binary.to_path_buf(),
            attach_cgroup: self.root.path().to_path_buf(),
            own_cgroup: self.agent_cgroup.path().to_path_buf(),
            host_netns: self.node_netns(),
            bpffs: self.bpffs.clone(),
            extra: args,
        }
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

/// A pod's cgroup and log directories; dropping it removes both, as a pod's end does.
pub struct KubeletPod {
    pub uid: String,
    pub container_id: String,
    pub cgroup: TestCgroup,
    logs: LogDirs,
}

impl KubeletPod {
    pub fn id(&self) -> u64 {
        self.cgroup.id()
    }
}

struct LogDirs {
    pod_dir: PathBuf,
    link: PathBuf,
}

impl Drop for LogDirs {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.link);
        let _ = fs::remove_dir_all(&self.pod_dir);
    }
}
