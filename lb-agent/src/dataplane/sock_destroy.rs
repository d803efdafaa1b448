//! Connected UDP sockets that the socket hooks sent to an endpoint which has left its service
//! are destroyed, so the application connects again and reaches a live endpoint.
//!
//! connect() on a UDP socket to a service address is translated once: the socket is then
//! connected to the pod itself, and no later hook sees its datagrams. kube-proxy moves such a
//! flow by flushing its conntrack entries; here the socket holds the choice, so it has to go.
//! The sockets are found with the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) in every
//! network namespace of the node, and told apart from sockets connected to that pod directly
//! by their cookie: connect4/6 recorded (cookie, endpoint) in `LB_SOCK_RNAT` with the service
//! port. Each is destroyed with `SOCK_DESTROY` (the kernel's `udp_abort`): the application's
//! next receive fails with ECONNABORTED, a send with EDESTADDRREQ, and its next connect() picks
//! a live endpoint. (Cilium does the same from a BPF socket iterator with the
//! `bpf_sock_destroy` kfunc, which aya cannot load; the netlink request needs no program.)
//!
//! Unconnected sockets are left alone: their next sendmsg() picks an endpoint anew.

use std::{
    collections::HashSet,
    fs::File,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use lb_common::{SockRevNatKey, SockRevNatValue, addr_from_ip};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SOCK_DESTROY, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

use super::{batch, conntrack_gc::StaleUdp};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destroyed {
    /// Sockets destroyed.
    pub sockets: u64,
    /// Network namespaces searched (0 when no recorded socket could match: no search).
    pub namespaces: usize,
    /// Namespaces that could not be searched, and the first reason: the others still are.
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Destroys the connected UDP sockets that the socket hooks sent to endpoints `stale` names,
/// in every network namespace of the node ([`network_namespaces`]).
pub fn destroy(sock_revnat: &MapData, stale: &StaleUdp) -> Result<Destroyed> {
    let doomed = recorded_sockets(sock_revnat, stale)?;
    if doomed.is_empty() {
        return Ok(Destroyed::default());
    }
    destroy_in(&network_namespaces(), &doomed)
}

/// The (cookie, endpoint) pairs connect4/6 and sendmsg4/6 recorded for endpoints `stale`
/// names. Entries outlive their sockets (the map is an LRU), so some name closed ones.
pub fn recorded_sockets(sock_revnat: &MapData, stale: &StaleUdp) -> Result<HashSet<SockRevNatKey>> {
    let mut doomed = HashSet::new();
    batch::for_each_chunk::<SockRevNatKey, SockRevNatValue>(sock_revnat, |keys, values| {
        for (k, v) in keys.iter().zip(values) {
            if stale.contains(v.service_id, k.addr, k.port_be) {
                doomed.insert(*k);
            }
        }
        Ok(())
    })
    .context("reading LB_SOCK_RNAT")?;
    Ok(doomed)
}

/// Every network namespace a process of this node is in (`/proc/*/ns/net`) or that is
/// mounted under `/run/netns` (where container runtimes keep pods' ones), each once.
pub fn network_namespaces() -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::from("/proc/self/ns/net")];
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            if p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                candidates.push(p.path().join("ns/net"));
            }
        }
    }
    if let Ok(mounted) = std::fs::read_dir("/run/netns") {
        candidates.extend(mounted.flatten().map(|m| m.path()));
    }
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter(|path| {
            // A process may have exited since the listing: skip it.
            std::fs::metadata(path).is_ok_and(|m| seen.insert((m.dev(), m.ino())))
        })
        .collect()
}

/// Destroys the sockets `doomed` names in each of `namespaces`. Runs on a thread of its own,
/// which enters each namespace in turn and then ends, so no other thread changes namespace.
pub fn destroy_in(namespaces: &[PathBuf], doomed: &HashSet<SockRevNatKey>) -> Result<Destroyed> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut done = Destroyed::default();
            for ns in namespaces {
                // A namespace gone since the listing has no sockets left to destroy.
                let Ok(file) = File::open(ns) else { continue };
                let here = enter(&file).context("entering it").and_then(|()| destroy_here(doomed));
                match here {
                    Ok(n) => {
                        done.namespaces += 1;
                        done.sockets += n;
                    }
                    Err(e) => {
                        done.failed += 1;
                        done.first_error.get_or_insert_with(|| format!("{}: {e:#}", ns.display()));
                    }
                }
            }
            Ok(done)
        })
        .join()
        .unwrap_or_else(|_| bail!("the socket search panicked"))
    })
}

fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns on a valid descriptor; it changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Destroys, in the current thread's network namespace, the connected UDP sockets `doomed`
/// names (the cookie and the peer must both match).
fn destroy_here(doomed: &HashSet<SockRevNatKey>) -> Result<u64> {
    let diag = open_diag()?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let dump = request(family, SocketId::any(family), NLM_F_REQUEST | NLM_F_DUMP);
        exchange(&diag, &dump, |id| {
            let key = SockRevNatKey {
                cookie: cookie(&id.cookie),
                addr: addr_from_ip(id.destination_address),
                port_be: id.destination_port.to_be(),
                ..Default::default()
            };
            if doomed.contains(&key) {
                found.push((family, id.clone()));
            }
        })?;
    }
    let mut destroyed = 0;
    for (family, id) in found {
        let mut kill = request(family, id.clone(), NLM_F_REQUEST | NLM_F_ACK);
        kill.header.message_type = SOCK_DESTROY;
        match exchange(&diag, &kill, |_| {}) {
            Ok(()) => destroyed += 1,
            // Closed since the dump.
            Err(e)
                if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error())
                    == Some(libc::ENOENT) =>
            {
                debug!(?id, "socket closed before it could be destroyed")
            }
            // EOPNOTSUPP: a kernel without CONFIG_INET_DIAG_DESTROY.
            Err(e) => return Err(e.context("destroying a socket")),
        }
    }
    Ok(destroyed)
}

fn open_diag() -> Result<Socket> {
    let mut diag = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    diag.bind_auto()?;
    diag.connect(&SocketAddr::new(0, 0))?;
    set_receive_timeout(diag.as_raw_fd(), Duration::from_secs(2))?;
    Ok(diag)
}

fn set_receive_timeout(fd: RawFd, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid option value of the right size on our own descriptor.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

trait AnySocket {
    fn any(family: u8) -> Self;
}

impl AnySocket for SocketId {
    fn any(family: u8) -> Self {
        if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() }
    }
}

/// A request about connected UDP sockets of `family` (UDP reports a connected socket as
/// TCP_ESTABLISHED).
fn request(family: u8, id: SocketId, flags: u16) -> NetlinkMessage<SockDiagMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id: id,
        })
        .into(),
    );
    msg.finalize();
    msg
}

/// The kernel's socket cookie from its two native-endian 32-bit halves, low first
/// (`sock_diag_save_cookie`).
fn cookie(raw: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (hi as u64) << 32 | lo as u64
}

/// Sends `msg` and reads the answer to its end (a dump's last part, or the acknowledgement),
/// giving each socket reported to `each`.
fn exchange(
    diag: &Socket,
    msg: &NetlinkMessage<SockDiagMessage>,
    mut each: impl FnMut(&SocketId),
) -> Result<()> {
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    diag.send(&out, 0).context("sending a sock_diag request")?;
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let len = diag.recv(&mut buf, 0).context("reading a sock_diag answer")?;
        let mut at = 0;
        while at < len {
            let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..len])
                .context("parsing a sock_diag answer")?;
            let size = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    each(&r.header.socket_id)
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                NetlinkPayload::Error(e) => return Err(e.to_io().into()),
                _ => {}
            }
            if size == 0 {
                break;
            }
            at += size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_from_their_two_halves() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x89ab_cdefu32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0123_4567u32.to_ne_bytes());
        assert_eq!(cookie(&raw), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn each_namespace_is_listed_once_and_ours_first() {
        let all = network_namespaces();
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(std::fs::metadata(&all[0]).unwrap().ino(), ours);
        let inodes: HashSet<u64> =
            all.iter().map(|p| std::fs::metadata(p).unwrap().ino()).collect();
        assert_eq!(inodes.len(), all.len());
    }
}
