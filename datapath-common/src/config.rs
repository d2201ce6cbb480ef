//! Runtime configuration, written by userspace into the single-entry `CONFIG` map.

use crate::ipv4::{addr, Cidr};

/// How the first NAT port candidate is chosen, matching the iptables plugin's knob.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRandomisation {
    /// A fresh pseudo-random start per flow (`--random-fully`, the default).
    Prng = 0,
    /// A start derived from a hash of the flow tuple (`--random`).
    HashRandom = 1,
    /// Keep the pod's own source port when it is in range and free.
    None = 2,
}

impl PortRandomisation {
    #[must_use]
    pub const fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::HashRandom,
            2 => Self::None,
            _ => Self::Prng,
        }
    }
}

/// Flow timeouts in seconds. The sweep removes flows by them, and the programs treat a flow
/// past its timeout as gone before that (see `Flow::is_expired`); they live in the config map so
/// a running daemon's settings are visible to every tool that opens the pinned maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_closing: u32,
    pub tcp_rst: u32,
    pub udp_one_way: u32,
    pub udp_replied: u32,
    pub icmp: u32,
    pub _pad: u32,
}

impl Timeouts {
    /// The defaults: TCP established per RFC 5382, the others after
    /// nf_conntrack's (README, `--timeout-*`).
    pub const DEFAULT: Self = Self {
        tcp_syn: 60,
        tcp_established: 7440,
        tcp_closing: 120,
        tcp_rst: 10,
        udp_one_way: 30,
        udp_replied: 120,
        icmp: 30,
        _pad: 0,
    };

    /// The shortest timeout, in seconds: no flow's expiry moves closer than this to the
    /// packet (or state change) that set it.
    #[must_use]
    pub const fn shortest(&self) -> u32 {
        let all = [
            self.tcp_syn,
            self.tcp_established,
            self.tcp_closing,
            self.tcp_rst,
            self.udp_one_way,
            self.udp_replied,
            self.icmp,
        ];
        let mut min = u32::MAX;
        let mut i = 0;
        while i < all.len() {
            if all[i] < min {
                min = all[i];
            }
            i += 1;
        }
        min
    }

    /// How often the sweep must read the whole flow table to remove every flow on time:
    /// every flow's expiry lies at least the shortest timeout after its last change, so a
    /// full scan that often, which lists the flows due before the next one, catches every
    /// expiry in time. Capped at `MAX_SCAN_INTERVAL_S`, at least one second. Scans of large
    /// tables may come less often ([`crate::scan`]).
    #[must_use]
    pub const fn full_scan_interval_s(&self) -> u32 {
        let shortest = self.shortest();
        if shortest < 1 {
            1
        } else if shortest > MAX_SCAN_INTERVAL_S {
            MAX_SCAN_INTERVAL_S
        } else {
            shortest
        }
    }
}

/// The longest interval between full scans of the flow table (seconds).
pub const MAX_SCAN_INTERVAL_S: u32 = 10;

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The datapath's configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The node's primary IPv4 (host order): the address pods are translated to.
    pub node_ip: u32,
    /// The pods' node-local IPv4 range.
    pub pod_cidr: Cidr,
    /// The pods' gateway (169.254.172.1), the one pod-CIDR address pods may reach.
    pub gateway_ip: u32,
    /// NAT port range, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// A [`PortRandomisation`] as `u8`.
    pub randomisation: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    pub timeouts: Timeouts,
}

/// Migration from iptables: the kernel's conntrack holds NAT flows to the node IP (pods
/// wired by egress-cni, masquerading), so inbound packets to NAT ports with no binding and no
/// socket are left to the kernel instead of being dropped.
pub const FLAG_PASS_UNTRACKED_INBOUND: u8 = 1;

/// The pod range of the egress-v4 plugin.
pub const DEFAULT_POD_CIDR: Cidr = match Cidr::new(addr(169, 254, 172, 0), 22) {
    Some(cidr) => cidr,
    None => panic!("valid prefix"),
};

/// The pods' gateway inside [`DEFAULT_POD_CIDR`].
pub const DEFAULT_GATEWAY: u32 = addr(169, 254, 172, 1);

impl Config {
    /// Number of ports in the NAT range (at least 1 for a valid config).
    #[must_use]
    pub const fn port_count(&self) -> u32 {
        if self.port_max < self.port_min {
            0
        } else {
            (self.port_max - self.port_min) as u32 + 1
        }
    }

    #[must_use]
    pub const fn port_in_range(&self, port: u16) -> bool {
        port >= self.port_min && port <= self.port_max
    }

    #[must_use]
    pub const fn pass_untracked_inbound(&self) -> bool {
        self.flags & FLAG_PASS_UNTRACKED_INBOUND != 0
    }

    #[must_use]
    pub const fn randomisation(&self) -> PortRandomisation {
        PortRandomisation::from_u8(self.randomisation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_scans_come_as_often_as_the_shortest_timeout_within_bounds() {
        assert_eq!(Timeouts::DEFAULT.shortest(), 10);
        assert_eq!(Timeouts::DEFAULT.full_scan_interval_s(), 10);
        let short = Timeouts {
            udp_one_way: 1,
            ..Timeouts::DEFAULT
        };
        assert_eq!(short.full_scan_interval_s(), 1);
        let zero = Timeouts {
            icmp: 0,
            ..Timeouts::DEFAULT
        };
        assert_eq!(zero.full_scan_interval_s(), 1);
        let long = Timeouts {
            tcp_rst: 600,
            tcp_syn: 600,
            udp_one_way: 600,
            icmp: 600,
            tcp_closing: 600,
            udp_replied: 600,
            tcp_established: 600,
            _pad: 0,
        };
        assert_eq!(long.full_scan_interval_s(), MAX_SCAN_INTERVAL_S);
    }

    fn config(min: u16, max: u16) -> Config {
        Config {
            node_ip: addr(192, 0, 2, 10),
            pod_cidr: DEFAULT_POD_CIDR,
            gateway_ip: DEFAULT_GATEWAY,
            port_min: min,
            port_max: max,
            randomisation: 0,
            flags: 0,
            _pad: [0; 2],
            timeouts: Timeouts::DEFAULT,
        }
    }

    #[test]
    fn port_range_counts_inclusive_bounds() {
        assert_eq!(config(1024, 32767).port_count(), 31744);
        assert_eq!(config(7, 7).port_count(), 1);
        assert_eq!(config(9, 8).port_count(), 0);
        assert!(config(1024, 2048).port_in_range(2048));
        assert!(!config(1024, 2048).port_in_range(1023));
    }

    #[test]
    fn randomisation_decodes_unknown_values_as_default() {
        assert_eq!(PortRandomisation::from_u8(0), PortRandomisation::Prng);
        assert_eq!(PortRandomisation::from_u8(1), PortRandomisation::HashRandom);
        assert_eq!(PortRandomisation::from_u8(2), PortRandomisation::None);
        assert_eq!(PortRandomisation::from_u8(200), PortRandomisation::Prng);
    }
}
