//! Expiry arithmetic on arbitrary flow entries (as read back from the maps): each result is
//! checked against the same rule computed independently here, in 128-bit arithmetic, from
//! the documented state → timeout table (README.md, `--timeout-*`;
//! `datapath_common::flow::FlowState`).
#![no_main]

use datapath_common::{
    config::Timeouts,
    flow::{Flow, REVALIDATE_INTERVAL_NS},
};
use libfuzzer_sys::fuzz_target;

const PROTO_ICMP: u8 = 1;

/// `at + secs` seconds in ns, or `u64::MAX` where that does not fit.
fn later(at: u64, secs: u128) -> u64 {
    u64::try_from(u128::from(at) + secs * 1_000_000_000).unwrap_or(u64::MAX)
}

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
    // 1..=4 TCP states, 5 unreplied, 6 replied (ICMP's own timeout for both); any other
    // value is a corrupt entry that expires at once.
    let secs = match (state, proto) {
        (1..=4, _) => t[usize::from(state) - 1],
        (5 | 6, PROTO_ICMP) => t[6],
        (5, _) => t[4],
        (6, _) => t[5],
        _ => 0,
    };
    let expires = later(last_seen_ns, u128::from(secs));
    assert_eq!(flow.expires_at_ns(proto, &timeouts), expires);
    let idle = later(last_seen_ns, u128::from(REVALIDATE_INTERVAL_NS / 1_000_000_000));
    let removable = expires.max(idle);
    assert_eq!(flow.removable_at_ns(proto, &timeouts), removable);
    assert!(flow.is_expired(0, proto, &timeouts, removable));
    if removable > 0 {
        assert!(!flow.is_expired(0, proto, &timeouts, removable - 1));
    }
});
