//! What a device's clsact hooks hold, as the kernel says (a netlink dump of its filters, as
//! `tc filter show` asks). Without TCX the agent's tc programs are filters there, and a filter
//! can go without the agent doing anything: `tc qdisc del dev X clsact` (a tool resetting a
//! device's queueing, another agent's cleanup) takes every filter of the device with it, and
//! nothing tells the program's holder. A TCX link cannot be removed that way.

use std::{cell::RefCell, os::fd::AsRawFd, os::unix::fs::MetadataExt};

use anyhow::{Context, Result, bail};
use aya::programs::TcAttachType;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A bpf filter on a clsact hook: its priority and handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
}

thread_local! {
    /// This thread's netlink socket and the network namespace it was opened in: the agent
    /// asks for each device's filters every 2 s (two dumps a device; hundreds on a node with
    /// pods' devices), and one socket serves them all.
    static SOCKET: RefCell<Option<(u64, Socket)>> = const { RefCell::new(None) };
}

/// The bpf filters on `ifindex`'s clsact hook `dir` (none when the device has no clsact
/// qdisc), in the calling thread's network namespace.
pub fn bpf_filters(ifindex: u32, dir: TcAttachType) -> Result<Vec<BpfFilter>> {
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading this thread's network namespace")?
        .ino();
    SOCKET.with_borrow_mut(|slot| {
        if slot.as_ref().is_none_or(|(at, _)| *at != netns) {
            *slot = Some((netns, open()?));
        }
        let Some((_, socket)) = slot.as_mut() else { unreachable!("just opened") };
        let found = dump(socket, ifindex, dir);
        if found.is_err() {
            // A dump cut short leaves its rest in the socket for the next one to misread.
            *slot = None;
        }
        found
    })
}

/// A netlink route socket that never waits on the kernel for long.
fn open() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting a netlink socket")?;
    // The agent's loop asks this: never wait on the kernel for long.
    let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: a valid socket and option of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("setting a netlink read timeout");
    }
    Ok(socket)
}

/// Asks `socket` for the filters of `ifindex`'s hook `dir` and reads the whole answer.
fn dump(socket: &mut Socket, ifindex: u32, dir: TcAttachType) -> Result<Vec<BpfFilter>> {
    let mut tc = TcMessage::with_index(ifindex as i32);
    let minor = match dir {
        TcAttachType::Ingress => TcHandle::MIN_INGRESS,
        TcAttachType::Egress => TcHandle::MIN_EGRESS,
        TcAttachType::Custom(_) => bail!("not a clsact hook"),
    };
    tc.header.parent = TcHandle { major: 0xffff, minor };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(header, RouteNetlinkMessage::GetTrafficFilter(tc).into());
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("asking for a device's tc filters")?;

    let mut found = Vec::new();
    let mut reply = Vec::with_capacity(64 * 1024);
    loop {
        reply.clear();
        socket.recv(&mut reply, 0).context("reading a device's tc filters")?;
        let mut at = 0;
        while at < reply.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                .context("parsing a tc filter message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                    let bpf = m
                        .attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
                    // A filter's info: its priority above its protocol.
                    if bpf && m.header.handle != TcHandle::UNSPEC {
                        found.push(BpfFilter {
                            priority: (m.header.info >> 16) as u16,
                            handle: u32::from(m.header.handle),
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("the kernel refused the tc filter dump: {}", e.to_io())
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            // Messages start 4-byte aligned (NLMSG_ALIGN).
            at += (len + 3) & !3;
        }
    }
}
