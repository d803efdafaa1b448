//! The deploy folder stays true: Kubernetes manifests validate against the schemas
//! (kubernetes-validate, strict, installed by `cargo xtask setup`), the kustomization lists
//! files that exist, the DaemonSet only uses flags the agent has, and the Grafana dashboard only
//! queries metrics the agent exports.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(bin) = lb_tests::setup_tool("kubernetes-validate") else {
        if lb_tests::tools_required() {
            panic!("kubernetes-validate is missing; run `cargo xtask setup`");
        }
        eprintln!("SKIPPED: kubernetes-validate not installed (cargo xtask setup installs it)");
        return;
    };
    let dir = root().join("deploy");
    let files: Vec<PathBuf> =
        ["serviceaccount", "clusterrole", "clusterrolebinding", "configmap", "daemonset"]
            .iter()
            .map(|f| dir.join(format!("kubernetes/{f}.yaml")))
            .chain([dir.join("examples/web.yaml"), dir.join("kind/e2e-workload.yaml")])
            .collect();
    for version in ["1.33.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kustomization_daemonset_flags_and_dashboard_are_consistent() {
    let dir = root().join("deploy");
    let kustomization = std::fs::read_to_string(dir.join("kubernetes/kustomization.yaml")).unwrap();
    let resources: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
        .collect();
    assert_eq!(resources.len(), 5, "{kustomization}");
    for r in resources {
        assert!(dir.join("kubernetes").join(r).exists(), "kustomization lists missing {r}");
    }

    let help = Command::new(lb_tests::workspace_bin("lb-agent")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let ds = std::fs::read_to_string(dir.join("kubernetes/daemonset.yaml")).unwrap();
    for flag in ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split('=').next().unwrap())
    {
        assert!(
            help.contains(&format!("--{flag}")),
            "the DaemonSet passes --{flag}, which lb-agent does not have"
        );
    }

    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    let exported = [
        "lb_syncs_total",
        "lb_sync_duration_seconds_bucket",
        "lb_objects",
        "lb_map_entries",
        "lb_map_capacity",
        "lb_datapath_events_total",
        "lb_datapath_service_packets_total",
        "lb_datapath_service_bytes_total",
        "lb_program_attached",
        "lb_pod_devices_attached",
        "lb_conntrack_gc_removed_entries_total",
        "lb_network_programming_duration_seconds_bucket",
        "lb_services_unprogrammed",
        "lb_sync_last_timestamp_seconds",
        "lb_services_no_local_endpoints",
    ];
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("lb_"))
                .collect();
            assert!(!used.is_empty(), "{expr}");
            for m in used {
                assert!(
                    exported.contains(&m),
                    "dashboard queries {m}, which the agent does not export"
                );
            }
        }
    }
}
