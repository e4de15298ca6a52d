// SPDX-License-Identifier: Apache-2.0
//! Conceal mode with real clients: moto's IMDS emulator as the metadata service and
//! botocore/boto3 as the SDK, in a simulated node of their own (the shared node's
//! stand-in holds port 80 on every metadata address).
//!
//! The interpreter is `--python` (the VM guests carry one with moto and boto3, see
//! xtask/src/vm/python.rs); without it, a virtualenv made here under target/ on first
//! use (python3 -m venv, pip). `--without-python` leaves these scenarios out.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    placed,
    sandbox::PodSandbox,
    scratch::Scratch,
    world::{PodNet, SimNode},
};

use crate::{
    agent::{Agent, AgentSpec},
    harness::{budget, Ctx},
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] = [(
    "conceal (moto, botocore): pods resolve region and zone with IMDSv2 and v1 and get no credentials; host and allowlisted pod do",
    botocore_through_the_proxy,
)];

const PROXY_PORT: u16 = 8775;
/// moto and boto3 versions are whatever pip resolves today; the scenario checks
/// behaviour, not versions.
const PIP_PACKAGES: [&str; 2] = ["moto[server]", "boto3"];

/// `--python`: an interpreter that imports moto (with its server) and boto3.
static PYTHON: OnceLock<PathBuf> = OnceLock::new();

pub(crate) fn set_python(interpreter: PathBuf) {
    let _ = PYTHON.set(interpreter);
}

/// Runs moto's server as `python -c`, so only the interpreter needs to be known.
pub(crate) const MOTO_SERVER: &str = "import sys; from moto.server import main; sys.exit(main())";

/// Asks botocore what an SDK would: region and zone through IMDS (v2 by default; v1
/// when told to skip the token), and boto3's credential chain. One JSON line out.
///
/// moto answers 500 to botocore's region path (`availability-zone/`, with a trailing
/// slash, which real IMDS serves like the leaf): the fetcher is pointed at the leaf
/// form, and botocore's own form is sent too, to show that the proxy passes it
/// (the pod then gets moto's 500, as the host does, not the proxy's 404).
const CLIENT: &str = r#"
import json, sys, time, urllib.request, urllib.error
import boto3, botocore.utils as u
u.InstanceMetadataRegionFetcher._URL_PATH = "latest/meta-data/placement/availability-zone"
v1 = sys.argv[1] == "v1"
timeout = float(sys.argv[2])
out = {}
try:
    urllib.request.urlopen("http://169.254.169.254/" + "latest/meta-data/placement/availability-zone/", timeout=timeout)
    out["botocore_form_status"] = 200
except urllib.error.HTTPError as e:
    out["botocore_form_status"] = e.code
def fetcher(cls):
    f = cls(timeout=timeout, num_attempts=1)
    if v1:
        f._fetch_metadata_token = lambda: None
    return f
t = time.monotonic()
out["region"] = fetcher(u.InstanceMetadataRegionFetcher).retrieve_region()
f = fetcher(u.InstanceMetadataFetcher)
r = f._get_request("latest/meta-data/placement/availability-zone", None, f._fetch_metadata_token())
out["zone"] = r.text
out["region_seconds"] = time.monotonic() - t
t = time.monotonic()
creds = boto3.Session(region_name="us-east-1").get_credentials()
out["credentials_seconds"] = time.monotonic() - t
out["access_key"] = creds.access_key if creds else None
print(json.dumps(out))
"#;

fn workspace_target() -> PathBuf {
    // mg-scenarios lives in target/debug (or target/<triple>/…): the venv sits beside.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map_or_else(|| std::env::temp_dir().join("metadata-guard-target"), Path::to_path_buf)
}

/// The interpreter: `--python`, or the virtualenv's, made on first use.
pub(crate) fn python() -> Result<PathBuf> {
    match PYTHON.get() {
        Some(p) => Ok(p.clone()),
        None => Ok(venv()?.join("bin/python")),
    }
}

/// The virtualenv with moto and boto3, made on first use.
fn venv() -> Result<PathBuf> {
    let dir = workspace_target().join("conceal-venv");
    let marker = dir.join(".installed");
    if marker.exists() {
        return Ok(dir);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| format!("could not run {what}"))?;
        ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let make = || run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&dir), "python3 -m venv");
    if make().is_err() {
        // Debian splits venv out of python3.
        run(Command::new("apt-get").arg("update"), "apt-get update")?;
        run(Command::new("apt-get").args(["install", "-y", "python3-venv"]), "apt-get install python3-venv")?;
        make()?;
    }
    run(Command::new(dir.join("bin/pip")).args(["install", "--quiet"]).args(PIP_PACKAGES), "pip install moto boto3")?;
    fs::write(&marker, "")?;
    Ok(dir)
}

/// A node of its own: namespaces, kubelet-named cgroups, a private bpffs, an agent in
/// conceal mode and moto_server on 169.254.169.254:80. Removed on drop.
struct MotoNode {
    /// Its directory and private bpffs; first, so that the pins go before the namespaces.
    _scratch: Scratch,
    sim: SimNode,
    pods: Vec<(PodNet, TestCgroup)>,
    /// A process in each pod's namespace and cgroup, as a pause container is: the host
    /// side finds an allowlisted pod's interface through it.
    sandboxes: Vec<PodSandbox>,
    agent: Option<Agent>,
    moto: Option<Child>,
    work: PathBuf,
    // Declared last: dropped after the agent and pods above.
    root: TestCgroup,
    cgroups: Vec<TestCgroup>,
}

impl MotoNode {
    fn build(agent_bin: &Path, python: &Path) -> Result<MotoNode> {
        let pid = std::process::id();
        let scratch = Scratch::new("metadata-guard-moto")?;
        let (work, bpffs) = (scratch.dir.clone(), scratch.bpffs.clone());
        let root = TestCgroup::create(&find_cgroup2_mount()?, &format!("metadata-guard-moto-{pid}"))?;
        let agent_cg = root.child("system.slice")?.child("metadata-guard.service")?;
        let burstable = root.child("kubepods.slice")?.child("kubepods-burstable.slice")?;
        let sim = SimNode::new("mg-moto-node")?;
        let mut node = MotoNode {
            _scratch: scratch,
            sim,
            pods: Vec::new(),
            sandboxes: Vec::new(),
            agent: None,
            moto: None,
            work: work.clone(),
            root,
            cgroups: vec![agent_cg.clone(), burstable.clone()],
        };
        for (n, (namespace, name)) in [("shop", "web-1"), ("infra", "node-agent-1")].into_iter().enumerate() {
            let uid = format!("{:08x}-aaaa-bbbb-cccc-{:012x}", n + 1, n + 1);
            let id = format!("{:064x}", 0xbeef + n);
            let pod_cg = burstable
                .child(&format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")))?
                .child(&format!("cri-containerd-{id}.scope"))?;
            let logs = work.join("pods").join(format!("{namespace}_{name}_{uid}")).join("main");
            fs::create_dir_all(&logs)?;
            fs::write(logs.join("0.log"), "")?;
            let net = node.sim.add_pod(name)?;
            node.sandboxes.push(PodSandbox::start(&net.ns.path(), pod_cg.path())?);
            node.pods.push((net, pod_cg));
        }
        fs::create_dir_all(work.join("containers"))?;
        node.start_moto(python)?;
        let proxy = format!("{}:{PROXY_PORT}", node.pods[0].0.node_side_ipv4);
        let config = work.join("config.yaml");
        fs::write(&config, "allow_pods:\n  - namespace: infra\n    pod: \"node-agent-*\"\n")?;
        let spec = AgentSpec {
            binary: agent_bin.to_path_buf(),
            attach_cgroup: node.root.path().to_path_buf(),
            own_cgroup: agent_cg.path().to_path_buf(),
            host_netns: node.sim.node().path(),
            bpffs: bpffs.join("metadata-guard"),
            extra: [
                "--mode",
                "conceal",
                "--conceal-addr",
                &proxy,
                "--config",
                &config.display().to_string(),
                "--pod-logs-dir",
                &work.join("pods").display().to_string(),
                "--container-logs-dir",
                &work.join("containers").display().to_string(),
                "--node-name",
                "moto-node",
            ]
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
        };
        node.agent = Some(Agent::start(&spec)?);
        Ok(node)
    }

    /// moto stands for a service off the node: its process stays outside the guarded
    /// cgroup tree (as the stand-in does), only its network namespace is the node's.
    /// Its start-up imports Flask, moto and botocore: a second natively, far longer
    /// under emulation; ready once it serves an instance id.
    fn start_moto(&mut self, python: &Path) -> Result<()> {
        let netns = self.sim.node().path();
        let log_path = self.work.join("moto.log");
        fs::create_dir_all(self.work.join("home"))?;
        let mut cmd = Command::new(python);
        cmd.args(["-c", MOTO_SERVER, "-H", "169.254.169.254", "-p", "80"])
            .env_clear()
            .env("HOME", self.work.join("home"))
            .env("PATH", "/usr/bin:/bin")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?);
        placed::start_in(&mut cmd, &own_cgroup()?, Some(&netns))?;
        self.moto =
            Some(cmd.spawn().with_context(|| format!("could not start moto's server with {}", python.display()))?);
        let within = budget(Duration::from_secs(30));
        let started = Instant::now();
        loop {
            if self.sim.node().run(moto_serves) {
                eprintln!("conceal_moto: moto's server ready after {:.1?}", started.elapsed());
                return Ok(());
            }
            if let Some(status) = self.moto.as_mut().and_then(|m| m.try_wait().ok().flatten()) {
                bail!("moto's server exited ({status}): {}", tail(&log_path));
            }
            if started.elapsed() > within {
                bail!("moto's server did not serve IMDS on 169.254.169.254:80 within {within:?}: {}", tail(&log_path));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn python_in(&self, netns: &Path, cgroup: &Path, python: &Path, version: &str) -> Result<serde_json::Value> {
        let home = self.work.join("home");
        fs::create_dir_all(&home)?;
        // The clients' own timeouts: 2 s natively, scaled like every budget.
        let timeout = budget(Duration::from_secs(2)).as_secs().to_string();
        let mut cmd = Command::new(python);
        cmd.args(["-c", CLIENT, version, &timeout]).env_clear().env("HOME", &home).env("PATH", "/usr/bin:/bin");
        cmd.env("AWS_METADATA_SERVICE_TIMEOUT", &timeout).env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1");
        placed::start_in(&mut cmd, cgroup, Some(netns))?;
        let out = cmd.output().context("could not run the botocore client")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        ensure!(out.status.success(), "botocore client ({version}) in {} failed: {last}", cgroup.display());
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("botocore client printed {text:?}"))
    }
}

/// Whether moto answers an IMDS request, asked from the calling thread's namespace.
pub(crate) fn moto_serves() -> bool {
    let ask = || -> std::io::Result<String> {
        let addr = "169.254.169.254:80".parse().expect("a socket address");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(budget(Duration::from_secs(2))))?;
        s.write_all(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    ask().is_ok_and(|a| a.starts_with("HTTP/1.") && a.split_whitespace().nth(1) == Some("200"))
}

/// The last lines of a log, for an error message.
pub(crate) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// The cgroup v2 directory this process runs in.
pub(crate) fn own_cgroup() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(find_cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

impl Drop for MotoNode {
    fn drop(&mut self) {
        self.agent.take();
        // Before the pods' cgroups go: a cgroup with a process in it cannot be removed.
        self.sandboxes.clear();
        if let Some(mut m) = self.moto.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn botocore_through_the_proxy(ctx: &mut Ctx) -> Result<()> {
    let python = python()?;
    let node = MotoNode::build(&ctx.agent_bin, &python)?;
    let host_cg = node.cgroups[0].path().to_path_buf();
    let host = node.python_in(&node.sim.node().path(), &host_cg, &python, "v2")?;
    ensure!(host["access_key"].is_string() && host["region"].is_string(), "host network: {host}");
    for version in ["v2", "v1"] {
        let (net, cg) = &node.pods[0];
        let pod = node.python_in(&net.ns.path(), cg.path(), &python, version)?;
        ensure!(
            pod["region"] == host["region"],
            "pod ({version}): region {} ≠ host's {}",
            pod["region"],
            host["region"]
        );
        ensure!(pod["zone"] == host["zone"] && pod["zone"].is_string(), "pod ({version}): zone {}", pod["zone"]);
        ensure!(pod["access_key"].is_null(), "pod ({version}) got credentials: {pod}");
        ensure!(pod["botocore_form_status"] == host["botocore_form_status"], "pod ({version}): {pod}, host: {host}");
        let took = pod["credentials_seconds"].as_f64().unwrap_or(f64::MAX);
        let at_once = budget(Duration::from_millis(1500)).as_secs_f64();
        ensure!(took < at_once, "pod ({version}): finding no credentials took {took:.2} s, not at once ({at_once} s)");
    }
    let (net, cg) = &node.pods[1];
    let allowed = node.python_in(&net.ns.path(), cg.path(), &python, "v2")?;
    ensure!(allowed["access_key"] == host["access_key"], "allowlisted pod: {allowed}");
    Ok(())
}
