//! `lb-agent`: loads the datapath, pins its maps and attaches it to the node's devices.
//!
//! Programming services from Kubernetes or a manifests folder is the control plane's job
//! (see ARCHITECTURE.md for what exists today).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use lb_agent::dataplane::{
    attach, counters,
    loader::{self, LoadOptions, MapSizes},
    programs,
};
use tracing::info;

#[derive(Parser, Debug)]
#[command(about = "eBPF service load balancer: node agent")]
struct Args {
    /// Devices that receive traffic from outside clients (NodePort, ExternalIP, LB IP).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Attach XDP to the devices too (native when the driver supports it, else generic).
    #[arg(long)]
    xdp: bool,
    /// bpffs directory where maps are pinned, so that an agent restart keeps traffic flowing.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Service ports (per IP family) the maps can hold.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Frontend entries (address, port, protocol, scope) the maps can hold.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Maglev slots shared by all frontends (4 bytes each).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_SLOTS)]
    maglev_slots: u32,
    /// Seconds between counter summaries in the log (0: never).
    #[arg(long, default_value_t = 60)]
    stats_interval: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let sizes = MapSizes {
        max_services: args.max_services,
        max_frontends: args.max_frontends,
        max_backends: args.max_backends,
        maglev_slots: args.maglev_slots,
    };
    let mut ebpf = loader::load(&LoadOptions { bpffs: Some(args.bpffs.clone()), sizes })?;
    programs::load_all(&mut ebpf)?;
    info!(bpffs = %args.bpffs.display(), "datapath loaded, maps pinned");
    for dev in &args.devices {
        attach::tc_ingress(&mut ebpf, dev)?;
        if args.xdp {
            attach::xdp_ingress(&mut ebpf, dev)?;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick(), if args.stats_interval > 0 => {
                let stats = counters::global(&ebpf).context("reading counters")?;
                info!(?stats, "datapath counters");
            }
        }
    }
    info!("stopping; maps stay pinned under {}", args.bpffs.display());
    Ok(())
}
