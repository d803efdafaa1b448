//! `lbctl`: the node-level CLI. `lbctl plan` shows, offline, what the agent would program for a
//! folder of manifests; the other commands read what the agent programmed from its pinned maps
//! (while it runs or after it died).

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    config::{ModelConfig, NodePortAddresses},
    inspect::{ConntrackRow, Inspection},
    model::{
        self, ServiceOutcome,
        plan::{Backend, ServicePlan},
    },
    sources::manifests::ManifestsDir,
    state::ClusterState,
};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Inspect and explain the load balancer on this node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct Pins {
    /// The agent's bpffs directory (its --bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand)]
enum Command {
    /// The node's load balancer on one screen: the agent's health (asked over its health port),
    /// devices and cgroups attached, what the maps hold, drops. Run it in the node's network
    /// namespace (the agent pod's).
    Status {
        /// The agent's --health-bind-address (0.0.0.0 is asked at 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:10256")]
        health_address: std::net::SocketAddr,
        /// The agent's --metrics-bind-address (likewise).
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_address: std::net::SocketAddr,
        #[command(flatten)]
        pins: Pins,
    },
    /// One row per frontend: service, kind, address, scope, flags, backends and counters.
    Services(Pins),
    /// Every backend and the service ports using it.
    Backends(Pins),
    /// The Maglev table of a service port (id or part of its name).
    Maglev {
        service: String,
        /// Print every slot.
        #[arg(long)]
        table: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// Tracked device flows (filter by service name part, address or protocol).
    Conntrack {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        protocol: Option<String>,
        #[command(flatten)]
        pins: Pins,
    },
    /// Tracked flows that were SNATed to this node (remote backends).
    Nat {
        /// Instead, per backend: SNAT ports held (and in which state), expired, and the range.
        #[arg(long)]
        ports: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// sessionAffinity entries.
    Affinity(Pins),
    /// Datapath counters (drops by reason) and map fill levels.
    Stats(Pins),
    /// What the datapath does with a packet, and why: from outside it runs the live program on
    /// the packet (BPF_PROG_TEST_RUN) against the live maps, changing none of them.
    Explain {
        /// Source address, optionally with port: 203.0.113.7 or 203.0.113.7:40000 or [2001:db8::7]:40000.
        src: String,
        /// Destination address:port, optionally /tcp, /udp or /sctp (default tcp); or address/icmp,
        /// a ping.
        dst: String,
        #[arg(long, value_enum, default_value = "outside")]
        from: lb_agent::explain::From,
        /// The device the packet arrives on (from outside); default: the one the agent attached
        /// to. Run lbctl in the node's network namespace.
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        pins: Pins,
    },
    /// Follow what the datapath drops, refuses and translates, event by event, until Ctrl-C (by
    /// default: drops, rejects and refused connects). One line per event; with `-o json`, one
    /// JSON object per line. The datapath sends events only while a monitor runs.
    Monitor {
        /// Kinds of event (comma-separated).
        #[arg(
            long = "type",
            value_enum,
            value_delimiter = ',',
            default_value = "drop,reject,refused"
        )]
        kinds: Vec<lb_agent::monitor::Kind>,
        /// Only events of services whose name contains this.
        #[arg(long)]
        service: Option<String>,
        /// Only events with an address (client, frontend, backend, SNAT) containing this.
        #[arg(long)]
        address: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (30s, 5m, 1h).
        #[arg(long)]
        duration: Option<lb_agent::dataplane::options::Timeout>,
        /// Take over from another monitor that is running (it stops receiving events).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        pins: Pins,
    },
    /// Print what the agent would program for a manifests folder (no kernel needed). Exits 1
    /// when a document was rejected (the rest is still planned).
    Plan {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// CIDRs, or `primary` (as lb-agent's flag).
        #[arg(long, value_parser = NodePortAddresses::parse, default_value = "", hide_default_value = true)]
        nodeport_addresses: NodePortAddresses,
        /// As lb-agent's flag.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        localhost_nodeports: bool,
        /// As lb-agent's flag.
        #[arg(long)]
        external_clusterip: bool,
        #[arg(long, value_delimiter = ',')]
        node_ip: Vec<IpAddr>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Serialize)]
struct PlanOutput<'a> {
    services: Vec<&'a ServicePlan>,
    skipped: Vec<Skipped>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Skipped {
    service: String,
    reason: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan {
            manifests,
            node_name,
            nodeport_addresses,
            localhost_nodeports,
            external_clusterip,
            node_ip,
            output,
        } => {
            let mut cfg = ModelConfig::new(node_name);
            cfg.nodeport_addresses = nodeport_addresses;
            cfg.localhost_nodeports = localhost_nodeports;
            cfg.external_cluster_ips = external_clusterip;
            cfg.extra_node_ips = node_ip;
            let poll = ManifestsDir::new(&manifests, cfg.clone())
                .poll()
                .with_context(|| format!("reading {}", manifests.display()))?;
            let mut state = ClusterState::default();
            for e in poll.events {
                state.apply_event(e);
            }
            let outcomes = model::plan_all(&state, &cfg);
            let mut out = PlanOutput {
                services: Vec::new(),
                skipped: Vec::new(),
                errors: poll.errors.iter().map(|e| e.to_string()).collect(),
            };
            for (key, outcome) in &outcomes {
                match outcome {
                    ServiceOutcome::Planned { plans, warnings } => {
                        out.services.extend(plans.iter());
                        out.errors.extend(warnings.iter().map(|w| format!("service {key}: {w}")));
                    }
                    ServiceOutcome::Skipped(s) => out
                        .skipped
                        .push(Skipped { service: key.to_string(), reason: format!("{s:?}") }),
                    ServiceOutcome::Invalid(e) => out.errors.push(format!("service {key}: {e}")),
                    ServiceOutcome::Absent => {}
                }
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                Output::Table => print_table(&out),
            }
            for e in &out.errors {
                eprintln!("error: {e}");
            }
            Ok(if poll.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        other => live(other).map(|()| ExitCode::SUCCESS),
    }
}

/// The commands that read an agent's pinned maps.
fn live(cmd: Command) -> Result<()> {
    match cmd {
        Command::Status { health_address, metrics_address, pins } => {
            let local = |mut a: std::net::SocketAddr| {
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                a
            };
            let s = lb_agent::status::status(
                &pins.bpffs,
                local(health_address),
                local(metrics_address),
            )?;
            match pins.output {
                Output::Json => print_json(&s)?,
                Output::Table => print!("{s}"),
            }
        }
        Command::Services(p) => {
            let ins = Inspection::open(&p.bpffs)?;
            let services = ins.services();
            match p.output {
                Output::Json => print_json(&services)?,
                Output::Table => {
                    for s in &services {
                        println!(
                            "{} (id {})  packets {}  bytes {}",
                            s.name, s.service_id, s.packets, s.bytes
                        );
                        for f in &s.frontends {
                            let backends: Vec<String> = f
                                .backends
                                .iter()
                                .map(|b| {
                                    format!(
                                        "{}{}{}",
                                        b.address,
                                        if b.local { "*" } else { "" },
                                        if b.terminating { "~" } else { "" }
                                    )
                                })
                                .collect();
                            let flags = if f.flags.is_empty() {
                                String::new()
                            } else {
                                format!(" [{}]", f.flags.join(","))
                            };
                            let backends = match f.no_endpoint {
                                Some(action) => format!("(no endpoint: {action})"),
                                None => backends.join(" "),
                            };
                            println!(
                                "  {:<12} {:<26} {:<4} {:<8}{flags} -> {backends}",
                                f.kind, f.address, f.protocol, f.scope
                            );
                        }
                    }
                    println!("(* local, ~ terminating)");
                }
            }
        }
        Command::Backends(p) => {
            let rows = Inspection::open(&p.bpffs)?.backends_with_flows()?;
            match p.output {
                Output::Json => print_json(&rows)?,
                Output::Table => {
                    println!(
                        "{:>6}  {:<26} {:<6} {:<12} {:>7} {:>8}  SERVICES",
                        "ID", "ADDRESS", "LOCAL", "TERMINATING", "FLOWS", "CLOSING"
                    );
                    for r in rows {
                        println!(
                            "{:>6}  {:<26} {:<6} {:<12} {:>7} {:>8}  {}",
                            r.id,
                            r.address,
                            r.local,
                            r.terminating,
                            r.open_flows,
                            r.closing_flows,
                            r.services.join(", ")
                        );
                    }
                    println!("(flows: from outside clients, through the device hooks)");
                }
            }
        }
        Command::Maglev { service, table, pins } => {
            let tables = Inspection::open(&pins.bpffs)?.maglev(&service, table)?;
            match pins.output {
                Output::Json => print_json(&tables)?,
                Output::Table => {
                    for t in tables {
                        println!("{}: M = {}", t.frontend, t.size);
                        for b in &t.backends {
                            let share = 100.0 * b.slots as f64 / t.size.max(1) as f64;
                            println!(
                                "  backend {:>5} {:<26} {:>6} slots ({share:.1}%)",
                                b.id, b.address, b.slots
                            );
                        }
                        if let Some(slots) = t.slots {
                            let s: Vec<String> = slots.iter().map(|s| s.to_string()).collect();
                            println!("  slots: {}", s.join(" "));
                        }
                    }
                }
            }
        }
        Command::Conntrack { service, address, protocol, pins } => {
            let rows: Vec<_> = Inspection::open(&pins.bpffs)?
                .conntrack()?
                .into_iter()
                .filter(|r| service.as_ref().is_none_or(|s| r.service.contains(s.as_str())))
                .filter(|r| {
                    address.as_ref().is_none_or(|a| {
                        [&r.from, &r.to, &r.new_from, &r.new_to]
                            .iter()
                            .any(|x| x.contains(a.as_str()))
                    })
                })
                .filter(|r| protocol.as_ref().is_none_or(|p| r.protocol.eq_ignore_ascii_case(p)))
                .collect();
            print_conntrack(&rows, pins.output)?;
        }
        Command::Nat { ports: false, pins: p } => {
            let rows: Vec<_> =
                Inspection::open(&p.bpffs)?.conntrack()?.into_iter().filter(|r| r.snat).collect();
            print_conntrack(&rows, p.output)?;
        }
        Command::Nat { ports: true, pins: p } => {
            let rows = Inspection::open(&p.bpffs)?.snat_ports()?;
            match p.output {
                Output::Json => print_json(&rows)?,
                Output::Table => {
                    for r in rows {
                        println!(
                            "{} {} from {}: {} of {} ports held ({} open, {} closing, {} time-wait, {} reset), {} expired",
                            r.backend,
                            r.protocol,
                            r.node,
                            r.held,
                            r.capacity,
                            r.open,
                            r.closing,
                            r.time_wait,
                            r.reset,
                            r.expired
                        );
                    }
                }
            }
        }
        Command::Affinity(p) => {
            let rows = Inspection::open(&p.bpffs)?.affinity()?;
            match p.output {
                Output::Json => print_json(&rows)?,
                Output::Table => {
                    for r in rows {
                        println!(
                            "{:<40} {:<24} -> {} (backend {}, idle {} s)",
                            r.service, r.client, r.backend, r.backend_id, r.idle_s
                        );
                    }
                }
            }
        }
        Command::Stats(p) => {
            let stats = Inspection::open(&p.bpffs)?.stats()?;
            match p.output {
                Output::Json => print_json(&stats)?,
                Output::Table => {
                    println!("counters:");
                    for (name, v) in &stats.counters {
                        println!("  {name:<22} {v:>12}");
                    }
                    println!("maps:");
                    for m in &stats.maps {
                        println!(
                            "  {:<14} {:>10} / {:<10} ({:.1}%)",
                            m.map,
                            m.entries,
                            m.capacity,
                            100.0 * m.entries as f64 / m.capacity.max(1) as f64
                        );
                    }
                }
            }
        }
        Command::Explain { src, dst, from, device, pins } => {
            let (dst, proto) = match dst.rsplit_once('/') {
                Some((d, p)) if p.eq_ignore_ascii_case("udp") => {
                    (d.to_string(), lb_common::PROTO_UDP)
                }
                Some((d, p)) if p.eq_ignore_ascii_case("tcp") => {
                    (d.to_string(), lb_common::PROTO_TCP)
                }
                Some((d, p)) if p.eq_ignore_ascii_case("sctp") => {
                    (d.to_string(), lb_common::PROTO_SCTP)
                }
                Some((d, p)) if p.eq_ignore_ascii_case("icmp") => {
                    (d.to_string(), lb_common::PROTO_ICMP)
                }
                Some((_, p)) => anyhow::bail!("protocol {p:?} is not tcp, udp, sctp or icmp"),
                None => (dst, lb_common::PROTO_TCP),
            };
            let src = parse_endpoint(&src, Some(40000))?;
            // A ping has no port.
            let ping = proto == lb_common::PROTO_ICMP;
            let dst = parse_endpoint(&dst, ping.then_some(0))?;
            let e =
                lb_agent::explain::explain(&pins.bpffs, src, dst, proto, from, device.as_deref())?;
            match pins.output {
                Output::Json => print_json(&e)?,
                Output::Table => {
                    match &e.device {
                        Some(d) => println!("packet:     {} ({} on {d})", e.packet, e.hook),
                        None => println!("packet:     {} ({})", e.packet, e.hook),
                    }
                    match (&e.service, &e.frontend) {
                        (Some(s), Some(f)) => println!("frontend:   {f} of {s}"),
                        _ => println!("frontend:   none"),
                    }
                    if !e.flags.is_empty() {
                        println!("flags:      {}", e.flags.join(", "));
                    }
                    if !e.candidates.is_empty() {
                        let c: Vec<String> = e
                            .candidates
                            .iter()
                            .map(|b| format!("{} ({} slots)", b.address, b.slots))
                            .collect();
                        println!("candidates: {}", c.join(", "));
                    }
                    if let Some(d) = &e.decided_by {
                        println!("decided by: {d}");
                    }
                    if let Some(b) = &e.backend {
                        println!(
                            "backend:    {b}{}",
                            if e.snat {
                                " (source NATed to this node)"
                            } else if e.dsr {
                                " (direct server return: its node answers the client)"
                            } else {
                                ""
                            }
                        );
                    }
                    if let Some(r) = &e.rewritten {
                        println!("rewritten:  {r}");
                    }
                    println!("verdict:    {}", e.verdict);
                    if let Some(r) = e.drop_reason {
                        println!("because:    {r}");
                    }
                    for n in &e.notes {
                        println!("note:       {n}");
                    }
                }
            }
        }
        Command::Monitor { kinds, service, address, count, duration, force, pins } => {
            let watch = lb_agent::monitor::Watch {
                kinds,
                service,
                address,
                count,
                duration: duration.map(|d| std::time::Duration::from_secs(d.0.into())),
                force,
            };
            let mut out = std::io::stdout().lock();
            let lost = match lb_agent::monitor::run(&pins.bpffs, &watch, |e| {
                use std::io::Write;
                match pins.output {
                    Output::Json => writeln!(out, "{}", serde_json::to_string(e)?)?,
                    Output::Table => writeln!(out, "{e}")?,
                }
                // Each line as it happens, also into a pipe.
                out.flush()?;
                Ok(())
            }) {
                Ok(lost) => lost,
                // The reader went away (`lbctl monitor | head`): done, not an error.
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if lost > 0 {
                eprintln!("lbctl: {lost} events lost (the ring buffer was full)");
            }
        }
        Command::Plan { .. } => unreachable!("handled by run"),
    }
    Ok(())
}

fn parse_endpoint(s: &str, default_port: Option<u16>) -> Result<std::net::SocketAddr> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    match (s.trim_matches(['[', ']']).parse::<IpAddr>(), default_port) {
        (Ok(ip), Some(port)) => Ok(std::net::SocketAddr::new(ip, port)),
        _ => anyhow::bail!(
            "{s:?} is not an address{}",
            if default_port.is_some() { "" } else { ":port" }
        ),
    }
}

fn print_conntrack(rows: &[ConntrackRow], output: Output) -> Result<()> {
    match output {
        Output::Json => print_json(&rows)?,
        Output::Table => {
            for r in rows {
                let snat = match (r.snat, r.dsr) {
                    (true, _) => " snat",
                    (_, true) => " dsr",
                    _ => "",
                };
                println!(
                    "{:<8} {} {} -> {}  =>  {} -> {}  [{}{snat}, backend {}, {}, idle {} s, expires in {} s]",
                    r.direction,
                    r.protocol,
                    r.from,
                    r.to,
                    r.new_from,
                    r.new_to,
                    r.state,
                    r.backend_id,
                    r.service,
                    r.idle_s,
                    r.expires_in_s
                );
            }
        }
    }
    Ok(())
}

fn backends(list: &[Backend]) -> String {
    if list.is_empty() {
        return "(none)".into();
    }
    list.iter()
        .map(|b| {
            let mut s = b.socket_addr().to_string();
            if b.local {
                s.push('*');
            }
            if b.terminating {
                s.push('~');
            }
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(out: &PlanOutput) {
    for p in &out.services {
        let port = if p.port_name.is_empty() { String::new() } else { format!(":{}", p.port_name) };
        let mut notes = vec![
            format!("ITP {:?}", p.internal_traffic_policy),
            format!("ETP {:?}", p.external_traffic_policy),
        ];
        if let Some(t) = p.affinity_timeout_s {
            notes.push(format!("affinity {t}s"));
        }
        if !p.source_ranges.is_empty() {
            let r: Vec<String> = p.source_ranges.iter().map(|r| r.to_string()).collect();
            notes.push(format!("source ranges {}", r.join(",")));
        }
        if let Some(h) = p.health_check_node_port {
            notes.push(format!("health check :{h}"));
        }
        println!(
            "{}/{}{port} {} {:?}  ({})",
            p.namespace,
            p.name,
            p.protocol,
            p.family,
            notes.join(", ")
        );
        for f in &p.frontends {
            println!(
                "  {:<12} {:<28} {:<8} -> {:?}",
                format!("{:?}", f.kind),
                std::net::SocketAddr::new(f.address, f.port).to_string(),
                format!("{:?}", f.scope).to_lowercase(),
                f.backends
            );
        }
        println!("  internal backends: {}", backends(&p.internal_backends));
        println!("  cluster backends:  {}", backends(&p.cluster_backends));
        println!("  external backends: {}", backends(&p.external_backends));
        if !p.retained_backends.is_empty() {
            println!("  retained (open flows only): {}", backends(&p.retained_backends));
        }
        if p.cluster_backends.is_empty() {
            println!(
                "  no endpoint: new connections are {}",
                if p.has_any_endpoints { "dropped" } else { "rejected" }
            );
        }
    }
    for s in &out.skipped {
        println!("skipped {}: {}", s.service, s.reason);
    }
    println!("(* local endpoint, ~ terminating)");
}
