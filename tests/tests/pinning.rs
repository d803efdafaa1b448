//! Maps pinned by one agent are reused by the next (traffic state survives a restart), and a
//! pinned map of another shape is refused with a clear error instead of being misread.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use lb_agent::dataplane::loader::{self, LoadOptions, MapSizes};
use lb_common::*;
use lb_tests::{
    kernel::{PinDir, TEST_MAP_SIZES},
    require_root,
};

fn services(ebpf: &aya::Ebpf) -> HashMap<&MapData, ServiceKey, ServiceValue> {
    HashMap::try_from(ebpf.map(MAP_SERVICES).unwrap()).unwrap()
}

#[test]
fn a_second_load_reuses_pinned_maps_and_other_sizes_are_refused() {
    require_root!();
    let pins = PinDir::new("pinning");
    let opts = LoadOptions { bpffs: Some(pins.path.clone()), sizes: TEST_MAP_SIZES };
    let key = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1).into(), 443, PROTO_TCP, SCOPE_INTERNAL);
    let value = ServiceValue { service_id: 5, ..Default::default() };
    {
        let mut first = loader::load(&opts).expect("first load");
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(first.map_mut(MAP_SERVICES).unwrap()).unwrap();
        map.insert(key, value, 0).unwrap();
    }
    let pinned = loader::maps_pin_dir(&pins.path).join(MAP_SERVICES);
    assert!(pinned.exists(), "{} not pinned", pinned.display());

    // The first agent is gone; the entry it wrote is still there for the next one.
    let second = loader::load(&opts).expect("second load");
    assert_eq!(services(&second).get(&key, 0).unwrap(), value);
    drop(second);

    let bigger = MapSizes { max_frontends: TEST_MAP_SIZES.max_frontends * 2, ..TEST_MAP_SIZES };
    let err = loader::load(&LoadOptions { bpffs: Some(pins.path.clone()), sizes: bigger })
        .expect_err("a pinned map of another capacity must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains(MAP_SERVICES) && msg.contains("expects"), "unclear error: {msg}");
}
