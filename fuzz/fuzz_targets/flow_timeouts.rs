//! Expiry arithmetic on arbitrary flow entries (as read back from the maps) never overflows.
#![no_main]

use datapath_common::{config::Timeouts, flow::Flow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u8, u8, [u32; 7])| {
    let (last_seen_ns, state, proto, t) = input;
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
    let flow = Flow {
        last_seen_ns,
        state,
        ..Flow::default()
    };
    let expires = flow.expires_at_ns(proto, &timeouts);
    assert!(expires >= last_seen_ns);
});
