//! The few rtnetlink requests the CNI plugin needs (veth pair, addresses, routes, link state),
//! over a raw NETLINK_ROUTE socket: no `ip` or `nsenter` on the host. A socket opened in
//! another network namespace (a thread that `setns`es, then opens it) keeps working there.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NOPREFIXROUTE: u32 = 0x200;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
const AF_INET: u8 = libc::AF_INET as u8;

/// A netlink message under construction: attributes appended, nests closed by length.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, header: &[u8]) -> Self {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(header);
        Self(buf)
    }

    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.align();
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self
    }

    fn begin(&mut self, kind: u16) -> usize {
        self.align();
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = u16::try_from(self.0.len() - at).unwrap_or(u16::MAX);
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        self.align();
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.0
    }
}

fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn name_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b
}

/// The attributes of one message payload after a fixed header of `skip` bytes.
fn attrs(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = payload.get(skip..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[4..len]));
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    out
}

/// A NETLINK_ROUTE socket bound to one network namespace.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    /// A socket in this process's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 1,
        })
    }

    /// A socket in the network namespace at `netns` (a bind-mounted nsfs path): opened by a
    /// thread that entered it, so this process's own namespace never changes.
    pub fn open_in(netns: &Path) -> io::Result<Self> {
        let ns = std::fs::File::open(netns)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this short-lived thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Self::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
        })
    }

    fn send(&mut self, msg: Msg) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        // SAFETY: sending our buffer to the kernel (zeroed sockaddr_nl).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffer and address valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or(12),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives the answers to `seq` until the ACK (or DONE for a dump); returns the
    /// payloads of data messages.
    fn receive(&mut self, seq: u32) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buffer valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n.unsigned_abs()];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                if msg_seq == seq {
                    match kind {
                        NLMSG_DONE => return Ok(out),
                        NLMSG_ERROR => {
                            let errno =
                                i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                            return if errno == 0 {
                                Ok(out)
                            } else {
                                Err(io::Error::from_raw_os_error(-errno))
                            };
                        }
                        _ => out.push(rest[16..len].to_vec()),
                    }
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }

    fn request(&mut self, msg: Msg) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.send(msg)?;
        self.receive(seq)
    }

    /// A veth pair: `host` here, `peer` created directly in the namespace `peer_netns` (an
    /// open nsfs file), both with `mtu`.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        mtu: u32,
        peer_netns: &std::fs::File,
    ) -> io::Result<()> {
        let mut m = Msg::new(
            RTM_NEWLINK,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &ifinfomsg(0, 0, 0),
        );
        m.attr(IFLA_IFNAME, &name_bytes(host));
        m.attr(IFLA_MTU, &mtu.to_ne_bytes());
        let info = m.begin(IFLA_LINKINFO);
        m.attr(IFLA_INFO_KIND, b"veth");
        let data = m.begin(IFLA_INFO_DATA);
        let peer_at = m.begin(VETH_INFO_PEER);
        m.0.extend_from_slice(&ifinfomsg(0, 0, 0));
        m.attr(IFLA_IFNAME, &name_bytes(peer));
        m.attr(IFLA_MTU, &mtu.to_ne_bytes());
        let fd = u32::try_from(peer_netns.as_raw_fd()).unwrap_or(u32::MAX);
        m.attr(IFLA_NET_NS_FD, &fd.to_ne_bytes());
        m.end(peer_at);
        m.end(data);
        m.end(info);
        self.request(m).map(drop)
    }

    /// The index and MAC of link `name`; `None` when there is no such link.
    pub fn link(&mut self, name: &str) -> io::Result<Option<(i32, String)>> {
        let mut m = Msg::new(RTM_GETLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
        m.attr(IFLA_IFNAME, &name_bytes(name));
        let answers = match self.request(m) {
            Ok(a) => a,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(msg) = answers.first().filter(|m| m.len() >= 16) else {
            return Ok(None);
        };
        let index = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let mac = attrs(msg, 16)
            .into_iter()
            .find(|(k, _)| *k == IFLA_ADDRESS)
            .map(|(_, v)| {
                v.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .unwrap_or_default();
        Ok(Some((index, mac)))
    }

    pub fn set_up(&mut self, index: i32) -> io::Result<()> {
        let flags = libc::IFF_UP as u32;
        let m = Msg::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, flags, flags));
        self.request(m).map(drop)
    }

    pub fn delete_link(&mut self, index: i32) -> io::Result<()> {
        let m = Msg::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
        self.request(m).map(drop)
    }

    /// `ip/prefix_len` on link `index` with `scope`; no prefix route when `noprefixroute`.
    pub fn add_address(
        &mut self,
        index: i32,
        ip: Ipv4Addr,
        prefix_len: u8,
        scope: u8,
        noprefixroute: bool,
    ) -> io::Result<()> {
        let mut h = [0u8; 8];
        h[0] = AF_INET;
        h[1] = prefix_len;
        h[3] = scope;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        m.attr(IFA_LOCAL, &ip.octets());
        m.attr(IFA_ADDRESS, &ip.octets());
        if noprefixroute {
            m.attr(IFA_FLAGS, &IFA_F_NOPREFIXROUTE.to_ne_bytes());
        }
        self.request(m).map(drop)
    }

    /// Whether link `index` has `ip/prefix_len`.
    pub fn has_address(&mut self, index: i32, ip: Ipv4Addr, prefix_len: u8) -> io::Result<bool> {
        let mut h = [0u8; 8];
        h[0] = AF_INET;
        let m = Msg::new(RTM_GETADDR, NLM_F_DUMP, &h);
        let answers = self.request(m)?;
        Ok(answers.iter().filter(|a| a.len() >= 8).any(|a| {
            let a_index = i32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
            a_index == index
                && a[1] == prefix_len
                && attrs(a, 8)
                    .iter()
                    .any(|(k, v)| *k == IFA_LOCAL && *v == ip.octets())
        }))
    }

    /// A main-table IPv4 route to `dst/dst_len` out of link `oif`, via `gateway` if given.
    pub fn add_route(
        &mut self,
        dst: Ipv4Addr,
        dst_len: u8,
        gateway: Option<Ipv4Addr>,
        oif: i32,
        scope: u8,
    ) -> io::Result<()> {
        let h = [
            AF_INET,
            dst_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        if dst_len > 0 {
            m.attr(RTA_DST, &dst.octets());
        }
        if let Some(gw) = gateway {
            m.attr(RTA_GATEWAY, &gw.octets());
        }
        m.attr(RTA_OIF, &oif.to_ne_bytes());
        self.request(m).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_nests_closed() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
        m.attr(IFLA_IFNAME, &name_bytes("abc"));
        let at = m.begin(IFLA_LINKINFO);
        m.attr(IFLA_INFO_KIND, b"veth");
        m.end(at);
        let bytes = m.finish(7);
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        let parsed = attrs(&bytes[16..], 16);
        assert_eq!(parsed[0], (IFLA_IFNAME, &b"abc\0"[..]));
        assert_eq!(parsed[1].0, IFLA_LINKINFO);
        assert_eq!(attrs(parsed[1].1, 0), [(IFLA_INFO_KIND, &b"veth"[..])]);
    }
}
