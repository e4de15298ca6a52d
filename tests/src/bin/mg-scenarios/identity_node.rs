// SPDX-License-Identifier: Apache-2.0
//! The world of the identity scenarios: a simulated node with moto as IMDS on
//! 169.254.169.254:80 and a second moto as STS on the node's loopback, a fake kubelet
//! directory holding each pod's service-account token, kubelet-named pod cgroups, and
//! an agent in conceal mode with identities configured.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    placed,
    sandbox::PodSandbox,
    world::{PodNet, SimNode},
};

use crate::{
    agent::{Agent, AgentSpec},
    conceal_moto::{moto_serves, own_cgroup, tail, MOTO_SERVER},
    harness::budget,
};

pub(crate) const PROXY_PORT: u16 = 8775;
/// moto as STS, on the node namespace's loopback (never a real endpoint).
pub(crate) const STS_PORT: u16 = 5123;
pub(crate) const ACCOUNT: &str = "111122223333";

/// One pod: its names, service account, and what the kubelet would have made for it.
pub(crate) struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub net: PodNet,
    pub cgroup: TestCgroup,
    sandbox: Option<PodSandbox>,
}

pub(crate) struct IdentityNode {
    pub sim: SimNode,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
    imds: Option<Child>,
    sts: Option<Child>,
    pub work: PathBuf,
    pub config: PathBuf,
    bpffs: PathBuf,
    pub host_cgroup: TestCgroup,
    burstable: TestCgroup,
    pods_made: usize,
    // Declared last: dropped after the agent and pods above.
    root: TestCgroup,
}

/// A Kubernetes-like service-account token (unsigned: moto does not verify it).
pub(crate) fn token(namespace: &str, pod: &str, uid: &str, account: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + 3600;
    let claims = serde_json::json!({
        "aud": ["sts.amazonaws.com"], "exp": exp, "iat": exp - 3600, "nbf": exp - 3600,
        "iss": "https://oidc.mg-test.example", "sub": format!("system:serviceaccount:{namespace}:{account}"),
        "kubernetes.io": {"namespace": namespace, "pod": {"name": pod, "uid": uid},
                          "serviceaccount": {"name": account, "uid": "5a5a5a5a-0000-0000-0000-000000000000"}}
    });
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(b"unsigned")
    )
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

impl IdentityNode {
    /// `config` is the agent's config file, written before it starts.
    /// `pods` (namespace, name, service account) exist before the agent starts.
    pub(crate) fn build(
        agent_bin: &Path,
        python: &Path,
        tag: &str,
        config: &str,
        pods: &[(&str, &str, &str)],
    ) -> Result<IdentityNode> {
        let pid = std::process::id();
        let work = std::env::temp_dir().join(format!("metadata-guard-identity-{tag}-{pid}"));
        let bpffs = work.join("bpffs");
        fs::create_dir_all(&bpffs)?;
        nix::mount::mount(Some("bpf"), &bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("could not mount a private bpffs")?;
        let root = TestCgroup::create(&find_cgroup2_mount()?, &format!("metadata-guard-identity-{tag}-{pid}"))?;
        let host_cgroup = root.child("system.slice")?.child("metadata-guard.service")?;
        let burstable = root.child("kubepods.slice")?.child("kubepods-burstable.slice")?;
        let mut node = IdentityNode {
            sim: SimNode::new(&format!("mg-id-{tag}"))?,
            pods: Vec::new(),
            agent: None,
            imds: None,
            sts: None,
            config: work.join("config.yaml"),
            work,
            bpffs,
            host_cgroup,
            burstable,
            pods_made: 0,
            root,
        };
        fs::create_dir_all(node.work.join("containers"))?;
        fs::create_dir_all(node.work.join("kubelet/pods"))?;
        node.imds = Some(node.start_moto(python, "169.254.169.254", 80, "imds")?);
        node.sts = Some(node.start_moto(python, "127.0.0.1", STS_PORT, "sts")?);
        // The proxy listens on the node end of the first pod's veth: make that pod now.
        node.add_pod("kube-system", "first", "default")?;
        for (namespace, name, account) in pods {
            node.add_pod(namespace, name, account)?;
        }
        fs::write(&node.config, config)?;
        let proxy = format!("{}:{PROXY_PORT}", node.pods[0].net.node_side_ipv4);
        let spec = AgentSpec {
            binary: agent_bin.to_path_buf(),
            attach_cgroup: node.root.path().to_path_buf(),
            own_cgroup: node.host_cgroup.path().to_path_buf(),
            host_netns: node.sim.node().path(),
            bpffs: node.bpffs.join("metadata-guard"),
            extra: [
                "--mode",
                "conceal",
                "--conceal-addr",
                &proxy,
                "--config",
                &node.config.display().to_string(),
                "--pod-logs-dir",
                &node.work.join("pods").display().to_string(),
                "--container-logs-dir",
                &node.work.join("containers").display().to_string(),
                "--kubelet-dir",
                &node.work.join("kubelet").display().to_string(),
                "--node-name",
                "identity-node",
            ]
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
        };
        node.agent = Some(Agent::start(&spec)?);
        Ok(node)
    }

    /// A pod as the kubelet makes it: cgroup, log directory (its names), projected
    /// token volume, network namespace with a sandbox process.
    pub(crate) fn add_pod(&mut self, namespace: &str, name: &str, account: &str) -> Result<usize> {
        let net = self.sim.add_pod(name)?;
        self.add_pod_in(namespace, name, account, net)
    }

    /// Like [`Self::add_pod`], in an existing network namespace (a pod that got a
    /// deleted pod's address).
    pub(crate) fn add_pod_in(&mut self, namespace: &str, name: &str, account: &str, net: PodNet) -> Result<usize> {
        self.pods_made += 1;
        let n = self.pods_made;
        let uid = format!("{n:08x}-1d1d-4e4e-8f8f-{:012x}", 0xabc000 + n);
        let cgroup = self
            .burstable
            .child(&format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")))?
            .child(&format!("cri-containerd-{:064x}.scope", 0xfeed00 + n))?;
        let logs = self.work.join("pods").join(format!("{namespace}_{name}_{uid}")).join("main");
        fs::create_dir_all(&logs)?;
        fs::write(logs.join("0.log"), "")?;
        self.write_token(&uid, &token(namespace, name, &uid, account))?;
        let sandbox = Some(PodSandbox::start(&net.ns.path(), cgroup.path())?);
        self.pods.push(Pod { namespace: namespace.into(), name: name.into(), uid, net, cgroup, sandbox });
        Ok(self.pods.len() - 1)
    }

    pub(crate) fn write_token(&self, uid: &str, token: &str) -> Result<()> {
        let dir =
            self.work.join("kubelet/pods").join(uid).join("volumes/kubernetes.io~projected/kube-api-access-q7x2z");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("token"), token)?;
        Ok(())
    }

    /// Deletes pod `i` as the kubelet does (processes, cgroup, volumes, logs); returns
    /// its network namespace, so that another pod can get its address.
    pub(crate) fn delete_pod(&mut self, i: usize) -> Result<PodNet> {
        let mut pod = self.pods.remove(i);
        pod.sandbox.take();
        let uid = pod.uid.clone();
        fs::remove_dir_all(self.work.join("kubelet/pods").join(&uid))?;
        fs::remove_dir_all(self.work.join("pods").join(format!("{}_{}_{uid}", pod.namespace, pod.name)))?;
        let Pod { net, cgroup, .. } = pod;
        drop(cgroup);
        Ok(net)
    }

    pub(crate) fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent runs")
    }

    fn start_moto(&self, python: &Path, host: &str, port: u16, what: &str) -> Result<Child> {
        let log_path = self.moto_log(what);
        fs::create_dir_all(self.work.join("home"))?;
        let mut cmd = Command::new(python);
        cmd.args(["-c", MOTO_SERVER, "-H", host, "-p", &port.to_string()])
            .env_clear()
            .env("HOME", self.work.join("home"))
            .env("PATH", "/usr/bin:/bin")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?);
        placed::start_in(&mut cmd, &own_cgroup()?, Some(&self.sim.node().path()))?;
        let mut child =
            cmd.spawn().with_context(|| format!("could not start moto's server with {}", python.display()))?;
        let within = budget(Duration::from_secs(30));
        let started = Instant::now();
        let addr = format!("{host}:{port}");
        loop {
            let serving = if what == "imds" {
                self.sim.node().run(moto_serves)
            } else {
                self.sim.node().run(|| std::net::TcpStream::connect(&addr).is_ok())
            };
            if serving {
                return Ok(child);
            }
            if let Some(status) = child.try_wait().ok().flatten() {
                bail!("moto's server ({what}) exited ({status}): {}", tail(&log_path));
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                bail!("moto's server ({what}) did not serve on {addr} within {within:?}: {}", tail(&log_path));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub(crate) fn moto_log(&self, what: &str) -> PathBuf {
        self.work.join(format!("moto-{what}.log"))
    }

    /// Requests moto's STS served (its request log), of any action.
    pub(crate) fn sts_requests(&self) -> usize {
        fs::read_to_string(self.moto_log("sts"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST / HTTP/1.1\""))
            .count()
    }

    /// Runs `script` with `args` in pod `i` (its namespace and cgroup); its JSON output.
    pub(crate) fn python_in_pod(
        &self,
        python: &Path,
        i: usize,
        script: &str,
        args: &[&str],
    ) -> Result<serde_json::Value> {
        let pod = &self.pods[i];
        self.python(python, &pod.net.ns.path(), pod.cgroup.path(), script, args)
    }

    /// Runs `script` on the host network, in the agent's sibling host cgroup.
    pub(crate) fn python_on_host(&self, python: &Path, script: &str, args: &[&str]) -> Result<serde_json::Value> {
        self.python(python, &self.sim.node().path(), self.host_cgroup.path(), script, args)
    }

    fn python(
        &self,
        python: &Path,
        netns: &Path,
        cgroup: &Path,
        script: &str,
        args: &[&str],
    ) -> Result<serde_json::Value> {
        let timeout = budget(Duration::from_secs(3)).as_secs().to_string();
        let mut cmd = Command::new(python);
        cmd.args(["-c", script])
            .args(args)
            .env_clear()
            .env("HOME", self.work.join("home"))
            .env("PATH", "/usr/bin:/bin");
        cmd.env("AWS_METADATA_SERVICE_TIMEOUT", &timeout).env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1");
        placed::start_in(&mut cmd, cgroup, Some(netns))?;
        let out = cmd.output().context("could not run python")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().take(4).collect::<Vec<_>>().join(" / ");
        ensure!(out.status.success(), "python in {} failed: {last}", cgroup.display());
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("python printed {text:?} ({last})"))
    }

    /// A metric's value summed over the series whose labels contain every one of `labels`.
    pub(crate) fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let (_, text) = self.agent().http_get("/metrics")?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for IdentityNode {
    fn drop(&mut self) {
        self.agent.take();
        for pod in &mut self.pods {
            pod.sandbox.take();
        }
        for child in [self.imds.take(), self.sts.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pods.clear();
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.work);
    }
}
