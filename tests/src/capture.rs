//! Packet capture on one interface of a namespace with the kernel's checksum status per
//! frame (a packet socket with PACKET_AUXDATA). A frame still carrying a partial checksum
//! (offload pending) holds the pseudo-header seed in its checksum field: that is what the
//! datapath must have updated, and what a receiving veth never verifies.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Context, Result};
use datapath_common::flow::{PROTO_TCP, PROTO_UDP};

use crate::{netns::spawn_within, packet::Parsed};

/// One captured frame.
pub struct Frame {
    pub data: Vec<u8>,
    /// TP_STATUS_CSUMNOTREADY: the L4 checksum is a partial seed.
    pub partial: bool,
    /// Sent by this namespace rather than received.
    pub outgoing: bool,
}

/// A capture running on a thread in the namespace until [`Capture::finish`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Frame>>>,
}

impl Capture {
    pub fn start(ns: &str, iface: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (name, flag) = (iface.to_string(), stop.clone());
        let thread = spawn_within(ns, move || {
            let socket = open(&name);
            let _ = ready_tx.send(socket.as_ref().map(|_| ()).map_err(ToString::to_string));
            receive(&socket?, &flag)
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(e)) => bail!("capture on {iface:?} in {ns}: {e}"),
            Err(_) => bail!("capture thread in {ns} ended early"),
        }
    }

    pub fn finish(self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_option<T>(
    socket: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: a value of its own size for an option that takes that type.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        )
    };
    check(rc, what)
}

fn open(iface: &str) -> Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(protocol)) };
    check(fd, "packet socket")?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {iface:?}");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    set_option(
        &socket,
        libc::SOL_PACKET,
        libc::PACKET_AUXDATA,
        &1,
        "PACKET_AUXDATA",
    )?;
    set_option(
        &socket,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeout,
        "SO_RCVTIMEO",
    )?;
    // SAFETY: zero is a valid sockaddr_ll to fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex.cast_signed();
    // SAFETY: a sockaddr_ll of its own size.
    check(
        unsafe { libc::bind(fd, (&raw const addr).cast(), size_of_val(&addr) as u32) },
        "binding the packet socket",
    )?;
    Ok(socket)
}

fn receive(socket: &OwnedFd, stop: &AtomicBool) -> Result<Vec<Frame>> {
    let mut frames = Vec::new();
    // GSO super-packets reach 64 KiB.
    let mut buf = vec![0u8; 1 << 17];
    let mut control = [0u64; 16];
    while !stop.load(Ordering::Relaxed) {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zero is a valid msghdr and sockaddr_ll to fill in.
        let (mut msg, mut from): (libc::msghdr, libc::sockaddr_ll) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = size_of_val(&from) as u32;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: buffers described by `msg` outlive the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                continue;
            }
            return Err(err).context("receiving from the packet socket");
        }
        let len = usize::try_from(n).unwrap_or(0);
        if len > buf.len() {
            bail!("a {len}-byte frame does not fit the capture buffer");
        }
        frames.push(Frame {
            data: buf[..len].to_vec(),
            partial: status(&msg) & libc::TP_STATUS_CSUMNOTREADY != 0,
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
        });
    }
    Ok(frames)
}

/// tp_status of the PACKET_AUXDATA control message.
fn status(msg: &libc::msghdr) -> u32 {
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_PACKET && (*cmsg).cmsg_type == libc::PACKET_AUXDATA {
                // The control data may sit unaligned: copy it out.
                let mut aux = std::mem::MaybeUninit::<libc::tpacket_auxdata>::uninit();
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    aux.as_mut_ptr().cast::<u8>(),
                    size_of::<libc::tpacket_auxdata>(),
                );
                return aux.assume_init().tp_status;
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    0
}

/// What a captured TCP or UDP checksum turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// A finished checksum that verifies (or UDP without one).
    Valid,
    /// A partial seed equal to the pseudo-header sum: what the device will complete correctly.
    ValidSeed,
    Wrong,
}

/// Checks the TCP or UDP checksum of an Ethernet + IPv4 frame; `None` for anything else
/// (other protocols, fragments, truncated frames).
#[must_use]
pub fn l4_checksum(frame: &Frame) -> Option<(u8, L4Checksum)> {
    let d = &frame.data;
    if d.len() < 14 + 20 || d[12..14] != [0x08, 0x00] {
        return None;
    }
    let packet = Parsed::parse(d);
    let header_len = match packet.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    let whole = usize::from(u16::from_be_bytes([packet.ip[2], packet.ip[3]])) == packet.ip.len();
    let fragment = u16::from_be_bytes([packet.ip[6], packet.ip[7]]) & 0x3fff != 0;
    if !whole || fragment || packet.ihl < 20 || packet.l4().len() < header_len {
        return None;
    }
    let verdict = if frame.partial {
        if packet.l4_seed_ok() {
            L4Checksum::ValidSeed
        } else {
            L4Checksum::Wrong
        }
    } else if packet.l4_checksum_ok() {
        L4Checksum::Valid
    } else {
        L4Checksum::Wrong
    };
    Some((packet.proto, verdict))
}
