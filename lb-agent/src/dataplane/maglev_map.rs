//! `LB_MAGLEV` through a shared memory mapping (the map is created `BPF_F_MMAPABLE`): the agent
//! reads and writes Maglev slots with plain 32-bit stores, no syscall per slot. A 4-byte aligned
//! store is atomic, so a packet reading a slot sees the old or the new backend id, never a mix.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use lb_common::MAGLEV_SLOTS_PER_ENTRY;

pub struct MaglevMap {
    // Keeps the map (and its fd) alive as long as the mapping.
    _map: MapData,
    base: *mut AtomicU32,
    slots: usize,
    bytes: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MaglevMap {}
unsafe impl Sync for MaglevMap {}

impl MaglevMap {
    pub fn new(map: MapData) -> Result<Self> {
        let info = map.info().context("reading LB_MAGLEV info")?;
        if info.value_size() != 4 * MAGLEV_SLOTS_PER_ENTRY {
            bail!(
                "LB_MAGLEV has {}-byte values, expected {}",
                info.value_size(),
                4 * MAGLEV_SLOTS_PER_ENTRY
            );
        }
        let slots = info.max_entries() as usize * MAGLEV_SLOTS_PER_ENTRY as usize;
        let page = 4096usize;
        let bytes = (slots * 4).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd of at least `bytes` bytes, shared, read/write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping LB_MAGLEV into memory: {} (a map pinned by an older agent without BPF_F_MMAPABLE? remove it)",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _map: map, base: ptr.cast(), slots, bytes })
    }

    pub fn len(&self) -> u32 {
        self.slots as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }

    fn slot(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.slots, "Maglev slot {i} beyond {}", self.slots);
        // SAFETY: in bounds of the live mapping (checked above); AtomicU32 has u32's layout.
        unsafe { &*self.base.add(i) }
    }

    pub fn read(&self, start: u32, len: u32) -> Vec<u32> {
        (start as usize..(start + len) as usize)
            .map(|i| self.slot(i).load(Ordering::Relaxed))
            .collect()
    }

    pub fn write(&self, start: u32, values: &[u32]) {
        for (i, v) in values.iter().enumerate() {
            self.slot(start as usize + i).store(*v, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Release);
    }

    pub fn write_scattered(&self, slots: &[(u32, u32)]) {
        for &(i, v) in slots {
            self.slot(i as usize).store(v, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Release);
    }
}

impl Drop for MaglevMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}
