//! Incremental checksum updates (what the datapath does per packet) must agree with a full
//! recomputation for any data and any rewritten word or address.
#![no_main]

use datapath_common::csum::{checksum, fold, sum_bytes, update16, update32, update32_udp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, u16, u16, u32, u32)| {
    let (mut data, index, new_word, old_addr, new_addr) = input;
    if data.len() < 2 {
        return;
    }
    data.truncate(data.len() & !1);
    let check = checksum(&data);
    let i = usize::from(index) % (data.len() / 2) * 2;
    let old_word = u16::from_be_bytes([data[i], data[i + 1]]);
    data[i..i + 2].copy_from_slice(&new_word.to_be_bytes());
    let updated = update16(check, old_word, new_word);
    // One's complement has two zeros: only all-zero data (never a real header) can end up with
    // the "other" one.
    let verified = fold(sum_bytes(u32::from(updated), &data));
    assert!(
        verified == 0xffff || data.iter().all(|b| *b == 0),
        "{verified:#x}"
    );
    // An address inside the covered data (a pseudo-header stand-in).
    let mut with_addr = old_addr.to_be_bytes().to_vec();
    with_addr.extend_from_slice(&data);
    let check = checksum(&with_addr);
    with_addr[..4].copy_from_slice(&new_addr.to_be_bytes());
    let verified = fold(sum_bytes(
        u32::from(update32(check, old_addr, new_addr)),
        &with_addr,
    ));
    assert!(
        verified == 0xffff || with_addr.iter().all(|b| *b == 0),
        "{verified:#x}"
    );
    let udp = update32_udp(check, old_addr, new_addr);
    assert!(udp != 0 || check == 0);
});
