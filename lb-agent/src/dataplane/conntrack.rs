//! The conntrack maps as one table for user space. IPv4 flows live in `LB_CT4` under a
//! 16-byte key, IPv6 flows in `LB_CT` (the datapath's conntrack.rs picks the same way);
//! callers see [`CtKey`] either way. An object built before `LB_CT4` (the bench loads older
//! builds) keeps both families in `LB_CT`, and is read that way.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use lb_common::{CtKey, CtKey4, CtValue, MAP_CONNTRACK, MAP_CONNTRACK4};

pub struct Conntrack {
    /// `None` for an object without `LB_CT4`.
    v4: Option<HashMap<MapData, CtKey4, CtValue>>,
    v6: HashMap<MapData, CtKey, CtValue>,
}

impl Conntrack {
    /// The object's maps (duplicated handles: the object stays usable).
    pub fn of(ebpf: &Ebpf) -> Result<Self> {
        let v4 = match ebpf.map(MAP_CONNTRACK4) {
            Some(_) => Some(HashMap::try_from(super::store::dup_map(ebpf, MAP_CONNTRACK4)?)?),
            None => None,
        };
        Ok(Self { v4, v6: HashMap::try_from(super::store::dup_map(ebpf, MAP_CONNTRACK)?)? })
    }

    /// The maps an agent pinned in `dir` (see `loader::maps_pin_dir`).
    pub fn pinned(dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening {} (is an agent running?)", path.display()))?;
            Ok(Map::LruHashMap(data))
        };
        Ok(Self {
            v4: Some(HashMap::try_from(open(MAP_CONNTRACK4)?)?),
            v6: HashMap::try_from(open(MAP_CONNTRACK)?)?,
        })
    }

    /// Every entry, IPv4 first. An entry removed while this walks the map is left out.
    pub fn entries(&self) -> Vec<(CtKey, CtValue)> {
        let v4 = self.v4.iter().flat_map(|m| m.iter().flatten().map(|(k, v)| (k.to_key(), v)));
        v4.chain(self.v6.iter().flatten()).collect()
    }

    /// Entries in each map: (`LB_CT4`, `LB_CT`).
    pub fn counts(&self) -> (u64, u64) {
        let v4 = self.v4.as_ref().map_or(0, |m| m.keys().flatten().count() as u64);
        (v4, self.v6.keys().flatten().count() as u64)
    }

    pub fn get(&self, key: &CtKey) -> Option<CtValue> {
        match (&self.v4, key.to_v4()) {
            (Some(v4), Some(k4)) => v4.get(&k4, 0).ok(),
            _ => self.v6.get(key, 0).ok(),
        }
    }

    /// Writes an entry; `flags` as for bpf_map_update_elem (BPF_NOEXIST: only if absent).
    pub fn insert(&mut self, key: &CtKey, value: &CtValue, flags: u64) -> Result<()> {
        match (&mut self.v4, key.to_v4()) {
            (Some(v4), Some(k4)) => v4.insert(k4, value, flags),
            _ => self.v6.insert(key, value, flags),
        }
        .with_context(|| format!("writing conntrack entry {key:?}"))
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<()> {
        match (&mut self.v4, key.to_v4()) {
            (Some(v4), Some(k4)) => v4.remove(&k4),
            _ => self.v6.remove(key),
        }
        .with_context(|| format!("removing conntrack entry {key:?}"))
    }

    /// Moves IPv4 entries an older build kept in `LB_CT` into `LB_CT4`, where this build's
    /// datapath looks them up. An entry already in `LB_CT4` is replaced only by a newer one
    /// (its packets went through the older programs since). With `finish`, the moved entries
    /// leave `LB_CT`: run once without it before attaching this build (the older programs,
    /// still attached, keep using `LB_CT`), and once with it right after, for the entries they
    /// created or refreshed meanwhile. Returns how many entries were copied.
    pub fn move_v4_from_lb_ct(&mut self, finish: bool) -> Result<usize> {
        if self.v4.is_none() {
            return Ok(0); // an older object: LB_CT is where its IPv4 flows belong
        }
        let legacy: Vec<(CtKey, CtValue)> =
            self.v6.iter().flatten().filter(|(k, _)| k.to_v4().is_some()).collect();
        let mut copied = 0;
        for (key, value) in &legacy {
            let newer = self.get(key).is_none_or(|cur| cur.last_seen_ns < value.last_seen_ns);
            if newer {
                self.insert(key, value, 0)?;
                copied += 1;
            }
            if finish {
                // Gone already (expired or evicted meanwhile) is fine.
                let _ = self.v6.remove(key);
            }
        }
        Ok(copied)
    }
}
