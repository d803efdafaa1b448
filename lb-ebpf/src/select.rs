//! Backend selection, shared by the socket hooks and the device hooks: a live sessionAffinity
//! entry first, else the frontend's Maglev table at a slot chosen by `hash`.

use lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, BE_F_TERMINATING, BackendValue,
    STAT_AFFINITY_HIT, STAT_BACKEND_MISSING, SVC_F_AFFINITY, ServiceValue,
};

use crate::{
    clock,
    maps::{AFFINITY, AFFINITY_MATCH, BACKENDS, MAGLEV, TABLES},
    stats,
};

pub struct Selected {
    pub id: u32,
    pub backend: &'static BackendValue,
}

/// Why no backend was chosen.
#[derive(Clone, Copy)]
pub enum NoBackend {
    /// The service has no usable endpoint: reject or drop per its flags.
    Empty,
    /// The maps disagree with themselves (counted; treated like Empty).
    Missing,
}

/// The backend with id `id`, if the slot is live.
#[inline(always)]
pub fn backend(id: u32) -> Result<Selected, NoBackend> {
    match BACKENDS.get(id) {
        Some(b) if b.addr != [0; 4] => Ok(Selected { id, backend: b }),
        _ => {
            stats::count(STAT_BACKEND_MISSING);
            Err(NoBackend::Missing)
        }
    }
}

/// The backend at `hash` in the frontend's Maglev table.
#[inline(always)]
pub fn from_table(svc: &ServiceValue, hash: u32) -> Result<Selected, NoBackend> {
    // SAFETY: table values are replaced whole by user space (hash map update), never in place.
    let table = unsafe { TABLES.get(svc.table_id) }.ok_or(NoBackend::Missing)?;
    if table.backend_count == 0 || table.maglev_size == 0 {
        return Err(NoBackend::Empty);
    }
    let index = table.maglev_offset.wrapping_add(hash % table.maglev_size);
    let pair = MAGLEV.get(index / 2).ok_or(NoBackend::Missing)?;
    let id = if index & 1 == 0 { pair[0] } else { pair[1] };
    backend(id)
}

/// Selection honouring sessionAffinity: a client keeps its backend while the entry is younger
/// than the timeout, the backend still belongs to the service and is not terminating.
#[inline(always)]
pub fn with_affinity(
    svc: &ServiceValue,
    key: &AffinityKey,
    hash: u32,
) -> Result<Selected, NoBackend> {
    if svc.flags & SVC_F_AFFINITY == 0 {
        return from_table(svc, hash);
    }
    let now = clock::now_ns();
    // SAFETY: a concurrent update gives an old or new value; both are valid entries.
    if let Some(v) = unsafe { AFFINITY.get(key) } {
        let fresh =
            clock::age_ns(now, v.last_used_ns) <= svc.affinity_timeout_s as u64 * 1_000_000_000;
        let member = AffinityMatchKey { backend_id: v.backend_id, service_id: svc.service_id };
        // SAFETY: read-only presence check.
        if fresh
            && unsafe { AFFINITY_MATCH.get(member) }.is_some()
            && let Ok(sel) = backend(v.backend_id)
            && sel.backend.flags & BE_F_TERMINATING == 0
        {
            let _ = AFFINITY.insert(
                key,
                AffinityValue { backend_id: sel.id, _pad: 0, last_used_ns: now },
                0,
            );
            stats::count(STAT_AFFINITY_HIT);
            return Ok(sel);
        }
    }
    let sel = from_table(svc, hash)?;
    let _ =
        AFFINITY.insert(key, AffinityValue { backend_id: sel.id, _pad: 0, last_used_ns: now }, 0);
    Ok(sel)
}
