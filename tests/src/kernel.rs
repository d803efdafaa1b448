//! The real eBPF object in the real kernel, driven by BPF_PROG_TEST_RUN.
//!
//! A test builds a packet, sets up maps, runs a program and checks the verdict, the bytes that
//! came out and the map state. Maps are private to each [`Datapath`] (nothing is pinned), so
//! tests run in parallel and leave nothing behind.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{Program, TestRun, TestRunOptions},
};
use lb_agent::{
    dataplane::{
        counters,
        loader::{self, LoadOptions, MapSizes},
        programs,
        store::KernelStore,
        writer::{Writer, WriterConfig},
    },
    model::maglev,
};
use lb_common::{
    BackendValue, MAP_BACKENDS, MAP_SERVICES, STAT_NAMES, ServiceKey, ServiceStats, ServiceValue,
};

/// Runs `f` in a network namespace of this process with no device up and no route when the
/// calling thread is in the process's own namespace (the machine's), else (a test's namespace,
/// such as a `RoutedNode`'s) where it is. The programs' route lookups then find nothing,
/// whatever the machine's routes and forwarding: a service address's unknown port, say, is
/// dropped only where the node would forward it. The thread moves there and back (two
/// setns calls); the namespace is anonymous (held by an fd): it goes with the process.
pub fn in_quiet_netns<R>(f: impl FnOnce() -> R) -> R {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    fn open(p: &str) -> std::fs::File {
        std::fs::File::open(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }
    fn enter(fd: i32) {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
    static QUIET: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    thread_local! {
        /// This thread's namespace if it is the process's own (a thread keeps the namespace
        /// it starts in: tests enter others on threads of their own), asked once.
        static HOME: Option<OwnedFd> = {
            let (home, own) = (open("/proc/thread-self/ns/net"), open("/proc/self/ns/net"));
            let ino = |f: &std::fs::File| f.metadata().map(|m| m.ino()).ok();
            (ino(&home) == ino(&own)).then(|| OwnedFd::from(home))
        };
        /// In the quiet namespace now (a caller wrapped a whole loop).
        static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    /// Takes the thread home however `f` ends.
    struct Home(i32);
    impl Drop for Home {
        fn drop(&mut self) {
            enter(self.0);
            INSIDE.set(false);
        }
    }
    let home = HOME.with(|h| h.as_ref().map(|fd| fd.as_raw_fd()));
    let Some(home) = home.filter(|_| !INSIDE.get()) else { return f() };
    let quiet = QUIET.get_or_init(|| {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which ends here.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            OwnedFd::from(open("/proc/thread-self/ns/net"))
        })
        .join()
        .expect("a quiet namespace")
    });
    enter(quiet.as_raw_fd());
    INSIDE.set(true);
    let _home = Home(home);
    f()
}

/// Room a program may add to a packet (encapsulation, options) in the output buffer.
const OUTPUT_HEADROOM: usize = 256;

/// Small maps: tests load many copies at once.
pub const TEST_MAP_SIZES: MapSizes = MapSizes {
    max_services: 1024,
    max_frontends: 4096,
    max_backends: 1024,
    maglev_slots: 1 << 16,
    max_conntrack: 16384,
};

/// The clock conntrack entries are stamped with (bpf_ktime_get_coarse_ns).
pub use lb_agent::dataplane::conntrack_gc::datapath_now_ns as coarse_now_ns;

/// A stamp of that clock `secs` seconds ago, for entries aged by moving their stamps back. The
/// clock starts at boot, so a test cannot age an entry by more than the machine's uptime: it
/// says so rather than wrapping round to a stamp far in the future.
pub fn secs_ago_ns(secs: u64) -> u64 {
    let now = coarse_now_ns();
    now.checked_sub(secs * 1_000_000_000).unwrap_or_else(|| {
        panic!("cannot age by {secs} s: the machine booted {} s ago", now / 1_000_000_000)
    })
}

/// Why a run on a CHECKSUM_COMPLETE skb ([`Datapath::run_checksum_complete`]) gave no output.
#[derive(Debug)]
pub enum SummedRunError {
    /// The program left the skb's sum wrong (the kernel's check after the run: EBADMSG).
    SumLeftWrong,
    /// The kernel would not run it at all (a packet too short for an skb, say).
    Refused(String),
}

impl std::fmt::Display for SummedRunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SumLeftWrong => f.write_str("the skb's CHECKSUM_COMPLETE sum was left wrong"),
            Self::Refused(why) => f.write_str(why),
        }
    }
}

/// What a program did with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// The program's return value (TC_ACT_*, XDP_*).
    pub verdict: i32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Kernel-reported run time.
    pub duration_ns: u64,
}

pub struct Datapath {
    pub ebpf: Ebpf,
    sizes: MapSizes,
    writer: Option<Writer<KernelStore>>,
    /// `--answer-service-pings` of the writer.
    answer_service_pings: bool,
}

impl Datapath {
    /// Loads the embedded object with private maps. Its programs are loaded (verified) as a
    /// test first runs each ([`Self::try_run`]), or all at once by [`Self::load_programs`]:
    /// the verifier's walk of the device programs is most of a load's time, the more so on
    /// 6.1 in an emulated VM (`older_kernel`), and most tests run two or three of them.
    pub fn load() -> Self {
        Self::load_with(TEST_MAP_SIZES)
    }

    pub fn load_with(sizes: MapSizes) -> Self {
        let object = lb_agent::ebpf_object().unwrap_or_else(|e| panic!("{e:#}"));
        Self::load_object(sizes, object)
    }

    /// [`Self::load_with`] for another build of the kernel programs (an ELF object).
    pub fn load_object(sizes: MapSizes, object: &[u8]) -> Self {
        let mut ebpf = loader::load_object(&LoadOptions { bpffs: None, sizes }, object)
            .unwrap_or_else(|e| panic!("loading the eBPF object: {e:#}"));
        // As the agent does at start (it skips the filters older builds, which the bench
        // loads, lack).
        lb_agent::dataplane::port_filters::enable(&mut ebpf).unwrap_or_else(|e| panic!("{e:#}"));
        lb_agent::dataplane::port_filters::complete_frontend_addrs(&mut ebpf)
            .unwrap_or_else(|e| panic!("{e:#}"));
        Self { ebpf, sizes, writer: None, answer_service_pings: true }
    }

    /// Loads (verifies) every program not loaded yet, as the agent does at start (before
    /// attaching them); what each load cost.
    pub fn load_programs(&mut self) -> Vec<programs::Loaded> {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        names.iter().filter_map(|n| self.load_program(n)).collect()
    }

    /// Loads (verifies) program `name` unless it is loaded already.
    pub fn load_program(&mut self, name: &str) -> Option<programs::Loaded> {
        programs::load_if_needed(&mut self.ebpf, name).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs a tc or XDP program once on `packet`; `Err` carries the kernel's refusal (for
    /// example a frame too short for the headers its ethertype announces, which the kernel
    /// refuses for skb programs).
    pub fn try_run(&mut self, name: &str, packet: &[u8]) -> Result<RunOutput, String> {
        self.try_run_ctx(name, packet, None)
    }

    /// [`Self::try_run`] with a context (`__sk_buff` or `xdp_md` bytes) passed in.
    pub fn try_run_ctx(
        &mut self,
        name: &str,
        packet: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<RunOutput, String> {
        self.load_program(name);
        self.try_run_loaded(name, packet, ctx)
    }

    /// [`Self::run`] of a program already loaded ([`Self::load_programs`]): the bench's
    /// datapaths take turns on each packet through shared references.
    pub fn run_loaded(&self, name: &str, packet: &[u8]) -> RunOutput {
        self.try_run_loaded(name, packet, None)
            .unwrap_or_else(|e| panic!("test run of {name}: {e}"))
    }

    fn try_run_loaded(
        &self,
        name: &str,
        packet: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<RunOutput, String> {
        let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..Default::default()
        };
        let program = self.ebpf.program(name);
        let run = move || match program {
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            Some(Program::Xdp(p)) => p.test_run(opts),
            Some(_) => panic!("{name} cannot be test-run"),
            None => panic!("object has no program {name}"),
        };
        let result = in_quiet_netns(run).map_err(|e| format!("{e:?}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutput {
            verdict: result.return_value as i32,
            packet: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }

    /// The descriptor of loaded tc or XDP program `name`.
    pub fn program_fd(&self, name: &str) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        let fd = match self.ebpf.program(name) {
            Some(Program::SchedClassifier(p)) => p.fd(),
            Some(Program::Xdp(p)) => p.fd(),
            _ => panic!("{name} is no tc or XDP program"),
        };
        fd.unwrap_or_else(|e| panic!("{name} is not loaded: {e}")).as_fd()
    }

    pub fn run(&mut self, name: &str, packet: &[u8]) -> RunOutput {
        self.try_run(name, packet).unwrap_or_else(|e| panic!("test run of {name}: {e}"))
    }

    /// Runs tc program `name` once on `packet` as a NIC that sums every packet hands it over
    /// (CHECKSUM_COMPLETE): the kernel puts the packet's sum into the skb first and, after the
    /// run, refuses the result (EBADMSG) when the program's changes left that sum wrong,
    /// which the stack would later take for a corrupt packet. (aya 0.14 cannot pass the flag.)
    pub fn run_checksum_complete(
        &mut self,
        name: &str,
        packet: &[u8],
    ) -> Result<RunOutput, SummedRunError> {
        self.load_program(name);
        self.run_checksum_complete_loaded(name, packet)
    }

    /// [`Self::run_checksum_complete`] of a program already loaded (as [`Self::run_loaded`]).
    pub fn run_checksum_complete_loaded(
        &self,
        name: &str,
        packet: &[u8],
    ) -> Result<RunOutput, SummedRunError> {
        use std::os::fd::{AsFd, AsRawFd};
        /// The BPF_PROG_TEST_RUN member of `union bpf_attr`.
        #[repr(C)]
        #[derive(Default)]
        struct TestRunAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
        let Some(Program::SchedClassifier(p)) = self.ebpf.program(name) else {
            panic!("{name} is no tc program")
        };
        let fd = p.fd().map_err(|e| SummedRunError::Refused(format!("{name}: {e:?}")))?;
        let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
        let mut attr = TestRunAttr {
            prog_fd: fd.as_fd().as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
            ..Default::default()
        };
        // SAFETY: the attr is the command's member, zero past its fields; the pointers are
        // valid for the sizes given for the call's duration.
        unsafe { lb_agent::dataplane::sys_bpf::bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(
            |e| match e.raw_os_error() {
                Some(libc::EBADMSG) => SummedRunError::SumLeftWrong,
                _ => SummedRunError::Refused(format!("{name} with CHECKSUM_COMPLETE: {e}")),
            },
        )?;
        out.truncate(attr.data_size_out as usize);
        Ok(RunOutput {
            verdict: attr.retval as i32,
            packet: out,
            duration_ns: attr.duration as u64,
        })
    }

    /// Runs XDP `name` on `packet` as if it arrived on interface `ifindex` of the calling
    /// thread's network namespace (routes and neighbours are looked up there).
    pub fn run_xdp_on(&mut self, name: &str, packet: &[u8], ifindex: u32) -> RunOutput {
        self.load_program(name);
        self.run_xdp_on_loaded(name, packet, ifindex)
    }

    /// [`Self::run_xdp_on`] of a program already loaded (as [`Self::run_loaded`]).
    pub fn run_xdp_on_loaded(&self, name: &str, packet: &[u8], ifindex: u32) -> RunOutput {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        self.try_run_loaded(name, packet, Some(&ctx))
            .unwrap_or_else(|e| panic!("test run of {name} on ifindex {ifindex}: {e}"))
    }

    /// Runs tc program `name` on `packet` as if it arrived on interface `ifindex` of the
    /// calling thread's network namespace; `gso_size` > 0 makes it a GSO packet of segments
    /// that size.
    pub fn run_tc_on(
        &mut self,
        name: &str,
        packet: &[u8],
        ifindex: u32,
        gso_size: u32,
    ) -> RunOutput {
        self.load_program(name);
        self.run_tc_on_loaded(name, packet, ifindex, gso_size)
    }

    /// [`Self::run_tc_on`] of a program already loaded (as [`Self::run_loaded`]).
    pub fn run_tc_on_loaded(
        &self,
        name: &str,
        packet: &[u8],
        ifindex: u32,
        gso_size: u32,
    ) -> RunOutput {
        // struct __sk_buff: gso_segs at 164, gso_size at 176.
        let mut ctx = lb_agent::explain::skb_ctx(ifindex);
        if gso_size > 0 {
            let segs = packet.len().div_ceil(gso_size as usize) as u32;
            ctx[164..168].copy_from_slice(&segs.to_ne_bytes());
            ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        }
        self.try_run_loaded(name, packet, Some(&ctx))
            .unwrap_or_else(|e| panic!("test run of {name} on ifindex {ifindex}: {e}"))
    }

    /// Sets the writer's `--answer-service-pings` (before anything is programmed).
    pub fn answer_service_pings(&mut self, on: bool) {
        assert!(self.writer.is_none(), "set before programming");
        self.answer_service_pings = on;
    }

    /// The writer over this datapath's maps (created on first use).
    pub fn writer(&mut self) -> &mut Writer<KernelStore> {
        if self.writer.is_none() {
            let store = KernelStore::new(&self.ebpf).expect("open maps");
            let cfg = WriterConfig {
                maglev_max_size: maglev::DEFAULT_MAX_SIZE,
                max_services: self.sizes.max_services,
                answer_service_pings: self.answer_service_pings,
            };
            self.writer = Some(Writer::new(store, cfg).expect("writer"));
        }
        self.writer.as_mut().unwrap()
    }

    /// Programs the plans of one Service object, as the agent would.
    pub fn program(&mut self, name: &str, plans: &[lb_agent::model::plan::ServicePlan]) {
        let key = lb_agent::state::ObjKey::new("default", name);
        let report = self
            .writer()
            .apply_object(&key, plans)
            .unwrap_or_else(|e| panic!("programming {name}: {e:#}"));
        assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    }

    /// The id the writer gave service `name`.
    pub fn service_id(&mut self, name: &str) -> u32 {
        let found = self.writer().service_ids().find(|(k, _)| k.name == name).map(|(_, id)| id);
        found.unwrap_or_else(|| panic!("no service {name}"))
    }

    /// Node-wide datapath options, as the agent writes them from its flags.
    pub fn set_options(&mut self, opts: &lb_agent::dataplane::options::Options) {
        lb_agent::dataplane::options::write(&mut self.ebpf, opts).expect("write LB_OPTIONS");
    }

    /// This node's SNAT addresses.
    pub fn set_node(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>) {
        self.writer().set_node_addresses(v4, v6).expect("write LB_NODE");
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Vec<(lb_common::CtKey, lb_common::CtValue)> {
        let map: HashMap<&MapData, lb_common::CtKey, lb_common::CtValue> =
            HashMap::try_from(self.ebpf.map(lb_common::MAP_CONNTRACK).expect("ct map"))
                .expect("ct map type");
        map.iter().map(|r| r.expect("read ct")).collect()
    }

    /// The conntrack entries in key order, their clock stamps zeroed and, unless `keep_state`,
    /// their states too (replies move a flow's state; its translation stays): for comparing
    /// the flows before and after a test's storm of packets.
    pub fn conntrack_sorted(
        &self,
        keep_state: bool,
    ) -> Vec<(lb_common::CtKey, lb_common::CtValue)> {
        let mut ct: Vec<_> = self
            .conntrack()
            .into_iter()
            .map(|(k, v)| {
                let state = if keep_state { v.state } else { 0 };
                (k, lb_common::CtValue { last_seen_ns: 0, state, ..v })
            })
            .collect();
        ct.sort_by_key(|(k, _)| *k);
        ct
    }

    /// Starts watching conntrack through a packet storm ([`StormWatch`]).
    pub fn watch_conntrack(&self) -> StormWatch {
        StormWatch { before: self.conntrack_sorted(false), ended: Default::default() }
    }

    /// Writes `entries` back (as [`Datapath::conntrack_sorted`] with its state kept read them),
    /// stamped now: after a packet storm, flows a mutated reset or FIN ended start from their
    /// first states again, as a new handshake would leave them, rather than expire within
    /// seconds by design (on a slow machine, before the checks that follow the storm).
    pub fn restore_conntrack(&mut self, entries: &[(lb_common::CtKey, lb_common::CtValue)]) {
        let now = secs_ago_ns(0);
        for (k, v) in entries {
            self.set_conntrack(*k, lb_common::CtValue { last_seen_ns: now, ..*v });
        }
    }

    /// The conntrack map itself, for the agent's readers (the sweep, the batch reader).
    pub fn conntrack_map(&self) -> &MapData {
        match self.ebpf.map(lb_common::MAP_CONNTRACK) {
            Some(aya::maps::Map::LruHashMap(map)) => map,
            _ => panic!("no LB_CT LRU hash map"),
        }
    }

    /// An independent handle on one of the object's maps (a duplicated descriptor), for the
    /// agent's and lbctl's code that owns its map.
    pub fn map_handle(&self, name: &str) -> aya::maps::MapData {
        use aya::maps::Map;
        use std::os::fd::AsFd;
        let data = match self.ebpf.map(name) {
            Some(
                Map::Array(d)
                | Map::HashMap(d)
                | Map::RingBuf(d)
                | Map::PerCpuArray(d)
                | Map::LruHashMap(d),
            ) => d,
            _ => panic!("no map {name} of a known kind"),
        };
        let fd = data.fd().as_fd().try_clone_to_owned().expect("duplicating a map descriptor");
        aya::maps::MapData::from_fd(fd).expect("reopening a map")
    }

    /// The conntrack lifetimes this datapath's options set.
    pub fn ct_timeouts(&self) -> lb_common::CtTimeouts {
        let options = self.ebpf.map(lb_common::MAP_OPTIONS).expect("options map");
        lb_agent::dataplane::options::ct_timeouts(options).expect("read options")
    }

    /// One conntrack sweep, as the agent's (by the lifetimes of this datapath's options).
    pub fn sweep_conntrack(&self) -> lb_agent::dataplane::conntrack_gc::Sweep {
        let t = self.ct_timeouts();
        lb_agent::dataplane::conntrack_gc::sweep(self.conntrack_map(), &t).expect("sweep")
    }

    /// Flushes the UDP flows of endpoints the last programming took away, as the agent's
    /// conntrack worker does after each sync; returns the entries removed.
    pub fn flush_stale_udp(&mut self) -> u64 {
        use lb_agent::dataplane::conntrack_gc::{UdpFlush, flush_udp};
        let stale = UdpFlush::To(self.writer().take_stale_udp());
        stale.stale().map_or(0, |s| flush_udp(self.conntrack_map(), &s).expect("flush"))
    }

    /// A new writer over the same maps, as a restarted agent makes: it adopts what they hold
    /// until [`Datapath::finish_restart`].
    pub fn restart_writer(&mut self) {
        self.writer = None;
        self.writer();
    }

    /// Ends a restart's initial sync, then flushes the UDP flows to endpoints no UDP service
    /// port uses any more, as the agent does at start; returns the entries removed.
    pub fn finish_restart(&mut self) -> u64 {
        use lb_agent::dataplane::conntrack_gc::{UdpFlush, flush_udp};
        self.writer().finish_initial_sync().expect("finish initial sync");
        let in_use = UdpFlush::AllBut(self.writer().udp_targets());
        in_use.stale().map_or(0, |s| flush_udp(self.conntrack_map(), &s).expect("flush"))
    }

    /// Destroys the connected UDP sockets the socket hooks sent to endpoints `which` names, as
    /// the agent's conntrack worker does after a flush.
    pub fn destroy_udp_sockets(
        &self,
        which: &lb_agent::dataplane::conntrack_gc::UdpFlush,
    ) -> lb_agent::dataplane::sock_destroy::Destroyed {
        let revnat = match self.ebpf.map(lb_common::MAP_SOCK_REVNAT) {
            Some(aya::maps::Map::LruHashMap(map)) => map,
            _ => panic!("no LB_SOCK_RNAT LRU hash map"),
        };
        let Some(stale) = which.stale() else { return Default::default() };
        lb_agent::dataplane::sock_destroy::destroy(revnat, &stale).expect("destroy sockets")
    }

    fn conntrack_mut(&mut self) -> HashMap<&mut MapData, lb_common::CtKey, lb_common::CtValue> {
        HashMap::try_from(self.ebpf.map_mut(lb_common::MAP_CONNTRACK).expect("ct map"))
            .expect("ct map type")
    }

    /// Adds a conntrack entry; `false` when the key exists already.
    pub fn insert_conntrack(&mut self, key: lb_common::CtKey, value: lb_common::CtValue) -> bool {
        const BPF_NOEXIST: u64 = 1;
        self.conntrack_mut().insert(key, value, BPF_NOEXIST).is_ok()
    }

    /// Replaces a conntrack entry.
    pub fn set_conntrack(&mut self, key: lb_common::CtKey, value: lb_common::CtValue) {
        self.conntrack_mut().insert(key, value, 0).expect("set ct entry");
    }

    /// Adds or replaces a frontend.
    pub fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) {
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).expect("services map"))
                .expect("services map type");
        map.insert(key, value, 0).expect("insert service");
    }

    pub fn insert_backend(&mut self, id: u32, value: BackendValue) {
        let mut map: Array<&mut MapData, BackendValue> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).expect("backends map"))
                .expect("backends map type");
        map.set(id, value, 0).expect("set backend");
    }

    /// Clears `addr`'s bit in the address set `map`, as an object without the set (an
    /// upgrade) leaves it.
    pub fn clear_addr_bit(&mut self, map: &str, addr: IpAddr) {
        let bit = lb_common::addr_bit(&lb_common::addr_from_ip(addr));
        let mut set: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(map).expect("map")).expect("array");
        let word = set.get(&(bit / 64), 0).expect("read the word");
        set.set(bit / 64, word & !(1 << (bit % 64)), 0).expect("write the word");
    }

    /// Whether the port set `map` has `port` (what the datapath checks before its lookups).
    pub fn port_set(&self, map: &str, port: u16) -> bool {
        self.bit_set(map, port.into())
    }

    /// Whether `addr`'s bit is set in the address set `map`.
    pub fn addr_set(&self, map: &str, addr: IpAddr) -> bool {
        self.bit_set(map, lb_common::addr_bit(&lb_common::addr_from_ip(addr)))
    }

    fn bit_set(&self, map: &str, bit: u32) -> bool {
        let map: aya::maps::Array<&aya::maps::MapData, u64> =
            aya::maps::Array::try_from(self.ebpf.map(map).expect("map")).expect("array");
        map.get(&(bit / 64), 0).expect("word") & (1 << (bit % 64)) != 0
    }

    /// A global counter (`STAT_*`), summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        counters::global_one(&self.ebpf, index).expect("read counter")
    }

    /// Every named global counter, for snapshots and deltas.
    pub fn stats(&self) -> Vec<u64> {
        STAT_NAMES.iter().map(|&(i, _)| self.stat(i)).collect()
    }

    pub fn service_stats(&self, service_id: u32) -> ServiceStats {
        counters::service(&self.ebpf, service_id).expect("read service counters")
    }
}

/// Differences between two [`Datapath::stats`] snapshots, by counter name, non-zero only.
/// Runs `prog` on `packet`, checks the checksums of what came out, and returns the verdict
/// and a summary of the packet (which must be TCP or UDP).
pub fn run_checked(dp: &mut Datapath, prog: &str, packet: &[u8]) -> (i32, crate::packets::Summary) {
    let out = dp.run(prog, packet);
    crate::packets::checksums_ok(&out.packet).unwrap_or_else(|e| panic!("{prog}: {e}"));
    (out.verdict, crate::packets::summarize(&out.packet).expect("a TCP/UDP packet"))
}

pub fn stat_deltas(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    STAT_NAMES
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(&(_, name), (b, a))| (name, a - b))
        .collect()
}

/// A frontend key in the external scope, for device-hook tests.
pub fn external_key(ip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey::new(ip, port, proto, lb_common::SCOPE_EXTERNAL)
}

/// A private directory on bpffs for pinning tests, removed (with its pins) on drop.
pub struct PinDir {
    pub path: std::path::PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        static STALE_SWEEP: std::sync::Once = std::sync::Once::new();
        STALE_SWEEP.call_once(|| {
            crate::cgroup::remove_stale_in(std::path::Path::new("/sys/fs/bpf"), |p| {
                let _ = std::fs::remove_dir_all(p);
            })
        });
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lbt-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {} (is bpffs mounted?): {e}", path.display()));
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Conntrack through a storm of mutated packets: every entry stays as it was, but for flows a
/// mutated reset or FIN ended, whose entries may expire within the storm (lifetimes of a
/// second or so: a slow or busy machine's storm outlasts them) and are then gone, rightly.
pub struct StormWatch {
    before: Vec<(lb_common::CtKey, lb_common::CtValue)>,
    /// Entries seen in an ended state.
    ended: std::collections::HashSet<lb_common::CtKey>,
}

impl StormWatch {
    /// Notes which entries a packet has ended so far; call it every few dozen packets (an
    /// ended entry lives a second at least, far longer than those take).
    pub fn look(&mut self, dp: &Datapath) {
        for (k, v) in dp.conntrack() {
            if lb_common::ct_state_ended(v.state) {
                self.ended.insert(k);
            }
        }
    }

    /// Panics unless conntrack is as it was before the storm, entries seen ended aside.
    pub fn check(&self, dp: &Datapath) {
        let after = dp.conntrack_sorted(false);
        let expired = |(k, _): &&(lb_common::CtKey, lb_common::CtValue)| {
            self.ended.contains(k) && !after.iter().any(|(a, _)| a == k)
        };
        let kept: Vec<_> = self.before.iter().filter(|e| !expired(e)).copied().collect();
        assert_eq!(after, kept, "conntrack after the storm (ended flows' entries aside)");
    }
}
