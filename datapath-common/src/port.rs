//! NAT port probing order: where the search for a free port starts and how it moves on.
//!
//! Each attempt picks an independent position in the range (a hash of a seed and the attempt
//! number), so flows that start near each other do not pile up behind one another as with
//! linear probing, and a range that is 90% full still yields a free port within a few tries.

use crate::config::PortRandomisation;
use crate::flow::FlowKey;

/// How many candidates a new flow tries before its packet is dropped as port exhaustion.
/// With 90% of a range in use, all of them failing has probability 0.9^64 ≈ 0.1%.
pub const MAX_PORT_PROBES: u32 = 64;

/// A 32-bit finaliser (murmur3 fmix32): cheap and well mixed, enough for spreading ports.
#[must_use]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A hash of a pod tuple, the seed of `hashrandom` mode (stable for the same tuple).
#[must_use]
pub const fn tuple_hash(key: &FlowKey) -> u32 {
    let mut h = mix32(key.src_ip ^ 0x9e37_79b9);
    h = mix32(h ^ key.dst_ip);
    h = mix32(h ^ ((key.src_port as u32) << 16 | key.dst_port as u32));
    mix32(h ^ key.proto as u32)
}

/// The seed for a new flow's probe sequence.
#[must_use]
pub const fn probe_seed(mode: PortRandomisation, key: &FlowKey, random: u32) -> u32 {
    match mode {
        PortRandomisation::HashRandom => tuple_hash(key),
        PortRandomisation::Prng | PortRandomisation::None => random,
    }
}

/// The `attempt`-th candidate port in `[port_min, port_min + port_count)`.
///
/// In `None` mode the first candidate is the pod's own port when it is in range.
#[must_use]
pub const fn candidate(
    mode: PortRandomisation,
    seed: u32,
    attempt: u32,
    pod_port: u16,
    port_min: u16,
    port_count: u32,
) -> u16 {
    if port_count == 0 {
        return port_min;
    }
    if attempt == 0
        && matches!(mode, PortRandomisation::None)
        && pod_port >= port_min
        && ((pod_port - port_min) as u32) < port_count
    {
        return pod_port;
    }
    let offset = mix32(seed ^ attempt.wrapping_mul(0x9e37_79b9)) % port_count;
    (port_min as u32 + offset) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: FlowKey = FlowKey::new(6, 0xa9fe_ac02, 40000, 0xc000_0214, 80);

    #[test]
    fn none_mode_keeps_the_pod_port_first() {
        assert_eq!(
            candidate(PortRandomisation::None, 7, 0, 40000, 32768, 28232),
            40000
        );
        // Out of range: falls back to a hashed candidate inside the range.
        let c = candidate(PortRandomisation::None, 7, 0, 80, 32768, 28232);
        assert!(c >= 32768);
    }

    #[test]
    fn hashrandom_is_stable_per_tuple() {
        assert_eq!(
            probe_seed(PortRandomisation::HashRandom, &KEY, 1),
            probe_seed(PortRandomisation::HashRandom, &KEY, 2)
        );
        let other = FlowKey {
            src_port: 40001,
            ..KEY
        };
        assert_ne!(tuple_hash(&KEY), tuple_hash(&other));
        assert_eq!(probe_seed(PortRandomisation::Prng, &KEY, 99), 99);
    }

    #[test]
    fn ninety_percent_full_range_still_allocates() {
        // Occupy 90% of a 10,000-port range and check nearly every seed finds a free port.
        let (min, count) = (20000u16, 10_000u32);
        let used = |p: u16| (u32::from(p - min) * 7919) % 10 != 0; // 90% used, spread out
        let mut failures = 0;
        for seed in 0..10_000u32 {
            let found = (0..MAX_PORT_PROBES)
                .any(|a| !used(candidate(PortRandomisation::Prng, seed, a, 0, min, count)));
            if !found {
                failures += 1;
            }
        }
        // Expected 0.9^64 * 10,000 ≈ 12.
        assert!(failures < 40, "{failures} of 10000 allocations failed");
    }

    proptest! {
        #[test]
        fn candidates_stay_in_range(mode in 0u8..3, seed: u32, attempt in 0..MAX_PORT_PROBES, pod_port: u16, min in 1u16..65535, span: u16) {
            let count = u32::from(span).min(65536 - u32::from(min)).max(1);
            let p = candidate(PortRandomisation::from_u8(mode), seed, attempt, pod_port, min, count);
            prop_assert!(u32::from(p) >= u32::from(min));
            prop_assert!(u32::from(p) < u32::from(min) + count);
        }

        #[test]
        fn probes_cover_a_small_range(seed: u32) {
            // With a 16-port range, 64 independent probes find each port with high probability;
            // at least 12 distinct ports must show up.
            let mut seen = [false; 16];
            for a in 0..MAX_PORT_PROBES {
                seen[usize::from(candidate(PortRandomisation::Prng, seed, a, 0, 100, 16) - 100)] = true;
            }
            prop_assert!(seen.iter().filter(|s| **s).count() >= 12);
        }
    }
}
