//! Any sequence of TCP flags in either direction keeps the flow in a TCP state, a RST always
//! resets, and close flags only accumulate the known bits.
#![no_main]

use datapath_common::{
    flow::FlowState,
    tcp::{initial_state, next_state, Direction, CLOSE_FLAGS, TCP_RST},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|packets: Vec<(u8, bool)>| {
    let Some(&(first, _)) = packets.first() else {
        return;
    };
    let (mut state, mut fins) = initial_state(first);
    for &(flags, inbound) in &packets[1..] {
        let dir = if inbound {
            Direction::In
        } else {
            Direction::Out
        };
        (state, fins) = next_state(state, fins, flags, dir);
        assert!(matches!(
            state,
            FlowState::SynSent | FlowState::Established | FlowState::Closing | FlowState::Reset
        ));
        assert_eq!(fins & !CLOSE_FLAGS, 0);
        if flags & TCP_RST != 0 {
            assert_eq!(state, FlowState::Reset);
        }
    }
});
