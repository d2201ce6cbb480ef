//! The skb's checksum state (`ip_summed`), which `__sk_buff` does not expose.
//!
//! A program that knows the state can fix TCP/UDP checksums with plain writes instead of two
//! kernel helper calls per packet. The programs carry a four-instruction sequence, [`TEMPLATE`],
//! that the loader rewrites for the running kernel before loading ([`patch_object`]):
//!
//! 1. a call of the `bpf_cast_to_kern_ctx` kfunc, by its BTF id (the verifier turns it into a
//!    register move: it returns the context as the kernel's `struct sk_buff`),
//! 2. a byte load at the offset of the byte holding the `ip_summed` bitfield,
//! 3. a right shift by the bitfield's position in that byte,
//! 4. a mask of its two bits.
//!
//! A kernel without the kfunc or without BTF gets [`FALLBACK`] instead: `r0 = CSUM_UNKNOWN`,
//! and the programs then use the kernel's checksum helpers as before.

/// `ip_summed` values (include/linux/skbuff.h).
pub const CHECKSUM_NONE: u8 = 0;
pub const CHECKSUM_UNNECESSARY: u8 = 1;
pub const CHECKSUM_COMPLETE: u8 = 2;
pub const CHECKSUM_PARTIAL: u8 = 3;
/// What the fallback sequence yields: the state could not be read.
pub const CSUM_UNKNOWN: u8 = 4;

/// Placeholder immediate of the kfunc call: how the loader finds the sequence.
pub const KFUNC_MARKER: u32 = 0x6b63_7473;

/// One eBPF instruction as stored in the object (little-endian).
pub type Insn = [u8; 8];

const fn insn(code: u8, regs: u8, off: i16, imm: i32) -> Insn {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, regs, o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// `call` of a kernel function (src_reg 2 = BPF_PSEUDO_KFUNC_CALL), by BTF id.
const CALL_KFUNC: u8 = 0x85;
const REGS_KFUNC: u8 = 0x20;
/// `r0 = *(u8 *)(r0 + off)`.
const LOAD_BYTE: u8 = 0x71;
/// `r0 >>= imm`, 64-bit.
const RSH_IMM: u8 = 0x77;
/// `r0 &= imm`, 64-bit.
const AND_IMM: u8 = 0x57;
/// `r0 = imm`, 64-bit.
const MOV_IMM: u8 = 0xb7;

/// `ip_summed` is a two-bit field.
const IP_SUMMED_BITS: u32 = 2;
const IP_SUMMED_MASK: i32 = (1 << IP_SUMMED_BITS) - 1;

/// The sequence as compiled into the programs (the eBPF crate emits [`TEMPLATE_WORDS`]).
pub const TEMPLATE: [Insn; 4] = [
    insn(CALL_KFUNC, REGS_KFUNC, 0, KFUNC_MARKER.cast_signed()),
    insn(LOAD_BYTE, 0, 0, 0),
    insn(RSH_IMM, 0, 0, 0),
    insn(AND_IMM, 0, 0, IP_SUMMED_MASK),
];

/// [`TEMPLATE`] as little-endian 32-bit words: what the eBPF crate's inline assembly emits
/// (`.4byte` directives take integers), so the programs carry exactly the bytes the loader
/// looks for.
pub const TEMPLATE_WORDS: [u32; 8] = {
    let bytes = TEMPLATE.as_flattened();
    let mut words = [0; 8];
    let mut i = 0;
    while i < words.len() {
        words[i] = u32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]);
        i += 1;
    }
    words
};

/// The sequence for a kernel that lacks the kfunc: the state reads as [`CSUM_UNKNOWN`].
pub const FALLBACK: [Insn; 4] = [insn(MOV_IMM, 0, 0, CSUM_UNKNOWN as i32); 4];

/// The sequence for a kernel whose `bpf_cast_to_kern_ctx` has BTF id `kfunc_id` and whose
/// `sk_buff.ip_summed` starts `bit_offset` bits into the struct.
#[must_use]
pub fn resolved(kfunc_id: u32, bit_offset: u32) -> Option<[Insn; 4]> {
    let byte = i16::try_from(bit_offset / u8::BITS).ok()?;
    let shift = bit_offset % u8::BITS;
    // The two bits must sit in one byte for a single byte load.
    if shift > u8::BITS - IP_SUMMED_BITS {
        return None;
    }
    Some([
        insn(CALL_KFUNC, REGS_KFUNC, 0, i32::try_from(kfunc_id).ok()?),
        insn(LOAD_BYTE, 0, byte, 0),
        insn(RSH_IMM, 0, 0, shift.cast_signed()),
        TEMPLATE[3],
    ])
}

/// Replaces every instruction-aligned copy of [`TEMPLATE`] in `object` (an ELF image: program
/// sections start 8-byte aligned) with `replacement`. Returns how many were replaced.
pub fn patch_object(object: &mut [u8], replacement: &[Insn; 4]) -> usize {
    let template = TEMPLATE.as_flattened();
    let mut count = 0;
    let mut at = 0;
    while at + template.len() <= object.len() {
        if object[at..at + template.len()] == *template {
            object[at..at + template.len()].copy_from_slice(replacement.as_flattened());
            count += 1;
            at += template.len();
        } else {
            at += 8;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_carries_the_marker_in_the_call() {
        assert_eq!(TEMPLATE[0][0], CALL_KFUNC);
        assert_eq!(TEMPLATE[0][1] >> 4, 2, "src_reg = BPF_PSEUDO_KFUNC_CALL");
        assert_eq!(TEMPLATE[0][4..], KFUNC_MARKER.to_le_bytes());
    }

    #[test]
    fn template_words_are_the_template_bytes() {
        for (word, bytes) in TEMPLATE_WORDS.iter().zip(TEMPLATE.as_flattened().chunks(4)) {
            assert_eq!(word.to_le_bytes(), bytes);
        }
    }

    #[test]
    fn resolved_sequence_encodes_offset_and_shift() {
        // ip_summed at bit 1013: byte 126, bit 5.
        let seq = resolved(12345, 126 * 8 + 5).unwrap();
        assert_eq!(seq[0][4..], 12345u32.to_le_bytes());
        assert_eq!(seq[1][2..4], 126i16.to_le_bytes());
        assert_eq!(seq[2][4..], 5i32.to_le_bytes());
        assert_eq!(seq[3], TEMPLATE[3]);
        assert!(resolved(1, 7).is_none(), "straddles two bytes");
        assert!(resolved(1, 8 * 40_000).is_none(), "offset beyond i16");
    }

    #[test]
    fn patch_replaces_aligned_copies_only() {
        let template = TEMPLATE.as_flattened();
        // Aligned copies at 8 and 48, an unaligned one at 84.
        let mut object = [0u8; 120];
        object[8..40].copy_from_slice(template);
        object[40..48].copy_from_slice(&[1; 8]);
        object[48..80].copy_from_slice(template);
        let unaligned_at = 84;
        object[84..116].copy_from_slice(template);
        assert_eq!(patch_object(&mut object, &FALLBACK), 2);
        assert_eq!(object[8..40], *FALLBACK.as_flattened());
        assert_eq!(object[48..80], *FALLBACK.as_flattened());
        assert_eq!(
            object[unaligned_at..unaligned_at + 32],
            *TEMPLATE.as_flattened()
        );
        assert_eq!(patch_object(&mut object, &FALLBACK), 0);
    }
}
