//! Incremental Internet checksum updates (RFC 1624): applied directly for XDP, and as the
//! 32-bit differences tc hands to the kernel's checksum helpers.
//! Words are taken in memory order; one's complement sums do not care about byte order as long
//! as every word is read the same way.

/// `sum` folded to 16 bits (end-around carry), not complemented.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// One's complement addition of 32-bit partial sums (end-around carry).
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// The checksum after changes summing to `diff`, as the kernel's csum_replace_by_diff does.
#[inline(always)]
pub fn apply_diff(csum: u16, diff: u32) -> u16 {
    !fold(add(diff, !(csum as u32)))
}

/// Adds the change of a 32-bit word from `old` to `new` to the difference `diff` (the form
/// bpf_csum_diff returns and the checksum helpers take with size 0).
#[inline(always)]
pub fn diff4(diff: u32, old: u32, new: u32) -> u32 {
    add(add(diff, !old), new)
}
