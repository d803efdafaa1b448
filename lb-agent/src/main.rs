//! `lb-agent`: the node agent. Loads the datapath, pins its maps, attaches it to the node's
//! devices and cgroup, and keeps the maps in step with the Services, EndpointSlices and Nodes of
//! its source: the Kubernetes API (kubeconfig or in-cluster), or a manifests folder.

use futures::{StreamExt, stream::BoxStream};
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lb_agent::{
    config::{ModelConfig, NodePortAddresses},
    dataplane::{
        attach, conntrack_gc, counters, kernel_features, links,
        links::LinkPins,
        loader::{self, LoadOptions, MapSizes},
        mounts, netdev, options, pin_lock,
        pod_devices::{self, PodDevices},
        port_filters, programs,
        store::{KernelStore, WriteCounts},
        writer::{Writer, WriterConfig},
    },
    kube_proxy_config,
    model::maglev,
    serve::{
        self, endpoints,
        endpoints::Status,
        health_check::HealthServers,
        metrics::{KindLabel, MapLabel, PolicyLabel, ProgramLabel},
    },
    sources::{
        Event, Object,
        kube::{self, KINDS, Kind, KubeMsg},
        manifests::ManifestsDir,
    },
    sync::{SyncReport, Syncer},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

#[derive(Parser, Debug)]
// A flag given twice takes its last value (a ConfigMap's extra flags can override defaults).
#[command(
    about = "eBPF service load balancer: node agent (a kube-proxy replacement)",
    args_override_self = true
)]
struct Args {
    /// Folder of Kubernetes manifests (Service, EndpointSlice, Node) to serve, watched for
    /// changes: runs without a cluster. Without it, the Kubernetes API is watched.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the API server (default: in-cluster configuration, else ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the configuration's: a cluster without kube-proxy cannot reach
    /// the `kubernetes` ClusterIP before this agent programs it.
    #[arg(long)]
    k8s_api_server: Option<String>,
    /// This node's name: decides which endpoints are local and which Node object is ours.
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Devices that receive traffic from outside clients (NodePort, ExternalIP, LB IP): names,
    /// `PREFIX+` for every device whose name starts with PREFIX (`eth+`), or `auto`: those the
    /// default routes leave by and those holding a --node-ip address. A device absent at start
    /// is attached when it appears (on netlink's word), as are new ones a pattern matches.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// The node's side of pods' devices (names and `PREFIX+` patterns: `lxc+`, `veth+`,
    /// `cali+`): pods' own service traffic is translated per packet there (ClusterIP,
    /// NodePort, ExternalIP, LB IP, by internalTrafficPolicy), as the devices come and go.
    /// Needed with --socket-lb-host-namespace-only.
    #[arg(long, value_delimiter = ',')]
    pod_devices: Vec<String>,
    /// The socket hooks translate only sockets of the host's network namespace (host
    /// processes, hostNetwork pods): a pod's connection to a service leaves its socket still
    /// addressed to the service, and --pod-devices translate its packets. What service meshes
    /// (Istio's sidecar redirect, Linkerd) need to see the service address, as Cilium's
    /// socketLB.hostNamespaceOnly.
    #[arg(long, requires = "pod_devices")]
    socket_lb_host_namespace_only: bool,
    /// Attach the tc programs as TCX links (kernel 6.6+). false, or a kernel without TCX: as
    /// filters of a clsact qdisc (over netlink), which stay when the agent exits and which
    /// the next agent replaces in place, as it swaps programs into pinned links (Cilium's
    /// --enable-tcx).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    enable_tcx: bool,
    /// Attach XDP to the devices too (native when the driver supports it, else generic).
    #[arg(long)]
    xdp: bool,
    /// With --xdp: may XDP send a flow to another node's backend (and its replies) out of the
    /// device itself (XDP_TX; XDP_REDIRECT between such devices)? auto: yes for native XDP on
    /// anything but veth.
    #[arg(long, value_enum, default_value_t)]
    xdp_tx: attach::XdpTx,
    /// How outside clients' TCP connections to a service without endpoints are refused.
    #[arg(long, value_enum, default_value_t)]
    reject_tcp_with: options::RejectTcpWith,
    /// How outside clients' flows reach other nodes' backends (policy Cluster): snat (through
    /// this node both ways, as kube-proxy) or hybrid (TCP by direct server return: the backend
    /// sees the client and its node answers directly; needs a network that passes service
    /// addresses as sources between nodes, IPv4 options and IPv6 destination options). Every
    /// node alike.
    #[arg(long, value_enum, default_value_t)]
    lb_mode: options::LbMode,
    /// Source ports for SNAT to other nodes' backends, FIRST-LAST: each backend address and
    /// port takes this many concurrent flows from each node address. Must lie outside the
    /// node's ephemeral ports (net.ipv4.ip_local_port_range).
    #[arg(long, default_value_t)]
    nat_port_range: options::PortRange,
    /// cgroup v2 directory whose processes (the node's pods and host) reach services through
    /// the socket hooks: the node's root cgroup in production.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory where maps are pinned, so that an agent restart keeps traffic flowing.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// NodePorts answer only on node addresses inside these CIDRs, or (`primary`) on the
    /// node's primary address of each family (default: every address of the node: its Node
    /// object's, --node-ip, and those of the attached devices, as they come and go).
    #[arg(long, value_parser = NodePortAddresses::parse, default_value = "", hide_default_value = true)]
    nodeport_addresses: NodePortAddresses,
    /// Host processes reach NodePorts on 127.0.0.1 too, as with kube-proxy's iptables mode
    /// (unless --nodeport-addresses leaves 127.0.0.1 out). Pods' loopback stays their own.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// The device hooks translate ClusterIPs too, for clients outside the cluster that the
    /// network routes the service range to (BGP-advertised ClusterIPs), as kube-proxy's rules
    /// do: off-cluster clients reach the same endpoints as pods (internalTrafficPolicy), with
    /// SNAT to other nodes' ones. Off by default: every packet to a ClusterIP's port then pays
    /// the device hooks' lookups.
    #[arg(long)]
    external_clusterip: bool,
    /// Service addresses outside clients reach (LoadBalancer IPs, ExternalIPs) answer ICMP
    /// echo requests on the node devices, as kube-proxy's IPVS mode answers them (the address
    /// is on a local dummy device there). Off: pings are dropped with every other packet to
    /// a port or protocol no service has on such an address (rather than sent back out by the
    /// routes: a loop). Addresses that are also the node's are left to the stack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    answer_service_pings: bool,
    /// Addresses of this node, in addition to those its Node object lists.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// Service ports (per IP family) the maps can hold.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Frontend entries (address, port, protocol, scope) the maps can hold.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// Backends (endpoint address and port) the maps can hold.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Maglev slots shared by all backend sets (4 bytes each).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_SLOTS)]
    maglev_slots: u32,
    /// Conntrack entries for flows through the devices (two per flow; LRU when full).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_CONNTRACK)]
    max_conntrack: u32,
    /// How long an established TCP flow through the devices may stay idle before its
    /// conntrack entries expire, as kube-proxy's flag of that name: 6h, 90m, 24h0m0s, 3600.
    #[arg(long, default_value_t = options::Timeout(lb_common::CT_TIMEOUT_TCP_ESTABLISHED_S as u32))]
    conntrack_tcp_timeout_established: options::Timeout,
    /// How long a UDP flow through the devices may stay idle before its conntrack entries
    /// expire (kube-proxy's --conntrack-udp-timeout).
    #[arg(long, default_value_t = options::Timeout(lb_common::CT_TIMEOUT_UDP_S as u32))]
    conntrack_udp_timeout: options::Timeout,
    /// How long a half-closed TCP flow (one side sent FIN, the other may go on sending) may
    /// stay idle before its conntrack entries expire (kube-proxy's
    /// --conntrack-tcp-timeout-close-wait).
    #[arg(long, default_value_t = options::Timeout(lb_common::CT_TIMEOUT_TCP_CLOSE_WAIT_S as u32))]
    conntrack_tcp_timeout_close_wait: options::Timeout,
    /// How long a UDP flow that has seen a reply may stay idle before its conntrack entries
    /// expire (kube-proxy's --conntrack-udp-timeout-stream; default: --conntrack-udp-timeout).
    #[arg(long)]
    conntrack_udp_timeout_stream: Option<options::Timeout>,
    /// Seconds between conntrack sweeps, which remove the entries of ended flows (the datapath
    /// only expires an entry when a packet meets it). 0: never (the LRU map evicts).
    #[arg(long, default_value_t = 30)]
    conntrack_gc_interval: u64,
    /// Largest Maglev table of one backend set (a prime from 251 to 131071).
    #[arg(long, default_value_t = maglev::DEFAULT_MAX_SIZE)]
    maglev_max_size: u32,
    /// How often the manifests folder is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// A manifests file is read only once unmodified for this long, in milliseconds, so that
    /// one caught mid-write is not taken for complete. 0 when files are always replaced by
    /// rename (ConfigMap volumes, tools that write a temporary file and rename it).
    #[arg(long, default_value_t = 100)]
    manifests_settle_ms: u64,
    /// Remove everything installed under --bpffs (pinned links, which detaches the programs,
    /// and maps) and exit: the uninstall step.
    #[arg(long)]
    cleanup: bool,
    /// kube-proxy's configuration file (a KubeProxyConfiguration, what kube-proxy's --config
    /// reads, as in kubeadm's kube-proxy ConfigMap): its fields with an equivalent here
    /// (hostnameOverride, healthzBindAddress, metricsBindAddress, nodePortAddresses,
    /// clientConnection.kubeconfig, conntrack lifetimes, and conntrack.maxPerCore/min as
    /// --max-conntrack, two entries a flow) are read as those flags, which the command line's
    /// own override; the log names each, and the fields not used.
    #[arg(long, value_name = "FILE")]
    kube_proxy_config: Option<PathBuf>,
    /// Where /healthz, /livez and /readyz are served (cloud load balancers probe /healthz:
    /// set 0.0.0.0:10256, as kube-proxy's --healthz-bind-address). 0.0.0.0 or :: means every
    /// address of both families where the node has IPv6.
    #[arg(long, default_value = "127.0.0.1:10256")]
    health_bind_address: std::net::SocketAddr,
    /// Where /metrics is served (kube-proxy's --metrics-bind-address; its own port, so that
    /// opening the health port to load balancers does not expose the metrics). The same
    /// address as --health-bind-address serves everything on one port.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: std::net::SocketAddr,
    /// How long a change may wait to reach the maps (a write failing, retried every 2 s), or
    /// the sync loop stand still, before /healthz and /livez answer 503 (kube-proxy: twice its
    /// sync period).
    #[arg(long, default_value = "60s")]
    health_timeout: options::Timeout,
    /// Seconds between counter summaries in the log (0: never).
    #[arg(long, default_value_t = 60)]
    stats_interval: u64,
    /// What to log: error, warn, info, debug, trace, or per-module directives
    /// ("info,lb_agent::sync=debug"). Default: RUST_LOG if set, else info.
    #[arg(long, value_parser = parse_log_level)]
    log_level: Option<tracing_subscriber::EnvFilter>,
    /// Log lines as text, or as one JSON object each (for log pipelines; kube-proxy's
    /// --logging-format).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_log_level(s: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map_err(|e| format!("{e} (try error, warn, info, debug or trace)"))
}

// The sync loop runs on the main thread (`block_on`) and does its map writes, program loads and
// manifest reads in place; the health, metrics and healthCheckNodePort servers (spawned tasks)
// run on a worker of their own, so that probes are answered while it works: on one thread a
// probe waited out a whole initial sync (the programs' verification alone takes seconds).
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    // kube-proxy's file, as flags before the command line's (which override them). Its
    // conntrack size counts the node's CPUs as kube-proxy does (Go's NumCPU), whatever CPU
    // limit this container has.
    // SAFETY: sysconf reads a system value; no memory is passed.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpus = u32::try_from(online).unwrap_or(1).max(1);
    let (argv, kube_proxy) = kube_proxy_config::expand(std::env::args_os().collect(), cpus)
        .unwrap_or_else(|e| {
            eprintln!("lb-agent: {e:#}");
            std::process::exit(2);
        });
    let mut args = Args::try_parse_from(argv).unwrap_or_else(|e| {
        if let Some((path, t)) = &kube_proxy {
            eprintln!("lb-agent: {} {path} gave {:?}", kube_proxy_config::FLAG, t.flags);
        }
        e.exit()
    });
    let filter = args.log_level.take().unwrap_or_else(|| {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if let Some((path, t)) = &kube_proxy {
        for (flag, value) in &t.flags {
            info!("{} {path}: {flag}={value}", kube_proxy_config::FLAG);
        }
        for unused in &t.unused {
            info!("{} {path}: {unused}", kube_proxy_config::FLAG);
        }
    }
    if let Err(e) = run(args).await {
        eprintln!("lb-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(mut args: Args) -> Result<()> {
    if args.cleanup {
        if !args.bpffs.exists() {
            bail!("nothing pinned under {}", args.bpffs.display());
        }
        mounts::require_bpffs(&args.bpffs)?;
        let _lock = pin_lock::acquire(&args.bpffs, pin_lock::WAIT)?;
        return links::cleanup(&args.bpffs);
    }
    if !maglev::SIZES.contains(&args.maglev_max_size) {
        bail!("--maglev-max-size {} is not one of {:?}", args.maglev_max_size, maglev::SIZES);
    }
    args.nat_port_range.check_against(options::ephemeral_ports()?)?;
    if args.pod_devices.iter().any(|d| d == "auto") {
        bail!("--pod-devices takes device names and PREFIX+ patterns (lxc+, veth+), not auto");
    }
    // `--pod-devices ''` (an empty list from a template) names none: off, as no flag.
    args.pod_devices.retain(|d| !d.is_empty());
    if args.socket_lb_host_namespace_only && args.pod_devices.is_empty() {
        bail!(
            "--socket-lb-host-namespace-only needs --pod-devices: pods' service traffic would go untranslated"
        );
    }
    if let Some(dir) = &args.manifests
        && !dir.is_dir()
    {
        bail!("--manifests {}: not a directory", dir.display());
    }
    mounts::require_bpffs(&args.bpffs)?;
    if let Some(cgroup) = &args.cgroup {
        mounts::require_cgroup2(cgroup)?;
    }
    let node_name = args.node_name.as_deref().context("--node-name is required")?;
    let mut cfg = ModelConfig::new(node_name);
    cfg.nodeport_addresses = args.nodeport_addresses.clone();
    cfg.localhost_nodeports = args.localhost_nodeports;
    cfg.external_cluster_ips = args.external_clusterip;
    cfg.pod_devices = !args.pod_devices.is_empty();
    cfg.extra_node_ips = args.node_ip.clone();
    cfg.maglev_max_size = args.maglev_max_size;
    // Served later; the API client counts its requests into its metrics.
    let status = Status::new(args.bpffs.clone(), Duration::from_secs(args.health_timeout.0.into()));
    // The source first: a bad kubeconfig must fail before anything is loaded into the kernel.
    let mut source = match &args.manifests {
        Some(dir) => Source::Manifests(
            ManifestsDir::new(dir, cfg.clone())
                .with_settle(Duration::from_millis(args.manifests_settle_ms)),
            Vec::new(),
        ),
        None => {
            let api_server = args.k8s_api_server.as_deref();
            let client =
                kube::client(args.kubeconfig.as_deref(), api_server, &status.metrics.api).await?;
            Source::Kube(kube::watch(client, node_name))
        }
    };
    let sizes = MapSizes {
        max_services: args.max_services,
        max_frontends: args.max_frontends,
        max_backends: args.max_backends,
        maglev_slots: args.maglev_slots,
        max_conntrack: args.max_conntrack,
    };
    // Before anything is served or loaded: another agent may be running on these pins.
    let _pins_lock = pin_lock::acquire(&args.bpffs, pin_lock::WAIT)?;
    let one_port = args.metrics_bind_address == args.health_bind_address;
    for (address, flag, paths) in [
        (args.health_bind_address, "--health-bind-address", endpoints::Paths::Health),
        (args.metrics_bind_address, "--metrics-bind-address", endpoints::Paths::Metrics),
    ] {
        let paths = if one_port { endpoints::Paths::All } else { paths };
        let listener = serve::listen(address)
            .await
            .with_context(|| format!("listening on {flag} {address}"))?;
        info!(address = %listener.local_addr()?, "serving {}", paths.describe());
        let served = status.clone();
        tokio::spawn(serve::serve(listener, move |req| {
            endpoints::handle(served.clone(), paths, req)
        }));
        if one_port {
            break;
        }
    }
    for (map, cap) in [
        (lb_common::MAP_SERVICES, sizes.max_frontends as i64),
        (lb_common::MAP_TABLES, (lb_common::TABLES_PER_SERVICE * sizes.max_services) as i64),
        (lb_common::MAP_BACKENDS, sizes.max_backends as i64),
        (lb_common::MAP_MAGLEV, sizes.maglev_slots as i64),
        (lb_common::MAP_AFFINITY_MATCH, sizes.max_backends as i64),
        (lb_common::MAP_NAMES, sizes.max_services as i64),
        (lb_common::MAP_CONNTRACK, sizes.max_conntrack as i64),
    ] {
        status.metrics.map_capacity.get_or_create(&MapLabel { map: map.into() }).set(cap);
    }
    let mut ebpf = loader::load(&LoadOptions { bpffs: Some(args.bpffs.clone()), sizes })?;
    let loaded = programs::load_all(&mut ebpf)?;
    // Each program: instructions as run / instructions the verifier walked (its limit is
    // 1,000,000), and the load's time.
    let loaded: Vec<String> = loaded.iter().map(ToString::to_string).collect();
    info!(programs = %loaded.join(", "), "programs verified");
    for fallback in kernel_features::fallbacks(*kernel_features::probed()) {
        warn!("this kernel has {fallback}");
    }
    let opts = options::Options {
        reject_tcp_with: args.reject_tcp_with,
        lb_mode: args.lb_mode,
        nat_ports: args.nat_port_range,
        ct_timeouts: lb_common::CtTimeouts {
            tcp_established_s: args.conntrack_tcp_timeout_established.0,
            udp_s: args.conntrack_udp_timeout.0,
            tcp_close_wait_s: args.conntrack_tcp_timeout_close_wait.0,
            udp_stream_s: args.conntrack_udp_timeout_stream.map_or(0, |t| t.0),
        },
        sock_host_netns_only: args.socket_lb_host_namespace_only,
    };
    options::write(&mut ebpf, &opts)?;
    let filters = port_filters::enable(&mut ebpf)?;
    info!(
        bpffs = %args.bpffs.display(),
        reply_ports = filters.reply_ports,
        ingress_ports = filters.ingress_ports,
        pod_ports = filters.pod_ports,
        pod_reply_ports = filters.pod_reply_ports,
        cluster_ips = filters.cluster_ips,
        external_ips = filters.external_ips,
        "datapath loaded, maps pinned"
    );
    // Links are pinned: programs stay attached when the agent stops, and the next agent swaps
    // its programs in atomically.
    let tc_filters = !args.enable_tcx || !attach::kernel_has_tcx();
    if tc_filters {
        info!(
            enable_tcx = args.enable_tcx,
            "tc programs attached as clsact filters (no TCX on this kernel, or --enable-tcx=false)"
        );
    }
    let mut pins = LinkPins::new(&args.bpffs)?.with_tc_filters(tc_filters);
    if let Some(cg) = &args.cgroup {
        attach::cgroup(&mut ebpf, cg, Some(&mut pins))?;
        attached(&status, "socket hooks", &cg.display().to_string());
    }
    // Word of devices and addresses coming and going, asked for before the first look at them
    // (a change meanwhile is not missed); without it, the 2 s check alone follows them.
    let mut net_watch = netdev::NetWatch::new(tc_filters)
        .map_err(|e| warn!("netlink events unavailable, devices are checked every 2 s: {e:#}"))
        .ok();
    log_detected(&args.devices, &args.node_ip);
    let attached_devices = devices(&args.devices, &args.node_ip);
    for dev in &attached_devices {
        // A DaemonSet's device list may name one some nodes lack (yet): attached when it
        // appears (the device check below), instead of keeping the node without a proxy.
        if netdev::ifindex(dev).is_err() {
            warn!(device = dev, "device absent: attached when it appears");
            let label = ProgramLabel { program: "tc".into(), target: dev.clone() };
            status.metrics.attached.get_or_create(&label).set(0);
            continue;
        }
        attach_device(&mut ebpf, dev, &args, &mut pins, &status)?;
    }
    attach::snat_devices(&mut ebpf, &attached_devices)?;
    let mut pod_devices =
        (!args.pod_devices.is_empty()).then(|| PodDevices::new(&args.pod_devices, &args.bpffs));
    if let Some(pods) = pod_devices.as_mut() {
        refresh_pods(pods, &mut ebpf, &mut pins, &attached_devices, &status);
        info!(
            patterns = args.pod_devices.join(","),
            devices = pods.count(),
            socket_lb_host_namespace_only = args.socket_lb_host_namespace_only,
            "pod devices: pods' service traffic is translated on them"
        );
    }
    let sweep_every =
        (args.conntrack_gc_interval > 0).then(|| Duration::from_secs(args.conntrack_gc_interval));
    let conntrack =
        conntrack_gc::spawn(&args.bpffs, sweep_every, status.metrics.conntrack_gc.clone())?;
    for gone in pins.remove_unwanted()? {
        info!(hook = gone, "detached a hook no longer configured");
    }
    // The programs this agent replaced are gone: the ingress address set can be completed.
    if let Some(addresses) = port_filters::complete_frontend_addrs(&mut ebpf)? {
        info!(addresses, "ingress address filter on");
    }
    for old in loader::remove_retired_maps(&args.bpffs)? {
        info!(pin = %old.display(), "removed a map this version replaced");
    }
    for old in links::remove_other_versions(&args.bpffs)? {
        warn!(dir = %old.display(), "removed maps of another layout version: their flows are re-balanced once");
    }

    let writer = Writer::new(
        KernelStore::new(&ebpf)?,
        WriterConfig {
            maglev_max_size: args.maglev_max_size,
            max_services: args.max_services,
            answer_service_pings: args.answer_service_pings,
        },
    )?;
    let mut syncer = Syncer::new(cfg.clone(), writer);
    // NodePorts answer on the devices' addresses too, from the first sync on.
    let device_addresses = netdev::device_addresses(&attached_devices);
    info!(addresses = ?device_addresses, "addresses of the attached devices (NodePorts answer on them)");
    syncer.state.set_device_addresses(device_addresses);

    // Initial sync: everything the source holds, then stale pinned entries go.
    let start = Instant::now();
    let (writes, mut initial) = source.initial(&mut syncer).await?;
    syncer.finish_initial_sync()?;
    // UDP flows to endpoints that went while no agent ran. This pass covers whatever the
    // initial sync released too, so its list is dropped.
    let in_use = conntrack_gc::UdpFlush::AllBut(syncer.writer.udp_targets());
    syncer.writer.take_stale_udp();
    if conntrack.send(in_use).is_err() {
        bail!("the conntrack worker stopped");
    }
    let mut health_servers = HealthServers::new(status.clone());
    // The first sync counts as one in the metrics (kube-proxy's first syncProxyRules does).
    initial.elapsed = start.elapsed();
    after_sync(&status, &syncer, &mut health_servers, &initial).await;
    status.ready.store(true, std::sync::atomic::Ordering::Release);
    // Said once /readyz says so and the health check ports serve (a reader of the log may
    // probe them at once; said before, /readyz could still answer 503).
    let (svcs, slices, nodes) = syncer.state.counts();
    info!(
        services = svcs,
        endpointslices = slices,
        nodes,
        service_ports = syncer.writer.port_count(),
        entries_written = writes.entries(),
        maglev_slots_written = writes.maglev_slots,
        elapsed_us = initial.elapsed.as_micros() as u64,
        "initial sync done"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut poll_tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(10)));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    stats_tick.tick().await;
    let mut device_tick = tokio::time::interval(DEVICE_CHECK_INTERVAL);
    device_tick.tick().await;
    loop {
        // At least every DEVICE_CHECK_INTERVAL: a loop that stops turning is unhealthy.
        status.proxy().beat(Instant::now());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            changed = source.next(&mut poll_tick) => {
                let Some(change) = changed else { bail!("the Kubernetes watch stream ended") };
                let report = match change {
                    Change::Events(events) => syncer.apply(events),
                    Change::Relist(kind, objects) => {
                        let report = syncer.apply_relist(kind, objects);
                        lb_agent::memory::release_freed(); // the replaced objects
                        report
                    }
                };
                synced(&status, &mut syncer, &conntrack, &mut health_servers, &report).await?;
            }
            _ = device_tick.tick() => {
                // What could not be written (a map was full, say) is tried again.
                if let Some(report) = syncer.retry_failed() {
                    synced(&status, &mut syncer, &conntrack, &mut health_servers, &report).await?;
                }
                // Anything netlink's word missed.
                let mut devs = Devices { ebpf: &mut ebpf, pins: &mut pins, pods: pod_devices.as_mut() };
                if let Some(report) = follow_devices(&args, &mut devs, &status, &mut syncer) {
                    synced(&status, &mut syncer, &conntrack, &mut health_servers, &report).await?;
                }
            }
            changed = async { net_watch.as_ref()?.changed().await.into() }, if net_watch.is_some() => {
                if let Some(Err(e)) = changed {
                    warn!("netlink events failed, devices are checked every 2 s from now on: {e:#}");
                    net_watch = None;
                }
                let mut devs = Devices { ebpf: &mut ebpf, pins: &mut pins, pods: pod_devices.as_mut() };
                if let Some(report) = follow_devices(&args, &mut devs, &status, &mut syncer) {
                    synced(&status, &mut syncer, &conntrack, &mut health_servers, &report).await?;
                }
            }
            _ = stats_tick.tick(), if args.stats_interval > 0 => {
                let stats = counters::global(&ebpf).context("reading counters")?;
                info!(?stats, "datapath counters");
            }
        }
    }
    info!(
        "stopping; programs stay attached and maps pinned under {} (lb-agent --cleanup removes them)",
        args.bpffs.display()
    );
    Ok(())
}

/// Where objects come from, with what the agent keeps about each.
enum Source {
    /// The folder, and the manifest errors last logged (to log changes only).
    Manifests(ManifestsDir, Vec<String>),
    Kube(BoxStream<'static, KubeMsg>),
}

/// One change from a source.
enum Change {
    Events(Vec<Event>),
    Relist(Kind, Vec<Object>),
}

impl Source {
    /// Applies everything the source holds now; for the API server, until every kind has been
    /// listed once. Returns the writes and a report holding the changes taken in (their counts
    /// only).
    async fn initial(
        &mut self,
        syncer: &mut Syncer<KernelStore>,
    ) -> Result<(WriteCounts, SyncReport)> {
        let before = syncer.writer.counts();
        let mut changes = SyncReport::default();
        let mut count = |r: SyncReport| {
            changes.service_changes += r.service_changes;
            changes.endpoint_changes += r.endpoint_changes;
        };
        match self {
            Source::Manifests(dir, last) => {
                let poll =
                    dir.poll().with_context(|| format!("reading {}", dir.dir().display()))?;
                log_manifest_errors(&poll.errors, last);
                count(syncer.apply(poll.events));
                lb_agent::memory::release_freed();
            }
            Source::Kube(stream) => {
                let mut listed = BTreeSet::new();
                while listed.len() < KINDS.len() {
                    match stream.next().await {
                        Some(KubeMsg::Relist(kind, objects)) => {
                            listed.insert(kind);
                            count(syncer.apply_relist(kind, objects));
                        }
                        Some(KubeMsg::Events(events)) => count(syncer.apply(events)),
                        None => bail!("the Kubernetes watch stream ended before the first lists"),
                    }
                }
            }
        }
        Ok((syncer.writer.counts().since(&before), changes))
    }

    /// The next change (the folder is polled on `tick`). `None` when a watch stream ended.
    async fn next(&mut self, tick: &mut tokio::time::Interval) -> Option<Change> {
        match self {
            Source::Manifests(dir, last) => loop {
                tick.tick().await;
                let start = std::time::Instant::now();
                match dir.poll() {
                    Ok(poll) => {
                        if poll.files_read > 0 {
                            lb_agent::memory::release_freed();
                            info!(
                                files = poll.files_read,
                                unchanged_documents = poll.documents_reused,
                                changed_objects = poll.events.len(),
                                elapsed_us = start.elapsed().as_micros() as u64,
                                "manifests read"
                            );
                        }
                        log_manifest_errors(&poll.errors, last);
                        if !poll.events.is_empty() {
                            return Some(Change::Events(poll.events));
                        }
                    }
                    Err(e) => warn!("reading {}: {e}", dir.dir().display()),
                }
            },
            Source::Kube(stream) => match stream.next().await? {
                KubeMsg::Events(events) => Some(Change::Events(events)),
                KubeMsg::Relist(kind, objects) => Some(Change::Relist(kind, objects)),
            },
        }
    }
}

/// After a sync: log it, flush the UDP flows to endpoints no longer in use (kube-proxy flushes
/// them too), update metrics, health and healthCheckNodePorts.
async fn synced(
    status: &Status,
    syncer: &mut Syncer<KernelStore>,
    conntrack: &std::sync::mpsc::Sender<conntrack_gc::UdpFlush>,
    health: &mut HealthServers,
    report: &SyncReport,
) -> Result<()> {
    if report.services_planned > 0 {
        info!(services = report.services_planned, writes = ?report.writes,
              elapsed_us = report.elapsed.as_micros() as u64, "synced");
    }
    let stale = syncer.writer.take_stale_udp();
    if !stale.is_empty() && conntrack.send(conntrack_gc::UdpFlush::To(stale)).is_err() {
        bail!("the conntrack worker stopped");
    }
    after_sync(status, syncer, health, report).await;
    Ok(())
}

/// Metrics, health and healthCheckNodePorts after the maps changed.
async fn after_sync(
    status: &Status,
    syncer: &Syncer<KernelStore>,
    health: &mut HealthServers,
    r: &SyncReport,
) {
    let m = &status.metrics;
    m.syncs.inc();
    m.sync_seconds.observe(r.elapsed.as_secs_f64());
    m.service_changes.inc_by(r.service_changes);
    m.endpoint_changes.inc_by(r.endpoint_changes);
    for &s in &r.programming_seconds {
        m.programming_seconds.observe(s);
    }
    if !r.errors.is_empty() {
        m.sync_errors.inc();
    }
    {
        let mut h = status.proxy();
        match syncer.pending_since() {
            Some(since) => h.pending(since),
            None => {
                let now = std::time::SystemTime::now();
                h.updated(now);
                let unix = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                m.last_synced.set(unix.as_secs_f64());
            }
        }
        // A node about to go away fails /healthz, so load balancers drain it first.
        let node = syncer.state.node(&syncer.cfg.node_name);
        h.set_node_eligible(node.is_none_or(lb_agent::serve::proxy_health::node_eligible));
    }
    m.unprogrammed.set(syncer.failed_count() as i64);
    let (internal, external) = syncer.no_local_endpoints();
    for (policy, n) in [("internal", internal), ("external", external)] {
        let label = PolicyLabel { traffic_policy: policy.into() };
        m.no_local_endpoints.get_or_create(&label).set(n as i64);
    }
    let (services, slices, nodes) = syncer.state.counts();
    for (kind, n) in [("Service", services), ("EndpointSlice", slices), ("Node", nodes)] {
        m.objects.get_or_create(&KindLabel { kind: kind.into() }).set(n as i64);
    }
    for (map, n) in syncer.writer.fill() {
        m.map_entries.get_or_create(&MapLabel { map: map.into() }).set(n as i64);
    }
    health.update(&syncer.health_ports()).await;
}

/// Logs manifest errors when they differ from the last ones logged.
fn log_manifest_errors(
    errors: &[lb_agent::sources::manifests::ManifestError],
    last: &mut Vec<String>,
) {
    let now: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    if !now.is_empty() && now != *last {
        for e in &now {
            warn!("{e}");
        }
    }
    *last = now;
}

/// The devices to attach to now (see `netdev::resolve_devices`).
fn devices(named: &[String], node_ips: &[IpAddr]) -> Vec<String> {
    netdev::resolve_devices(named, node_ips)
}

/// Says which devices `auto` found at start (they depend on the node's routes).
fn log_detected(named: &[String], node_ips: &[IpAddr]) {
    if !named.iter().any(|d| d == "auto") {
        return;
    }
    let found = netdev::detect_devices(node_ips);
    if found.is_empty() {
        warn!(
            "--devices auto found no device (no default route, no --node-ip on a device): only the socket hooks serve"
        );
    } else {
        info!(
            devices = found.join(","),
            "--devices auto: devices of the default routes and of --node-ip"
        );
    }
}

/// What `follow_devices` attaches with.
struct Devices<'a> {
    ebpf: &'a mut aya::Ebpf,
    pins: &'a mut LinkPins,
    pods: Option<&'a mut PodDevices>,
}

/// Follows the node's devices (on netlink's word, and every 2 s): a device re-created (a NIC
/// reset, a bond or VLAN rebuilt) comes back without its programs, `--devices auto` or a
/// pattern may match a new one, pods' devices come and go, and an address added to or removed
/// from a device (a VIP moving, a DHCP lease) moves NodePorts. The sync report when they moved.
fn follow_devices(
    args: &Args,
    devs: &mut Devices<'_>,
    status: &Status,
    syncer: &mut Syncer<KernelStore>,
) -> Option<SyncReport> {
    let named = devices(&args.devices, &args.node_ip);
    for dev in &named {
        if attach::tc_missing(devs.pins, dev, attach::TcRole::External) {
            // Attached before by this agent: its programs went (re-created, a qdisc deleted).
            let label = ProgramLabel { program: "tc".into(), target: dev.clone() };
            let had = status.metrics.attached.get_or_create(&label).get() == 1;
            match attach_device(devs.ebpf, dev, args, devs.pins, status) {
                Ok(()) => {
                    if had {
                        status.metrics.hooks_restored.inc();
                    }
                    warn!(
                        device = dev,
                        "programs were missing on the device (re-created, or new): attached"
                    )
                }
                Err(e) => warn!(device = dev, "attaching to a re-created or new device: {e:#}"),
            }
        }
    }
    if let Err(e) = attach::snat_devices(devs.ebpf, &named) {
        warn!("recording the devices for SNAT sources: {e:#}");
    }
    if let Some(pods) = devs.pods.as_deref_mut() {
        refresh_pods(pods, devs.ebpf, devs.pins, &named, status);
    }
    let addresses = netdev::device_addresses(&named);
    if addresses != syncer.state.device_addresses() {
        info!(addresses = ?addresses, "the attached devices' addresses changed: NodePorts follow");
    }
    syncer.set_device_addresses(addresses)
}

/// Attaches the pod hooks to pods' devices that lack them, logs it and counts them.
fn refresh_pods(
    pods: &mut PodDevices,
    ebpf: &mut aya::Ebpf,
    pins: &mut LinkPins,
    external: &[String],
    status: &Status,
) {
    let r = pods.refresh(ebpf, pins, external);
    pod_devices::log_refresh(&r, pods.count());
    status.metrics.hooks_restored.inc_by(r.restored.len() as u64);
    status.metrics.pod_devices.set(pods.count() as i64);
}

/// How often the devices are checked for missing programs.
const DEVICE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Records an attached program in the metrics.
fn attached(status: &Status, program: &str, target: &str) {
    let label = ProgramLabel { program: program.into(), target: target.into() };
    status.metrics.attached.get_or_create(&label).set(1);
}

/// Attaches tc (and with --xdp, XDP) to `dev`, or puts this agent's programs into the links a
/// previous agent pinned there.
fn attach_device(
    ebpf: &mut aya::Ebpf,
    dev: &str,
    args: &Args,
    pins: &mut LinkPins,
    status: &Status,
) -> Result<()> {
    attach::tc(ebpf, dev, Some(pins))?;
    attached(status, "tc", dev);
    if args.xdp {
        let mode = attach::xdp_ingress(ebpf, dev, Some(pins))?;
        let label = match mode {
            attach::XdpAttachMode::Native => "xdp native",
            attach::XdpAttachMode::Generic => "xdp generic",
            attach::XdpAttachMode::Kept => "xdp",
        };
        attached(status, label, dev);
        attach::xdp_tx(ebpf, dev, mode, args.xdp_tx)?;
    }
    Ok(())
}
