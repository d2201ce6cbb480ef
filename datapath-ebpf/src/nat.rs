//! Address and port rewriting with checksum fix-ups.
//!
//! Data is written directly; checksums go through the kernel's csum helpers, which know the
//! skb's checksum state (a CHECKSUM_PARTIAL L4 checksum holds only the pseudo-header sum and
//! must be updated differently from a complete one).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    csum,
    flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

use crate::parse::{self, Fragment, Ipv4, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4, L4_OFF_PLAIN};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Source address and port (SNAT of pod packets).
    Source,
    /// Destination address and port (reverse translation of replies).
    Destination,
}

/// Rewrites one end of the packet to `addr:port`. `l4` is `None` for later fragments, which
/// carry no L4 header (their L4 checksum lives in the first fragment).
///
/// Helper calls are the expensive part of this path, so everything that can be done with
/// direct access is: the IPv4 address and header checksum (never offloaded), ports of
/// option-less packets, the ICMP checksum (never offloaded). Only the TCP/UDP checksum goes
/// through the kernel, which knows whether it is a CHECKSUM_PARTIAL pseudo-header sum.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: Option<&L4>,
    side: Side,
    addr: u32,
    port: u16,
) -> Result<(), Counter> {
    let bad = Counter::DropMalformed;
    let (addr_off, old_addr) = match side {
        Side::Source => (IP_SRC_OFF, ip.src),
        Side::Destination => (IP_DST_OFF, ip.dst),
    };
    set_ip_field(ctx, addr_off, old_addr, addr)?;
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
    let l4_flags = match ip.proto {
        PROTO_TCP => 0,
        PROTO_UDP => BPF_F_MARK_MANGLED_0,
        // ICMP: no pseudo-header, and its checksum is always complete.
        _ => {
            if old_port != port {
                let check = read_l4(ctx, ip, L4Field::IcmpChecksum).ok_or(bad)?;
                write_l4(
                    ctx,
                    ip,
                    L4Field::IcmpChecksum,
                    csum::update16(check, old_port, port),
                )
                .ok_or(bad)?;
            }
            return Ok(());
        }
    };
    // The helpers may move packet data: all direct writes are done above.
    let (old_raw, new_raw) = (u64::from(old_addr.to_be()), u64::from(addr.to_be()));
    ctx.l4_csum_replace(
        l4.csum_off,
        old_raw,
        new_raw,
        l4_flags | BPF_F_PSEUDO_HDR | 4,
    )
    .map_err(|_| bad)?;
    if old_port != port {
        let (from, to) = (u64::from(old_port.to_be()), u64::from(port.to_be()));
        ctx.l4_csum_replace(l4.csum_off, from, to, l4_flags | 2)
            .map_err(|_| bad)?;
    }
    Ok(())
}

/// Writes a 32-bit IPv4 header field at a constant offset and updates the header checksum.
#[inline(always)]
pub fn set_ip_field(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), Counter> {
    let bad = Counter::DropMalformed;
    let field = parse::ptr_at::<[u8; 4]>(ctx, off).ok_or(bad)?;
    let check = parse::ptr_at::<[u8; 2]>(ctx, IP_CSUM_OFF).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at (constant offsets).
    unsafe {
        *field = new.to_be_bytes();
        *check = csum::update32(u16::from_be_bytes(*check), old, new).to_be_bytes();
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

/// Offset of the field in an option-less packet: a constant, so direct access verifies.
#[inline(always)]
const fn plain_offset(field: L4Field) -> usize {
    match field {
        L4Field::SrcPort => L4_OFF_PLAIN,
        L4Field::DstPort | L4Field::IcmpChecksum => L4_OFF_PLAIN + 2,
        L4Field::IcmpId => L4_OFF_PLAIN + 4,
    }
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
            // SAFETY: bounds checked by ptr_at.
            unsafe { *p = value.to_be_bytes() };
            return Some(());
        }
    }
    parse::write_u16(ctx, ip.l4_off + plain_offset(field) - L4_OFF_PLAIN, value)
}

#[inline(always)]
fn read_l4(ctx: &TcContext, ip: &Ipv4, field: L4Field) -> Option<u16> {
    parse::read_u16(ctx, ip.l4_off + plain_offset(field) - L4_OFF_PLAIN)
}
