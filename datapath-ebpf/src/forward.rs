//! Sending packets on without the host stack: FIB lookup + redirect towards the uplink, and
//! redirect to the pod for replies.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use datapath_common::{
    counters::Counter,
    csum,
    flow::PROTO_TCP,
    headers::{Ipv4, L4},
};
use network_types::eth::EthHdr;

use crate::{
    flow_ref::{Delivery, FlowRef},
    parse::{ptr_at, ETH_LEN, IP_CSUM_OFF, IP_TTL_OFF},
};

const AF_INET: u8 = 2;

/// Per-CPU scratch space for the FIB lookup's parameter block.
#[map]
static SCRATCH_FIB: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

/// Where a translated packet leaves.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    /// Whether the neighbour is resolved (then `src_mac`/`dst_mac` are set). Plain fields
    /// rather than an `Option`: copies of a partly uninitialised value make LLVM spill
    /// registers the verifier considers unreadable.
    pub resolved: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Next-hop address as the kernel stores it (network order), for the neighbour lookup.
    pub gateway: u32,
    pub mtu: u16,
}

/// What the FIB says about a translated pod packet.
pub enum Route {
    Forward(NextHop),
    /// The host stack takes the packet untranslated, counted under this pass counter:
    /// `PassLocal` when it is addressed to the node itself, `PassHostStack` when it is not
    /// forwardable here (no route, fragmentation needed, forwarding off, TTL exhausted) and the
    /// host answers the pod with ICMP where appropriate.
    Pass(Counter),
}

/// Looks up the route for `ip` as it will be after translation to `nat_ip`.
#[inline(always)]
pub fn route(ctx: &TcContext, ip: &Ipv4, nat_ip: u32, ingress_ifindex: u32) -> Route {
    // The 64-byte parameter block lives in a per-CPU scratch slot: the stack is tight.
    let Some(params) = SCRATCH_FIB.get_ptr_mut(0) else {
        return Route::Pass(Counter::PassHostStack);
    };
    // SAFETY: this CPU's slot, used only while this program runs on it (so the `&mut` is the
    // only reference); zero is valid for every field of the plain-data block.
    let params = unsafe {
        core::ptr::write_bytes(params, 0, 1);
        &mut *params
    };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.ifindex = ingress_ifindex;
    // tot_len stays 0: the kernel then checks this skb (GSO-aware) against the egress MTU.
    params.__bindgen_anon_3.ipv4_src = nat_ip.to_be();
    params.__bindgen_anon_4.ipv4_dst = ip.dst.to_be();
    let size = size_of::<FibParams>() as i32;
    // SAFETY: `skb` is the program's context and `params` a whole parameter block of `size`
    // bytes.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &raw mut *params, size, 0) };
    match rc as u32 {
        // SAFETY (the union reads in both arms): the kernel filled in the IPv4 members and, on
        // success, the egress MTU (tot_len was 0).
        BPF_FIB_LKUP_RET_SUCCESS => Route::Forward(NextHop {
            ifindex: params.ifindex,
            resolved: true,
            src_mac: params.smac,
            dst_mac: params.dmac,
            gateway: unsafe { params.__bindgen_anon_4.ipv4_dst },
            mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::Forward(NextHop {
            ifindex: params.ifindex,
            resolved: false,
            src_mac: [0; 6],
            dst_mac: [0; 6],
            gateway: unsafe { params.__bindgen_anon_4.ipv4_dst },
            mtu: 0,
        }),
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::Pass(Counter::PassLocal),
        _ => Route::Pass(Counter::PassHostStack),
    }
}

/// The route for a translated pod packet, with the packet's TTL decremented when it is
/// forwarded: everything the bypassed forwarding code would have decided.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    ip: &Ipv4,
    nat_ip: u32,
    ingress_ifindex: u32,
) -> Result<Route, Counter> {
    let route = route(ctx, ip, nat_ip, ingress_ifindex);
    if matches!(route, Route::Forward(_)) && !decrement_ttl(ctx, ip)? {
        return Ok(Route::Pass(Counter::PassHostStack));
    }
    Ok(route)
}

/// Decrements the TTL as a router does (the fast path skips the kernel's forwarding code).
/// Returns false when the TTL is exhausted: the caller hands the packet to the host stack,
/// which answers with time-exceeded (traceroute then shows the node).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: &Ipv4) -> Result<bool, Counter> {
    if ip.ttl <= 1 {
        return Ok(false);
    }
    let diff = write_decremented_ttl(ctx, ip)?;
    let check = ptr_at::<[u8; 2]>(ctx, IP_CSUM_OFF).ok_or(Counter::DropWriteError)?;
    // SAFETY: ptr_at checked the field lies within the packet (a constant offset).
    unsafe { *check = csum::apply(u16::from_be_bytes(*check), diff).to_be_bytes() };
    Ok(true)
}

/// The hop limit of a packet the datapath hands to a pod: one that a router would not forward
/// (TTL 1 or less) is dropped and counted. The pod must never see it: the instance metadata
/// service answers with TTL 1 precisely so that its tokens do not travel past the node.
#[inline(always)]
pub fn check_hop_limit(ip: &Ipv4) -> Result<(), Counter> {
    if ip.ttl <= 1 {
        return Err(Counter::DropTtlExceeded);
    }
    Ok(())
}

/// Writes TTL - 1 (the caller checked `ip.ttl > 1`) and returns what the header checksum must
/// take for it, so a caller rewriting more of the header can apply all changes at once.
#[inline(always)]
pub fn write_decremented_ttl(ctx: &TcContext, ip: &Ipv4) -> Result<u32, Counter> {
    let ttl = ptr_at::<u8>(ctx, IP_TTL_OFF).ok_or(Counter::DropWriteError)?;
    // SAFETY: ptr_at checked the field lies within the packet (a constant offset).
    unsafe { *ttl = ip.ttl - 1 };
    // The checksum covers TTL and protocol as one 16-bit word.
    Ok(csum::diff16(
        u16::from_be_bytes([ip.ttl, ip.proto]),
        u16::from_be_bytes([ip.ttl - 1, ip.proto]),
    ))
}

/// Sends a translated packet to `hop`.
#[inline(always)]
pub fn send(ctx: &TcContext, hop: &NextHop) -> Result<i32, Counter> {
    let (ifindex, gateway) = (hop.ifindex, hop.gateway);
    let rc = if hop.resolved {
        set_macs(ctx, hop.src_mac, hop.dst_mac)?;
        // SAFETY: a helper taking plain integers.
        unsafe { bpf_redirect(ifindex, 0) }
    } else {
        let mut nh = bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: gateway },
        };
        let size = size_of::<bpf_redir_neigh>() as i32;
        // SAFETY: `nh` is a whole parameter block of `size` bytes.
        unsafe { bpf_redirect_neigh(ifindex, &raw mut nh, size, 0) }
    };
    redirect_verdict(rc)
}

/// Hands a reverse-translated packet to the pod: straight into the pod's namespace when the
/// link-layer addresses are known, else through the host veth's neighbour entry. Either
/// way the host stack (and its FORWARD REJECT rule for the pod range) is not involved.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, to: Delivery) -> Result<i32, Counter> {
    let rc = if to.has_macs {
        set_macs(ctx, to.gateway_mac, to.pod_mac)?;
        // SAFETY: a helper taking plain integers.
        unsafe { bpf_redirect_peer(to.ifindex, 0) }
    } else {
        // SAFETY: a null parameter block makes the kernel route on the packet's destination.
        unsafe { bpf_redirect_neigh(to.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    redirect_verdict(rc)
}

/// The IPv4 length of the largest packet `ip` leaves the node as. A TCP GSO packet (up to
/// 64 KiB from a pod's veth) leaves as segments of its headers plus `gso_size` bytes each,
/// which is what the kernel's forwarding MTU check (and the FIB lookup's) compares with the
/// MTU; without this every such packet of a bulk flow missed the fast path. Other GSO
/// packets (UDP, tunnels) keep their full length, so the FIB checks them.
#[inline(always)]
pub fn leaving_len(ctx: &TcContext, ip: &Ipv4, l4: &L4) -> u32 {
    // SAFETY: a read of a field of the program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 || ip.proto != PROTO_TCP {
        return ip.l3_len;
    }
    (ip.l4_off - ETH_LEN) as u32 + u32::from(l4.tcp_hdr_len) + gso_size
}

/// The flow's cached next hop, if it was looked up within the revalidation interval and the
/// packets leaving ([`leaving_len`]) fit its MTU (larger ones go through the FIB, which
/// checks them).
#[inline(always)]
pub fn cached_route(flow: FlowRef, leaving_len: u32, now: u64) -> Option<NextHop> {
    flow.read(|f| {
        if f.out_ifindex == 0 || !f.is_fresh(now) || leaving_len > u32::from(f.out_mtu) {
            return None;
        }
        Some(NextHop {
            ifindex: f.out_ifindex,
            resolved: true,
            src_mac: f.out_src_mac,
            dst_mac: f.out_dst_mac,
            gateway: 0,
            mtu: f.out_mtu,
        })
    })
}

/// Caches a resolved next hop in the flow (unresolved neighbours are not cached).
#[inline(always)]
pub fn remember_route(flow: FlowRef, hop: &NextHop) {
    if hop.resolved {
        flow.cache_route(hop.ifindex, hop.mtu, hop.src_mac, hop.dst_mac);
    } else {
        flow.forget_route();
    }
}

#[inline(always)]
fn set_macs(ctx: &TcContext, src: [u8; 6], dst: [u8; 6]) -> Result<(), Counter> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Counter::DropWriteError)?;
    // SAFETY: ptr_at checked the header lies within the packet.
    unsafe {
        (*eth).src_addr = src;
        (*eth).dst_addr = dst;
    }
    Ok(())
}

#[inline(always)]
fn redirect_verdict(rc: i64) -> Result<i32, Counter> {
    if rc == i64::from(TC_ACT_REDIRECT) {
        Ok(rc as i32)
    } else {
        Err(Counter::DropRedirectFailed)
    }
}
