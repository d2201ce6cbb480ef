//! Building and checking Ethernet/IPv4 frames for BPF_PROG_TEST_RUN.

use datapath_common::flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// The one's-complement sum of RFC 1071 over big-endian 16-bit words (a trailing odd byte
/// padded with zero). The tests' own implementation, kept apart from
/// `datapath_common::csum` (what the programs use) so that a bug there cannot hide in the
/// checks: it takes the plain sum modulo 0xffff, where the production code folds carries.
#[must_use]
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut total: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hi = u64::from(bytes[i]) << 8;
        let lo = bytes.get(i + 1).map_or(0, |b| u64::from(*b));
        total += hi | lo;
        i += 2;
    }
    // End-around carry is arithmetic modulo 0xffff, where 0xffff ("negative zero") stands
    // for a non-zero multiple.
    match total % 0xffff {
        0 if total != 0 => 0xffff,
        r => r as u16,
    }
}

/// The checksum to store over `bytes` (checksum field zero).
#[must_use]
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    !ones_complement_sum(bytes)
}

/// The TCP/UDP pseudo-header (RFC 793 / RFC 768) followed by the segment.
fn with_pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> Vec<u8> {
    let mut all = Vec::with_capacity(12 + segment.len());
    all.extend_from_slice(&src);
    all.extend_from_slice(&dst);
    all.extend_from_slice(&[0, proto]);
    all.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    all.extend_from_slice(segment);
    all
}

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// An ARP frame (zero but for its EtherType): the programs pass it at their first check.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame
}

/// An IPv4 packet description.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset field (host order).
    pub frag: u16,
    /// IPv4 options (padded to 4 bytes by the caller).
    pub options: Vec<u8>,
    /// Everything after the IPv4 header.
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    #[must_use]
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8, payload: Vec<u8>) -> Self {
        Self {
            src,
            dst,
            proto,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
            payload,
        }
    }

    /// The IPv4 header and payload, checksummed.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let ihl = 20 + self.options.len();
        let mut h = vec![0u8; ihl];
        h[0] = 0x40 | (ihl / 4) as u8;
        h[2..4].copy_from_slice(&((ihl + self.payload.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        h[20..].copy_from_slice(&self.options);
        let c = internet_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&self.payload);
        h
    }

    /// In an Ethernet frame.
    #[must_use]
    pub fn frame(&self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + 20 + self.payload.len());
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&self.bytes());
        f
    }
}

/// A TCP segment with a correct checksum.
#[must_use]
pub fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(data);
    let c = l4_checksum(src, dst, PROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A UDP datagram; `with_checksum = false` sends checksum 0 ("none").
#[must_use]
pub fn udp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    data: &[u8],
    with_checksum: bool,
) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(data);
    if with_checksum {
        let c = match l4_checksum(src, dst, PROTO_UDP, &u) {
            0 => 0xffff,
            c => c,
        };
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    u
}

/// An ICMP message of `ty`/`code` with the 4 header bytes `rest` and `data`.
#[must_use]
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    let c = internet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An echo request/reply body: identifier and sequence.
#[must_use]
pub fn echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = [0u8; 4];
    rest[0..2].copy_from_slice(&id.to_be_bytes());
    rest[2..4].copy_from_slice(&seq.to_be_bytes());
    icmp(ty, 0, rest, b"ping-payload")
}

#[must_use]
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    internet_checksum(&with_pseudo_header(src, dst, proto, segment))
}

/// A parsed output frame.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub proto: u8,
    pub ihl: usize,
    /// The IPv4 header and payload.
    pub ip: Vec<u8>,
}

impl Parsed {
    #[must_use]
    pub fn parse(frame: &[u8]) -> Self {
        let ip = frame[14..].to_vec();
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        Self {
            dst_mac: frame[0..6].try_into().unwrap(),
            src_mac: frame[6..12].try_into().unwrap(),
            src: ip[12..16].try_into().unwrap(),
            dst: ip[16..20].try_into().unwrap(),
            ttl: ip[8],
            proto: ip[9],
            ihl,
            ip,
        }
    }

    #[must_use]
    pub fn l4(&self) -> &[u8] {
        &self.ip[self.ihl..]
    }

    #[must_use]
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }

    #[must_use]
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }

    /// True when the IPv4 header checksum verifies.
    #[must_use]
    pub fn ip_checksum_ok(&self) -> bool {
        ones_complement_sum(&self.ip[..self.ihl]) == 0xffff
    }

    /// The TCP/UDP pseudo-header followed by `l4`.
    fn with_pseudo_header(&self, l4: &[u8]) -> Vec<u8> {
        with_pseudo_header(self.src, self.dst, self.proto, l4)
    }

    /// True when the L4 checksum verifies (TCP/UDP with pseudo-header, ICMP without).
    /// A UDP checksum of 0 counts as valid ("no checksum").
    #[must_use]
    pub fn l4_checksum_ok(&self) -> bool {
        let l4 = self.l4();
        match self.proto {
            PROTO_UDP if l4[6] == 0 && l4[7] == 0 => true,
            PROTO_TCP | PROTO_UDP => ones_complement_sum(&self.with_pseudo_header(l4)) == 0xffff,
            PROTO_ICMP => ones_complement_sum(l4) == 0xffff,
            _ => true,
        }
    }

    /// True when the TCP/UDP checksum field holds the seed a device completes for a packet
    /// still carrying a partial checksum (CHECKSUM_PARTIAL): the folded pseudo-header sum.
    #[must_use]
    pub fn l4_seed_ok(&self) -> bool {
        let at = match self.proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => return false,
        };
        let l4 = self.l4();
        let seed = u16::from_be_bytes([l4[at], l4[at + 1]]);
        // 0x0000 and 0xffff are the same value in one's complement.
        ones_complement_sum(&self.with_pseudo_header(self.l4())[..12]) % 0xffff == seed % 0xffff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oracle against published vectors, not against the production code.
    #[test]
    fn oracle_matches_published_vectors() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        // Wikipedia's "IPv4 header checksum" example: b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
        assert_eq!(ones_complement_sum(&[0x12]), 0x1200, "odd byte padded");
        assert_eq!(
            ones_complement_sum(&[0xff, 0xff, 0x00, 0x01]),
            0x0001,
            "end-around carry"
        );
    }
}
