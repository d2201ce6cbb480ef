//! Switching a node from iptables (egress-cni) to the datapath without breaking what the
//! kernel already translates. Pods wired by egress-cni keep their SNAT chain until they are
//! recreated, and the node may masquerade other traffic: replies to those flows reach the
//! node IP on ports in the datapath's NAT range with no binding and no socket, which the
//! uplink program would drop as untracked. While the kernel has such flows (or unmanaged pods
//! exist that can make new ones), the daemon sets [`FLAG_PASS_UNTRACKED_INBOUND`] and the
//! uplink program leaves those packets to the kernel; the flag clears once the last one goes.

use std::{io, net::Ipv4Addr};

use datapath_common::{
    config::{Config, FLAG_PASS_UNTRACKED_INBOUND},
    ipv4::Cidr,
};
use log::info;

use crate::{error::Result, maps::Maps, Error};

/// Why untracked inbound traffic is left to the kernel now (`None`: it is not).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelNat {
    /// Pod addresses routed to a host veth but not registered in the datapath (egress-cni's).
    pub unmanaged_pods: Vec<Ipv4Addr>,
    /// Kernel conntrack entries whose reply goes to the node IP from a translated source.
    pub nat_flows: usize,
}

impl KernelNat {
    #[must_use]
    pub fn active(&self) -> bool {
        !self.unmanaged_pods.is_empty() || self.nat_flows > 0
    }
}

/// What the kernel translates for `config`'s node, given the pods the datapath has.
pub fn observe(config: &Config, registered: &[Ipv4Addr]) -> Result<KernelNat> {
    let routes =
        std::fs::read_to_string("/proc/net/route").map_err(|e| Error::io("/proc/net/route", e))?;
    let unmanaged_pods = pod_routes(&routes, config.pod_cidr)
        .into_iter()
        .filter(|ip| !registered.contains(ip))
        .collect();
    let nat_flows = match conntrack_nat_flows(Ipv4Addr::from(config.node_ip)) {
        Ok(n) => n,
        // No conntrack in this kernel (module not loaded): nothing the kernel translates.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::ENOENT)
            ) =>
        {
            0
        }
        Err(e) => return Err(Error::io("reading the kernel's conntrack table", e)),
    };
    Ok(KernelNat {
        unmanaged_pods,
        nat_flows,
    })
}

/// `config` with the flag set as `observe` says, for the daemon's start (before attaching).
#[must_use]
pub fn at_start(mut config: Config, maps: Option<&Maps>) -> Config {
    let registered = registered(maps);
    match observe(&config, &registered) {
        Ok(seen) => {
            if seen.active() {
                config.flags |= FLAG_PASS_UNTRACKED_INBOUND;
                info!("{}", describe(&seen));
            } else {
                config.flags &= !FLAG_PASS_UNTRACKED_INBOUND;
            }
        }
        Err(e) => {
            // Unknown: the safe side is the kernel's.
            config.flags |= FLAG_PASS_UNTRACKED_INBOUND;
            log::warn!("migration check: {e}; leaving untracked inbound to the kernel");
        }
    }
    config
}

fn registered(maps: Option<&Maps>) -> Vec<Ipv4Addr> {
    maps.and_then(|m| m.pods().ok())
        .map(|pods| pods.into_iter().map(|(ip, _)| ip).collect())
        .unwrap_or_default()
}

fn describe(seen: &KernelNat) -> String {
    format!(
        "migration: {} pods not managed by the datapath and {} kernel NAT flows to the node IP; \
         untracked inbound traffic is left to the kernel until they are gone",
        seen.unmanaged_pods.len(),
        seen.nat_flows
    )
}

/// Re-checks on the daemon's ticks (at most once a second) and flips the flag in the pinned
/// CONFIG when it changes. Kernel NAT flows turn it on at once; unmanaged pods only when seen
/// twice in a row, so the moment between datapath-cni's wiring and its registration does
/// not count.
#[derive(Default)]
pub struct Migration {
    unmanaged_streak: u32,
    last_check: Option<std::time::Instant>,
    last_error: Option<String>,
}

impl Migration {
    pub fn update(&mut self, maps: &mut Maps) -> Result<()> {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return Ok(());
        }
        self.last_check = Some(std::time::Instant::now());
        let mut config = maps.config()?;
        let seen = match observe(&config, &registered(Some(maps))) {
            Ok(seen) => {
                self.last_error = None;
                seen
            }
            Err(e) => {
                // Once per distinct problem; the flag stays as it is.
                let text = e.to_string();
                if self.last_error.as_ref() != Some(&text) {
                    log::warn!("migration check: {text}");
                    self.last_error = Some(text);
                }
                return Ok(());
            }
        };
        self.unmanaged_streak = if seen.unmanaged_pods.is_empty() {
            0
        } else {
            self.unmanaged_streak + 1
        };
        let was = config.pass_untracked_inbound();
        let now = seen.nat_flows > 0 || self.unmanaged_streak >= 2 || (was && seen.active());
        if now == was {
            return Ok(());
        }
        if now {
            config.flags |= FLAG_PASS_UNTRACKED_INBOUND;
            info!("{}", describe(&seen));
        } else {
            config.flags &= !FLAG_PASS_UNTRACKED_INBOUND;
            info!("migration: the kernel translates nothing for pods any more; untracked inbound traffic to NAT ports is dropped again");
        }
        maps.config
            .set(0, config, 0)
            .map_err(|e| Error::map("writing CONFIG", e))
    }
}

/// Host routes (`/32` in the main table) into `cidr`, from `/proc/net/route`'s text: what
/// egress-cni and datapath-cni both add for each pod.
fn pod_routes(table: &str, cidr: Cidr) -> Vec<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The file prints the network-order address as a native u32: its native bytes
            // are the address's bytes.
            let dst = u32::from_be_bytes(dst.to_ne_bytes());
            (mask == u32::MAX && cidr.contains(dst)).then(|| Ipv4Addr::from(dst))
        })
        .collect()
}

// ctnetlink: a dump of the IPv4 conntrack table over NETLINK_NETFILTER.
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Conntrack entries whose reply goes to `node_ip` while the original source was another
/// address: flows the kernel source-translates to the node IP.
pub fn conntrack_nat_flows(node_ip: Ipv4Addr) -> io::Result<usize> {
    let mut count = 0;
    dump_conntrack(|orig_src, reply_dst| {
        if reply_dst == node_ip && orig_src != node_ip {
            count += 1;
        }
    })?;
    Ok(count)
}

struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// Calls `f(original source, reply destination)` for each IPv4 conntrack entry.
fn dump_conntrack(mut f: impl FnMut(Ipv4Addr, Ipv4Addr)) -> io::Result<()> {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = Socket(fd);
    // nlmsghdr (16 bytes) + nfgenmsg (4 bytes).
    let mut req = [0u8; 20];
    req[0..4].copy_from_slice(&20u32.to_ne_bytes());
    req[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_INET as u8;
    // SAFETY: sockaddr_nl zeroed is the kernel as destination.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: buffer and address valid for the call.
    let sent = unsafe {
        libc::sendto(
            sock.0,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n.unsigned_abs()];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into().unwrap_or_default());
            if len < 16 || len > msgs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            match kind {
                3 => return Ok(()), // NLMSG_DONE
                2 => {
                    // NLMSG_ERROR: an errno, 0 for an acknowledgement.
                    let errno = i32::from_ne_bytes(msgs[16..20].try_into().unwrap_or_default());
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                _ if len >= 20 => {
                    let attrs = &msgs[20..len];
                    let orig =
                        nested(attrs, CTA_TUPLE_ORIG).and_then(|t| tuple_ip(t, CTA_IP_V4_SRC));
                    let reply =
                        nested(attrs, CTA_TUPLE_REPLY).and_then(|t| tuple_ip(t, CTA_IP_V4_DST));
                    if let (Some(o), Some(r)) = (orig, reply) {
                        f(o, r);
                    }
                }
                _ => {}
            }
            let step = (len + 3) & !3;
            msgs = &msgs[step.min(msgs.len())..];
        }
    }
}

/// The payload of attribute `kind` among `attrs`.
fn nested(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == kind {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

/// One IPv4 address of a conntrack tuple.
fn tuple_ip(tuple: &[u8], which: u16) -> Option<Ipv4Addr> {
    let ip = nested(nested(tuple, CTA_TUPLE_IP)?, which)?;
    let bytes: [u8; 4] = ip.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath_common::config::DEFAULT_POD_CIDR;

    #[test]
    fn pod_host_routes_are_found() {
        // 169.254.172.5/32 and .9/32 on veths, the node's /24, a default route.
        let table =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            vethab\t05ACFEA9\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            vethcd\t09ACFEA9\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            pod_routes(table, DEFAULT_POD_CIDR),
            [
                Ipv4Addr::new(169, 254, 172, 5),
                Ipv4Addr::new(169, 254, 172, 9)
            ]
        );
    }

    #[test]
    fn netlink_attributes_are_walked() {
        // CTA_TUPLE_IP { CTA_IP_V4_SRC 192.0.2.1, CTA_IP_V4_DST 192.0.2.10 }
        let mut inner = Vec::new();
        for (t, ip) in [
            (CTA_IP_V4_SRC, [192, 0, 2, 1]),
            (CTA_IP_V4_DST, [192, 0, 2, 10]),
        ] {
            inner.extend_from_slice(&8u16.to_ne_bytes());
            inner.extend_from_slice(&t.to_ne_bytes());
            inner.extend_from_slice(&ip);
        }
        let mut tuple = Vec::new();
        tuple.extend_from_slice(&(4 + inner.len() as u16).to_ne_bytes());
        tuple.extend_from_slice(&(CTA_TUPLE_IP | 0x8000).to_ne_bytes());
        tuple.extend_from_slice(&inner);
        assert_eq!(
            tuple_ip(&tuple, CTA_IP_V4_DST),
            Some(Ipv4Addr::new(192, 0, 2, 10))
        );
        assert_eq!(
            tuple_ip(&tuple, CTA_IP_V4_SRC),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(tuple_ip(&tuple[..6], CTA_IP_V4_SRC), None);
    }
}
