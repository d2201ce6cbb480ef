//! IPv4 address helpers. Addresses are `u32` in host byte order everywhere in maps and APIs.

/// An IPv4 prefix (`network/len`), with the network address masked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: u32,
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}

impl Cidr {
    /// Builds a prefix, masking host bits; `None` when `prefix_len > 32`.
    #[must_use]
    pub const fn new(addr: u32, prefix_len: u8) -> Option<Self> {
        if prefix_len > 32 {
            return None;
        }
        Some(Self {
            network: addr & mask(prefix_len),
            prefix_len,
            _pad: [0; 3],
        })
    }

    #[must_use]
    pub const fn mask(&self) -> u32 {
        mask(self.prefix_len)
    }

    #[must_use]
    pub const fn contains(&self, addr: u32) -> bool {
        addr & self.mask() == self.network
    }

    /// The last address of the prefix.
    #[must_use]
    pub const fn broadcast(&self) -> u32 {
        self.network | !self.mask()
    }

    /// Why `addr` cannot be a pod's address in this range with this gateway, if it cannot.
    #[must_use]
    pub const fn pod_address_problem(&self, gateway: u32, addr: u32) -> Option<&'static str> {
        if !self.contains(addr) {
            Some("is outside the pod range")
        } else if addr == gateway {
            Some("is the pods' gateway")
        } else if self.prefix_len < 31 && addr == self.network {
            Some("is the pod range's network address")
        } else if self.prefix_len < 31 && addr == self.broadcast() {
            Some("is the pod range's broadcast address")
        } else {
            None
        }
    }

    /// Why `gateway` cannot be the pods' gateway in this range, if it cannot.
    #[must_use]
    pub const fn gateway_problem(&self, gateway: u32) -> Option<&'static str> {
        match self.pod_address_problem(0, gateway) {
            Some(problem) => Some(problem),
            None => None,
        }
    }
}

/// Netmask for a prefix length (0..=32).
#[must_use]
pub const fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - prefix_len as u32)
    }
}

/// 224.0.0.0/4 and the limited broadcast address are never translated (the iptables chain
/// accepts them before its SNAT rule).
#[must_use]
pub const fn is_multicast_or_broadcast(addr: u32) -> bool {
    addr >> 28 == 0xe || addr == u32::MAX
}

/// 169.254.0.0/16 (RFC 3927): never routed, so never a legitimate source on the uplink.
#[must_use]
pub const fn is_link_local(addr: u32) -> bool {
    addr >> 16 == 0xa9fe
}

/// Builds a host-order address from its four octets.
#[must_use]
pub const fn addr(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidr_contains_only_its_addresses() {
        let cidr = Cidr::new(addr(169, 254, 172, 9), 22).unwrap();
        assert_eq!(cidr.network, addr(169, 254, 172, 0));
        assert!(cidr.contains(addr(169, 254, 175, 255)));
        assert!(!cidr.contains(addr(169, 254, 176, 0)));
        assert!(!cidr.contains(addr(192, 0, 2, 10)));
        assert!(Cidr::new(0, 33).is_none());
        assert!(Cidr::new(0, 0).unwrap().contains(addr(203, 0, 113, 1)));
    }

    #[test]
    fn link_local_is_169_254_slash_16() {
        assert!(is_link_local(addr(169, 254, 172, 2)));
        assert!(is_link_local(addr(169, 254, 0, 0)));
        assert!(!is_link_local(addr(169, 255, 0, 1)));
        assert!(!is_link_local(addr(192, 0, 2, 10)));
    }

    #[test]
    fn pod_addresses_exclude_network_gateway_and_broadcast() {
        let cidr = Cidr::new(addr(169, 254, 172, 0), 22).unwrap();
        let gw = addr(169, 254, 172, 1);
        assert_eq!(cidr.broadcast(), addr(169, 254, 175, 255));
        assert_eq!(cidr.pod_address_problem(gw, addr(169, 254, 172, 2)), None);
        assert_eq!(cidr.pod_address_problem(gw, addr(169, 254, 175, 254)), None);
        for bad in [
            addr(169, 254, 172, 0),
            gw,
            addr(169, 254, 175, 255),
            addr(169, 254, 176, 2),
        ] {
            assert!(cidr.pod_address_problem(gw, bad).is_some());
        }
        assert!(cidr.gateway_problem(addr(169, 254, 172, 0)).is_some());
        assert!(cidr.gateway_problem(addr(169, 254, 175, 255)).is_some());
        assert!(cidr.gateway_problem(addr(192, 0, 2, 1)).is_some());
        assert_eq!(cidr.gateway_problem(gw), None);
    }

    #[test]
    fn multicast_and_broadcast_are_recognised() {
        assert!(is_multicast_or_broadcast(addr(224, 0, 0, 251)));
        assert!(is_multicast_or_broadcast(addr(239, 255, 255, 250)));
        assert!(is_multicast_or_broadcast(u32::MAX));
        assert!(!is_multicast_or_broadcast(addr(192, 0, 2, 20)));
        assert!(!is_multicast_or_broadcast(addr(240, 0, 0, 1)));
    }
}
