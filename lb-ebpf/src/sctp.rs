//! SCTP's checksum when a translation changes an SCTP packet's ports. SCTP sums with CRC32c
//! (no pseudo-header: addresses may change freely), which no checksum helper of the kernel
//! updates; `lb_common::crc32c` gives the change a port rewrite makes, from the packet's length
//! alone, so the payload is never read.
//!
//! A checksum field of 0 is left as it is: a packet the node's own SCTP stack (a pod's, through
//! its veth, or the host's) hands on for the device to sum (CHECKSUM_PARTIAL: the field stays 0
//! until the sum is taken at transmission, over the rewritten packet), or one whose sender
//! sums nothing (`sctp.no_checksums`). A summed packet's CRC is 0 once in 2^32.

use lb_common::crc32c;

use crate::packet::{Bounds, Flow};

/// The IP payload's length (the SCTP packet's: common header and chunks), from the network
/// header; `None` when it cannot hold an SCTP header.
#[inline(always)]
fn sctp_len(b: &Bounds, flow: &Flow) -> Option<u32> {
    let ip: *const [u8; 8] = b.ptr_at(flow.l3())?;
    // SAFETY: bounds checked by ptr_at. IPv4: total length (bytes 2-3) covers the header;
    // IPv6: payload length (bytes 4-5) covers the extension headers before the transport's.
    let (field, headers) = unsafe {
        if flow.is_v6 {
            (u16::from_be_bytes([(*ip)[4], (*ip)[5]]), flow.l4() - flow.l3() - 40)
        } else {
            (u16::from_be_bytes([(*ip)[2], (*ip)[3]]), flow.l4() - flow.l3())
        }
    };
    let len = (field as u32).checked_sub(headers as u32)?;
    (len >= 12).then_some(len)
}

/// The common header's three words: ports, verification tag, checksum. One pointer for the
/// reads and writes: checked apart, LLVM merged the checks into one the verifier could not
/// follow to the other pointer.
#[inline(always)]
pub fn header(b: &Bounds, flow: &Flow) -> Result<*mut [u32; 3], ()> {
    b.ptr_at(flow.l4()).ok_or(())
}

/// The checksum field's new value (as it lies in the packet, a little-endian word; `cur`
/// now) once the ports word changes from `old_ports` to `new_ports` (as they lie in the
/// packet); `Ok(None)` to leave a field of 0 alone. `Err` for a packet whose length makes no
/// sense.
#[inline(always)]
pub fn checksum_after(
    b: &Bounds,
    flow: &Flow,
    cur: u32,
    old_ports: u32,
    new_ports: u32,
) -> Result<Option<u32>, ()> {
    if cur == 0 {
        return Ok(None);
    }
    let len = sctp_len(b, flow).ok_or(())?;
    let delta = port_change(
        u32::from_le_bytes(old_ports.to_ne_bytes()),
        u32::from_le_bytes(new_ports.to_ne_bytes()),
        len,
    );
    Ok(Some(u32::from_ne_bytes((u32::from_le_bytes(cur.to_ne_bytes()) ^ delta).to_le_bytes())))
}

/// `crc32c::port_change` as a subprogram: its 32-step multiplication exists once per program,
/// and only scalars cross the call. `len` is read back from the stack first: LLVM knew from
/// the caller that it is below 65,536 and dropped the mask on the table index, while the
/// verifier, walking the callee, did not (an index "outside the allowed memory range").
#[inline(never)]
fn port_change(old: u32, new: u32, len: u32) -> u32 {
    // SAFETY: reading a local variable.
    let len = unsafe { core::ptr::read_volatile(&len) };
    crc32c::port_change(old, new, len)
}
