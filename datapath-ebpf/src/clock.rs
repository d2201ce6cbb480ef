//! The coarse monotonic clock, read once a tick.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::Array,
};

/// The coarse clock's value for the jiffy it was read in. One slot for all CPUs: a per-CPU
/// slot would cost a second dependent load per packet, and the shared one is written only
/// once a tick.
#[map]
static CLOCK: Array<TickClock> = Array::with_max_entries(1, 0);

#[repr(C)]
struct TickClock {
    jiffies: u64,
    ns: u64,
}

/// CLOCK_MONOTONIC (coarse) nanoseconds. The coarse clock only moves when the tick advances
/// jiffies, and the verifier inlines `bpf_jiffies64` into one load, so the clock's value for
/// the current jiffy is kept in `CLOCK` and the helper is called once a tick instead of once
/// a packet.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: the slot is a map value, valid while the program runs. CPUs share it and read
    // and write each field whole (aligned 8-byte loads and stores, no reference held): two
    // CPUs refreshing it at once may pair a jiffy with the previous tick's time, which is at
    // most a tick off, and timeouts are seconds.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).jiffies = jiffies;
            (*clock).ns = bpf_ktime_get_coarse_ns();
        }
        (*clock).ns
    }
}
