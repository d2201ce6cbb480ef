//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Checksums are handled as the 16-bit value stored in the header, read big-endian.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of big-endian 16-bit words (odd trailing byte padded with zero),
/// added to `initial`, unfolded.
#[must_use]
pub fn sum_bytes(initial: u32, bytes: &[u8]) -> u32 {
    let mut sum = u64::from(initial);
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The checksum to store over `bytes` (whose checksum field must be zero).
#[must_use]
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_bytes(0, bytes))
}

/// Pseudo-header sum for TCP/UDP over IPv4.
#[must_use]
pub const fn pseudo_header_sum(src: u32, dst: u32, proto: u8, l4_len: u16) -> u32 {
    (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto as u32 + l4_len as u32
}

/// What a 16-bit word changing from `old` to `new` adds to a one's-complement sum, unfolded:
/// differences of several fields can be added up and applied with one [`apply`].
#[must_use]
pub const fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// [`diff16`] for a 32-bit field (an IPv4 address).
#[must_use]
pub const fn diff32(old: u32, new: u32) -> u32 {
    diff16((old >> 16) as u16, (new >> 16) as u16) + diff16(old as u16, new as u16)
}

/// Updates a stored checksum by an unfolded difference (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
/// Any sum of up to 65,535 [`diff16`] terms fits.
#[must_use]
pub const fn apply(check: u16, diff: u32) -> u16 {
    let sum = ((!check) as u32).wrapping_add(diff);
    // The carry out of a wrapped 32-bit add is worth 1 in one's complement.
    let sum = if sum < diff { sum + 1 } else { sum };
    !fold(sum)
}

/// Updates a stored checksum for a 16-bit word of the covered data changing from `old` to
/// `new`.
#[must_use]
pub const fn update16(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff16(old, new))
}

/// Updates a stored checksum for a 32-bit field (an IPv4 address) changing from `old` to `new`.
#[must_use]
pub const fn update32(check: u16, old: u32, new: u32) -> u16 {
    apply(check, diff32(old, new))
}

/// [`apply`] for a UDP checksum: 0 means "no checksum" and stays 0, and a computed 0 is sent
/// as 0xffff (RFC 768).
#[must_use]
pub const fn apply_udp(check: u16, diff: u32) -> u16 {
    keep_udp_zero_rule(check, apply(check, diff))
}

/// The RFC 768 rule as the kernel's checksum helper applies it, to the stored value before
/// (`check`) and after (`updated`) an update.
const fn keep_udp_zero_rule(check: u16, updated: u16) -> u16 {
    match (check, updated) {
        (0, _) => 0,
        (_, 0) => 0xffff,
        (_, other) => other,
    }
}

/// [`update16`] with the UDP zero rule of [`apply_udp`].
#[must_use]
pub const fn update16_udp(check: u16, old: u16, new: u16) -> u16 {
    apply_udp(check, diff16(old, new))
}

/// [`update32`] with the UDP zero rule of [`apply_udp`].
#[must_use]
pub const fn update32_udp(check: u16, old: u32, new: u32) -> u16 {
    apply_udp(check, diff32(old, new))
}

/// Updates the seed of a CHECKSUM_PARTIAL TCP/UDP checksum by a pseudo-header difference
/// (an address change; ports are not in the pseudo-header and must not be applied). Such a
/// field holds the folded pseudo-header sum, not yet complemented: the device (or the kernel,
/// in software) adds the segment and complements later, so the seed moves the opposite way to
/// a finished checksum.
#[must_use]
pub const fn apply_partial(seed: u16, diff: u32) -> u16 {
    !apply(!seed, diff)
}

/// [`apply_partial`] with the UDP zero rule of [`apply_udp`].
#[must_use]
pub const fn apply_udp_partial(seed: u16, diff: u32) -> u16 {
    keep_udp_zero_rule(seed, apply_partial(seed, diff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal IPv4 header with a correct checksum.
    fn ipv4_header(src: u32, dst: u32) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&60u16.to_be_bytes());
        h[8] = 64;
        h[9] = 6;
        h[12..16].copy_from_slice(&src.to_be_bytes());
        h[16..20].copy_from_slice(&dst.to_be_bytes());
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn known_header_checksum() {
        // RFC 1071 section 3, numerical example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let rfc1071 = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_bytes(0, &rfc1071)), 0xddf2);
        assert_eq!(checksum(&rfc1071), !0xddf2);
        // The IPv4 header of the "IPv4 header checksum" example on Wikipedia (192.168.0.1 to
        // 192.168.0.199, UDP, TTL 64): its published checksum is b861.
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0xb861);
        header[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(
            fold(sum_bytes(0, &header)),
            0xffff,
            "a correct header verifies"
        );
    }

    #[test]
    fn odd_length_is_padded() {
        assert_eq!(sum_bytes(0, &[0x12]), 0x1200);
        assert_eq!(checksum(&[0x00, 0x01, 0xf2]), !0xf201);
    }

    proptest! {
        #[test]
        fn address_update_matches_recomputation(src: u32, dst: u32, new_src: u32) {
            let h = ipv4_header(src, dst);
            let old = u16::from_be_bytes([h[10], h[11]]);
            let updated = update32(old, src, new_src);
            let fresh = ipv4_header(new_src, dst);
            // 0x0000 and 0xffff are the same value in one's complement; a header checksum
            // is never 0xffff when recomputed, so compare on the folded sum.
            let mut patched = fresh;
            patched[10..12].copy_from_slice(&updated.to_be_bytes());
            prop_assert_eq!(fold(sum_bytes(0, &patched)), 0xffff);
        }

        #[test]
        fn word_update_keeps_data_verifiable(mut data in proptest::collection::vec(any::<u8>(), 2..64), idx: usize, new: u16) {
            let len = data.len() & !1;
            data.truncate(len);
            let check = checksum(&data);
            let i = (idx % (len / 2)) * 2;
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            let updated = update16(check, old, new);
            prop_assert_eq!(fold(sum_bytes(u32::from(updated), &data)), 0xffff);
        }

        #[test]
        fn partial_seed_update_completes_to_a_valid_checksum(
            src: u32, dst: u32, new_src: u32, mut segment in proptest::collection::vec(any::<u8>(), 20..80),
        ) {
            // A TCP segment as a stack with checksum offload hands it down: the checksum
            // field holds the folded pseudo-header sum.
            let len = segment.len() as u16;
            let seed = fold(pseudo_header_sum(src, dst, 6, len));
            let seed = apply_partial(seed, diff32(src, new_src));
            // What the device does: sum the segment with the seed in place, complement.
            segment[16..18].copy_from_slice(&seed.to_be_bytes());
            let check = !fold(sum_bytes(0, &segment));
            segment[16..18].copy_from_slice(&check.to_be_bytes());
            prop_assert_eq!(fold(sum_bytes(pseudo_header_sum(new_src, dst, 6, len), &segment)), 0xffff);
        }

        #[test]
        fn udp_partial_update_keeps_zero_and_never_produces_it(seed: u16, old: u32, new: u32) {
            let updated = apply_udp_partial(seed, diff32(old, new));
            prop_assert_eq!(updated == 0, seed == 0);
        }

        #[test]
        fn one_combined_difference_equals_updates_in_turn(check: u16, old: u32, new: u32, old_port: u16, new_port: u16) {
            let combined = apply(check, diff32(old, new) + diff16(old_port, new_port));
            let in_turn = update16(update32(check, old, new), old_port, new_port);
            // Same value in one's complement (0x0000 and 0xffff are both zero).
            prop_assert_eq!(fold(u32::from(combined)) % 0xffff, fold(u32::from(in_turn)) % 0xffff);
        }

        #[test]
        fn udp_update_never_produces_zero(check: u16, old: u32, new: u32) {
            let updated = update32_udp(check, old, new);
            if check == 0 {
                prop_assert_eq!(updated, 0);
            } else {
                prop_assert_ne!(updated, 0);
            }
        }
    }
}
