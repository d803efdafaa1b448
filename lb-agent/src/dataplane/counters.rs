//! Reading the per-CPU counters (summed over CPUs).

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::{MAP_SERVICE_STATS, MAP_STATS, STAT_NAMES, ServiceStats};

/// The value of every named global counter, summed over CPUs.
pub fn global(ebpf: &Ebpf) -> Result<Vec<(&'static str, u64)>> {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(MAP_STATS).context("object has no LB_STATS map")?)?;
    named(&map)
}

/// The global counters of the agent whose maps are pinned under `bpffs`.
pub fn global_pinned(bpffs: &std::path::Path) -> Result<Vec<(&'static str, u64)>> {
    let path = super::loader::maps_pin_dir(bpffs).join(MAP_STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    named(&map)
}

fn named<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<Vec<(&'static str, u64)>> {
    STAT_NAMES
        .iter()
        .map(|&(index, name)| {
            let per_cpu = map.get(&index, 0).with_context(|| format!("reading counter {name}"))?;
            Ok((name, per_cpu.iter().sum()))
        })
        .collect()
}

/// One global counter by index, summed over CPUs.
pub fn global_one(ebpf: &Ebpf, index: u32) -> Result<u64> {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(MAP_STATS).context("object has no LB_STATS map")?)?;
    Ok(map.get(&index, 0)?.iter().sum())
}

/// Packets and bytes of one service port, summed over CPUs.
pub fn service(ebpf: &Ebpf, service_id: u32) -> Result<ServiceStats> {
    let map: PerCpuArray<&MapData, ServiceStats> = PerCpuArray::try_from(
        ebpf.map(MAP_SERVICE_STATS).context("object has no LB_SVC_STATS map")?,
    )?;
    let per_cpu = map.get(&service_id, 0)?;
    Ok(per_cpu.iter().fold(ServiceStats::default(), |acc, s| ServiceStats {
        packets: acc.packets + s.packets,
        bytes: acc.bytes + s.bytes,
    }))
}
