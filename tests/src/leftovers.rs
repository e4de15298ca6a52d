// SPDX-License-Identifier: Apache-2.0
//! What a test made and left behind: processes, network namespaces, cgroups, bpffs
//! mounts and pins. A [`Footprint`] taken before a scenario and another taken after it
//! differ exactly by what the scenario leaked.
//!
//! Only this process's own things count: its descendants, the namespaces its fds and
//! threads hold, and the cgroups and bpffs mounts whose names carry its pid (the
//! harness names everything it makes `...-<pid>`). Other programs on the machine,
//! other test runs among them, are never looked at, so they cannot fail a scenario.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::cgroups::find_cgroup2_mount;

/// One snapshot of what this process owns outside itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Descendant processes, by pid: their command line (and `(zombie)` when exited
    /// but never waited for).
    pub processes: BTreeMap<u32, String>,
    /// Network namespaces held by this process's fds and threads, by inode.
    pub namespaces: BTreeSet<u64>,
    /// Cgroups below this run's cgroup roots (`<cgroup2>/<name>-<pid>`).
    pub cgroups: BTreeSet<PathBuf>,
    /// This run's bpffs mounts and every pin (file or directory) in them.
    pub pins: BTreeSet<PathBuf>,
}

/// What to leave out of a [`Footprint`]: what the caller keeps on purpose.
#[derive(Clone, Debug, Default)]
pub struct Kept {
    /// Processes (with their descendants) kept across tests, e.g. the agent under test.
    pub processes: Vec<u32>,
    /// Pin directories kept across tests, e.g. the guard's own pin root.
    pub pin_dirs: Vec<PathBuf>,
}

impl Footprint {
    /// Takes a snapshot now.
    pub fn take(kept: &Kept) -> Result<Footprint> {
        let me = std::process::id();
        let tag = format!("-{me}");
        let mut pins = BTreeSet::new();
        for mount in bpffs_mounts()?.into_iter().filter(|m| carries(m, &tag)) {
            walk(&mount, &kept.pin_dirs, &mut pins)?;
            pins.insert(mount);
        }
        let mut cgroups = BTreeSet::new();
        let top = find_cgroup2_mount()?;
        for entry in read_dir(&top)? {
            if entry.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&tag)) {
                walk_dirs(&entry, &mut cgroups)?;
            }
        }
        Ok(Footprint { processes: descendants(me, &kept.processes)?, namespaces: namespaces()?, cgroups, pins })
    }

    /// What this snapshot holds that `before` did not.
    pub fn since(&self, before: &Footprint) -> Footprint {
        Footprint {
            processes: self
                .processes
                .iter()
                .filter(|(pid, _)| !before.processes.contains_key(pid))
                .map(|(pid, cmd)| (*pid, cmd.clone()))
                .collect(),
            namespaces: self.namespaces.difference(&before.namespaces).copied().collect(),
            cgroups: self.cgroups.difference(&before.cgroups).cloned().collect(),
            pins: self.pins.difference(&before.pins).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.namespaces.is_empty() && self.cgroups.is_empty() && self.pins.is_empty()
    }

    /// Kills the processes of this footprint (SIGKILL, by pid) and reaps those that are
    /// this process's children. For leftovers: each is a descendant of this process.
    pub fn kill_processes(&self) {
        for &pid in self.processes.keys() {
            // SAFETY: kill(2) and waitpid(2) on a pid that descends from this process;
            // a killed child exits at once, so the wait is short. ESRCH (gone
            // meanwhile) and ECHILD (a grandchild, which its parent or init reaps) are fine.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
            }
        }
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.processes.is_empty() {
            let list: Vec<String> = self.processes.iter().map(|(pid, cmd)| format!("{pid} ({cmd})")).collect();
            parts.push(format!("processes {}", list.join(", ")));
        }
        if !self.namespaces.is_empty() {
            let list: Vec<String> = self.namespaces.iter().map(|ino| format!("net:[{ino}]")).collect();
            parts.push(format!("network namespaces held by this process {}", list.join(", ")));
        }
        let paths = |set: &BTreeSet<PathBuf>| set.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
        if !self.cgroups.is_empty() {
            parts.push(format!("cgroups {}", paths(&self.cgroups).join(", ")));
        }
        if !self.pins.is_empty() {
            parts.push(format!("bpffs mounts and pins {}", paths(&self.pins).join(", ")));
        }
        if parts.is_empty() {
            return write!(f, "nothing");
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Whether a path has a component ending in `tag` (`-<pid>`).
fn carries(path: &Path, tag: &str) -> bool {
    path.components().any(|c| c.as_os_str().to_str().is_some_and(|s| s.ends_with(tag)))
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            entries.map(|e| e.map(|e| e.path()).with_context(|| format!("could not list {}", dir.display()))).collect()
        }
        // Removed while we looked (a drop on another thread): nothing left there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("could not list {}", dir.display())),
    }
}

/// Every file and directory below `dir`, leaving out `skip` and what is below it.
fn walk(dir: &Path, skip: &[PathBuf], out: &mut BTreeSet<PathBuf>) -> Result<()> {
    for path in read_dir(dir)? {
        if skip.contains(&path) {
            continue;
        }
        if path.is_dir() {
            walk(&path, skip, out)?;
        }
        out.insert(path);
    }
    Ok(())
}

/// `dir` and every directory below it (a cgroup's files are not cgroups).
fn walk_dirs(dir: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    out.insert(dir.to_path_buf());
    for path in read_dir(dir)? {
        walk_dirs(&path, out)?;
    }
    Ok(())
}

/// Mount points of bpf file systems, from this process's mountinfo.
fn bpffs_mounts() -> Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("could not read /proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next()? == "bpf").then(|| crate::cgroups::unescape(left.split(' ').nth(4)?))?
        })
        .collect())
}

/// Descendants of `root`, leaving out the subtrees of `kept`.
fn descendants(root: u32, kept: &[u32]) -> Result<BTreeMap<u32, String>> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut zombies = BTreeMap::new();
    for entry in fs::read_dir("/proc").context("could not list /proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process gone between the listing and the read is simply not there.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let (Some((head, rest)), Some(open)) = (stat.rsplit_once(')'), stat.find('(')) else { continue };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok())) else {
            continue;
        };
        children.entry(ppid).or_default().push(pid);
        // A zombie has no command line left: its name is all there is to show.
        if state == "Z" {
            zombies.insert(pid, head[open + 1..].to_string());
        }
    }
    let mut found = BTreeMap::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for &pid in children.get(&parent).into_iter().flatten() {
            if kept.contains(&pid) {
                continue;
            }
            let shown = match zombies.get(&pid) {
                Some(name) => format!("{name}: a zombie, exited and never waited for"),
                None => {
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string()
                }
            };
            found.insert(pid, shown);
            queue.push(pid);
        }
    }
    Ok(found)
}

/// Network namespaces this process holds: by fd, and as the namespace a thread is in.
fn namespaces() -> Result<BTreeSet<u64>> {
    let mut held = BTreeSet::new();
    let mut links: Vec<PathBuf> = read_dir(Path::new("/proc/self/fd"))?;
    links.extend(read_dir(Path::new("/proc/self/task"))?.into_iter().map(|task| task.join("ns/net")));
    for link in links {
        // An fd closed or a thread ended between the listing and the read.
        let Ok(target) = fs::read_link(&link) else { continue };
        if let Some(ino) = target.to_str().and_then(|t| t.strip_prefix("net:[")?.strip_suffix(']')?.parse::<u64>().ok())
        {
            held.insert(ino);
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_names_only_what_is_new() {
        let before = Footprint {
            processes: BTreeMap::from([(10, "sandbox".into())]),
            namespaces: BTreeSet::from([1, 2]),
            cgroups: BTreeSet::from([PathBuf::from("/cg/a")]),
            pins: BTreeSet::new(),
        };
        let mut after = before.clone();
        assert!(after.since(&before).is_empty());
        after.processes.insert(11, "moto_server".into());
        after.namespaces.remove(&1);
        after.namespaces.insert(3);
        after.pins.insert(PathBuf::from("/bpffs/cgroup-gone"));
        let new = after.since(&before);
        assert_eq!(new.processes.keys().collect::<Vec<_>>(), [&11]);
        assert_eq!(new.namespaces, BTreeSet::from([3]));
        assert!(new.cgroups.is_empty());
        let shown = new.to_string();
        assert!(shown.contains("11 (moto_server)") && shown.contains("net:[3]") && shown.contains("cgroup-gone"));
    }

    #[test]
    fn only_components_ending_in_the_tag_are_ours() {
        assert!(carries(Path::new("/tmp/metadata-guard-test-42/bpffs"), "-42"));
        assert!(!carries(Path::new("/tmp/metadata-guard-test-420/bpffs"), "-42"));
        assert!(!carries(Path::new("/sys/fs/bpf"), "-42"));
    }

    #[test]
    fn a_child_left_running_is_a_leftover_until_killed() {
        let before = Footprint::take(&Kept::default()).unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let after = Footprint::take(&Kept::default()).unwrap().since(&before);
        assert!(after.processes.contains_key(&child.id()), "{after}");
        let kept = Footprint::take(&Kept { processes: vec![child.id()], ..Kept::default() }).unwrap();
        assert!(kept.since(&before).processes.is_empty(), "a kept process is no leftover");
        after.kill_processes();
        let gone = Footprint::take(&Kept::default()).unwrap().since(&before);
        assert!(!gone.processes.contains_key(&child.id()), "killed and reaped, yet still listed: {gone}");
        // Reaped already: this only tells the handle so.
        let _ = child.wait();
    }
}
