//! Flow-table keys and entries, and the per-state timeout choice.

use crate::{
    config::Timeouts,
    headers::{Ipv4, L4},
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A 5-tuple, host byte order. For ICMP echo the identifier stands in for a port: the
/// request's `src_port` and the reply's `dst_port` (the other port is 0), so a request's
/// tuple and its reply's tuple are mirror images as they are for TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

impl FlowKey {
    #[must_use]
    pub const fn new(proto: u8, src_ip: u32, src_port: u16, dst_ip: u32, dst_port: u16) -> Self {
        Self {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The tuple of a parsed packet (one that carries an L4 header).
    #[must_use]
    pub const fn from_packet(ip: &Ipv4, l4: &L4) -> Self {
        Self::new(ip.proto, ip.src, l4.src_port, ip.dst, l4.dst_port)
    }

    /// The tuple of a packet flowing the other way.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.proto,
            self.dst_ip,
            self.dst_port,
            self.src_ip,
            self.src_port,
        )
    }

    /// The key of the NAT binding for a pod flow `self` translated to `nat_ip:nat_port`: the
    /// tuple its replies carry.
    #[must_use]
    pub const fn reply_tuple(&self, nat_ip: u32, nat_port: u16) -> Self {
        Self::new(self.proto, self.dst_ip, self.dst_port, nat_ip, nat_port)
    }
}

/// Where a flow is in its life. TCP uses the first four; UDP and ICMP the last two.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// SYN sent by the pod, no answer yet.
    SynSent = 1,
    Established = 2,
    /// A FIN was seen (either way); covers TIME_WAIT.
    Closing = 3,
    /// A RST was seen.
    Reset = 4,
    /// UDP/ICMP with packets from the pod only.
    Unreplied = 5,
    /// UDP/ICMP that has seen a reply.
    Replied = 6,
}

impl FlowState {
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::SynSent,
            2 => Self::Established,
            3 => Self::Closing,
            4 => Self::Reset,
            5 => Self::Unreplied,
            6 => Self::Replied,
            _ => return None,
        })
    }

    /// Lower-case name used by `flows`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SynSent => "syn_sent",
            Self::Established => "established",
            Self::Closing => "closing",
            Self::Reset => "reset",
            Self::Unreplied => "unreplied",
            Self::Replied => "replied",
        }
    }

    /// The state of a UDP or ICMP flow after an inbound packet. A reply makes it replied; an
    /// ICMP error about it (port unreachable, ...) does not: nf_conntrack keeps such a flow
    /// unreplied, with the short timeout.
    #[must_use]
    pub const fn after_inbound(self, icmp_error: bool) -> Self {
        match self {
            Self::Unreplied if !icmp_error => Self::Replied,
            other => other,
        }
    }

    /// The state and close flags (`FLAG_FIN_*`) of a flow its first outbound packet creates
    /// (`tcp_flags`: that packet's, if it is TCP).
    #[must_use]
    pub const fn opened_by(proto: u8, tcp_flags: u8) -> (Self, u8) {
        match proto {
            PROTO_TCP => crate::tcp::initial_state(tcp_flags),
            _ => (Self::Unreplied, 0),
        }
    }

    /// The state of a flow rebuilt from its NAT binding for a reply (LRU pressure evicted the
    /// entry, not the binding): a TCP connection is taken as established, as one picked up
    /// mid-stream is; anything else as not yet replied, its reply being accounted next.
    #[must_use]
    pub const fn rebuilt(proto: u8) -> Self {
        match proto {
            PROTO_TCP => Self::Established,
            _ => Self::Unreplied,
        }
    }

    /// True when a reply without SYN, FIN or RST ([`crate::tcp::changes_state`]) leaves a
    /// flow of `proto` in this state as it is: only its counters and times move, so such
    /// replies may skip the flow entry (see [`Binding`]).
    #[must_use]
    pub const fn is_settled(self, proto: u8) -> bool {
        match self {
            Self::Established | Self::Closing | Self::Reset => proto == PROTO_TCP,
            Self::Replied => proto != PROTO_TCP,
            Self::SynSent | Self::Unreplied => false,
        }
    }

    /// How long a flow in this state lives without packets, in seconds.
    #[must_use]
    pub const fn timeout(self, proto: u8, timeouts: &Timeouts) -> u32 {
        match self {
            Self::SynSent => timeouts.tcp_syn,
            Self::Established => timeouts.tcp_established,
            Self::Closing => timeouts.tcp_closing,
            Self::Reset => timeouts.tcp_rst,
            Self::Unreplied | Self::Replied if proto == PROTO_ICMP => timeouts.icmp,
            Self::Unreplied => timeouts.udp_one_way,
            Self::Replied => timeouts.udp_replied,
        }
    }
}

/// Flow flags.
pub const FLAG_FIN_OUT: u8 = 1;
pub const FLAG_FIN_IN: u8 = 1 << 1;
/// `pod_mac`/`gateway_mac` hold the addresses seen on the pod's first packet, so replies can
/// be handed straight to the pod's interface.
pub const FLAG_HAS_MACS: u8 = 1 << 2;
/// Created by the uplink-egress safety net rather than the pod-side program.
pub const FLAG_FROM_EGRESS: u8 = 1 << 3;
/// A connection the node itself opened (keyed by the node's tuple), tracked at uplink egress
/// so pod flows avoid its port; `nat_port` differs from the key's port when a pod flow held
/// that port first and the node's packets are translated.
pub const FLAG_NODE: u8 = 1 << 4;
/// The remote end sent its FIN before the pod's: the remote holds TIME_WAIT, so the NAT port
/// must not go to another connection to it soon.
pub const FLAG_REMOTE_CLOSED_FIRST: u8 = 1 << 5;

/// How often (ns) the outbound path re-checks a flow's NAT binding and route. A flow idle for
/// longer takes the full path, which confirms the flow is still in the table.
pub const REVALIDATE_INTERVAL_NS: u64 = 1_000_000_000;

/// The flow-table entry, keyed by the pod-side [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the first packet.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the latest packet.
    pub last_seen_ns: u64,
    /// When the outbound path last confirmed the NAT binding and looked up the route.
    pub revalidated_ns: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub nat_ip: u32,
    /// The pod's host-side veth.
    pub pod_ifindex: u32,
    /// Cached route of translated packets (0: none; look it up).
    pub out_ifindex: u32,
    pub nat_port: u16,
    /// MTU of `out_ifindex`: larger packets take the FIB path, which checks them.
    pub out_mtu: u16,
    /// A [`FlowState`] as `u8`.
    pub state: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub pod_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    /// Link-layer addresses of the cached route.
    pub out_src_mac: [u8; 6],
    pub out_dst_mac: [u8; 6],
    pub _pad: [u8; 6],
}

/// Link-layer addresses seen on a pod's packet: replies can then be handed to the pod's
/// interface without a neighbour lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMacs {
    pub pod: [u8; 6],
    pub gateway: [u8; 6],
}

/// How long a finished TCP connection keeps its NAT port before another connection may take
/// it, when the pod closed first (or a RST ended it): late packets of the old connection (the
/// last ACK, a retransmitted FIN) still find it meanwhile, and the remote has no state left.
pub const PORT_REUSE_GRACE_NS: u64 = 1_000_000_000;
/// The same when the remote closed first: it holds TIME_WAIT (60 s on Linux), and a SYN from
/// another connection on the same tuple could be answered as an old duplicate.
pub const PORT_REUSE_REMOTE_TIME_WAIT_NS: u64 = 60_000_000_000;

impl Flow {
    /// Makes this entry, all zero (a fresh scratch slot), a new flow at `now` translated to
    /// `nat_ip:nat_port` for the pod behind `pod_ifindex` (0: a node connection), in `state`
    /// with `flags`; with the pod's link-layer addresses if they are known.
    ///
    /// In place, field by field: the programs build a flow in a per-CPU map slot (the BPF
    /// stack cannot hold one) that they zero word by word, and a whole-struct store there
    /// would bring back the zeroing as a `memset` call the 6.1 verifier walks byte by byte.
    pub fn start(
        &mut self,
        now: u64,
        (nat_ip, nat_port): (u32, u16),
        pod_ifindex: u32,
        (state, flags): (FlowState, u8),
        macs: Option<PodMacs>,
    ) {
        self.created_ns = now;
        self.last_seen_ns = now;
        self.revalidated_ns = now;
        self.nat_ip = nat_ip;
        self.nat_port = nat_port;
        self.pod_ifindex = pod_ifindex;
        self.state = state as u8;
        self.flags = flags;
        if let Some(macs) = macs {
            self.pod_mac = macs.pod;
            self.gateway_mac = macs.gateway;
            self.flags |= FLAG_HAS_MACS;
        }
    }

    #[must_use]
    pub const fn state(&self) -> Option<FlowState> {
        FlowState::from_u8(self.state)
    }

    /// True when the flow's binding check and cached route (`revalidated_ns`) are recent
    /// enough to trust at `now`.
    #[must_use]
    pub const fn is_fresh(&self, now: u64) -> bool {
        now.wrapping_sub(self.revalidated_ns) < REVALIDATE_INTERVAL_NS
    }

    /// How long the flow must have been idle before its NAT port may go to another
    /// connection; `None` while the connection is not over (or it is not TCP).
    #[must_use]
    pub const fn port_reusable_after_ns(&self, proto: u8) -> Option<u64> {
        if proto != PROTO_TCP {
            return None;
        }
        match self.state() {
            Some(FlowState::Reset) => Some(PORT_REUSE_GRACE_NS),
            Some(FlowState::Closing)
                if self.flags & (FLAG_FIN_OUT | FLAG_FIN_IN) == FLAG_FIN_OUT | FLAG_FIN_IN =>
            {
                if self.flags & FLAG_REMOTE_CLOSED_FIRST != 0 {
                    Some(PORT_REUSE_REMOTE_TIME_WAIT_NS)
                } else {
                    Some(PORT_REUSE_GRACE_NS)
                }
            }
            _ => None,
        }
    }

    /// True when the flow's NAT port may go to another connection at time `now`.
    #[must_use]
    pub const fn port_reusable(&self, proto: u8, now: u64) -> bool {
        match self.port_reusable_after_ns(proto) {
            Some(after) => now.wrapping_sub(self.last_seen_ns) >= after,
            None => false,
        }
    }

    /// Nanoseconds (monotonic) at which this flow expires, given its state's timeout.
    #[must_use]
    pub const fn expires_at_ns(&self, proto: u8, timeouts: &Timeouts) -> u64 {
        expires_at(self.state, self.last_seen_ns, proto, timeouts)
    }
}

impl Flow {
    /// Whether the flow is over at `now`: its state's timeout has passed and it has been idle
    /// for longer than the revalidation interval (so a packet that finds it again takes the
    /// full path, which notices a removal racing with it). `last_reply_ns` is its binding's
    /// [`Binding::last_seen_ns`] (0 when unknown): replies on the one-lookup path are timed
    /// there only.
    #[must_use]
    pub const fn is_expired(
        &self,
        last_reply_ns: u64,
        proto: u8,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> bool {
        let last_seen = if last_reply_ns > self.last_seen_ns {
            last_reply_ns
        } else {
            self.last_seen_ns
        };
        now_ns >= removable_at(self.state, last_seen, proto, timeouts)
    }

    /// When the flow is over if no packet comes first (see [`Flow::is_expired`]), as far as
    /// its own entry tells.
    #[must_use]
    pub const fn removable_at_ns(&self, proto: u8, timeouts: &Timeouts) -> u64 {
        removable_at(self.state, self.last_seen_ns, proto, timeouts)
    }

    /// When the sweep, which reads the flow table alone, may remove the flow: one revalidation
    /// interval after [`Flow::removable_at_ns`]. Replies within an interval of the last one
    /// that took the full path are timed in the binding only, so the flow's own
    /// `last_seen_ns` can be up to that much behind its last packet.
    #[must_use]
    pub const fn sweepable_at_ns(&self, proto: u8, timeouts: &Timeouts) -> u64 {
        self.removable_at_ns(proto, timeouts)
            .saturating_add(REVALIDATE_INTERVAL_NS)
    }

    /// The flow as its two entries tell it together: the replies counted in its binding (the
    /// flow's own `packets_in` counts later fragments and ICMP errors) and the later of the
    /// two last-seen times.
    #[must_use]
    pub const fn with_replies(self, binding: &Binding) -> Self {
        self.with_reply_counts(binding.packets, binding.bytes, binding.last_seen_ns)
    }

    /// [`Flow::with_replies`] from a binding's counters and time alone.
    #[must_use]
    pub const fn with_reply_counts(mut self, packets: u64, bytes: u64, last_seen_ns: u64) -> Self {
        self.packets_in = self.packets_in.wrapping_add(packets);
        self.bytes_in = self.bytes_in.wrapping_add(bytes);
        if last_seen_ns > self.last_seen_ns {
            self.last_seen_ns = last_seen_ns;
        }
        self
    }
}

/// When a flow in `state` (a [`FlowState`] as `u8`) last seen at `last_seen` expires: its
/// state's timeout after that.
const fn expires_at(state: u8, last_seen: u64, proto: u8, timeouts: &Timeouts) -> u64 {
    let timeout = match FlowState::from_u8(state) {
        Some(state) => state.timeout(proto, timeouts),
        None => 0,
    };
    // Saturating: entries are read back from maps any process may have written.
    last_seen.saturating_add(timeout as u64 * 1_000_000_000)
}

/// When such a flow is over: it has expired ([`expires_at`]) and been idle for at least the
/// revalidation interval.
const fn removable_at(state: u8, last_seen: u64, proto: u8, timeouts: &Timeouts) -> u64 {
    let expires = expires_at(state, last_seen, proto, timeouts);
    let idle = last_seen.saturating_add(REVALIDATE_INTERVAL_NS);
    if expires > idle {
        expires
    } else {
        idle
    }
}

/// A NAT binding: the `NAT_BINDINGS` value under a flow's reply tuple. It names the flow that
/// owns the tuple and carries the reply direction's share of that flow: what a reply needs to
/// reach the pod, and the replies' counters.
///
/// A reply looks up this entry alone while it is fresh: a reply in the last revalidation
/// interval took the full path, found the flow live and in a state such a reply does not
/// change ([`FlowState::is_settled`]). Otherwise it looks up the flow too, runs the state
/// machine there and refreshes this entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The flow's pod-side tuple (its `CONNTRACK` key).
    pub owner: FlowKey,
    /// When a reply last took the full path and refreshed the fields below (0: never).
    pub revalidated_ns: u64,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the latest reply.
    pub last_seen_ns: u64,
    /// Replies (TCP, UDP, echo) and their IPv4 bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Copied from the flow: the pod's host veth, its link-layer addresses and whether they
    /// are known (`FLAG_HAS_MACS`).
    pub pod_ifindex: u32,
    pub flags: u8,
    pub _pad: u8,
    pub pod_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub _pad2: [u8; 6],
}

impl Binding {
    /// A new binding of `owner`, with nothing counted and nothing to deliver by yet.
    #[must_use]
    pub fn claim(owner: FlowKey) -> Self {
        Self {
            owner,
            ..Self::default()
        }
    }

    /// True when a reply may take the one-lookup path at `now` (see the type).
    #[must_use]
    pub const fn is_fresh(&self, now: u64) -> bool {
        self.revalidated_ns != 0 && now.wrapping_sub(self.revalidated_ns) < REVALIDATE_INTERVAL_NS
    }
}

/// True when the NAT port of a binding whose flow is `holder` (`None`: gone) may serve a new
/// connection at `now`: the flow is gone, or is a TCP connection that is over and idle long
/// enough to be safe for the remote end ([`Flow::port_reusable`]). Without this, a pod
/// opening connections to one destination faster than range / closing-timeout runs out of
/// ports.
#[must_use]
pub const fn is_reclaimable(holder: Option<&Flow>, proto: u8, now: u64) -> bool {
    match holder {
        None => true,
        Some(flow) => flow.port_reusable(proto, now),
    }
}

/// Key of an inbound fragment train: (src, dst, IP id, proto), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl FragKey {
    #[must_use]
    pub const fn new(src_ip: u32, dst_ip: u32, id: u16, proto: u8) -> Self {
        Self {
            src_ip,
            dst_ip,
            id,
            proto,
            _pad: 0,
        }
    }

    /// The fragment train a parsed packet belongs to.
    #[must_use]
    pub const fn from_packet(ip: &Ipv4) -> Self {
        Self::new(ip.src, ip.dst, ip.id, ip.proto)
    }
}

/// Lower-case protocol name.
#[must_use]
pub const fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{headers::Fragment, ipv4::addr};

    #[test]
    fn reply_tuple_mirrors_the_translated_packet() {
        let pod = FlowKey::new(
            PROTO_TCP,
            addr(169, 254, 172, 2),
            40000,
            addr(192, 0, 2, 20),
            80,
        );
        let reply = pod.reply_tuple(addr(192, 0, 2, 10), 33000);
        assert_eq!(
            reply,
            FlowKey::new(
                PROTO_TCP,
                addr(192, 0, 2, 20),
                80,
                addr(192, 0, 2, 10),
                33000
            )
        );
        assert_eq!(pod.reversed().reversed(), pod);
    }

    #[test]
    fn keys_come_from_the_parsed_packet() {
        let ip = Ipv4 {
            src: addr(169, 254, 172, 2),
            dst: addr(192, 0, 2, 20),
            proto: PROTO_UDP,
            ttl: 64,
            id: 7,
            fragment: Fragment::First,
            l4_off: 34,
            l3_len: 40,
        };
        let l4 = L4 {
            src_port: 40000,
            dst_port: 53,
            tcp_flags: 0,
            icmp_type: 0,
            tcp_hdr_len: 0,
            csum_off: 40,
        };
        assert_eq!(
            FlowKey::from_packet(&ip, &l4),
            FlowKey::new(PROTO_UDP, ip.src, 40000, ip.dst, 53)
        );
        assert_eq!(
            FragKey::from_packet(&ip),
            FragKey::new(ip.src, ip.dst, 7, PROTO_UDP)
        );
    }

    #[test]
    fn a_started_flow_holds_what_it_was_given_and_nothing_else() {
        let macs = PodMacs {
            pod: [2, 0, 0, 0, 0, 2],
            gateway: [2, 0, 0, 0, 0, 1],
        };
        let mut flow = Flow::default();
        flow.start(
            5,
            (addr(192, 0, 2, 10), 33000),
            9,
            FlowState::opened_by(PROTO_TCP, crate::tcp::TCP_SYN),
            Some(macs),
        );
        assert_eq!(
            flow,
            Flow {
                created_ns: 5,
                last_seen_ns: 5,
                revalidated_ns: 5,
                nat_ip: addr(192, 0, 2, 10),
                nat_port: 33000,
                pod_ifindex: 9,
                state: FlowState::SynSent as u8,
                flags: FLAG_HAS_MACS,
                pod_mac: macs.pod,
                gateway_mac: macs.gateway,
                ..Flow::default()
            }
        );
        let mut node = Flow::default();
        node.start(
            5,
            (addr(192, 0, 2, 10), 40000),
            0,
            (FlowState::rebuilt(PROTO_UDP), FLAG_NODE),
            None,
        );
        assert_eq!(node.state(), Some(FlowState::Unreplied));
        assert_eq!(node.flags, FLAG_NODE, "no MACs, no MAC flag");
        assert_eq!((node.pod_mac, node.gateway_mac), ([0; 6], [0; 6]));
    }

    #[test]
    fn opening_and_rebuilt_states_follow_the_protocol() {
        use crate::tcp::{TCP_ACK, TCP_FIN, TCP_SYN};
        assert_eq!(
            FlowState::opened_by(PROTO_TCP, TCP_SYN),
            (FlowState::SynSent, 0)
        );
        assert_eq!(
            FlowState::opened_by(PROTO_TCP, TCP_FIN | TCP_ACK),
            (FlowState::Closing, FLAG_FIN_OUT)
        );
        assert_eq!(
            FlowState::opened_by(PROTO_UDP, TCP_SYN),
            (FlowState::Unreplied, 0),
            "TCP flags mean nothing to UDP"
        );
        assert_eq!(FlowState::rebuilt(PROTO_TCP), FlowState::Established);
        assert_eq!(FlowState::rebuilt(PROTO_ICMP), FlowState::Unreplied);
    }

    #[test]
    fn freshness_lasts_one_revalidation_interval() {
        let flow = Flow {
            revalidated_ns: 10,
            ..Flow::default()
        };
        assert!(flow.is_fresh(10));
        assert!(flow.is_fresh(10 + REVALIDATE_INTERVAL_NS - 1));
        assert!(!flow.is_fresh(10 + REVALIDATE_INTERVAL_NS));
        // A clock behind the flow's (another CPU's, a tick late) reads as stale: the packet
        // takes the full path.
        assert!(!flow.is_fresh(9));
    }

    #[test]
    fn a_binding_is_reclaimable_when_its_flow_is_gone_or_over() {
        let over = Flow {
            last_seen_ns: 0,
            state: FlowState::Reset as u8,
            ..Flow::default()
        };
        let live = Flow {
            state: FlowState::Established as u8,
            ..over
        };
        let later = PORT_REUSE_GRACE_NS;
        assert!(is_reclaimable(None, PROTO_TCP, 0));
        assert!(is_reclaimable(Some(&over), PROTO_TCP, later));
        assert!(!is_reclaimable(Some(&over), PROTO_TCP, later - 1));
        assert!(!is_reclaimable(Some(&live), PROTO_TCP, later * 1000));
        assert!(!is_reclaimable(Some(&over), PROTO_UDP, later * 1000));
    }

    #[test]
    fn timeouts_follow_state_and_protocol() {
        let t = Timeouts::DEFAULT;
        assert_eq!(FlowState::Established.timeout(PROTO_TCP, &t), 7440);
        assert_eq!(FlowState::SynSent.timeout(PROTO_TCP, &t), 60);
        assert_eq!(FlowState::Closing.timeout(PROTO_TCP, &t), 120);
        assert_eq!(FlowState::Reset.timeout(PROTO_TCP, &t), 10);
        assert_eq!(FlowState::Unreplied.timeout(PROTO_UDP, &t), 30);
        assert_eq!(FlowState::Replied.timeout(PROTO_UDP, &t), 120);
        assert_eq!(FlowState::Replied.timeout(PROTO_ICMP, &t), 30);
        let flow = Flow {
            last_seen_ns: 5_000_000_000,
            state: FlowState::Unreplied as u8,
            ..Flow::default()
        };
        assert_eq!(flow.expires_at_ns(PROTO_UDP, &t), 35_000_000_000);
    }

    #[test]
    fn ports_are_reusable_only_when_the_connection_is_over() {
        let at = |state: FlowState, flags: u8| Flow {
            last_seen_ns: 10_000_000_000,
            state: state as u8,
            flags,
            ..Flow::default()
        };
        let both = FLAG_FIN_OUT | FLAG_FIN_IN;
        let later = |s: u64| 10_000_000_000 + s * 1_000_000_000;
        // Pod closed first: one second after the last packet.
        assert!(!at(FlowState::Closing, both).port_reusable(PROTO_TCP, later(0)));
        assert!(at(FlowState::Closing, both).port_reusable(PROTO_TCP, later(1)));
        // Remote closed first: it holds TIME_WAIT.
        let remote = both | FLAG_REMOTE_CLOSED_FIRST;
        assert!(!at(FlowState::Closing, remote).port_reusable(PROTO_TCP, later(30)));
        assert!(at(FlowState::Closing, remote).port_reusable(PROTO_TCP, later(60)));
        // Half closed, live, or not TCP: never.
        assert!(!at(FlowState::Closing, FLAG_FIN_OUT).port_reusable(PROTO_TCP, later(999)));
        assert!(!at(FlowState::Established, 0).port_reusable(PROTO_TCP, later(999)));
        assert!(!at(FlowState::Replied, 0).port_reusable(PROTO_UDP, later(999)));
        assert!(at(FlowState::Reset, 0).port_reusable(PROTO_TCP, later(1)));
    }

    #[test]
    fn a_flow_seen_within_the_revalidation_interval_never_expires() {
        let t = Timeouts {
            udp_one_way: 0,
            ..Timeouts::DEFAULT
        };
        let flow = Flow {
            last_seen_ns: 5_000_000_000,
            state: FlowState::Unreplied as u8,
            ..Flow::default()
        };
        // Timed out at once (timeout 0), yet kept until idle for the interval.
        assert!(!flow.is_expired(0, PROTO_UDP, &t, 5_000_000_000));
        assert!(!flow.is_expired(0, PROTO_UDP, &t, 5_999_999_999));
        assert!(flow.is_expired(0, PROTO_UDP, &t, 6_000_000_000));
        // The state's timeout still rules when it is longer.
        assert!(!flow.is_expired(0, PROTO_UDP, &Timeouts::DEFAULT, 34_999_999_999));
        assert!(flow.is_expired(0, PROTO_UDP, &Timeouts::DEFAULT, 35_000_000_000));
        // A clock behind the flow (another CPU's tick) is not idleness.
        assert!(!flow.is_expired(0, PROTO_UDP, &t, 1));
    }

    #[test]
    fn only_a_real_reply_makes_a_flow_replied() {
        assert_eq!(
            FlowState::Unreplied.after_inbound(false),
            FlowState::Replied
        );
        assert_eq!(
            FlowState::Unreplied.after_inbound(true),
            FlowState::Unreplied
        );
        assert_eq!(FlowState::Replied.after_inbound(true), FlowState::Replied);
    }

    #[test]
    fn states_round_trip() {
        for v in 0..=255u8 {
            if let Some(s) = FlowState::from_u8(v) {
                assert_eq!(s as u8, v);
                assert!(!s.name().is_empty());
            }
        }
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<Flow>() % 8, 0);
    }

    #[test]
    fn a_binding_is_fresh_for_one_revalidation_interval_after_the_full_path() {
        let owner = FlowKey::new(PROTO_UDP, 1, 2, 3, 4);
        let claim = Binding::claim(owner);
        assert_eq!(claim.owner, owner);
        assert!(
            !claim.is_fresh(5),
            "never refreshed: every reply takes the full path"
        );
        let b = Binding {
            revalidated_ns: 10,
            ..claim
        };
        assert!(b.is_fresh(10));
        assert!(b.is_fresh(10 + REVALIDATE_INTERVAL_NS - 1));
        assert!(!b.is_fresh(10 + REVALIDATE_INTERVAL_NS));
        assert!(!b.is_fresh(9), "a clock behind it reads as stale");
        assert_eq!(size_of::<Binding>() % 8, 0);
    }

    #[test]
    fn a_flow_seen_through_its_binding_adds_the_replies_and_the_later_time() {
        let flow = Flow {
            last_seen_ns: 50,
            packets_in: 2,
            bytes_in: 100,
            ..Flow::default()
        };
        let binding = Binding {
            last_seen_ns: 70,
            packets: 5,
            bytes: 500,
            ..Binding::claim(FlowKey::default())
        };
        let seen = flow.with_replies(&binding);
        assert_eq!(
            (seen.packets_in, seen.bytes_in, seen.last_seen_ns),
            (7, 600, 70)
        );
        let older = Binding {
            last_seen_ns: 40,
            ..binding
        };
        assert_eq!(flow.with_replies(&older).last_seen_ns, 50);
    }

    #[test]
    fn a_reply_timed_in_the_binding_keeps_the_flow_alive_and_the_sweep_waits_for_it() {
        let t = Timeouts::DEFAULT;
        let flow = Flow {
            last_seen_ns: 5_000_000_000,
            state: FlowState::Replied as u8,
            ..Flow::default()
        };
        let timeout = u64::from(t.udp_replied) * 1_000_000_000;
        let over = flow.last_seen_ns + timeout;
        assert!(flow.is_expired(0, PROTO_UDP, &t, over));
        // A reply half a second later, timed in the binding only.
        let reply = flow.last_seen_ns + 500_000_000;
        assert!(!flow.is_expired(reply, PROTO_UDP, &t, over));
        assert!(flow.is_expired(reply, PROTO_UDP, &t, reply + timeout));
        // The sweep sees the flow alone: it waits an interval more than the flow says.
        assert_eq!(
            flow.sweepable_at_ns(PROTO_UDP, &t),
            over + REVALIDATE_INTERVAL_NS
        );
        assert!(flow.sweepable_at_ns(PROTO_UDP, &t) >= reply + timeout);
    }

    // A settled state is one no reply without SYN, FIN or RST moves: the one-lookup reply path
    // relies on it to skip the state machine.
    proptest::proptest! {
        #[test]
        fn settled_states_ignore_replies_without_state_flags(state in 1u8..=6, fins in 0u8..8, flags: u8) {
            use crate::tcp::{self, Direction};
            let state = FlowState::from_u8(state).unwrap();
            let fins = fins & tcp::CLOSE_FLAGS;
            let flags = flags & !tcp::STATE_FLAGS;
            proptest::prop_assert!(!tcp::changes_state(flags));
            if state.is_settled(PROTO_TCP) {
                proptest::prop_assert_eq!(
                    tcp::next_state(state, fins, flags, Direction::In),
                    (state, fins)
                );
            }
            for proto in [PROTO_UDP, PROTO_ICMP] {
                if state.is_settled(proto) {
                    proptest::prop_assert_eq!(state.after_inbound(false), state);
                }
            }
        }
    }

    #[test]
    fn states_a_reply_moves_are_not_settled() {
        use crate::tcp::{next_state, Direction, TCP_ACK};
        assert_eq!(
            next_state(FlowState::SynSent, 0, TCP_ACK, Direction::In).0,
            FlowState::Established
        );
        assert!(!FlowState::SynSent.is_settled(PROTO_TCP));
        assert!(!FlowState::Unreplied.is_settled(PROTO_UDP));
        assert!(FlowState::Replied.is_settled(PROTO_UDP));
        assert!(FlowState::Established.is_settled(PROTO_TCP));
        assert!(!FlowState::Established.is_settled(PROTO_UDP));
    }

    // The expiry rule against an independent computation in 128-bit arithmetic (the fuzz
    // target `flow_timeouts` checks the same over arbitrary inputs).
    proptest::proptest! {
        #[test]
        fn expiry_matches_the_rule(last_seen_ns: u64, state in 0u8..8, proto: u8, t: [u32; 7]) {
            let timeouts = Timeouts {
                tcp_syn: t[0],
                tcp_established: t[1],
                tcp_closing: t[2],
                tcp_rst: t[3],
                udp_one_way: t[4],
                udp_replied: t[5],
                icmp: t[6],
                _pad: 0,
            };
            let flow = Flow { last_seen_ns, state, ..Flow::default() };
            let secs = match (state, proto) {
                (1..=4, _) => t[usize::from(state) - 1],
                (5 | 6, PROTO_ICMP) => t[6],
                (5, _) => t[4],
                (6, _) => t[5],
                _ => 0,
            };
            let later = |secs: u128| {
                u64::try_from(u128::from(last_seen_ns) + secs * 1_000_000_000).unwrap_or(u64::MAX)
            };
            let expires = later(u128::from(secs));
            proptest::prop_assert_eq!(flow.expires_at_ns(proto, &timeouts), expires);
            let removable = expires.max(later(1));
            proptest::prop_assert_eq!(flow.removable_at_ns(proto, &timeouts), removable);
            proptest::prop_assert!(flow.is_expired(0, proto, &timeouts, removable));
            proptest::prop_assert!(removable == 0 || !flow.is_expired(0, proto, &timeouts, removable - 1));
        }
    }
}
