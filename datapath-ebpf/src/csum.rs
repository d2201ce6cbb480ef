//! TCP/UDP checksum fix-ups after an address and port rewrite.
//!
//! The kernel's `bpf_l4_csum_replace` knows how to update a checksum whatever the skb's
//! checksum state, but two calls cost more than the rest of the established path. When the
//! state can be read (see `datapath_common::skb`) and the checksum sits at a constant offset,
//! the update is a plain write; otherwise the helpers do it.

use core::arch::asm;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use datapath_common::{
    counters::Counter,
    csum as arith,
    flow::{PROTO_TCP, PROTO_UDP},
    headers::{Ipv4, L4},
    skb::{CHECKSUM_NONE, CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY, TEMPLATE_WORDS},
};

use crate::parse::{self, L4_OFF_PLAIN};

/// The skb's `ip_summed`, or `CSUM_UNKNOWN` where the loader found no way to read it.
#[inline(always)]
fn state(ctx: &TcContext) -> u8 {
    let state: u64;
    // SAFETY: the words are `datapath_common::skb::TEMPLATE`, which the loader replaces before
    // the verifier sees them (and refuses to load an object without): either a kfunc call
    // that only reads the context it is given plus a bounded byte load, or register moves.
    // Both leave only r0 set; r1-r5 are clobbered as by any call.
    unsafe {
        asm!(
            ".4byte {w0}, {w1}, {w2}, {w3}, {w4}, {w5}, {w6}, {w7}",
            w0 = const TEMPLATE_WORDS[0],
            w1 = const TEMPLATE_WORDS[1],
            w2 = const TEMPLATE_WORDS[2],
            w3 = const TEMPLATE_WORDS[3],
            w4 = const TEMPLATE_WORDS[4],
            w5 = const TEMPLATE_WORDS[5],
            w6 = const TEMPLATE_WORDS[6],
            w7 = const TEMPLATE_WORDS[7],
            inout("r1") ctx.skb.skb => _,
            lateout("r0") state,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    state as u8
}

/// Updates the TCP/UDP checksum of a packet whose `old_addr` (in the pseudo-header) became
/// `new_addr` and whose port `old_port` became `new_port`. Call after all direct writes: the
/// helper fallback may move packet data.
#[inline(always)]
pub fn update_l4(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    (old_addr, new_addr): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Result<(), Counter> {
    let udp = ip.proto == PROTO_UDP;
    if ip.l4_off == L4_OFF_PLAIN {
        let state = state(ctx);
        if matches!(
            state,
            CHECKSUM_NONE | CHECKSUM_UNNECESSARY | CHECKSUM_PARTIAL
        ) {
            let field = if udp {
                parse::ptr_at::<[u8; 2]>(ctx, L4_OFF_PLAIN + parse::l4_csum_offset(PROTO_UDP))
            } else {
                parse::ptr_at::<[u8; 2]>(ctx, L4_OFF_PLAIN + parse::l4_csum_offset(PROTO_TCP))
            };
            let field = field.ok_or(Counter::DropWriteError)?;
            // SAFETY: ptr_at checked the field lies within the packet (constant offsets, so
            // the verifier follows); no helper call in between moves the data.
            let check = u16::from_be_bytes(unsafe { *field });
            let addr_diff = arith::diff32(old_addr, new_addr);
            let check = match (state, udp) {
                // The field is the pseudo-header seed the device completes: ports are summed
                // with the segment later.
                (CHECKSUM_PARTIAL, false) => arith::apply_partial(check, addr_diff),
                (CHECKSUM_PARTIAL, true) => arith::apply_udp_partial(check, addr_diff),
                (_, false) => arith::apply(check, addr_diff + arith::diff16(old_port, new_port)),
                (_, true) => arith::apply_udp(check, addr_diff + arith::diff16(old_port, new_port)),
            };
            // SAFETY: as above.
            unsafe { *field = check.to_be_bytes() };
            return Ok(());
        }
    }
    // CHECKSUM_COMPLETE (skb->csum must follow the pseudo-header change), IPv4 options, or a
    // kernel without the kfunc: the helpers.
    // A UDP checksum of 0 means "none": the helper keeps it so (and stores a computed 0 as
    // 0xffff).
    let flags = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let bad = Counter::DropChecksumError;
    let (from, to) = (u64::from(old_addr.to_be()), u64::from(new_addr.to_be()));
    let addr_flags = flags | u64::from(BPF_F_PSEUDO_HDR) | size_of::<u32>() as u64;
    ctx.l4_csum_replace(l4.csum_off, from, to, addr_flags)
        .map_err(|_| bad)?;
    if old_port != new_port {
        let (from, to) = (u64::from(old_port.to_be()), u64::from(new_port.to_be()));
        ctx.l4_csum_replace(l4.csum_off, from, to, flags | size_of::<u16>() as u64)
            .map_err(|_| bad)?;
    }
    Ok(())
}
