//! Header parsing with direct packet access. Values are copied out (host order) so no packet
//! pointer outlives a helper call that may move the data.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_LEN: usize = EthHdr::LEN;
const ETH_P_IP: u16 = 0x0800;
pub const IP_SRC_OFF: usize = ETH_LEN + 12;
pub const IP_DST_OFF: usize = ETH_LEN + 16;
pub const IP_CSUM_OFF: usize = ETH_LEN + 10;
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
/// Where L4 starts in a packet without IPv4 options.
pub const L4_OFF_PLAIN: usize = ETH_LEN + 20;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;

/// Where a packet stands in a fragment train.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more fragments: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub ttl: u8,
    pub id: u16,
    pub fragment: Fragment,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// Bytes from the IPv4 header on (skb length minus Ethernet).
    pub l3_len: u32,
}

/// The L4 fields the datapath uses. For ICMP echo the identifier is the "port" on the side
/// that owns it (see `FlowKey`).
#[derive(Clone, Copy)]
pub struct L4 {
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// Offset of the L4 checksum field from the start of the frame.
    pub csum_off: usize,
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
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(None);
    }
    if !ensure_linear(ctx, ETH_LEN + Ipv4Hdr::LEN) {
        return Err(Counter::DropMalformed);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(Counter::DropMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    let l3_len = ctx.len().saturating_sub(ETH_LEN as u32);
    let tot_len = u32::from(u16::from_be_bytes(ip.tot_len));
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl as u32 || tot_len > l3_len {
        return Err(Counter::DropMalformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let more = frags & 0x2000 != 0;
    let offset = frags & 0x1fff;
    let fragment = match (offset, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    Ok(Some(Ipv4 {
        src: u32::from_be_bytes(ip.src_addr),
        dst: u32::from_be_bytes(ip.dst_addr),
        proto: ip.proto,
        ttl: ip.ttl,
        id: u16::from_be_bytes(ip.id),
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
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP => 8,
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
        ptr_at::<[u8; 14]>(ctx, L4_OFF_PLAIN).map(|p| unsafe { *p })
    } else {
        None
    };
    let head = direct
        .ok_or(())
        .or_else(|()| ctx.load::<[u8; 14]>(off).map_err(|_| ()))
        .or_else(|()| {
            // UDP/ICMP packets may be shorter than 14 bytes of L4.
            ctx.load::<[u8; 8]>(off).map_err(|_| ()).map(|h| {
                let mut head = [0u8; 14];
                head[..8].copy_from_slice(&h);
                head
            })
        });
    let head = head.map_err(|()| Counter::DropMalformed)?;
    let port = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
    Ok(match ip.proto {
        PROTO_TCP => L4 {
            src_port: port(0),
            dst_port: port(2),
            tcp_flags: head[13],
            icmp_type: 0,
            csum_off: off + 16,
        },
        PROTO_UDP => L4 {
            src_port: port(0),
            dst_port: port(2),
            tcp_flags: 0,
            icmp_type: 0,
            csum_off: off + 6,
        },
        _ => {
            let (src_port, dst_port) = match head[0] {
                ICMP_ECHO_REQUEST => (port(4), 0),
                ICMP_ECHO_REPLY => (0, port(4)),
                _ => (0, 0),
            };
            L4 {
                src_port,
                dst_port,
                tcp_flags: 0,
                icmp_type: head[0],
                csum_off: off + 2,
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
