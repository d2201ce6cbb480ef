//! What the programs read from a packet's IPv4 and L4 headers (host order). `datapath-ebpf`'s
//! `parse` fills these in; flow keys are built from them ([`crate::flow::FlowKey::from_packet`]).

/// Where a packet stands in a fragment train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more fragments: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

/// The IPv4 header fields the datapath uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
/// that owns it (see [`crate::flow::FlowKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// Length of the TCP header with its options (0 for UDP and ICMP).
    pub tcp_hdr_len: u8,
    /// Offset of the L4 checksum field from the start of the frame.
    pub csum_off: usize,
}
