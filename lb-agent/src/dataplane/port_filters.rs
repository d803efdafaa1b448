//! The port filters that let the datapath pass most packets without a hash lookup: bit sets of
//! 65,536 ports the agent keeps complete, and the datapath trusts once told so.
//! - `LB_REPLY_PORTS`: the ports local backends answer from. tc egress looks a packet up in
//!   conntrack only when its source port is set.
//! - `LB_INGRESS_PORTS`: the ports of external frontends and the SNAT port range. tc ingress
//!   and XDP look a packet up (conntrack, then frontends) only when its destination port is set.
//! - `LB_POD_PORTS`: the ports of internal frontends and the SNAT port range: `tc_from_pod`
//!   looks a pod's packet up only when its destination port is set.
//! - `LB_POD_REPLY_PORTS`: the ports of every backend, local or not: `tc_to_pod` looks a
//!   packet to a pod up only when its source port is set.
//! - `LB_CLUSTER_SET`, a set of 2^20 address bits (`addr_bit`) rather than ports: the ClusterIPs.
//!   `tc_from_pod` looks up whether a pod's packet to a port no frontend has is to a ClusterIP
//!   (and refuses it) only when its destination's bit is set.
//! - `LB_EXTERNAL_SET`, address bits too: the addresses with an external marker (LoadBalancer
//!   IPs, ExternalIPs). tc ingress and XDP look up whether a packet to a port no frontend has
//!   is to one (and drop it) only when its destination's bit is set.
//! - `LB_FRONTEND_SET`, address bits: every frontend's address and SNAT source. tc ingress,
//!   XDP and `tc_from_pod` look up a packet to a port of their port set only when its
//!   destination's bit is set too (pod to pod traffic to a port a service also exposes skips
//!   them). The datapath sets a SNAT source's bit itself when it makes the flow.
//!
//! Bits are only ever added: a flow whose backend or service is gone keeps its translation
//! until it ends. A port is added before the map entry that makes it matter is written. The
//! datapath ignores a set until its `OPT_*_READY` option says it is complete ([`enable`]).

use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData},
};
use lb_common::{
    Addr, BE_F_LOCAL, BackendValue, CT_F_REPLY, CT_F_SNAT, CtKey, CtValue, KF_ATOMICS,
    MAP_BACKENDS, MAP_CLUSTER_IPS, MAP_CONNTRACK, MAP_EXTERNAL_IPS, MAP_FRONTEND_ADDRS,
    MAP_INGRESS_PORTS, MAP_OPTIONS, MAP_POD_PORTS, MAP_POD_REPLY_PORTS, MAP_REPLY_PORTS,
    MAP_SERVICES, OPT_INGRESS_PORTS_READY, OPT_NAT_PORT_MAX, OPT_NAT_PORT_MIN, OPT_POD_PORTS_READY,
    OPT_REPLY_PORTS_READY, PORT_SET_WORDS, READY_FRONTEND_ADDRS, RETIRED_ADDRESS_SETS,
    SCOPE_EXTERNAL, ServiceKey, ServiceValue, addr_bit, nat_ports,
};

use super::{batch, kernel_features, mapped::MappedArray};

/// Every filter set as `lbctl status` shows it: its name, map, and the `LB_OPTIONS` entry and
/// bits that say the datapath trusts it.
pub const FILTER_SETS: [(&str, &str, u32, u32); 7] = [
    ("reply ports", MAP_REPLY_PORTS, OPT_REPLY_PORTS_READY, u32::MAX),
    ("ingress ports", MAP_INGRESS_PORTS, OPT_INGRESS_PORTS_READY, u32::MAX),
    ("pod ports", MAP_POD_PORTS, OPT_POD_PORTS_READY, u32::MAX),
    ("pod reply ports", MAP_POD_REPLY_PORTS, OPT_POD_PORTS_READY, u32::MAX),
    ("ClusterIPs", MAP_CLUSTER_IPS, OPT_POD_PORTS_READY, u32::MAX),
    ("external addresses", MAP_EXTERNAL_IPS, OPT_INGRESS_PORTS_READY, u32::MAX),
    ("frontend addresses", MAP_FRONTEND_ADDRS, OPT_INGRESS_PORTS_READY, READY_FRONTEND_ADDRS),
];

/// One bit set (65,536 ports, or 2^20 address bits): its map and a copy of its words (a bit
/// already set costs no syscall).
pub struct BitSet {
    name: &'static str,
    map: Array<MapData, u64>,
    words: Vec<u64>,
}

impl BitSet {
    /// The set `name` of the object, or `None` when the object has no such map (older builds,
    /// which the bench and the upgrade test load).
    pub fn open(ebpf: &Ebpf, name: &'static str) -> Result<Option<Self>> {
        if ebpf.map(name).is_none() {
            return Ok(None);
        }
        let Map::Array(data) = super::store::dup_map(ebpf, name)? else {
            bail!("{name} is not an array");
        };
        let mut words = vec![0u64; data.info()?.max_entries() as usize];
        // A chunk of words a system call (16,384 words make an address set).
        batch::for_each_chunk::<u32, u64>(&data, |keys, values| {
            for (&i, &word) in keys.iter().zip(values) {
                *words.get_mut(i as usize).context("a word past the set's end")? = word;
            }
            Ok(())
        })
        .with_context(|| format!("reading {name}"))?;
        Ok(Some(Self { name, map: Array::try_from(Map::Array(data))?, words }))
    }

    /// The address set `name`, or for an older build's object its retired 65,536-bit set.
    fn open_addresses(ebpf: &Ebpf, name: &'static str) -> Result<Option<Self>> {
        match RETIRED_ADDRESS_SETS.iter().find(|(_, now)| *now == name) {
            Some((old, _)) if ebpf.map(name).is_none() => Self::open(ebpf, old),
            _ => Self::open(ebpf, name),
        }
    }

    /// Adds an address's bit.
    fn add_addr(&mut self, addr: &Addr) -> Result<()> {
        let bit = if self.words.len() == PORT_SET_WORDS as usize {
            // A retired set's 16-bit fold (`bench --against` an older build).
            let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
            (x ^ (x >> 16)) & 0xffff
        } else {
            addr_bit(addr)
        };
        self.add_bit(bit)
    }

    /// Adds the ports `first..=last` (host order), writing each changed word once.
    pub fn add_range(&mut self, first: u32, last: u32) -> Result<()> {
        for (i, bits) in range_masks(first, last) {
            let word =
                *self.words.get(i).with_context(|| format!("bit {last} past {}", self.name))?;
            if word & bits != bits {
                self.words[i] |= bits;
                self.map
                    .set(i as u32, self.words[i], 0)
                    .with_context(|| format!("writing {}[{i}]", self.name))?;
            }
        }
        Ok(())
    }

    /// Adds a port (network byte order, as maps hold it).
    pub fn add(&mut self, port_be: u16) -> Result<()> {
        self.add_bit(u16::from_be(port_be).into())
    }

    pub fn add_bit(&mut self, bit: u32) -> Result<()> {
        self.add_range(bit, bit)
    }

    /// How many bits are set.
    fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// `LB_FRONTEND_SET`, mapped into memory: the datapath sets bits of it too (SNAT sources), so
/// bits are added with an atomic OR on the shared words, never by writing a word back from a
/// copy, which would clear the bits set meanwhile.
pub struct SharedAddrSet {
    words: MappedArray,
}

impl SharedAddrSet {
    /// The set `name` of the object, or `None` when the object has no such map.
    fn open(ebpf: &Ebpf, name: &'static str) -> Result<Option<Self>> {
        if ebpf.map(name).is_none() {
            return Ok(None);
        }
        let Map::Array(data) = super::store::dup_map(ebpf, name)? else {
            bail!("{name} is not an array");
        };
        Ok(Some(Self { words: MappedArray::new(data, name)? }))
    }

    fn add_addr(&self, addr: &Addr) -> Result<()> {
        let bit = addr_bit(addr);
        let word = self.words.u64s().get(bit as usize / 64).context("an address set too small")?;
        // Release: the bit is visible before the entry it lets packets reach is written.
        word.fetch_or(1 << (bit % 64), Ordering::Release);
        Ok(())
    }

    fn len(&self) -> usize {
        self.words.u64s().iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }
}

/// The words `first..=last` touches, each with the bits of the range it holds.
fn range_masks(first: u32, last: u32) -> impl Iterator<Item = (usize, u64)> {
    (first as usize / 64..=last as usize / 64).map(move |i| {
        let lo = (i * 64).max(first as usize);
        let hi = (i * 64 + 63).min(last as usize);
        (i, (u64::MAX >> (63 - (hi - lo))) << (lo % 64))
    })
}

/// The sets, as the map writer keeps them (each `None` when the object lacks its map, and all
/// for pins opened to be read).
#[derive(Default)]
pub struct PortFilters {
    reply: Option<BitSet>,
    ingress: Option<BitSet>,
    pod: Option<BitSet>,
    pod_reply: Option<BitSet>,
    cluster_ips: Option<BitSet>,
    external_ips: Option<BitSet>,
    frontend_addrs: Option<SharedAddrSet>,
}

impl PortFilters {
    pub fn open(ebpf: &Ebpf) -> Result<Self> {
        Ok(Self {
            reply: BitSet::open(ebpf, MAP_REPLY_PORTS)?,
            ingress: BitSet::open(ebpf, MAP_INGRESS_PORTS)?,
            pod: BitSet::open(ebpf, MAP_POD_PORTS)?,
            pod_reply: BitSet::open(ebpf, MAP_POD_REPLY_PORTS)?,
            cluster_ips: BitSet::open_addresses(ebpf, MAP_CLUSTER_IPS)?,
            external_ips: BitSet::open_addresses(ebpf, MAP_EXTERNAL_IPS)?,
            frontend_addrs: SharedAddrSet::open(ebpf, MAP_FRONTEND_ADDRS)?,
        })
    }

    /// Adds `b`'s port: to the reply set if it is a local backend, to the pod reply set
    /// whatever its node (call before writing `b`: a flow can reach it as soon as it is in
    /// `LB_BACKENDS`).
    pub fn note_backend(&mut self, b: &BackendValue) -> Result<()> {
        match self.pod_reply.as_mut() {
            // Port 0: an unused slot of `LB_BACKENDS` (`enable` reads them all).
            Some(set) if b.port_be != 0 => set.add(b.port_be)?,
            _ => {}
        }
        match self.reply.as_mut() {
            Some(set) if b.flags & BE_F_LOCAL != 0 => set.add(b.port_be),
            _ => Ok(()),
        }
    }

    /// Adds `key`'s port: to the ingress set if it is an external frontend, else to the pod
    /// set; an address marker (port 0) adds its address to the ClusterIP set (internal) or the
    /// external address set instead. Every frontend's address, marker or not, goes into the
    /// frontend address set (call before writing the entry).
    pub fn note_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        let external = key.scope == SCOPE_EXTERNAL;
        if let Some(set) = &self.frontend_addrs {
            set.add_addr(&key.addr)?;
        }
        let set = match (key.port_be == 0, external) {
            (true, true) => &mut self.external_ips,
            (true, false) => &mut self.cluster_ips,
            (false, true) => &mut self.ingress,
            (false, false) => &mut self.pod,
        };
        match set.as_mut() {
            Some(set) if key.port_be == 0 => set.add_addr(&key.addr),
            Some(set) => set.add(key.port_be),
            None => Ok(()),
        }
    }

    /// The sets that hold the SNAT range (replies to SNATed flows: remote backends', and a
    /// pod's own through a service).
    fn nat_range_sets(&mut self) -> impl Iterator<Item = &mut BitSet> {
        [self.ingress.as_mut(), self.pod.as_mut()].into_iter().flatten()
    }
}

/// The SNAT port range as `LB_OPTIONS` holds it (what the datapath allocates from).
fn stored_nat_range(options: &Array<&mut MapData, u32>) -> Result<(u32, u32)> {
    let opt = |i| options.get(&i, 0).context("reading LB_OPTIONS");
    let (first, count) = nat_ports(opt(OPT_NAT_PORT_MIN)?, opt(OPT_NAT_PORT_MAX)?);
    Ok((first, first + count - 1))
}

/// Adds the SNAT port range now in `LB_OPTIONS` to the ingress and pod sets (replies to
/// SNATed flows arrive on those ports). Run whenever the range is written, and by [`enable`].
pub fn note_nat_range(ebpf: &mut Ebpf) -> Result<()> {
    let mut filters = PortFilters::open(ebpf)?;
    let options = Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    let (first, last) = stored_nat_range(&options)?;
    filters.nat_range_sets().try_for_each(|set| set.add_range(first, last))
}

/// What [`enable`] found: ports set in each filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enabled {
    pub reply_ports: usize,
    pub ingress_ports: usize,
    pub pod_ports: usize,
    pub pod_reply_ports: usize,
    pub cluster_ips: usize,
    pub external_ips: usize,
}

/// Fills every set from the maps as they are (an upgrade from a build without them, or flows
/// whose backends or services are gone), then tells the datapath they are complete:
/// - reply ports: every local backend in `LB_BACKENDS`, and the source port of every reply
///   entry of a local backend in conntrack;
/// - ingress ports: every external frontend in `LB_SERVICES`, the SNAT range in `LB_OPTIONS`,
///   and the destination port of every other conntrack entry (a forward entry's frontend port,
///   a SNATed reply's NAT port, also from an earlier range);
/// - pod ports: every internal frontend, the SNAT range, and the destination port of every
///   entry but a local backend's reply (as for the ingress ports);
/// - pod reply ports: every backend, and the source port of every reply entry;
/// - ClusterIPs: every ClusterIP's marker in `LB_SERVICES`;
/// - external addresses: every external marker there;
/// - frontend addresses: every frontend's address, and the destination address of
///   every conntrack entry but a local backend's reply (a SNATed reply's SNAT source); the
///   datapath trusts it only after [`complete_frontend_addrs`].
///
/// Run at agent start, before or after attaching: until its option is set, the datapath does
/// not filter on a set. Sets the object lacks are skipped.
pub fn enable(ebpf: &mut Ebpf) -> Result<Enabled> {
    let mut filters = PortFilters::open(ebpf)?;
    let map = |name: &str| ebpf.map(name).with_context(|| format!("object has no map {name}"));
    let backends: Array<&MapData, BackendValue> = Array::try_from(map(MAP_BACKENDS)?)?;
    for b in backends.iter().flatten() {
        filters.note_backend(&b)?;
    }
    let services: HashMap<&MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(map(MAP_SERVICES)?)?;
    for key in services.keys().flatten() {
        filters.note_frontend(&key)?;
    }
    note_conntrack(ebpf, &mut filters)?;
    let mut options: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    let (first, last) = stored_nat_range(&options)?;
    filters.nat_range_sets().try_for_each(|set| set.add_range(first, last))?;
    let mut enabled = Enabled::default();
    for (set, ready, count) in [
        (&filters.reply, OPT_REPLY_PORTS_READY, &mut enabled.reply_ports),
        (&filters.ingress, OPT_INGRESS_PORTS_READY, &mut enabled.ingress_ports),
        (&filters.pod, OPT_POD_PORTS_READY, &mut enabled.pod_ports),
        (&filters.pod_reply, OPT_POD_PORTS_READY, &mut enabled.pod_reply_ports),
        (&filters.cluster_ips, OPT_POD_PORTS_READY, &mut enabled.cluster_ips),
        (&filters.external_ips, OPT_INGRESS_PORTS_READY, &mut enabled.external_ips),
    ] {
        if let Some(set) = set {
            *count = set.len();
            // (Also: the frontend address set is trusted only once `complete_frontend_addrs`
            // has run, after this agent's programs are in.)
            options.set(ready, 1, 0).context("writing LB_OPTIONS")?;
        }
    }
    Ok(enabled)
}

/// Completes `LB_FRONTEND_SET` once this agent's programs are attached, and tells the datapath
/// so: the programs they replaced (an older build's) may have made SNAT flows meanwhile
/// without setting their sources' bits, and [`enable`]'s look at conntrack came before those.
/// Returns how many bits are set (`None`: the object has no such set, or the kernel no atomics,
/// without which the datapath cannot add SNAT sources to it: the filter stays off).
pub fn complete_frontend_addrs(ebpf: &mut Ebpf) -> Result<Option<usize>> {
    if *kernel_features::probed() & KF_ATOMICS == 0 {
        return Ok(None);
    }
    let mut filters = PortFilters::open(ebpf)?;
    note_conntrack(ebpf, &mut filters)?;
    let Some(set) = filters.frontend_addrs.as_ref() else { return Ok(None) };
    let mut options: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    for option in [OPT_INGRESS_PORTS_READY, OPT_POD_PORTS_READY] {
        let ready = options.get(&option, 0).context("reading LB_OPTIONS")?;
        if ready == 0 {
            bail!("the frontend address set completed before the port sets (call enable first)");
        }
        options.set(option, ready | READY_FRONTEND_ADDRS, 0).context("writing LB_OPTIONS")?;
    }
    Ok(Some(set.len()))
}

/// Adds what every conntrack entry needs to keep matching: its source port to the reply sets
/// (a reply), else its destination port and address to the ingress and pod sets.
fn note_conntrack(ebpf: &Ebpf, filters: &mut PortFilters) -> Result<()> {
    let ct = ebpf.map(MAP_CONNTRACK).context("object has no map LB_CT")?;
    let Map::LruHashMap(ct) = ct else { bail!("LB_CT is not an LRU hash map") };
    batch::for_each_chunk::<CtKey, CtValue>(ct, |keys, values| {
        for (key, value) in keys.iter().zip(values) {
            if value.flags & CT_F_REPLY != 0
                && let Some(set) = filters.pod_reply.as_mut()
            {
                set.add(key.sport_be)?;
            }
            if value.flags & (CT_F_REPLY | CT_F_SNAT) == CT_F_REPLY {
                // A local backend's reply: it leaves through egress.
                if let Some(set) = filters.reply.as_mut() {
                    set.add(key.sport_be)?;
                }
            } else {
                for set in [filters.ingress.as_mut(), filters.pod.as_mut()].into_iter().flatten() {
                    set.add(key.dport_be)?;
                }
                if let Some(set) = &filters.frontend_addrs {
                    set.add_addr(&key.daddr)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `add_range` writes hold exactly the range's bits, checked port by port.
    #[test]
    fn range_masks_cover_exactly_the_range() {
        for (first, last) in [(0, 0), (0, 63), (5, 9), (63, 64), (61000, 65535), (130, 1000)] {
            let mut words = vec![0u64; PORT_SET_WORDS as usize];
            for (i, bits) in range_masks(first, last) {
                assert_eq!(words[i], 0, "word {i} twice");
                words[i] = bits;
            }
            for port in 0..=65535u32 {
                let set = words[port as usize / 64] & (1 << (port % 64)) != 0;
                assert_eq!(set, (first..=last).contains(&port), "{first}..={last}: port {port}");
            }
        }
    }
}
