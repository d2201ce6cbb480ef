//! What a program returns: a TC action, or the drop counter that explains a drop.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use datapath_common::counters::Counter;

use crate::maps::count;

pub const PASS: i32 = TC_ACT_OK;

/// The action for a program's result: a drop is counted and shot.
#[inline(always)]
pub fn of(result: Result<i32, Counter>) -> i32 {
    match result {
        Ok(action) => action,
        Err(counter) => {
            count(counter);
            TC_ACT_SHOT
        }
    }
}

/// Counts a pass verdict; a `Result` so every exit of a path reads alike.
#[inline(always)]
#[allow(clippy::unnecessary_wraps)]
pub fn pass(counter: Counter) -> Result<i32, Counter> {
    count(counter);
    Ok(PASS)
}
