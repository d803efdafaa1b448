//! Every map the kernel programs use, with its default size. Names come from lb-common so user
//! space opens exactly these. Sizes are defaults: the agent overrides them at load time.
//! Maps are not pinned by the object itself: the agent pins them under `--bpffs`, and tests load
//! private, unpinned copies.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::*;

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_FRONTENDS, 0);

// A hash map, not an array: user space replaces a whole value atomically when a table moves,
// so a packet never sees a new offset with an old size.
#[map(name = "LB_TABLES")]
pub static TABLES: HashMap<u32, TableValue> =
    HashMap::with_max_entries(TABLES_PER_SERVICE * DEFAULT_MAX_SERVICES, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<BackendValue> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

// Two slots per element (see MAGLEV_SLOTS_PER_ENTRY); mmapable so the agent writes tables with
// plain stores instead of one syscall per slot.
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAGLEV_SLOTS / MAGLEV_SLOTS_PER_ENTRY, BPF_F_MMAPABLE);

#[map(name = "LB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map(name = "LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "LB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

#[map(name = "LB_AFF_MATCH")]
// Sized like LB_BACKENDS by the agent: one entry per (affinity service, backend).
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "LB_SOCK_RNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCK_REVNAT, 0);
