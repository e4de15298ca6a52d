// SPDX-License-Identifier: Apache-2.0
//! Sockets in the host's network namespace, whatever namespace the agent runs in.
//!
//! A socket belongs to the namespace it was created in. The proxy's listener must sit
//! where pods are redirected to, and its upstream connections must be host sockets
//! (the kernel hooks let those reach the metadata service). With `--host-netns`, one
//! thread joins that namespace for good and creates sockets on request; the agent's
//! own threads never change namespace.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{mpsc, Mutex},
    thread,
};

use anyhow::{anyhow, Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use tokio::sync::oneshot;

type Job = (AddressFamily, oneshot::Sender<nix::Result<OwnedFd>>);

pub(crate) struct HostSockets {
    /// None: the agent's own namespace is the host's.
    maker: Option<Mutex<mpsc::Sender<Job>>>,
    netns: Option<PathBuf>,
}

impl HostSockets {
    pub(crate) fn new(netns: Option<&Path>) -> Result<HostSockets> {
        let Some(path) = netns else {
            return Ok(HostSockets { maker: None, netns: None });
        };
        let ns = File::open(path).with_context(|| format!("could not open network namespace {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::Builder::new()
            .name("conceal-netns".into())
            .spawn(move || {
                let joined = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = joined.is_ok();
                let _ = ready_tx.send(joined);
                if !ok {
                    return;
                }
                for (family, reply) in rx {
                    let _ = reply.send(new_tcp_socket(family));
                }
            })
            .context("could not start the thread that makes host-namespace sockets")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the host-namespace socket thread died"))?
            .with_context(|| format!("could not join network namespace {}", path.display()))?;
        Ok(HostSockets { maker: Some(Mutex::new(tx)), netns: Some(path.to_path_buf()) })
    }

    /// A new non-blocking TCP socket of `addr`'s family, in the host namespace.
    pub(crate) async fn tcp(&self, addr: &SocketAddr) -> Result<tokio::net::TcpSocket> {
        let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let fd = match &self.maker {
            None => new_tcp_socket(family)?,
            Some(maker) => {
                let (tx, rx) = oneshot::channel();
                maker.lock().map_err(|_| anyhow!("socket maker lock poisoned"))?.send((family, tx))?;
                rx.await.map_err(|_| anyhow!("the host-namespace socket thread died"))??
            }
        };
        Ok(tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
    }

    /// Listens on `addr` in the host namespace.
    pub(crate) async fn listen(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
        let where_ = self.netns.as_ref().map_or_else(|| "the agent's own".into(), |p| p.display().to_string());
        let socket = self.tcp(&addr).await?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr).with_context(|| {
            format!(
                "could not bind the conceal proxy to {addr} in {where_} network namespace; is it this node's address?"
            )
        })?;
        Ok(socket.listen(1024)?)
    }
}

fn new_tcp_socket(family: AddressFamily) -> nix::Result<OwnedFd> {
    socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
}
