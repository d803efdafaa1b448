//! A BPF array created `BPF_F_MMAPABLE`, mapped into the agent's memory: its values are read
//! and written with atomics, no system call each. `LB_MAGLEV` (slots written by the million)
//! and `LB_FRONTEND_SET` (whose words the datapath sets bits of too: a word written back from a
//! copy would clear them, an atomic OR cannot).

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU32, AtomicU64},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;

pub struct MappedArray {
    // Keeps the map (and its fd) alive as long as the mapping.
    _map: MapData,
    base: *mut u8,
    /// Bytes of values (entries x value size), what the accessors hand out.
    len: usize,
    /// Bytes mapped (whole pages).
    mapped: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps `map` (`name` for errors), an array whose values are a multiple of 8 bytes (so that
    /// they sit back to back, as the kernel lays an array's values out).
    pub fn new(map: MapData, name: &str) -> Result<Self> {
        let info = map.info().with_context(|| format!("reading {name} info"))?;
        if info.value_size() % 8 != 0 {
            bail!("{name} has {}-byte values, not a multiple of 8", info.value_size());
        }
        let len = info.max_entries() as usize * info.value_size() as usize;
        let mapped = len.div_ceil(4096).max(1) * 4096;
        // SAFETY: mapping a BPF array fd of at least `mapped` bytes, shared, read/write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping {name} into memory: {} (a map pinned by an older agent without BPF_F_MMAPABLE? remove it)",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _map: map, base: ptr.cast(), len, mapped })
    }

    pub fn u32s(&self) -> &[AtomicU32] {
        // SAFETY: `len` bytes of the live mapping, page aligned; AtomicU32 has u32's layout,
        // and the memory is only ever accessed atomically (here and by BPF programs).
        unsafe { std::slice::from_raw_parts(self.base.cast(), self.len / 4) }
    }

    pub fn u64s(&self) -> &[AtomicU64] {
        // SAFETY: as `u32s`; page aligned, so 8-byte aligned.
        unsafe { std::slice::from_raw_parts(self.base.cast(), self.len / 8) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), self.mapped) };
    }
}
