//! Batched array access (BPF_MAP_UPDATE_BATCH / BPF_MAP_LOOKUP_BATCH, kernel 5.6+), which aya
//! 0.14 does not wrap: writing a 16381-slot Maglev table is one syscall instead of 16381.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Result, bail};
use aya::maps::{Array, IterableMap, MapData};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Elements per lookup call when reading a whole array.
const LOOKUP_CHUNK: u32 = 65536;

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

fn fd_of(map: &Array<MapData, u32>) -> u32 {
    map.map().fd().as_fd().as_raw_fd() as u32
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of the size passed; the
    // pointers inside it reference live buffers of `count` elements owned by the caller.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, size_of::<BatchAttr>() as u32)
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Writes `values` to indices `start..start + values.len()`.
pub fn update_array_range(map: &Array<MapData, u32>, start: u32, values: &[u32]) -> Result<()> {
    let keys: Vec<u32> = (start..start + values.len() as u32).collect();
    update(map, &keys, values)
}

/// Writes `(index, value)` pairs.
pub fn update_array_scattered(map: &Array<MapData, u32>, slots: &[(u32, u32)]) -> Result<()> {
    let (keys, values): (Vec<u32>, Vec<u32>) = slots.iter().copied().unzip();
    update(map, &keys, &values)
}

fn update(map: &Array<MapData, u32>, keys: &[u32], values: &[u32]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd_of(map),
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count as usize != keys.len() {
        bail!("batch update wrote {} of {} elements", attr.count, keys.len());
    }
    Ok(())
}

/// Reads the whole array.
pub fn read_array(map: &Array<MapData, u32>) -> Result<Vec<u32>> {
    let len = map.len();
    let mut out = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; LOOKUP_CHUNK as usize];
    let mut values = vec![0u32; LOOKUP_CHUNK as usize];
    let mut token = 0u32;
    let mut first = true;
    while (out.len() as u32) < len {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK.min(len - out.len() as u32),
            map_fd: fd_of(map),
            ..Default::default()
        };
        let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e.into()),
        };
        out.extend_from_slice(&values[..attr.count as usize]);
        if done || attr.count == 0 {
            break;
        }
        token = next;
        first = false;
    }
    if out.len() as u32 != len {
        bail!("batch lookup read {} of {len} elements", out.len());
    }
    Ok(out)
}
