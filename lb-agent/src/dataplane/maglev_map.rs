//! `LB_MAGLEV` through a shared memory mapping (the map is created `BPF_F_MMAPABLE`): the agent
//! reads and writes Maglev slots with plain 32-bit stores, no syscall per slot. A 4-byte aligned
//! store is atomic, so a packet reading a slot sees the old or the new backend id, never a mix.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use lb_common::MAGLEV_SLOTS_PER_ENTRY;

use super::mapped::MappedArray;

pub struct MaglevMap {
    map: MappedArray,
    slots: usize,
}

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
        Ok(Self { map: MappedArray::new(map, "LB_MAGLEV")?, slots })
    }

    pub fn len(&self) -> u32 {
        self.slots as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }

    fn slot(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.slots, "Maglev slot {i} beyond {}", self.slots);
        &self.map.u32s()[i]
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
