//! Bounds the verifier can see on every supported kernel.

/// `v` when `min <= v <= max`, proven on the register the caller goes on with. Written as one
/// range check, LLVM compiles it to a single compare of `v - min`, a register of its own, and
/// the verifier of older kernels (6.1) does not carry that bound back to `v`: a helper given
/// `v` as a length was refused ("min value is negative", "unbounded memory access"). Here
/// each compare is on `v` itself, the second on a copy read back from the stack, which LLVM
/// cannot merge with the first (the verifier keeps a spilled register's bounds).
#[inline(always)]
pub fn within(v: usize, min: usize, max: usize) -> Option<usize> {
    if v < min {
        return None;
    }
    // SAFETY: reading a local variable.
    let v = unsafe { core::ptr::read_volatile(&v) };
    if v > max {
        return None;
    }
    Some(v)
}
