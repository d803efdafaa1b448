//! Frontend lookup.

use lb_common::{Addr, ServiceKey, ServiceValue};

use crate::maps::SERVICES;

/// The frontend for a destination, if it is one.
#[inline(always)]
pub fn service(daddr: Addr, dport_be: u16, proto: u8, scope: u8) -> Option<&'static ServiceValue> {
    let key = ServiceKey { addr: daddr, port_be: dport_be, proto, scope };
    // SAFETY: service values are replaced whole by user space, never mutated in place by the
    // datapath; a concurrent update gives either the old or the new value.
    unsafe { SERVICES.get(key) }
}
