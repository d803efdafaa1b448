//! `lbctl`: the node-level CLI. `lbctl plan` shows, offline, what the agent would program for a
//! folder of manifests.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use lb_agent::{
    config::ModelConfig,
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

#[derive(Subcommand)]
enum Command {
    /// Print what the agent would program for a manifests folder (no kernel needed). Exits 1
    /// when a document was rejected (the rest is still planned).
    Plan {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[arg(long, value_delimiter = ',')]
        nodeport_addresses: Vec<IpNet>,
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan { manifests, node_name, nodeport_addresses, node_ip, output } => {
            let mut cfg = ModelConfig::new(node_name);
            cfg.nodeport_cidrs = nodeport_addresses;
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
    }
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
