//! Entries of the flow and binding tables as the programs share them: every access to a
//! `CONNTRACK` or `NAT_BINDINGS` value goes through an [`EntryRef`], which holds the one
//! argument for why it is sound.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::write_volatile,
};

use aya_ebpf::bindings::BPF_NOEXIST;
use datapath_common::{
    config::Timeouts,
    counters::Counter,
    flow::{self, Binding, Flow, FlowKey, FlowState, FLAG_HAS_MACS, PROTO_TCP},
    tcp::{self, Direction},
};

use crate::maps::{count, CONNTRACK, NAT_BINDINGS};

/// An entry of a shared table, reached by pointer: packets of one flow run on several CPUs at
/// once and userspace may delete the entry meanwhile, so no `&mut` to one is ever made.
///
/// Why the accesses are sound. The pointer comes from a look-up in this program run, and the
/// kernel frees a hash-map value only after an RCU grace period, which cannot end while a
/// program runs: the memory stays valid (perhaps unlinked) until the program returns. Each
/// access reads or writes whole aligned fields of at most 8 bytes, which the BPF target does
/// with single loads and stores (the packet counters with atomic adds), so a racing CPU sees
/// each field before or after another's write, never torn. What a race can cost is a value,
/// not memory: of two CPUs advancing a flow's state at once one update may be lost.
pub struct EntryRef<V>(*mut V);

impl<V> Clone for EntryRef<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for EntryRef<V> {}

impl<V> EntryRef<V> {
    /// Reads the entry through a shared view that lives only as long as `read` runs.
    #[inline(always)]
    pub fn read<T>(self, read: impl FnOnce(&V) -> T) -> T {
        // SAFETY: see EntryRef: valid for this run, and fields written meanwhile by another
        // CPU read whole, old or new.
        read(unsafe { &*self.0 })
    }
}

/// A `CONNTRACK` entry.
pub type FlowRef = EntryRef<Flow>;

/// A `NAT_BINDINGS` entry.
pub type BindingRef = EntryRef<Binding>;

impl FlowRef {
    /// The entry of `key`, if the table holds one.
    #[inline(always)]
    pub fn find(key: &FlowKey) -> Option<Self> {
        CONNTRACK.get_ptr_mut(key).map(EntryRef)
    }

    /// Whether the flow is over (its state's timeout, and at least the revalidation interval
    /// idle, since its last packet either way): from then on it matches no packet from the
    /// wire. `binding` times the replies.
    #[inline(always)]
    pub fn is_expired(self, binding: BindingRef, proto: u8, timeouts: &Timeouts, now: u64) -> bool {
        let last_reply = binding.read(|b| b.last_seen_ns);
        self.read(|f| f.is_expired(last_reply, proto, timeouts, now))
    }

    /// Where replies go: the pod's host veth, and its link-layer addresses if known.
    #[inline(always)]
    pub fn delivery(self) -> Delivery {
        self.read(|f| Delivery::new(f.pod_ifindex, f.flags, f.pod_mac, f.gateway_mac))
    }

    /// The address and port the flow is translated to.
    #[inline(always)]
    pub fn nat(self) -> (u32, u16) {
        self.read(|f| (f.nat_ip, f.nat_port))
    }

    /// The pod's packets now come in on `ifindex` (a pod re-created with the same address).
    #[inline(always)]
    pub fn set_pod_ifindex(self, ifindex: u32) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).pod_ifindex = ifindex };
    }

    /// Caches the route of translated packets: leave on `ifindex` (MTU `mtu`) with these MACs.
    #[inline(always)]
    pub fn cache_route(self, ifindex: u32, mtu: u16, src_mac: [u8; 6], dst_mac: [u8; 6]) {
        // SAFETY: see EntryRef: whole fields written. A reader racing with this may pair the
        // new interface with the old MACs for one packet, as it could before.
        unsafe {
            (*self.0).out_ifindex = ifindex;
            (*self.0).out_mtu = mtu;
            (*self.0).out_src_mac = src_mac;
            (*self.0).out_dst_mac = dst_mac;
        }
    }

    /// Drops the cached route: the next packet looks it up.
    #[inline(always)]
    pub fn forget_route(self) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).out_ifindex = 0 };
    }

    /// Records that the binding and route were checked at `now`.
    #[inline(always)]
    pub fn set_revalidated(self, now: u64) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).revalidated_ns = now };
    }

    /// Accounts one packet of `l3_len` bytes going `dir` and advances the state machine.
    #[inline(always)]
    pub fn account(self, proto: u8, dir: Direction, l3_len: u32, tcp_flags: u8, now: u64) {
        self.count_packet(dir, l3_len, now);
        self.advance(proto, dir, tcp_flags);
    }

    /// Times a reply counted in its binding and advances the state machine with it.
    #[inline(always)]
    pub fn account_reply(self, proto: u8, tcp_flags: u8, now: u64) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).last_seen_ns = now };
        self.advance(proto, Direction::In, tcp_flags);
    }

    /// Whether a reply without state flags leaves the flow as it is ([`FlowState::is_settled`]).
    #[inline(always)]
    pub fn is_settled(self, proto: u8) -> bool {
        self.read(|f| f.state().is_some_and(|s| s.is_settled(proto)))
    }

    #[inline(always)]
    fn advance(self, proto: u8, dir: Direction, tcp_flags: u8) {
        let Some(state) = self.read(Flow::state) else {
            return;
        };
        if proto == PROTO_TCP {
            let flags = self.read(|f| f.flags);
            let fins = flags & tcp::CLOSE_FLAGS;
            let (next, next_fins) = tcp::next_state(state, fins, tcp_flags, dir);
            if next != state || next_fins != fins {
                if next == FlowState::SynSent && state != FlowState::SynSent {
                    // The same tuple is back with a new connection: flow and port reused.
                    count(Counter::FlowReused);
                }
                self.set_state(next);
                self.set_flags((flags & !tcp::CLOSE_FLAGS) | next_fins);
            }
        } else if dir == Direction::In {
            let next = state.after_inbound(false);
            if next != state {
                self.set_state(next);
            }
        }
    }

    /// Accounts an ICMP error about the flow coming in: counted, but it is no reply (a UDP flow
    /// answered only by port-unreachable stays unreplied, as in nf_conntrack).
    #[inline(always)]
    pub fn account_icmp_error(self, l3_len: u32, now: u64) {
        self.count_packet(Direction::In, l3_len, now);
    }

    #[inline(always)]
    fn set_state(self, state: FlowState) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).state = state as u8 };
    }

    #[inline(always)]
    fn set_flags(self, flags: u8) {
        // SAFETY: see EntryRef: one whole field written.
        unsafe { (*self.0).flags = flags };
    }

    #[inline(always)]
    fn count_packet(self, dir: Direction, l3_len: u32, now: u64) {
        // SAFETY: see EntryRef; the counters take atomic adds, as packets of one flow are
        // counted on several CPUs at once.
        unsafe {
            (*self.0).last_seen_ns = now;
            let (packets, bytes) = match dir {
                Direction::Out => (&raw mut (*self.0).packets_out, &raw mut (*self.0).bytes_out),
                Direction::In => (&raw mut (*self.0).packets_in, &raw mut (*self.0).bytes_in),
            };
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, u64::from(l3_len));
        }
    }

    /// Puts the entry back under `key` if the sweep removed it while this packet was using it.
    /// The sweep only removes flows idle for over the revalidation interval, and such a flow's
    /// next packet comes through here, so the flow keeps its NAT port whatever the
    /// interleaving.
    #[inline(always)]
    pub fn restore_if_swept(self, key: &FlowKey) {
        if CONNTRACK.get_ptr(key).is_some() {
            return;
        }
        // The unlinked value itself is handed to the helper (which copies it): a copy would
        // take the size of a flow from the stack.
        let restored = self.read(|f| CONNTRACK.insert(key, f, u64::from(BPF_NOEXIST)).is_ok());
        if restored {
            count(Counter::FlowRestored);
        }
    }
}

/// Where a reply goes: the pod's host veth, and its link-layer addresses when `has_macs`
/// (see [`crate::forward::to_pod`]). Plain fields rather than an `Option`, as in
/// [`crate::forward::NextHop`].
#[derive(Clone, Copy)]
pub struct Delivery {
    pub ifindex: u32,
    pub has_macs: bool,
    pub pod_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
}

impl Delivery {
    /// From an entry's copy of the pod's veth, `FLAG_*` bits and link-layer addresses (flows
    /// and bindings hold the same fields).
    #[inline(always)]
    fn new(ifindex: u32, flags: u8, pod_mac: [u8; 6], gateway_mac: [u8; 6]) -> Self {
        Self {
            ifindex,
            has_macs: flags & FLAG_HAS_MACS != 0,
            pod_mac,
            gateway_mac,
        }
    }
}

impl BindingRef {
    /// The binding of reply tuple `tuple`, if the table holds one.
    #[inline(always)]
    pub fn find(tuple: &FlowKey) -> Option<Self> {
        NAT_BINDINGS.get_ptr_mut(tuple).map(EntryRef)
    }

    /// The owning flow's pod-side tuple, copied out.
    #[inline(always)]
    pub fn owner(self) -> FlowKey {
        self.read(|b| b.owner)
    }

    /// Whether a reply may take the one-lookup path at `now` ([`Binding::is_fresh`]).
    #[inline(always)]
    pub fn is_fresh(self, now: u64) -> bool {
        self.read(|b| b.is_fresh(now))
    }

    /// Counts one reply of `l3_len` bytes at `now`.
    #[inline(always)]
    pub fn count_reply(self, l3_len: u32, now: u64) {
        // SAFETY: see EntryRef: a whole field written, the counters with atomic adds.
        unsafe {
            (*self.0).last_seen_ns = now;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*self.0).packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*self.0).bytes,
                u64::from(l3_len),
            );
        }
    }

    /// Where the one-lookup path delivers replies.
    #[inline(always)]
    pub fn delivery(self) -> Delivery {
        self.read(|b| Delivery::new(b.pod_ifindex, b.flags, b.pod_mac, b.gateway_mac))
    }

    /// Copies `to` (the flow's delivery, just confirmed) into the entry and opens the
    /// one-lookup path for a revalidation interval from `now`.
    #[inline(always)]
    pub fn revalidate(self, to: Delivery, now: u64) {
        // SAFETY: see EntryRef: whole fields written. Volatile, so the time that opens the
        // one-lookup path is stored after what that path reads; a racing reply may still pair
        // new MACs with an old interface for one packet, as a flow's route can.
        unsafe {
            let b = self.0;
            write_volatile(&raw mut (*b).pod_ifindex, to.ifindex);
            write_volatile(&raw mut (*b).pod_mac, to.pod_mac);
            write_volatile(&raw mut (*b).gateway_mac, to.gateway_mac);
            write_volatile(
                &raw mut (*b).flags,
                if to.has_macs { FLAG_HAS_MACS } else { 0 },
            );
            write_volatile(&raw mut (*b).revalidated_ns, now);
        }
    }
}

/// Whether the NAT binding the flow `owner` holds may go to another connection at `now`
/// ([`flow::is_reclaimable`]).
#[inline(always)]
pub fn is_reclaimable(owner: &FlowKey, now: u64) -> bool {
    // SAFETY: as in `EntryRef::read`: a shared view of the entry for this call only.
    let holder = unsafe { CONNTRACK.get(owner) };
    flow::is_reclaimable(holder, owner.proto, now)
}
