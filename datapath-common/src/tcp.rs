//! The TCP state machine of the flow table. Deliberately loose (like nf_conntrack with
//! `tcp_loose`): a flow picked up mid-stream, after a restart or an eviction, is taken as
//! established rather than dropped, and sequence numbers are not tracked.

use crate::flow::{FlowState, FLAG_FIN_IN, FLAG_FIN_OUT, FLAG_REMOTE_CLOSED_FIRST};

/// The flow flags the state machine owns (passed in and returned by [`next_state`]).
pub const CLOSE_FLAGS: u8 = FLAG_FIN_OUT | FLAG_FIN_IN | FLAG_REMOTE_CLOSED_FIRST;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The flags that can move a connection to another state, whatever it is in.
pub const STATE_FLAGS: u8 = TCP_SYN | TCP_FIN | TCP_RST;

/// True when a packet with TCP `flags` (0 for other protocols) may change a flow's state
/// beyond what [`crate::flow::FlowState::is_settled`] covers.
#[must_use]
pub const fn changes_state(flags: u8) -> bool {
    flags & STATE_FLAGS != 0
}

/// Which way a packet travels relative to the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Pod → remote.
    Out,
    /// Remote → pod.
    In,
}

/// State of a new flow created by an outbound packet with TCP `flags`.
#[must_use]
pub const fn initial_state(flags: u8) -> (FlowState, u8) {
    if flags & TCP_RST != 0 {
        (FlowState::Reset, 0)
    } else if flags & TCP_FIN != 0 {
        (FlowState::Closing, FLAG_FIN_OUT)
    } else if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        (FlowState::SynSent, 0)
    } else {
        (FlowState::Established, 0)
    }
}

/// The state and close flags ([`CLOSE_FLAGS`]) after a packet with TCP `flags` going `dir`.
#[must_use]
pub const fn next_state(
    state: FlowState,
    fin_flags: u8,
    flags: u8,
    dir: Direction,
) -> (FlowState, u8) {
    if flags & TCP_RST != 0 {
        return (FlowState::Reset, fin_flags);
    }
    let is_syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    if is_syn && matches!(dir, Direction::Out) {
        // A new connection on a tuple whose previous one ended re-starts the handshake.
        return match state {
            FlowState::Closing | FlowState::Reset | FlowState::SynSent => (FlowState::SynSent, 0),
            other => (other, fin_flags),
        };
    }
    if flags & TCP_FIN != 0 {
        let bit = match dir {
            Direction::Out => FLAG_FIN_OUT,
            // The remote's FIN before the pod's: the remote will hold TIME_WAIT.
            Direction::In if fin_flags & FLAG_FIN_OUT == 0 => {
                FLAG_FIN_IN | FLAG_REMOTE_CLOSED_FIRST
            }
            Direction::In => FLAG_FIN_IN,
        };
        return (FlowState::Closing, fin_flags | bit);
    }
    match (state, dir) {
        // The answer to our SYN: the connection is up.
        (FlowState::SynSent, Direction::In) => (FlowState::Established, fin_flags),
        (other, _) => (other, fin_flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn walk(packets: &[(u8, Direction)]) -> FlowState {
        let (mut state, mut fins) = initial_state(packets[0].0);
        for &(flags, dir) in &packets[1..] {
            (state, fins) = next_state(state, fins, flags, dir);
        }
        state
    }

    #[test]
    fn handshake_data_and_close() {
        use Direction::{In, Out};
        assert_eq!(walk(&[(TCP_SYN, Out)]), FlowState::SynSent);
        assert_eq!(
            walk(&[(TCP_SYN, Out), (TCP_SYN | TCP_ACK, In)]),
            FlowState::Established
        );
        assert_eq!(
            walk(&[
                (TCP_SYN, Out),
                (TCP_SYN | TCP_ACK, In),
                (TCP_ACK, Out),
                (TCP_FIN | TCP_ACK, Out)
            ]),
            FlowState::Closing
        );
        assert_eq!(
            walk(&[(TCP_SYN, Out), (TCP_SYN | TCP_ACK, In), (TCP_RST, In)]),
            FlowState::Reset
        );
        // A new SYN after a RST re-opens the tuple.
        assert_eq!(
            walk(&[(TCP_SYN, Out), (TCP_RST, In), (TCP_SYN, Out)]),
            FlowState::SynSent
        );
        // Mid-stream pickup.
        assert_eq!(walk(&[(TCP_ACK, Out)]), FlowState::Established);
    }

    #[test]
    fn fin_flags_accumulate_per_direction() {
        let (s, f) = next_state(FlowState::Established, 0, TCP_FIN | TCP_ACK, Direction::Out);
        assert_eq!((s, f), (FlowState::Closing, FLAG_FIN_OUT));
        let (s, f) = next_state(s, f, TCP_FIN | TCP_ACK, Direction::In);
        assert_eq!((s, f), (FlowState::Closing, FLAG_FIN_OUT | FLAG_FIN_IN));
        // The remote closing first is remembered until a new SYN re-opens the tuple.
        let (s, f) = next_state(FlowState::Established, 0, TCP_FIN | TCP_ACK, Direction::In);
        assert_eq!(f, FLAG_FIN_IN | FLAG_REMOTE_CLOSED_FIRST);
        let (s, f) = next_state(s, f, TCP_FIN | TCP_ACK, Direction::Out);
        assert_eq!(f, CLOSE_FLAGS);
        assert_eq!(
            next_state(s, f, TCP_SYN, Direction::Out),
            (FlowState::SynSent, 0)
        );
    }

    proptest! {
        #[test]
        fn rst_always_wins_and_states_stay_tcp(seq in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..32)) {
            let (mut state, mut fins) = initial_state(seq[0].0);
            for &(flags, inbound) in &seq[1..] {
                let dir = if inbound { Direction::In } else { Direction::Out };
                (state, fins) = next_state(state, fins, flags, dir);
                if flags & TCP_RST != 0 {
                    prop_assert_eq!(state, FlowState::Reset);
                }
                prop_assert!(matches!(state, FlowState::SynSent | FlowState::Established | FlowState::Closing | FlowState::Reset));
                prop_assert_eq!(fins & !CLOSE_FLAGS, 0);
            }
        }
    }
}
