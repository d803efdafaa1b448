//! Reading a whole map a chunk of entries per system call (`BPF_MAP_LOOKUP_BATCH`, Linux
//! 5.6+), for the maps that hold a flow each: a full conntrack map has over half a million
//! entries, and aya's iterator costs two system calls per entry (next key, then lookup). The
//! filters' bit sets (arrays of up to 16,384 words) are read the same way.
//! aya 0.14 has no batch operations, hence this small wrapper over the system call.

use std::{
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result, bail};
use aya::{Pod, maps::MapData};

use super::sys_bpf::{BPF_MAP_LOOKUP_BATCH, bpf};

/// Entries asked for per call: 4096 conntrack entries are 384 KiB of buffers.
pub const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `visit` with each chunk of a map's entries (keys and values, same length), in bucket
/// (or index) order; returns how many entries there were. Entries changed meanwhile by the
/// datapath may be seen in either state, or (if moved between buckets' reads) missed: callers
/// that act on an entry re-read it first.
pub fn for_each_chunk<K: Pod, V: Pod>(
    map: &MapData,
    mut visit: impl FnMut(&[K], &[V]) -> Result<()>,
) -> Result<u64> {
    let info = map.info().context("reading the map's info")?;
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        bail!(
            "map {:?} has {}-byte keys and {}-byte values, not {} and {}",
            info.name_as_str().unwrap_or("?"),
            info.key_size(),
            info.value_size(),
            size_of::<K>(),
            size_of::<V>()
        );
    }
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut chunk = CHUNK;
    let (mut keys, mut values) = (Vec::<K>::new(), Vec::<V>::new());
    // The kernel's cursor for hash maps is a bucket index (a u32); room for more is harmless.
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    let mut total = 0u64;
    loop {
        keys.reserve_exact(chunk as usize);
        values.reserve_exact(chunk as usize);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &cursor_in as *const u64 as u64 },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: fd,
            ..Default::default()
        };
        // SAFETY: the buffers have room for `count` keys and values, which is all the kernel
        // writes; the attribute is a valid `bpf_attr` prefix, zero past its fields.
        let done = match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than asked for: ask for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                chunk = chunk.checked_mul(2).context("a bucket larger than 2^32 entries")?;
                continue;
            }
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        };
        let n = (attr.count as usize).min(chunk as usize);
        // SAFETY: the kernel wrote `n` whole keys and values; K and V are plain data (Pod).
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        total += n as u64;
        if n > 0 {
            visit(&keys, &values)?;
        }
        keys.clear();
        values.clear();
        if done {
            return Ok(total);
        }
        cursor_in = cursor_out;
        first = false;
    }
}
