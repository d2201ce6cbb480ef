//! ICMP errors about translated flows (RFC 5508): the outer header and the embedded packet
//! are both translated, so PMTU discovery and traceroute work from pods.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    counters::Counter,
    csum,
    flow::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

use crate::{
    nat::Side,
    parse::{self, Ipv4, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
};

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
    let ip_off = ip.l4_off + 8;
    let [vihl, _tos] = parse::read_pair(ctx, ip_off).ok_or(bad)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(bad);
    }
    let l4_off = ip_off + ihl;
    if (ctx.len() as usize) < l4_off + 8 {
        return Err(bad);
    }
    let [_ttl, proto] = parse::read_pair(ctx, ip_off + 8).ok_or(bad)?;
    let src = parse::read_u32(ctx, ip_off + 12).ok_or(bad)?;
    let dst = parse::read_u32(ctx, ip_off + 16).ok_or(bad)?;
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (
            parse::read_u16(ctx, l4_off).ok_or(bad)?,
            parse::read_u16(ctx, l4_off + 2).ok_or(bad)?,
        ),
        PROTO_ICMP => {
            let [ty, _code] = parse::read_pair(ctx, l4_off).ok_or(bad)?;
            let id = parse::read_u16(ctx, l4_off + 4).ok_or(bad)?;
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
    let bad = Counter::DropMalformed;
    let icmp_csum_off = ip.l4_off + 2;
    let mut icmp_csum = parse::read_u16(ctx, icmp_csum_off).ok_or(bad)?;

    // Embedded address and its header checksum.
    let (addr_off, old_addr) = match inner_side {
        Side::Source => (emb.ip_off + 12, emb.key.src_ip),
        Side::Destination => (emb.ip_off + 16, emb.key.dst_ip),
    };
    let old_ip_csum = parse::read_u16(ctx, emb.ip_off + 10).ok_or(bad)?;
    let new_ip_csum = csum::update32(old_ip_csum, old_addr, inner_addr);
    parse::write_u32(ctx, addr_off, inner_addr).ok_or(bad)?;
    parse::write_u16(ctx, emb.ip_off + 10, new_ip_csum).ok_or(bad)?;
    icmp_csum = csum::update32(icmp_csum, old_addr, inner_addr);
    icmp_csum = csum::update16(icmp_csum, old_ip_csum, new_ip_csum);

    // Embedded port (or echo identifier).
    let (port_off, old_port) = match (emb.key.proto, inner_side) {
        (PROTO_ICMP, Side::Source) => (emb.l4_off + 4, emb.key.src_port),
        (PROTO_ICMP, Side::Destination) => (emb.l4_off + 4, emb.key.dst_port),
        (_, Side::Source) => (emb.l4_off, emb.key.src_port),
        (_, Side::Destination) => (emb.l4_off + 2, emb.key.dst_port),
    };
    parse::write_u16(ctx, port_off, inner_port).ok_or(bad)?;
    icmp_csum = csum::update16(icmp_csum, old_port, inner_port);

    // Embedded L4 checksum, when the error quoted it.
    let l4_csum_off = match emb.key.proto {
        PROTO_TCP => emb.l4_off + 16,
        PROTO_UDP => emb.l4_off + 6,
        _ => emb.l4_off + 2,
    };
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
        4,
    )
    .map_err(|_| bad)
}
