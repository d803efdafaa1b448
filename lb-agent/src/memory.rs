//! Giving memory back after a large batch of objects was dropped.
//!
//! glibc's malloc keeps the pages of freed chunks: after a re-read manifests file or a re-list
//! replaced thousands of objects, the agent's RSS stayed at its parse-time peak. Measured with
//! one 2,700-service file re-read six times: 97 MB of anonymous memory without trimming, 56 MB
//! with it.

/// Returns freed heap pages to the kernel (glibc only; elsewhere nothing to do).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
