//! Header parsing with direct packet access. Values are copied out (host order) so no packet
//! pointer outlives a helper call that may move the data.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    flow::{PodMacs, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    headers::{Fragment, Ipv4, L4},
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::{IcmpIdSequence, Icmpv4Hdr},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_TTL_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, ttl);
pub const IP_CSUM_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, check);
pub const IP_SRC_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, src_addr);
pub const IP_DST_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, dst_addr);
/// Where L4 starts in a packet without IPv4 options.
pub const L4_OFF_PLAIN: usize = ETH_LEN + Ipv4Hdr::LEN;

const IPV4_VERSION: u8 = 4;
/// The IHL: the low half of the version/IHL byte, in 32-bit words.
const IHL_MASK: u8 = 0x0f;
/// "More fragments": the lowest of the three flag bits.
const IP_MORE_FRAGMENTS: u8 = 1;

/// Offsets within an L4 header. TCP and UDP keep their ports at the same places.
pub const SRC_PORT_OFF: usize = offset_of!(UdpHdr, src);
pub const DST_PORT_OFF: usize = offset_of!(UdpHdr, dst);
const _: () =
    assert!(offset_of!(TcpHdr, source) == SRC_PORT_OFF && offset_of!(TcpHdr, dest) == DST_PORT_OFF);
pub const ICMP_CSUM_OFF: usize = offset_of!(Icmpv4Hdr, check);
/// The echo identifier: the first half of the ICMP header's data word.
pub const ICMP_ID_OFF: usize = offset_of!(Icmpv4Hdr, data) + offset_of!(IcmpIdSequence, id);
/// The TCP flags: the byte after the data offset, in the header's bitfield word.
const TCP_FLAGS_OFF: usize = offset_of!(TcpHdr, _bitfield_1) + 1;
/// The byte whose high nibble is the TCP header's length in 32-bit words.
const TCP_DATA_OFFSET_OFF: usize = offset_of!(TcpHdr, _bitfield_1);
/// What `l4` reads at once: through the TCP flags (ports, ICMP type and identifier included).
const L4_HEAD_LEN: usize = TCP_FLAGS_OFF + 1;
/// What an ICMP error quotes of the packet it is about beyond its IPv4 header (RFC 792).
pub const QUOTED_L4_LEN: usize = 8;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;

/// Offset of the checksum in the L4 header of `proto` (TCP, UDP, else ICMP).
#[inline(always)]
pub const fn l4_csum_offset(proto: u8) -> usize {
    match proto {
        PROTO_TCP => offset_of!(TcpHdr, check),
        PROTO_UDP => offset_of!(UdpHdr, check),
        _ => ICMP_CSUM_OFF,
    }
}

/// The IPv4 header length in bytes given its version/IHL byte.
#[inline(always)]
pub const fn ipv4_header_len(vihl: u8) -> usize {
    (vihl & IHL_MASK) as usize * size_of::<u32>()
}

/// A pointer to a `T` at `off`, if the linear data holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes the first `len` bytes directly accessible, pulling non-linear data in if needed.
#[inline(always)]
pub fn ensure_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    if (ctx.len() as usize) < len || ctx.pull_data(len as u32).is_err() {
        return false;
    }
    ctx.data() + len <= ctx.data_end()
}

/// The interface the packet arrived on (its TC hook's).
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context the kernel passed to this program; the verifier allows
    // reads of this `__sk_buff` field.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The interface a packet came in through before the stack sent it here; 0 for one the host
/// itself sends.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `ifindex`.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// The link-layer addresses of a pod's packet (its own and the gateway's it sent to).
#[inline(always)]
pub fn pod_macs(ctx: &TcContext) -> Option<PodMacs> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the header lies within the packet; it is read before any helper
    // call can move the data.
    let eth = unsafe { &*eth };
    Some(PodMacs {
        pod: eth.src_addr,
        gateway: eth.dst_addr,
    })
}

// Fields past the IPv4 header sit at a variable offset (IPv4 options). They are read and
// written with the skb load/store helpers: the verifier cannot follow LLVM's re-derived
// packet pointers at variable offsets, and the helpers also reach non-linear data.

/// The two bytes at `off` (single bytes are read in pairs).
#[inline(always)]
pub fn read_pair(ctx: &TcContext, off: usize) -> Option<[u8; 2]> {
    ctx.load::<[u8; 2]>(off).ok()
}

#[inline(always)]
pub fn read_u16(ctx: &TcContext, off: usize) -> Option<u16> {
    ctx.load::<[u8; 2]>(off).ok().map(u16::from_be_bytes)
}

#[inline(always)]
pub fn read_u32(ctx: &TcContext, off: usize) -> Option<u32> {
    ctx.load::<[u8; 4]>(off).ok().map(u32::from_be_bytes)
}

#[inline(always)]
pub fn write_u16(ctx: &TcContext, off: usize, value: u16) -> Option<()> {
    ctx.store(off, &value.to_be_bytes(), 0).ok()
}

#[inline(always)]
pub fn write_u32(ctx: &TcContext, off: usize, value: u32) -> Option<()> {
    ctx.store(off, &value.to_be_bytes(), 0).ok()
}

/// Parses Ethernet + IPv4. `Ok(None)` for anything that is not IPv4.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, Counter> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        // Shorter than an Ethernet header: nothing we translate.
        return Ok(None);
    };
    // SAFETY: ptr_at checked the header lies within the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Ok(None);
    }
    if !ensure_linear(ctx, ETH_LEN + Ipv4Hdr::LEN) {
        return Err(Counter::DropMalformed);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(Counter::DropMalformed)?;
    // SAFETY: ptr_at checked the header lies within the packet; nothing moves the data while
    // the fields are read.
    let ip = unsafe { &*ip };
    let ihl = ipv4_header_len(ip.vihl);
    let l3_len = ctx.len().saturating_sub(ETH_LEN as u32);
    let tot_len = u32::from(ip.tot_len());
    if ip.version() != IPV4_VERSION
        || ihl < Ipv4Hdr::LEN
        || tot_len < ihl as u32
        || tot_len > l3_len
    {
        return Err(Counter::DropMalformed);
    }
    let more = ip.frag_flags() & IP_MORE_FRAGMENTS != 0;
    let fragment = match (ip.frag_offset(), more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    Ok(Some(Ipv4 {
        src: u32::from_be_bytes(ip.src_addr),
        dst: u32::from_be_bytes(ip.dst_addr),
        proto: ip.proto,
        ttl: ip.ttl,
        id: ip.id(),
        fragment,
        l4_off: ETH_LEN + ihl,
        l3_len,
    }))
}

/// Parses the TCP/UDP/ICMP header of a packet that carries one (not a later fragment).
#[inline(always)]
pub fn l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, Counter> {
    let off = ip.l4_off;
    let needed = match ip.proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        PROTO_ICMP => Icmpv4Hdr::LEN,
        _ => return Err(Counter::DropUnsupportedProtocol),
    };
    if (ctx.len() as usize) < off + needed {
        return Err(Counter::DropMalformed);
    }
    // Packets built from page fragments (packet sockets, some drivers) may hold only part of
    // the headers linearly: pull the L4 header in so the direct reads and writes below and in
    // `nat` see it.
    let _ = ensure_linear(ctx, off + needed);
    // One read for everything we use: ports (or ICMP type and identifier) and TCP flags;
    // direct for option-less packets, else one load helper.
    let direct = if off == L4_OFF_PLAIN {
        // SAFETY: ptr_at checked the bytes lie within the packet.
        ptr_at::<[u8; L4_HEAD_LEN]>(ctx, L4_OFF_PLAIN).map(|p| unsafe { *p })
    } else {
        None
    };
    let head = direct
        .ok_or(())
        .or_else(|()| ctx.load::<[u8; L4_HEAD_LEN]>(off).map_err(|_| ()))
        .or_else(|()| {
            // UDP/ICMP packets may be shorter than the TCP header's head.
            ctx.load::<[u8; UdpHdr::LEN]>(off).map_err(|_| ()).map(|h| {
                let mut head = [0u8; L4_HEAD_LEN];
                head[..UdpHdr::LEN].copy_from_slice(&h);
                head
            })
        });
    let head = head.map_err(|()| Counter::DropMalformed)?;
    let field = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    Ok(match ip.proto {
        PROTO_TCP => L4 {
            src_port: field(SRC_PORT_OFF),
            dst_port: field(DST_PORT_OFF),
            tcp_flags: head[TCP_FLAGS_OFF],
            icmp_type: 0,
            tcp_hdr_len: (head[TCP_DATA_OFFSET_OFF] >> 4) * 4,
            csum_off: off + l4_csum_offset(PROTO_TCP),
        },
        PROTO_UDP => L4 {
            src_port: field(SRC_PORT_OFF),
            dst_port: field(DST_PORT_OFF),
            tcp_flags: 0,
            icmp_type: 0,
            tcp_hdr_len: 0,
            csum_off: off + l4_csum_offset(PROTO_UDP),
        },
        _ => {
            let icmp_type = head[offset_of!(Icmpv4Hdr, type_)];
            let (src_port, dst_port) = match icmp_type {
                ICMP_ECHO_REQUEST => (field(ICMP_ID_OFF), 0),
                ICMP_ECHO_REPLY => (0, field(ICMP_ID_OFF)),
                _ => (0, 0),
            };
            L4 {
                src_port,
                dst_port,
                tcp_flags: 0,
                icmp_type,
                tcp_hdr_len: 0,
                csum_off: off + ICMP_CSUM_OFF,
            }
        }
    })
}

/// ICMP types that carry an embedded packet (RFC 5508 translates these).
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
    )
}
