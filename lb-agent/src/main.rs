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
use ipnet::IpNet;
use lb_agent::{
    config::ModelConfig,
    dataplane::{
        attach, counters,
        loader::{self, LoadOptions, MapSizes},
        programs,
        store::{KernelStore, WriteCounts},
        writer::{Writer, WriterConfig},
    },
    model::maglev,
    sources::{
        Event, Object,
        kube::{self, KINDS, Kind, KubeMsg},
        manifests::ManifestsDir,
    },
    sync::Syncer,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(about = "eBPF service load balancer: node agent (a kube-proxy replacement)")]
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
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Devices that receive traffic from outside clients (NodePort, ExternalIP, LB IP).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Attach XDP to the devices too (native when the driver supports it, else generic).
    #[arg(long)]
    xdp: bool,
    /// cgroup v2 directory whose processes (the node's pods and host) reach services through
    /// the socket hooks: the node's root cgroup in production.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory where maps are pinned, so that an agent restart keeps traffic flowing.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// NodePorts answer only on node addresses inside these CIDRs (default: every address).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<IpNet>,
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
    /// Largest Maglev table of one backend set (a prime from 251 to 131071).
    #[arg(long, default_value_t = maglev::DEFAULT_MAX_SIZE)]
    maglev_max_size: u32,
    /// How often the manifests folder is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// Seconds between counter summaries in the log (0: never).
    #[arg(long, default_value_t = 60)]
    stats_interval: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("lb-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if !maglev::SIZES.contains(&args.maglev_max_size) {
        bail!("--maglev-max-size {} is not one of {:?}", args.maglev_max_size, maglev::SIZES);
    }
    if let Some(dir) = &args.manifests
        && !dir.is_dir()
    {
        bail!("--manifests {}: not a directory", dir.display());
    }
    let mut cfg = ModelConfig::new(&args.node_name);
    cfg.nodeport_cidrs = args.nodeport_addresses.clone();
    cfg.extra_node_ips = args.node_ip.clone();
    cfg.maglev_max_size = args.maglev_max_size;
    // The source first: a bad kubeconfig must fail before anything is loaded into the kernel.
    let mut source = match &args.manifests {
        Some(dir) => Source::Manifests(ManifestsDir::new(dir, cfg.clone()), Vec::new()),
        None => {
            let client =
                kube::client(args.kubeconfig.as_deref(), args.k8s_api_server.as_deref()).await?;
            Source::Kube(kube::watch(client, &args.node_name))
        }
    };
    let sizes = MapSizes {
        max_services: args.max_services,
        max_frontends: args.max_frontends,
        max_backends: args.max_backends,
        maglev_slots: args.maglev_slots,
        max_conntrack: args.max_conntrack,
    };
    let mut ebpf = loader::load(&LoadOptions { bpffs: Some(args.bpffs.clone()), sizes })?;
    programs::load_all(&mut ebpf)?;
    info!(bpffs = %args.bpffs.display(), "datapath loaded, maps pinned");
    if let Some(cg) = &args.cgroup {
        attach::cgroup(&mut ebpf, cg)?;
    }
    for dev in &args.devices {
        attach::tc(&mut ebpf, dev)?;
        if args.xdp {
            attach::xdp_ingress(&mut ebpf, dev)?;
        }
    }

    let writer = Writer::new(
        KernelStore::new(&ebpf)?,
        WriterConfig { maglev_max_size: args.maglev_max_size, max_services: args.max_services },
    )?;
    let mut syncer = Syncer::new(cfg.clone(), writer);

    // Initial sync: everything the source holds, then stale pinned entries go.
    let start = Instant::now();
    let writes = source.initial(&mut syncer).await?;
    syncer.finish_initial_sync()?;
    let (svcs, slices, nodes) = syncer.state.counts();
    info!(
        services = svcs,
        endpointslices = slices,
        nodes,
        service_ports = syncer.writer.port_count(),
        entries_written = writes.entries(),
        maglev_slots_written = writes.maglev_slots,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "initial sync done"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut poll_tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(10)));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    stats_tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            changed = source.next(&mut poll_tick) => {
                let Some(change) = changed else { bail!("the Kubernetes watch stream ended") };
                let report = match change {
                    Change::Events(events) => syncer.apply(events),
                    Change::Relist(kind, objects) => syncer.apply_relist(kind, objects),
                };
                if report.services_planned > 0 {
                    info!(services = report.services_planned, writes = ?report.writes,
                          elapsed_us = report.elapsed.as_micros() as u64, "synced");
                }
            }
            _ = stats_tick.tick(), if args.stats_interval > 0 => {
                let stats = counters::global(&ebpf).context("reading counters")?;
                info!(?stats, "datapath counters");
            }
        }
    }
    info!("stopping; programs detach, maps stay pinned under {}", args.bpffs.display());
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
    /// listed once.
    async fn initial(&mut self, syncer: &mut Syncer<KernelStore>) -> Result<WriteCounts> {
        let before = syncer.writer.counts();
        match self {
            Source::Manifests(dir, last) => {
                let poll =
                    dir.poll().with_context(|| format!("reading {}", dir.dir().display()))?;
                log_manifest_errors(&poll.errors, last);
                syncer.apply(poll.events);
            }
            Source::Kube(stream) => {
                let mut listed = BTreeSet::new();
                while listed.len() < KINDS.len() {
                    match stream.next().await {
                        Some(KubeMsg::Relist(kind, objects)) => {
                            listed.insert(kind);
                            syncer.apply_relist(kind, objects);
                        }
                        Some(KubeMsg::Events(events)) => {
                            syncer.apply(events);
                        }
                        None => bail!("the Kubernetes watch stream ended before the first lists"),
                    }
                }
            }
        }
        Ok(syncer.writer.counts().since(&before))
    }

    /// The next change (the folder is polled on `tick`). `None` when a watch stream ended.
    async fn next(&mut self, tick: &mut tokio::time::Interval) -> Option<Change> {
        match self {
            Source::Manifests(dir, last) => loop {
                tick.tick().await;
                match dir.poll() {
                    Ok(poll) => {
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
