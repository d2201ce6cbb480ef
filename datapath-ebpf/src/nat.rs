//! Address and port rewriting with checksum fix-ups.
//!
//! Data is written directly; checksums go through the kernel's csum helpers, which know the
//! skb's checksum state (a CHECKSUM_PARTIAL L4 checksum holds only the pseudo-header sum and
//! must be updated differently from a complete one).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

use crate::parse::{self, Fragment, Ipv4, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4};

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
    parse::write_u32(ctx, addr_off, addr).ok_or(bad)?;
    let port_change = match l4 {
        Some(l4) if ip.fragment != Fragment::Later => {
            let (port_off, old_port) = match (ip.proto, side) {
                (PROTO_ICMP, Side::Source) => (ip.l4_off + 4, l4.src_port),
                (PROTO_ICMP, Side::Destination) => (ip.l4_off + 4, l4.dst_port),
                (_, Side::Source) => (ip.l4_off, l4.src_port),
                (_, Side::Destination) => (ip.l4_off + 2, l4.dst_port),
            };
            if old_port != port {
                parse::write_u16(ctx, port_off, port).ok_or(bad)?;
            }
            Some((l4.csum_off, old_port))
        }
        _ => None,
    };

    // Checksum helpers may move packet data: all direct writes are done above.
    let (old_raw, new_raw) = (u64::from(old_addr.to_be()), u64::from(addr.to_be()));
    ctx.l3_csum_replace(IP_CSUM_OFF, old_raw, new_raw, 4)
        .map_err(|_| bad)?;
    let Some((csum_off, old_port)) = port_change else {
        return Ok(());
    };
    let l4_flags = match ip.proto {
        PROTO_TCP => 0,
        PROTO_UDP => BPF_F_MARK_MANGLED_0,
        // ICMP has no pseudo-header: only the identifier counts.
        _ => {
            if old_port != port {
                let (from, to) = (u64::from(old_port.to_be()), u64::from(port.to_be()));
                ctx.l4_csum_replace(csum_off, from, to, 2)
                    .map_err(|_| bad)?;
            }
            return Ok(());
        }
    };
    ctx.l4_csum_replace(csum_off, old_raw, new_raw, l4_flags | BPF_F_PSEUDO_HDR | 4)
        .map_err(|_| bad)?;
    if old_port != port {
        let (from, to) = (u64::from(old_port.to_be()), u64::from(port.to_be()));
        ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2)
            .map_err(|_| bad)?;
    }
    Ok(())
}
