//! `LB_REPLY_PORTS`: the ports local backends answer from, a bit each. tc egress looks a
//! packet up in conntrack only when its source port is set, so the node's other outgoing
//! traffic skips the lookup. Bits are only ever added: a flow whose backend or service is gone
//! still has its replies translated until it ends. The datapath ignores the map until
//! `OPT_REPLY_PORTS_READY` says it is complete ([`enable`]).

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use lb_common::{
    BE_F_LOCAL, BackendValue, CT_F_REPLY, CT_F_SNAT, CtKey, CtValue, MAP_BACKENDS, MAP_CONNTRACK,
    MAP_OPTIONS, MAP_REPLY_PORTS, OPT_REPLY_PORTS_READY, REPLY_PORT_WORDS,
};

/// The map and a copy of its words (a port already set costs no syscall).
pub struct ReplyPorts {
    map: Array<MapData, u64>,
    words: Vec<u64>,
}

impl ReplyPorts {
    pub fn new(map: Array<MapData, u64>) -> Result<Self> {
        let words = (0..REPLY_PORT_WORDS)
            .map(|i| map.get(&i, 0).with_context(|| format!("reading {MAP_REPLY_PORTS}[{i}]")))
            .collect::<Result<_>>()?;
        Ok(Self { map, words })
    }

    /// Adds a port (network byte order, as maps hold it).
    pub fn add(&mut self, port_be: u16) -> Result<()> {
        let port = u16::from_be(port_be) as usize;
        let (i, bit) = (port / 64, 1u64 << (port % 64));
        if self.words[i] & bit == 0 {
            self.words[i] |= bit;
            self.map
                .set(i as u32, self.words[i], 0)
                .with_context(|| format!("writing {MAP_REPLY_PORTS}[{i}]"))?;
        }
        Ok(())
    }
}

/// Adds `b`'s port if it is a local backend (call before writing `b`: a flow can reach it as
/// soon as it is in `LB_BACKENDS`).
pub fn note_backend(ports: &mut ReplyPorts, b: &BackendValue) -> Result<()> {
    if b.flags & BE_F_LOCAL != 0 { ports.add(b.port_be) } else { Ok(()) }
}

/// Adds the port of every local backend in `LB_BACKENDS` and every local-backend reply entry in
/// conntrack (flows of backends gone before this map existed, as after an upgrade), then tells
/// the datapath the map is complete. Returns how many ports are set. Run at agent start, before
/// or after attaching: until the option is set, the datapath does not filter.
pub fn enable(ebpf: &mut Ebpf) -> Result<usize> {
    let map = |name: &str| ebpf.map(name).with_context(|| format!("object has no map {name}"));
    let mut ports =
        ReplyPorts::new(Array::try_from(super::store::dup_map(ebpf, MAP_REPLY_PORTS)?)?)?;
    let backends: Array<&MapData, BackendValue> = Array::try_from(map(MAP_BACKENDS)?)?;
    for b in backends.iter().flatten() {
        note_backend(&mut ports, &b)?;
    }
    let ct: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map(MAP_CONNTRACK)?)?;
    for (key, value) in ct.iter().flatten() {
        if value.flags & (CT_F_REPLY | CT_F_SNAT) == CT_F_REPLY {
            ports.add(key.sport_be)?;
        }
    }
    let set = ports.words.iter().map(|w| w.count_ones() as usize).sum();
    let mut options: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(MAP_OPTIONS).with_context(|| format!("object has no map {MAP_OPTIONS}"))?,
    )?;
    options.set(OPT_REPLY_PORTS_READY, 1, 0).context("writing LB_OPTIONS")?;
    Ok(set)
}
