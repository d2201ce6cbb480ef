//! Interfaces and addresses of the current network namespace.

use std::{ffi::CString, net::Ipv4Addr};

use crate::error::{Error, Result};

/// The ifindex of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    let c_name = CString::new(name).map_err(|_| Error::UnknownInterface(name.into()))?;
    // SAFETY: valid C string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(Error::UnknownInterface(name.into())),
        index => Ok(index),
    }
}

/// True when `name` is a loopback interface (`lo`).
pub fn is_loopback(name: &str) -> Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Error::UnknownInterface(name.into()));
    }
    // SAFETY: plain socket call; the descriptor is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Error::io("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed ifreq is valid; the name fits with its terminating zero.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = (*src).cast_signed();
    }
    // SAFETY: SIOCGIFFLAGS fills the ifreq we pass.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            &raw mut req,
        )
    } < 0
    {
        return Err(Error::UnknownInterface(name.into()));
    }
    // SAFETY: SIOCGIFFLAGS set the flags member.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok(flags & libc::IFF_LOOPBACK != 0)
}

/// The name of interface `ifindex`, if it exists.
#[must_use]
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE bytes as the call requires.
    let ptr = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if ptr.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// The IPv4 addresses of `name`, primary first (in the order the kernel lists them).
pub fn ipv4_addrs(name: &str) -> Result<Vec<Ipv4Addr>> {
    let mut addrs = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&raw mut ifap) } != 0 {
        return Err(Error::io("getifaddrs", std::io::Error::last_os_error()));
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: walking the list returned by getifaddrs.
        unsafe {
            let entry = &*cur;
            let entry_name = std::ffi::CStr::from_ptr(entry.ifa_name).to_string_lossy();
            if entry_name == name
                && !entry.ifa_addr.is_null()
                && i32::from((*entry.ifa_addr).sa_family) == libc::AF_INET
            {
                // AF_INET entries point at a sockaddr_in; read it unaligned to be safe.
                let sin = entry.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = entry.ifa_next;
        }
    }
    // SAFETY: list from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(addrs)
}

/// The interface of the default IPv4 route (the primary ENI, whatever its name: `eth0`,
/// `ens5`, ...), read from `/proc/net/route`; the lowest metric wins.
pub fn default_route_interface() -> Result<String> {
    let path = "/proc/net/route";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    default_route_in(&text).ok_or(Error::NoDefaultRoute)
}

/// The default route's interface in `/proc/net/route`'s text (destination and mask 0, up).
fn default_route_in(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dst, flags, metric, mask) =
                (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
            (up && *dst == "00000000" && *mask == "00000000").then(|| {
                (
                    metric.parse::<u32>().unwrap_or(u32::MAX),
                    (*iface).to_string(),
                )
            })
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The default NAT port range: all of 1024-65535, as iptables' SNAT uses, so a pod cycling
/// through its whole port range to one destination finds a NAT port for every tuple. It
/// overlaps the kernel's ephemeral range: the programs track the node's own connections and
/// check its sockets, so the two never collide.
pub const DEFAULT_NAT_RANGE: (u16, u16) = (1024, 65535);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_interface_is_found() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            ens5\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            ens6\t00000000\t0102000A\t0003\t0\t0\t1024\t00000000\t0\t0\t0\n\
            ens5\t00000000\t0102000A\t0003\t0\t0\t512\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_in(table).as_deref(), Some("ens5"));
        let no_default = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            ens5\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_route_in(no_default), None);
    }
}
