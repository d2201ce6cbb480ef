//! NAT port probing order: where the search for a free port starts and how it moves on.
//!
//! A few independent random candidates first (a hash of a seed and the attempt number), so
//! flows that start near each other do not pile up behind one another; then a linear scan of
//! the range from a random start, so allocation keeps succeeding up to 99% and more of a
//! range in use. The scan's steps are cheap look-ups (the eBPF side only
//! tries to claim a port its look-up found free or reclaimable).

use crate::config::PortRandomisation;
use crate::flow::FlowKey;

/// Independent random candidates tried before the linear scan.
pub const RANDOM_PROBES: u32 = 4;

/// Most ports the linear scan looks at: it bounds what one SYN can cost when a destination's
/// range is full (about 130 ns a step), and with 1% of a range free, spread out, it misses
/// them all with probability 0.99^2048 ≈ 1e-9.
pub const MAX_SCAN: u32 = 2048;

/// How many candidates a new flow may try in a range of `port_count` ports: the random ones,
/// then up to [`MAX_SCAN`] ports of the range in order (all of a smaller range).
#[must_use]
pub const fn max_probes(port_count: u32) -> u32 {
    RANDOM_PROBES
        + if port_count < MAX_SCAN {
            port_count
        } else {
            MAX_SCAN
        }
}

/// Words of a destination's [`PortHint`]: one bit per port of a range of up to 65,536.
pub const HINT_WORDS: usize = 1024;
/// Destinations with a [`PortHint`] (LRU: the busy ones keep theirs).
pub const HINT_DESTINATIONS: u32 = 256;
/// Steps the hint phase may take (each passes over a full word, or proposes a port whose
/// claim may still fail).
pub const HINT_ITERATIONS: u32 = 48;
/// Full words the hint phase passes over before it gives up (then the random candidates and
/// the scan run): with 1% of a range free, spread out, a word has a clear bit with
/// probability 0.47, so 16 full ones in a row happen once in 30,000 searches.
pub const HINT_WORDS_TRIED: u32 = 16;

/// Ports of one destination that are probably taken (bit set), so a search in a nearly full
/// range skips them without a look-up. Only a hint: a clear bit is always checked against the
/// binding table before it is used, the programs set bits as they learn, and the sweep clears
/// the bits of the bindings it removes and rebuilds the whole map from the flow table on each
/// full scan (ports freed otherwise look taken until then; the random candidates and the
/// scan still find them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortHint {
    pub words: [u64; HINT_WORDS],
}

impl PortHint {
    pub const EMPTY: Self = Self {
        words: [0; HINT_WORDS],
    };

    /// Marks port offset `offset` (port - port_min) as taken.
    pub fn set(&mut self, offset: u32) {
        if let Some(w) = self.words.get_mut((offset / 64) as usize) {
            *w |= 1 << (offset % 64);
        }
    }

    /// Marks port offset `offset` as free.
    pub fn clear(&mut self, offset: u32) {
        if let Some(w) = self.words.get_mut((offset / 64) as usize) {
            *w &= !(1 << (offset % 64));
        }
    }

    /// Marks every offset at or beyond `port_count` as taken, so a search never proposes one.
    pub fn close_tail(&mut self, port_count: u32) {
        for offset in port_count..(HINT_WORDS as u32 * 64) {
            self.set(offset);
        }
    }
}

/// The hint key of a destination: the pod-side tuple with the pod's address and port zeroed.
#[must_use]
pub const fn hint_key(key: &FlowKey) -> FlowKey {
    FlowKey::new(key.proto, 0, 0, key.dst_ip, key.dst_port)
}

/// The lowest clear bit of `word` as an offset in the word, branch-free (the eBPF verifier
/// sees one path). `word` must not be all ones.
#[must_use]
pub const fn lowest_clear_bit(word: u64) -> u32 {
    let bit = !word & word.wrapping_add(1);
    bit.wrapping_sub(1).count_ones()
}

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
    let offset = if attempt < RANDOM_PROBES {
        mix32(seed ^ attempt.wrapping_mul(0x9e37_79b9)) % port_count
    } else {
        let start = mix32(seed ^ 0x5bd1_e995) % port_count;
        (start + (attempt - RANDOM_PROBES) % port_count) % port_count
    };
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
    fn a_single_free_port_is_always_found() {
        // Every port but one in use: every seed reaches it within the probe budget.
        let (min, count) = (20000u16, 1000u32);
        for free in [20000u16, 20500, 20999] {
            for seed in 0..200u32 {
                let found = (0..max_probes(count))
                    .any(|a| candidate(PortRandomisation::Prng, seed, a, 0, min, count) == free);
                assert!(found, "seed {seed} never reached {free}");
            }
        }
    }

    #[test]
    fn ninety_nine_percent_full_range_needs_few_probes_on_average() {
        // 1% of a 10,000-port range free, spread out: the scan finds one within about 100
        // steps of its start.
        let (min, count) = (20000u16, 10_000u32);
        let free = |p: u16| (u32::from(p - min) * 7919) % 100 == 0;
        let mut total = 0u64;
        for seed in 0..2000u32 {
            let probes = (0..max_probes(count))
                .position(|a| free(candidate(PortRandomisation::Prng, seed, a, 0, min, count)))
                .expect("a free port exists");
            total += probes as u64 + 1;
        }
        assert!(total / 2000 < 200, "mean {} probes", total / 2000);
    }

    #[test]
    fn hint_bits_and_lowest_clear_bit() {
        assert_eq!(lowest_clear_bit(0), 0);
        assert_eq!(lowest_clear_bit(0b1011), 2);
        assert_eq!(lowest_clear_bit(u64::MAX >> 1), 63);
        let mut h = PortHint::EMPTY;
        h.set(65);
        h.set(66);
        h.clear(66);
        assert_eq!(h.words[1], 2);
        h.close_tail(64512);
        assert_eq!(h.words[1007], 0);
        assert_eq!(h.words[1008], u64::MAX);
        assert_eq!(hint_key(&KEY), FlowKey::new(6, 0, 0, 0xc000_0214, 80));
    }

    proptest! {
        #[test]
        fn candidates_stay_in_range(mode in 0u8..3, seed: u32, attempt in 0..70_000u32, pod_port: u16, min in 1u16..65535, span: u16) {
            let count = u32::from(span).min(65536 - u32::from(min)).max(1);
            let p = candidate(PortRandomisation::from_u8(mode), seed, attempt, pod_port, min, count);
            prop_assert!(u32::from(p) >= u32::from(min));
            prop_assert!(u32::from(p) < u32::from(min) + count);
        }

        #[test]
        fn probes_cover_the_whole_range(seed: u32, span in 1u32..MAX_SCAN) {
            // The scan after the random candidates visits every port of the range.
            let mut seen = [false; MAX_SCAN as usize];
            for a in 0..max_probes(span) {
                seen[usize::from(candidate(PortRandomisation::Prng, seed, a, 0, 1024, span) - 1024)] = true;
            }
            prop_assert!(seen[..span as usize].iter().all(|s| *s));
        }
    }
}
