//! ICMP errors about translated flows (RFC 5508): the outer header and the embedded packet
//! are both translated, so PMTU discovery and traceroute work from pods.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    csum,
    flow::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    headers::Ipv4,
};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr};

use crate::{
    nat::Side,
    parse::{
        self, DST_PORT_OFF, ICMP_CSUM_OFF, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_ID_OFF,
        IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, QUOTED_L4_LEN, SRC_PORT_OFF,
    },
};

/// Offsets in the embedded IPv4 header.
const EMB_TTL_OFF: usize = offset_of!(Ipv4Hdr, ttl);
const EMB_CSUM_OFF: usize = offset_of!(Ipv4Hdr, check);
const EMB_SRC_OFF: usize = offset_of!(Ipv4Hdr, src_addr);
const EMB_DST_OFF: usize = offset_of!(Ipv4Hdr, dst_addr);

/// The packet embedded in an ICMP error.
pub struct Embedded {
    pub key: FlowKey,
    ip_off: usize,
    l4_off: usize,
}

impl Embedded {
    /// For an error from the wire about a packet the node sent (node:nat_port → remote): the
    /// reply tuple under which its NAT binding is stored.
    pub const fn binding_key(&self) -> FlowKey {
        self.key.reversed()
    }

    /// For an error sent by a pod about a packet it received (remote → pod): the pod-side flow
    /// key.
    pub const fn flow_key(&self) -> FlowKey {
        self.key.reversed()
    }
}

/// Parses the IPv4 header and the first 8 L4 bytes embedded in the ICMP error at `ip.l4_off`.
#[inline(always)]
pub fn embedded(ctx: &TcContext, ip: &Ipv4) -> Result<Embedded, Counter> {
    let bad = Counter::DropMalformed;
    let ip_off = ip.l4_off + Icmpv4Hdr::LEN;
    let [vihl, _tos] = parse::read_pair(ctx, ip_off).ok_or(bad)?;
    let ihl = parse::ipv4_header_len(vihl);
    if ihl < Ipv4Hdr::LEN {
        return Err(bad);
    }
    let l4_off = ip_off + ihl;
    if (ctx.len() as usize) < l4_off + QUOTED_L4_LEN {
        return Err(bad);
    }
    let [_ttl, proto] = parse::read_pair(ctx, ip_off + EMB_TTL_OFF).ok_or(bad)?;
    let src = parse::read_u32(ctx, ip_off + EMB_SRC_OFF).ok_or(bad)?;
    let dst = parse::read_u32(ctx, ip_off + EMB_DST_OFF).ok_or(bad)?;
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (
            parse::read_u16(ctx, l4_off + SRC_PORT_OFF).ok_or(bad)?,
            parse::read_u16(ctx, l4_off + DST_PORT_OFF).ok_or(bad)?,
        ),
        PROTO_ICMP => {
            let [ty, _code] = parse::read_pair(ctx, l4_off).ok_or(bad)?;
            let id = parse::read_u16(ctx, l4_off + ICMP_ID_OFF).ok_or(bad)?;
            match ty {
                ICMP_ECHO_REQUEST => (id, 0),
                ICMP_ECHO_REPLY => (0, id),
                _ => return Err(Counter::DropIcmpUntracked),
            }
        }
        _ => return Err(Counter::DropIcmpUntracked),
    };
    Ok(Embedded {
        key: FlowKey::new(proto, src, src_port, dst, dst_port),
        ip_off,
        l4_off,
    })
}

/// Translates an ICMP error: the outer `outer_side` address becomes `outer_addr`; the
/// embedded packet's `inner_side` address and port become `inner_addr:inner_port`. Every
/// checksum involved (outer IPv4, ICMP, embedded IPv4, embedded L4 when present) is updated.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn translate(
    ctx: &TcContext,
    ip: &Ipv4,
    emb: &Embedded,
    outer_side: Side,
    outer_addr: u32,
    inner_side: Side,
    inner_addr: u32,
    inner_port: u16,
) -> Result<(), Counter> {
    // Everything read here lies within what `embedded` checked the packet holds.
    let bad = Counter::DropWriteError;
    let icmp_csum_off = ip.l4_off + ICMP_CSUM_OFF;
    let mut icmp_csum = parse::read_u16(ctx, icmp_csum_off).ok_or(bad)?;

    // Embedded address and its header checksum.
    let (addr_off, old_addr) = match inner_side {
        Side::Source => (emb.ip_off + EMB_SRC_OFF, emb.key.src_ip),
        Side::Destination => (emb.ip_off + EMB_DST_OFF, emb.key.dst_ip),
    };
    let old_ip_csum = parse::read_u16(ctx, emb.ip_off + EMB_CSUM_OFF).ok_or(bad)?;
    let new_ip_csum = csum::update32(old_ip_csum, old_addr, inner_addr);
    parse::write_u32(ctx, addr_off, inner_addr).ok_or(bad)?;
    parse::write_u16(ctx, emb.ip_off + EMB_CSUM_OFF, new_ip_csum).ok_or(bad)?;
    icmp_csum = csum::update32(icmp_csum, old_addr, inner_addr);
    icmp_csum = csum::update16(icmp_csum, old_ip_csum, new_ip_csum);

    // Embedded port (or echo identifier).
    let (port_off, old_port) = match (emb.key.proto, inner_side) {
        (PROTO_ICMP, Side::Source) => (emb.l4_off + ICMP_ID_OFF, emb.key.src_port),
        (PROTO_ICMP, Side::Destination) => (emb.l4_off + ICMP_ID_OFF, emb.key.dst_port),
        (_, Side::Source) => (emb.l4_off + SRC_PORT_OFF, emb.key.src_port),
        (_, Side::Destination) => (emb.l4_off + DST_PORT_OFF, emb.key.dst_port),
    };
    parse::write_u16(ctx, port_off, inner_port).ok_or(bad)?;
    icmp_csum = csum::update16(icmp_csum, old_port, inner_port);

    // Embedded L4 checksum, when the error quoted it.
    let l4_csum_off = emb.l4_off + parse::l4_csum_offset(emb.key.proto);
    if let Some(old_l4) = parse::read_u16(ctx, l4_csum_off) {
        let new_l4 = match emb.key.proto {
            PROTO_UDP => csum::update16_udp(
                csum::update32_udp(old_l4, old_addr, inner_addr),
                old_port,
                inner_port,
            ),
            PROTO_TCP => csum::update16(
                csum::update32(old_l4, old_addr, inner_addr),
                old_port,
                inner_port,
            ),
            // ICMP echo: no pseudo-header.
            _ => csum::update16(old_l4, old_port, inner_port),
        };
        parse::write_u16(ctx, l4_csum_off, new_l4).ok_or(bad)?;
        icmp_csum = csum::update16(icmp_csum, old_l4, new_l4);
    }
    parse::write_u16(ctx, icmp_csum_off, icmp_csum).ok_or(bad)?;

    // Outer address last: the helper may move packet data.
    let (outer_off, old_outer) = match outer_side {
        Side::Source => (IP_SRC_OFF, ip.src),
        Side::Destination => (IP_DST_OFF, ip.dst),
    };
    parse::write_u32(ctx, outer_off, outer_addr).ok_or(bad)?;
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u64::from(old_outer.to_be()),
        u64::from(outer_addr.to_be()),
        size_of::<u32>() as u64,
    )
    .map_err(|_| Counter::DropChecksumError)
}
