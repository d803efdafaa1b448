//! Zeroing and copying small structs a 32-bit word at a time. A plain `*x = zeroed()`, `*a =
//! [0; 4]` or struct copy compiles to a call of a byte-by-byte memset or memmove subprogram
//! (seen in the translated programs: a 64-byte zeroing walks 64 iterations), which first
//! packets, route lookups and monitor events paid. Volatile stores: LLVM would merge plain
//! ones back into the same call.

/// How many words a `T` is; refused at build time unless `T` is a whole number of words and
/// at least word-aligned.
const fn words<T>() -> usize {
    assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4);
    size_of::<T>() / 4
}

/// `*to = all zero bytes`.
///
/// # Safety
/// All zero bytes must be a valid `T`: plain data (integers, arrays and structs of them), no
/// references, `NonZero` or enums.
#[inline(always)]
pub unsafe fn zero<T>(to: &mut T) {
    let n = const { words::<T>() };
    let to = to as *mut T as *mut u32;
    for i in 0..n {
        // SAFETY: `to` spans `n` aligned words (checked above).
        unsafe { core::ptr::write_volatile(to.add(i), 0) };
    }
}

/// `*to = *from`, for plain data (`Copy`).
#[inline(always)]
pub fn copy<T: Copy>(from: &T, to: &mut T) {
    let n = const { words::<T>() };
    let (from, to) = (from as *const T as *const u32, to as *mut T as *mut u32);
    for i in 0..n {
        // SAFETY: both span `n` aligned words (checked above) and do not overlap (a shared
        // and a unique reference).
        unsafe { core::ptr::write_volatile(to.add(i), *from.add(i)) };
    }
}
