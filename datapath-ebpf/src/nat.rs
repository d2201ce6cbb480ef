//! Address and port rewriting with checksum fix-ups.
//!
//! Data and the IPv4 and ICMP checksums are written directly; the TCP/UDP checksum depends on
//! the skb's checksum state (see `csum`).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    csum as arith,
    flow::PROTO_ICMP,
    headers::{Fragment, Ipv4, L4},
};

use crate::{
    csum, forward,
    parse::{
        self, DST_PORT_OFF, ICMP_CSUM_OFF, ICMP_ID_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF,
        L4_OFF_PLAIN, SRC_PORT_OFF,
    },
};

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Source address and port (SNAT of pod packets).
    Source,
    /// Destination address and port (reverse translation of replies).
    Destination,
}

/// What a rewrite does to the TTL.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The kernel's forwarding code (or the node's own stack) takes care of it.
    Keep,
    /// The datapath forwards the packet itself: decremented in the same header-checksum
    /// update. The caller checked `ip.ttl > 1` ([`forward::check_hop_limit`]).
    Decrement,
}

/// Rewrites one end of the packet to `addr:port`. `l4` is `None` for later fragments, which
/// carry no L4 header (their L4 checksum lives in the first fragment).
///
/// Helper calls are the expensive part of this path, so everything that can be done with
/// direct access is: the IPv4 address and header checksum (never offloaded), ports of
/// option-less packets, the ICMP checksum (never offloaded), and the TCP/UDP checksum when
/// the skb's checksum state allows.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: Option<&L4>,
    side: Side,
    (addr, port): (u32, u16),
    ttl: Ttl,
) -> Result<(), Counter> {
    let bad = Counter::DropWriteError;
    let (addr_off, old_addr) = match side {
        Side::Source => (IP_SRC_OFF, ip.src),
        Side::Destination => (IP_DST_OFF, ip.dst),
    };
    let mut ip_diff = arith::diff32(old_addr, addr);
    if ttl == Ttl::Decrement {
        ip_diff += forward::write_decremented_ttl(ctx, ip)?;
    }
    set_ip_field(ctx, addr_off, addr, ip_diff)?;
    let Some(l4) = l4.filter(|_| ip.fragment != Fragment::Later) else {
        return Ok(());
    };
    let (port_at, old_port) = match (ip.proto, side) {
        (PROTO_ICMP, Side::Source) => (L4Field::IcmpId, l4.src_port),
        (PROTO_ICMP, Side::Destination) => (L4Field::IcmpId, l4.dst_port),
        (_, Side::Source) => (L4Field::SrcPort, l4.src_port),
        (_, Side::Destination) => (L4Field::DstPort, l4.dst_port),
    };
    if old_port != port {
        write_l4(ctx, ip, port_at, port).ok_or(bad)?;
    }
    if ip.proto != PROTO_ICMP {
        return csum::update_l4(ctx, ip, l4, (old_addr, addr), (old_port, port));
    }
    // ICMP: no pseudo-header, and its checksum is always complete.
    if old_port != port {
        let check = read_l4(ctx, ip, L4Field::IcmpChecksum).ok_or(bad)?;
        write_l4(
            ctx,
            ip,
            L4Field::IcmpChecksum,
            arith::update16(check, old_port, port),
        )
        .ok_or(bad)?;
    }
    Ok(())
}

/// Writes a 32-bit IPv4 header field at a constant offset and applies `diff` (the field's
/// change and any other) to the header checksum.
#[inline(always)]
fn set_ip_field(ctx: &TcContext, off: usize, new: u32, diff: u32) -> Result<(), Counter> {
    let bad = Counter::DropWriteError;
    let field = parse::ptr_at::<[u8; 4]>(ctx, off).ok_or(bad)?;
    let check = parse::ptr_at::<[u8; 2]>(ctx, IP_CSUM_OFF).ok_or(bad)?;
    // SAFETY: ptr_at checked both lie within the packet (constant offsets, so the verifier
    // follows); no helper call in between moves the data.
    unsafe {
        *field = new.to_be_bytes();
        *check = arith::apply(u16::from_be_bytes(*check), diff).to_be_bytes();
    }
    Ok(())
}

/// 16-bit L4 fields the datapath rewrites.
#[derive(Clone, Copy)]
pub enum L4Field {
    SrcPort,
    DstPort,
    IcmpChecksum,
    IcmpId,
}

/// Offset of the field in its L4 header.
#[inline(always)]
const fn offset(field: L4Field) -> usize {
    match field {
        L4Field::SrcPort => SRC_PORT_OFF,
        L4Field::DstPort => DST_PORT_OFF,
        L4Field::IcmpChecksum => ICMP_CSUM_OFF,
        L4Field::IcmpId => ICMP_ID_OFF,
    }
}

/// Offset of the field in an option-less packet: a constant, so direct access verifies.
#[inline(always)]
const fn plain_offset(field: L4Field) -> usize {
    L4_OFF_PLAIN + offset(field)
}

#[inline(always)]
fn write_l4(ctx: &TcContext, ip: &Ipv4, field: L4Field, value: u16) -> Option<()> {
    if ip.l4_off == L4_OFF_PLAIN {
        let p = match field {
            L4Field::SrcPort => parse::ptr_at::<[u8; 2]>(ctx, plain_offset(L4Field::SrcPort)),
            L4Field::DstPort => parse::ptr_at::<[u8; 2]>(ctx, plain_offset(L4Field::DstPort)),
            L4Field::IcmpChecksum => {
                parse::ptr_at::<[u8; 2]>(ctx, plain_offset(L4Field::IcmpChecksum))
            }
            L4Field::IcmpId => parse::ptr_at::<[u8; 2]>(ctx, plain_offset(L4Field::IcmpId)),
        };
        if let Some(p) = p {
            // SAFETY: ptr_at checked the field lies within the packet.
            unsafe { *p = value.to_be_bytes() };
            return Some(());
        }
    }
    parse::write_u16(ctx, ip.l4_off + offset(field), value)
}

#[inline(always)]
fn read_l4(ctx: &TcContext, ip: &Ipv4, field: L4Field) -> Option<u16> {
    parse::read_u16(ctx, ip.l4_off + offset(field))
}
